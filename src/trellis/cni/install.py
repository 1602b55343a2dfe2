"""`trellis install-cni`: put the plugin and its conflist where a container runtime looks.

The plugin is two files: `trellis`, a three-line launcher run by the fastest interpreter on
the node (Debian's `/usr/bin/python3 -IS` starts in about 6 ms; a shebang passes one
argument, hence the joined flags), and `.trellis/trellis_cni.py`, `trellis.cni.client` with
the agent's socket written in, byte-compiled at install time: importing the cached code is
about 0.8 ms faster per exec than compiling a script. Every file is written to a temporary
name and renamed, so a runtime never reads half a file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from trellis.cni import client

PLUGIN_NAME = "trellis"
MODULE_DIR = ".trellis"
MODULE_NAME = "trellis_cni"
CONFLIST_NAME = "10-trellis.conflist"
NETWORK_NAME = "trellis"
FAST_PYTHON = Path("/usr/bin/python3")
SOCKET_LINE = 'AGENT_SOCKET = "/run/trellis/agent.sock"'


def module_source(agent_socket: Path) -> str:
    """The client module with `agent_socket` written into its AGENT_SOCKET line."""
    source = Path(client.__file__).read_text()
    if SOCKET_LINE not in source:
        raise RuntimeError(f"{client.__file__} lacks the line {SOCKET_LINE!r} to rewrite")
    return source.replace(SOCKET_LINE, f"AGENT_SOCKET = {json.dumps(str(agent_socket))}")


def launcher_source(module_dir: Path, interpreter: Path) -> str:
    return (
        f"#!{interpreter} -IS\n"
        f"# The Trellis CNI plugin, installed by `trellis install-cni`; its code: {module_dir}\n"
        f"import sys\nsys.path.insert(0, {json.dumps(str(module_dir))})\n"
        f"from {MODULE_NAME} import main\nmain()\n"
    )


def conflist(mtu: int = 0, chain: bool = False, version: str = "1.1.0") -> dict[str, Any]:
    """The network config: Trellis, and with `chain` the reference portmap and bandwidth after it.

    The runtime and chained plugins must speak `version`: Debian's reference plugins (1.1.1)
    and podman 4.3's libcni stop at 1.0.0 (docs/design/cni.md, "Running under podman").
    """
    trellis: dict[str, Any] = {"type": PLUGIN_NAME}
    if mtu:
        trellis["mtu"] = mtu
    plugins = [trellis]
    if chain:
        plugins += [
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
            {"type": "bandwidth", "capabilities": {"bandwidth": True}},
        ]
    return {"cniVersion": version, "name": NETWORK_NAME, "plugins": plugins}


def _write_atomic(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)


def install(
    bin_dir: Path,
    conf_dir: Path,
    agent_socket: Path,
    mtu: int = 0,
    chain: bool = False,
    version: str = "1.1.0",
) -> tuple[Path, Path]:
    """Write the plugin (launcher and module) and the conflist; returns their paths."""
    interpreter = FAST_PYTHON if FAST_PYTHON.exists() else Path(sys.executable)
    module_dir = bin_dir / MODULE_DIR
    module = module_dir / f"{MODULE_NAME}.py"
    _write_atomic(module, module_source(agent_socket), 0o644)
    # Compiled by the interpreter that will run it, so the cache matches its version.
    subprocess.run([str(interpreter), "-IS", "-m", "py_compile", str(module)], check=True)
    plugin = bin_dir / PLUGIN_NAME
    _write_atomic(plugin, launcher_source(module_dir, interpreter), 0o755)
    conf = conf_dir / CONFLIST_NAME
    _write_atomic(conf, json.dumps(conflist(mtu, chain, version), indent=2) + "\n", 0o644)
    return plugin, conf
