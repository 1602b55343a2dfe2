"""A throwaway node namespace running a real agent, the installed plugin, and pods, for root tests.

Every namespace made here is named `trlt-<random>` (the node) or `trlt-<random>-p<n>` (its pods),
a prefix no one else uses, and only the names recorded at creation are ever deleted.
`Node.teardown`, which the `node` fixture always runs, kills the agent by its PID, then deletes
every namespace the node made (taking the veths, routes, qdiscs and iptables rules inside along).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers import cni_env, net_conf, stored_allocations, wait_until
from trellis.cni import client
from trellis.cni.install import install
from trellis.dataplane.kernel.netns import NETNS_RUN_DIR, enter, netns_path
from trellis.datastore.sqlite import SqliteDatastore
from trellis.lab.runtime import CniRuntime, Invocation
from trellis.model.ipam import Attachment
from trellis.model.naming import is_host_veth_name
from trellis.model.node import STATUS_FILE

PREFIX = "trlt"
NODE_NAME = "test"
UPLINK = "trlt-up0"
NODE_ADDRESS = ipaddress.IPv4Interface("192.0.2.1/24")
"""The node's uplink address (TEST-NET-1); its default route points at .254 on the same link."""
REFERENCE_PLUGINS = Path("/usr/lib/cni")
AGENT = Path(sys.executable).with_name("trellis")
AGENT_READY_TIMEOUT_S = 30.0


def run(*cmd: str) -> str:
    """Run a command, failing with its stderr; returns its stdout."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def ip_json(netns: str, *args: str) -> list[dict[str, Any]]:
    """`ip -j -n NETNS ARGS...`, parsed."""
    out: list[dict[str, Any]] = json.loads(run("ip", "-j", "-n", netns, *args) or "[]")
    return out


@dataclass(frozen=True)
class Pod:
    """A pod's network namespace and the container ID the runtime uses for it."""

    netns: str
    container_id: str
    ifname: str = "eth0"

    @property
    def path(self) -> str:
        return netns_path(self.netns)

    @property
    def attachment(self) -> Attachment:
        return Attachment(self.container_id, self.ifname)

    def addresses(self) -> set[str]:
        """IPv4 addresses on the pod's interface, as `a.b.c.d/len`."""
        links = ip_json(self.netns, "-4", "addr", "show", "dev", self.ifname)
        return {f"{a['local']}/{a['prefixlen']}" for link in links for a in link["addr_info"]}


class Node:
    """A node namespace with an uplink, an agent serving it and the plugin installed for it."""

    def __init__(self, workdir: Path) -> None:
        self.tag = secrets.token_hex(3)
        self.netns = f"{PREFIX}-{self.tag}"
        self.dir = workdir
        self.socket = workdir / "agent.sock"
        self.bin_dir = workdir / "bin"
        self.plugin, self.conflist = install(self.bin_dir, workdir / "net.d", self.socket)
        self.runtime = self.runtime_for(self.conflist)
        self.agent: subprocess.Popen[bytes] | None = None
        self._namespaces: list[str] = []
        self._pods = 0

    # -- set-up and teardown ---------------------------------------------------------------

    def _create_netns(self, names: list[str]) -> None:
        self._namespaces += names  # recorded first: a half-made batch is cleaned up as well
        subprocess.run(
            ["ip", "-batch", "-"], input="".join(f"netns add {n}\n" for n in names), text=True, check=True
        )

    def build(self) -> None:
        """The node namespace: lo up, an uplink veth pair with an address and a default route,
        forwarding on (proxy ARP answers only on a forwarding interface); then the agent."""
        self._create_netns([self.netns])
        for args in (
            "link set lo up",
            f"link add {UPLINK} type veth peer name trlt-up1",
            f"link set {UPLINK} up",
            "link set trlt-up1 up",
            f"addr add {NODE_ADDRESS} dev {UPLINK}",
            f"route add default via {NODE_ADDRESS.network[-2]} dev {UPLINK}",
        ):
            run("ip", "-n", self.netns, *args.split())
        self.exec_in_node("sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.start_agent()

    def teardown(self) -> None:
        """End the runtime's exec threads, kill the agent by its PID, delete every namespace made."""
        self.runtime.close()
        if self.agent is not None:
            self.stop_agent(signal.SIGKILL)
        failures = delete_namespaces(reversed(self._namespaces))
        assert not failures, f"could not delete namespaces: {failures}"

    # -- the agent -------------------------------------------------------------------------

    def start_agent(self) -> None:
        """Start `trellis agent` inside the node namespace and wait until STATUS answers 0."""
        with (self.dir / "agent.log").open("ab") as log:
            self.agent = subprocess.Popen(
                [
                    str(AGENT),
                    "agent",
                    "--node",
                    NODE_NAME,
                    "--socket",
                    str(self.socket),
                    "--state-dir",
                    str(self.dir),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                # setns between fork and exec: it takes no lock a thread could hold
                preexec_fn=functools.partial(enter, self.netns),  # noqa: PLW1509
            )
        wait_until(self._agent_ready, AGENT_READY_TIMEOUT_S, f"the agent of {self.netns} to be ready")

    def _agent_ready(self) -> bool:
        assert self.agent is not None
        if self.agent.poll() is not None:
            log = (self.dir / "agent.log").read_text(errors="replace")[-3000:]
            raise AssertionError(f"agent exited with status {self.agent.returncode}:\n{log}")
        code, _ = client.run(cni_env("STATUS"), net_conf(), str(self.socket))
        return code == 0

    def stop_agent(self, sig: signal.Signals) -> int:
        """Send `sig` to the agent's PID and reap it; returns its exit status."""
        assert self.agent is not None
        agent, self.agent = self.agent, None
        agent.send_signal(sig)
        try:
            return agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            return agent.wait()

    # -- pods and the plugin ---------------------------------------------------------------

    def new_pods(self, count: int) -> list[Pod]:
        """`count` fresh pod namespaces, each with its own container ID."""
        numbers = range(self._pods, self._pods + count)
        self._pods += count
        pods = [Pod(f"{self.netns}-p{n}", f"ctr-{self.tag}-{n}") for n in numbers]
        self._create_netns([pod.netns for pod in pods])
        return pods

    def new_pod(self) -> Pod:
        (pod,) = self.new_pods(1)
        return pod

    def delete_netns(self, pod: Pod) -> None:
        """Delete a pod's namespace, as a runtime does when the sandbox is gone."""
        run("ip", "netns", "del", pod.netns)

    def runtime_for(self, conflist: Path) -> CniRuntime:
        """A libcni-style runtime for `conflist`: plugins from the install dir and /usr/lib/cni."""
        return CniRuntime(conflist, [self.bin_dir, REFERENCE_PLUGINS], self.dir / "cache", self.netns)

    def cni(self, command: str, pod: Pod | None = None, conf: bytes | None = None, **env: str) -> Invocation:
        """Exec the installed plugin once, in the node namespace, as a runtime does."""
        if pod is not None:
            env = {"CNI_CONTAINERID": pod.container_id, "CNI_NETNS": pod.path, **env}
        full_env = cni_env(command, CNI_PATH=str(self.bin_dir), **env)
        return self.runtime.exec_plugin(self.plugin, full_env, net_conf() if conf is None else conf)

    # -- what the node holds ---------------------------------------------------------------

    @property
    def netns_path(self) -> str:
        return netns_path(self.netns)

    def exec_in_node(self, *cmd: str) -> str:
        return run("ip", "netns", "exec", self.netns, *cmd)

    def host_veths(self) -> set[str]:
        """Names of the Trellis host veths in the node namespace."""
        return {
            link["ifname"]
            for link in ip_json(self.netns, "link", "show", "type", "veth")
            if is_host_veth_name(link["ifname"])
        }

    def wait_programmed(self) -> None:
        """Wait until the agent's kernel reflects the datastore as it is now (its status.json)."""
        store = SqliteDatastore(self.dir / "trellis.db")
        try:
            revision = store.snapshot("/trellis/").revision
        finally:
            store.close()

        def programmed() -> bool:
            try:
                return int(json.loads((self.dir / STATUS_FILE).read_text())["revision"]) >= revision
            except (FileNotFoundError, ValueError, KeyError):
                return False

        wait_until(
            programmed, AGENT_READY_TIMEOUT_S, f"the agent of {self.netns} to program revision {revision}"
        )

    def allocations(self) -> dict[Attachment, str]:
        """The datastore's allocations of this node, each as `a.b.c.d/32`; fails on a duplicate."""
        store = SqliteDatastore(self.dir / "trellis.db")
        try:
            stored = stored_allocations(store)
        finally:
            store.close()
        addresses = [str(address) for _, address, _ in stored]
        assert len(addresses) == len(set(addresses)), f"an address is allocated twice: {sorted(addresses)}"
        mine = {attachment: f"{address}/32" for node, address, attachment in stored if node == NODE_NAME}
        assert len(mine) == len(stored), "an attachment holds two addresses, or a block is not this node's"
        return mine


def delete_namespaces(names: Iterable[str]) -> list[str]:
    """Delete each namespace that still exists; returns one line per one that would not go."""
    failures = []
    for name in names:
        if (NETNS_RUN_DIR / name).exists():
            proc = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                failures.append(f"{name}: {proc.stderr.strip()}")
    return failures
