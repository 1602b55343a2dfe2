"""`trellis install-cni`: put the plugin and its conflist where a container runtime looks.

The plugin is `trellis.cni.client` copied as one file, with the agent's socket written in,
and run by the fastest interpreter on the node: Debian's `/usr/bin/python3 -IS` starts in
about 6 ms (a shebang passes one argument, hence the joined flags). Both files are written
to a temporary name and renamed, so a runtime never reads half a file.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from trellis.cni import client

PLUGIN_NAME = "trellis"
CONFLIST_NAME = "10-trellis.conflist"
NETWORK_NAME = "trellis"
FAST_PYTHON = Path("/usr/bin/python3")
SOCKET_LINE = 'AGENT_SOCKET = "/run/trellis/agent.sock"'


def plugin_source(agent_socket: Path, python: Path | None = None) -> str:
    source = Path(client.__file__).read_text()
    if SOCKET_LINE not in source:
        raise RuntimeError(f"{client.__file__} lacks the line {SOCKET_LINE!r} to rewrite")
    interpreter = python or (FAST_PYTHON if FAST_PYTHON.exists() else Path(sys.executable))
    body = source.replace(SOCKET_LINE, f"AGENT_SOCKET = {json.dumps(str(agent_socket))}")
    return f"#!{interpreter} -IS\n# Installed by `trellis install-cni`; do not edit.\n{body}"


def conflist(mtu: int = 0, chain: bool = False, version: str = "1.1.0") -> dict[str, Any]:
    """The network config: Trellis, and with `chain` the reference portmap and bandwidth after it.

    Chained plugins must speak `version`: Debian's reference plugins (1.1.1) stop at 1.0.0.
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
    """Write the plugin and the conflist; returns their paths."""
    plugin = bin_dir / PLUGIN_NAME
    _write_atomic(plugin, plugin_source(agent_socket), 0o755)
    conf = conf_dir / CONFLIST_NAME
    _write_atomic(conf, json.dumps(conflist(mtu, chain, version), indent=2) + "\n", 0o644)
    return plugin, conf
