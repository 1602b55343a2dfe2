"""`trellis install-cni`: the installed plugin file runs on its own, as a runtime execs it (no root)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import cni_env, cni_error, net_conf
from trellis.cni import client
from trellis.cni.install import conflist, install, launcher_source, module_source


def test_module_carries_the_socket_and_the_launcher_a_fast_shebang(tmp_path: Path) -> None:
    """The module names the agent socket it was installed for; the launcher runs `python -IS`."""
    source = module_source(tmp_path / "x.sock")
    assert f'AGENT_SOCKET = "{tmp_path}/x.sock"' in source
    assert 'AGENT_SOCKET = "/run/trellis/agent.sock"' not in source
    first, *_ = launcher_source(tmp_path / ".trellis", Path("/usr/bin/python3")).splitlines()
    assert first == "#!/usr/bin/python3 -IS"


@pytest.mark.parametrize("chain", [False, True])
def test_conflist_chains_portmap_and_bandwidth_on_request(chain: bool) -> None:
    """The conflist holds Trellis first, then portmap and bandwidth with their capabilities."""
    conf = conflist(mtu=1400, chain=chain, version="1.0.0")
    assert (conf["cniVersion"], conf["name"]) == ("1.0.0", "trellis")
    types = [plugin["type"] for plugin in conf["plugins"]]
    assert types == (["trellis", "portmap", "bandwidth"] if chain else ["trellis"])
    assert conf["plugins"][0] == {"type": "trellis", "mtu": 1400}
    capabilities = {k for plugin in conf["plugins"] for k in plugin.get("capabilities", {})}
    assert capabilities == ({"portMappings", "bandwidth"} if chain else set())


def test_install_writes_an_executable_plugin_and_a_readable_conflist(tmp_path: Path) -> None:
    """The files land in place (no temporary left) with modes 0755 and 0644, the module compiled."""
    plugin, conf = install(tmp_path / "bin", tmp_path / "net.d", tmp_path / "agent.sock")
    assert plugin == tmp_path / "bin" / "trellis" and conf.name == "10-trellis.conflist"
    assert plugin.stat().st_mode & 0o777 == 0o755 and conf.stat().st_mode & 0o777 == 0o644
    assert json.loads(conf.read_text()) == conflist()
    assert sorted(p.name for p in (tmp_path / "bin").iterdir()) == [".trellis", "trellis"]
    assert list((tmp_path / "bin" / ".trellis" / "__pycache__").glob("trellis_cni.*.pyc"))


def _exec(plugin: Path, env: dict[str, str], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    """Exec the plugin as a runtime does: a clean environment plus the CNI variables, config on stdin."""
    return subprocess.run(
        [str(plugin)], input=stdin, env={"PATH": os.environ["PATH"], **env}, capture_output=True, check=False
    )


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    """The plugin installed for an agent socket nobody listens on."""
    plugin, _ = install(tmp_path / "bin", tmp_path / "net.d", tmp_path / "agent.sock")
    return plugin


def test_installed_plugin_answers_version_itself(installed: Path) -> None:
    """exec'd with CNI_COMMAND=VERSION, the file prints the supported versions and exits 0."""
    proc = _exec(installed, {"CNI_COMMAND": "VERSION"}, b"")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "cniVersion": "1.1.0",
        "supportedVersions": list(client.SUPPORTED_VERSIONS),
    }


@pytest.mark.parametrize(("command", "expected"), [("ADD", 11), ("CHECK", 11), ("STATUS", 50)])
def test_installed_plugin_without_agent_is_11_or_50(installed: Path, command: str, expected: int) -> None:
    """exec'd with no agent at its socket, the file exits 1 with code 11 (50 for STATUS)."""
    proc = _exec(installed, cni_env(command), net_conf())
    assert proc.returncode == 1, proc.stderr
    code, msg = cni_error(proc.stdout)
    assert code == expected and str(installed.parent.parent / "agent.sock") in msg
