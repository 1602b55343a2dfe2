"""One node for CNI benchmarks: a namespace with an uplink, the installed `trellis` plugin, its
agent, and Debian's reference `bridge` + `host-local` beside it.

cni_latency, cni_concurrency and agent_restart measure on this same node, so their figures
compare. The uplink (a veth to a second namespace, an address and a default route) gives the
host veths' proxy ARP for 169.254.1.1 a route to answer for. Everything lives in the run's
`Scratch`: its namespaces, its temporary directory, and the agents, ended by PID at teardown.
"""

from __future__ import annotations

import functools
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from common.host import Scratch, ip
from common.lab import TRELLIS
from trellis.cni.install import install
from trellis.dataplane.kernel.netns import enter
from trellis.lab.runtime import CniRuntime, PluginError

REFERENCE_CNI_PATH = Path("/usr/lib/cni")
REFERENCE_SUBNET = "10.250.0.0/16"
"""host-local's range for the reference; apart from Trellis' default pool 10.244.0.0/16."""
UPLINK_NET = "192.0.2"
"""TEST-NET-1: the node's uplink is .2, its default gateway .1 in the second namespace."""
AGENT_READY_S = 30.0
"""How long an agent may take to answer CNI STATUS after its start (seconds)."""


@dataclass(frozen=True)
class CniNode:
    """Node namespace `netns` of `run`, with the `trellis` plugin installed in `bin_dir`."""

    run: Scratch
    netns: str
    bin_dir: Path
    plugin: Path
    conflist: Path
    socket: Path
    """The agent's socket, which the plugin's conflist names."""

    def start_agent(self) -> tuple[subprocess.Popen[bytes], Path]:
        """Start `trellis agent` inside the node (ended by PID at teardown); returns it and its log.

        The log is appended to: an agent started again after a kill keeps its predecessor's lines.
        """
        log = self.run.tmp / "agent.log"
        argv = [TRELLIS, "agent", "--node", "bench", "--socket", str(self.socket)]
        with log.open("ab") as out:
            agent = subprocess.Popen(
                [*argv, "--state-dir", str(self.run.tmp)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=functools.partial(enter, self.netns),  # noqa: PLW1509 - no other thread runs yet
            )
        return self.run.track(agent), log

    def trellis(self, in_node: bool = True) -> CniRuntime:
        """A runtime for the `trellis` plugin; exec'ing from the node's namespace unless `in_node`
        is False (the caller's threads entered it themselves)."""
        return CniRuntime(self.conflist, [self.bin_dir], self.run.tmp / "cache-trellis", self._in(in_node))

    def reference(self, in_node: bool = True) -> CniRuntime:
        """A runtime for the reference `bridge` + `host-local`, as `trellis()` for its plugin."""
        conflist = reference_conflist(self.conflist.parent, self.run.tmp / "host-local")
        return CniRuntime(conflist, [REFERENCE_CNI_PATH], self.run.tmp / "cache-reference", self._in(in_node))

    def _in(self, in_node: bool) -> str | None:
        return self.netns if in_node else None


def cni_node(run: Scratch) -> CniNode:
    """The node namespace (lo up, uplink `trlb-up` with an address and a default route) and the
    plugin installed in `run.tmp/bin`, its conflist in `run.tmp/net.d`; no agent yet."""
    node = run.netns("node")
    gateway = run.netns("gw")
    ip("-n", node, "link", "add", "trlb-up", "type", "veth", "peer", "name", "trlb-down", "netns", gateway)
    for netns, ifname, host in ((node, "trlb-up", 2), (gateway, "trlb-down", 1)):
        ip("-n", netns, "addr", "add", f"{UPLINK_NET}.{host}/24", "dev", ifname)
        ip("-n", netns, "link", "set", ifname, "up")
    ip("-n", node, "route", "add", "default", "via", f"{UPLINK_NET}.1")
    bin_dir, socket = run.tmp / "bin", run.tmp / "agent.sock"
    plugin, conflist = install(bin_dir, run.tmp / "net.d", socket)
    return CniNode(run, node, bin_dir, plugin, conflist, socket)


def wait_ready(agent: subprocess.Popen[bytes], runtime: CniRuntime, log: Path) -> None:
    """Poll CNI STATUS through the plugin until the agent answers, or fail at the deadline."""
    deadline = time.monotonic() + AGENT_READY_S
    while True:
        if agent.poll() is not None:
            tail = log.read_text()[-2000:]
            raise RuntimeError(f"trellis agent exited with {agent.returncode}:\n{tail}")
        try:
            runtime.status()
            return
        except PluginError as err:
            if time.monotonic() > deadline:
                raise RuntimeError(f"trellis agent not ready after {AGENT_READY_S:.0f} s: {err}") from None
        time.sleep(0.05)


def reference_conflist(conf_dir: Path, data_dir: Path) -> Path:
    """`bridge` (gateway on the bridge, no masquerade) with `host-local` IPAM, at cniVersion 1.0.0."""
    conf = {
        "cniVersion": "1.0.0",
        "name": "trlb-ref",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "trlb-br0",
                "isGateway": True,
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": REFERENCE_SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(data_dir),
                },
            }
        ],
    }
    path = conf_dir / "20-trlb-ref.conflist"
    path.write_text(json.dumps(conf, indent=2) + "\n")
    return path
