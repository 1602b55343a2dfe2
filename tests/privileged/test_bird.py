"""BIRD for real: three node namespaces on one bridge, each with a BIRD started by `Bird` from
rendered configs, exchanging routes in a full mesh; a reconfigure withdraws a removed node's
block; restarts (a crash, and an agent's stop and start) lose no route at the peers.

Namespaces are `trlg-<random>-*`, deleted afterwards even on failure; every BIRD started is
stopped by its supervisor and, should one survive, killed by its PID.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import wait_until
from tests.privileged.nodes import delete_namespaces, ip_json, run
from trellis.bgp.bird import Bird, BirdControl, BirdError
from trellis.calc.bgp import BGPObjects, DesiredBGP, compute_bgp
from trellis.dataplane.kernel.netns import netns_path
from trellis.model.node import Node

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(shutil.which("bird") is None, reason="needs BIRD 2 (`make setup` installs bird2)"),
]

POOLS = (ipaddress.IPv4Network("10.244.0.0/16"),)
NAMES = ("node-1", "node-2", "node-3")
CONVERGE_S = 30.0
WITHDRAW_S = 10.0


def underlay(i: int) -> ipaddress.IPv4Interface:
    return ipaddress.IPv4Interface(f"192.0.2.{10 + i}/24")


def block(i: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"10.244.{i}.0/26")


class Mesh:
    """A fabric namespace with a bridge, and per node a namespace, a veth onto the bridge and a BIRD."""

    def __init__(self) -> None:
        self.tag = os.urandom(3).hex()
        self.fabric = f"trlg-{self.tag}-fab"
        self.dir = Path(tempfile.mkdtemp(prefix="trlg"))  # short: a control socket path has 107 bytes
        self.nodes = {name: Node(name, underlay(i)) for i, name in enumerate(NAMES, start=1)}
        self.netns = {name: f"trlg-{self.tag}-{name}" for name in NAMES}
        self.birds: dict[str, Bird] = {}
        self.pids: set[int] = set()
        self._namespaces: list[str] = []

    def build(self) -> None:
        self._namespaces += [
            self.fabric,
            *self.netns.values(),
        ]  # recorded first: a half-made lab is removed too
        batch = "".join(f"netns add {n}\n" for n in self._namespaces)
        subprocess.run(["ip", "-batch", "-"], input=batch, text=True, check=True)
        run("ip", "-n", self.fabric, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.fabric, "link", "set", "br0", "up")
        for i, name in enumerate(NAMES, start=1):
            ns = self.netns[name]
            run(
                "ip",
                "link",
                "add",
                "eth0",
                "netns",
                ns,
                "type",
                "veth",
                "peer",
                "name",
                f"n{i}",
                "netns",
                self.fabric,
            )
            run("ip", "-n", self.fabric, "link", "set", f"n{i}", "master", "br0", "up")
            run("ip", "-n", ns, "addr", "add", str(underlay(i)), "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
            state_dir = self.dir / name
            state_dir.mkdir()
            self.birds[name] = Bird(state_dir, netns=netns_path(ns), restart_delay_s=0.2)

    def teardown(self) -> None:
        for bird in self.birds.values():
            pid = bird.status().pid
            if pid is not None:
                self.pids.add(pid)
            bird.stop()
        for pid in self.pids:  # none should be left; kill by PID any that is
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
        failures = delete_namespaces(reversed(self._namespaces))
        shutil.rmtree(self.dir, ignore_errors=True)
        assert not failures, f"could not delete namespaces: {failures}"

    # -- desired state and what the kernels hold -------------------------------------------

    def desired(self, name: str, members: tuple[str, ...] = NAMES) -> DesiredBGP:
        nodes = {n: self.nodes[n] for n in members}
        blocks = [(block(NAMES.index(n) + 1), n) for n in members]
        return compute_bgp(self.nodes[name], nodes, blocks, POOLS, BGPObjects())

    def apply(self, members: tuple[str, ...] = NAMES) -> None:
        for name in members:
            self.birds[name].apply(self.desired(name, members))
            pid = self.birds[name].status().pid
            assert pid is not None
            self.pids.add(pid)

    def bird_routes(self, name: str) -> dict[str, str]:
        """The node's `proto bird` routes with a gateway: destination -> gateway."""
        routes = ip_json(self.netns[name], "-4", "route", "show", "proto", "bird")
        return {r["dst"]: r["gateway"] for r in routes if "gateway" in r}

    def expected_routes(self, name: str, members: tuple[str, ...] = NAMES) -> dict[str, str]:
        return {
            str(block(NAMES.index(other) + 1)): str(self.nodes[other].underlay.ip)
            for other in members
            if other != name
        }

    def converged(self, members: tuple[str, ...] = NAMES) -> bool:
        return all(self.bird_routes(name) == self.expected_routes(name, members) for name in members)

    def established(self, name: str, sessions: int) -> bool:
        bgp = [p for p in self.birds[name].status().protocols if p.proto == "BGP"]
        return len(bgp) == sessions and all(p.established for p in bgp)


@pytest.fixture
def mesh() -> Iterator[Mesh]:
    made = Mesh()
    try:
        made.build()
        made.apply()
        wait_until(made.converged, CONVERGE_S, "every node to hold proto bird routes to the other blocks")
        yield made
    finally:
        made.teardown()


def answers(control: BirdControl) -> bool:
    try:
        control.command("show status")
    except (OSError, BirdError):
        return False
    return True


def recovered(control: BirdControl) -> bool:
    """BIRD started with -R defers kernel changes until its recovery ends (its sessions have
    sent everything, or the recovery wait ran out)."""
    status = control.command("show status")
    return not any("Graceful restart recovery in progress" in text for _, text in status)


class Watch:
    """Samples, until stopped, whether each node still holds its routes to the other blocks."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.samples = 0
        self.missing: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for name in NAMES:
                held = self.mesh.bird_routes(name)
                for dst, gateway in self.mesh.expected_routes(name).items():
                    if held.get(dst) != gateway:
                        self.missing.append((name, dst))
            self.samples += 1


def test_mesh_exchanges_blocks_and_a_reconfigure_withdraws_a_removed_node(mesh: Mesh) -> None:
    """Converged (the fixture): each node holds the others' blocks via their underlay addresses,
    `proto bird`, and its own block as a blackhole. Then node-3 leaves the cluster: the others are
    reconfigured (not restarted) and drop its block within seconds, keeping each other's."""
    for name in NAMES:
        assert mesh.established(name, sessions=2)
        own = ip_json(mesh.netns[name], "-4", "route", "show", "proto", "bird", "type", "blackhole")
        assert [r["dst"] for r in own] == [str(block(NAMES.index(name) + 1))]
    pids = {name: mesh.birds[name].status().pid for name in NAMES}

    remaining = ("node-1", "node-2")
    mesh.apply(remaining)
    wait_until(
        lambda: mesh.converged(remaining), WITHDRAW_S, "node-3's block to be withdrawn from node-1 and node-2"
    )
    assert {name: mesh.birds[name].status().pid for name in NAMES} == pids  # configured, never restarted
    assert [p.name for p in mesh.birds["node-1"].status().protocols if p.proto == "BGP"] == [
        "mesh_192_0_2_12"
    ]


def test_a_crashed_bird_is_restarted_and_its_peers_keep_its_routes(mesh: Mesh) -> None:
    """SIGKILL node-1's BIRD: the supervisor starts it again with -R; meanwhile its peers hold its
    block as stale (graceful restart) and its own kernel keeps theirs (persist)."""
    bird = mesh.birds["node-1"]
    old = bird.status().pid
    assert old is not None
    with Watch(mesh) as watch:
        os.kill(old, signal.SIGKILL)
        wait_until(
            lambda: bird.status().pid not in (None, old), CONVERGE_S, "node-1's BIRD to be started again"
        )
        new = bird.status().pid
        assert new is not None
        mesh.pids.add(new)
        wait_until(
            lambda: all(mesh.established(name, sessions=2) for name in NAMES),
            CONVERGE_S,
            "every session to be established again",
        )
        wait_until(mesh.converged, CONVERGE_S, "the routes to settle")
    assert watch.samples > 20 and watch.missing == []


def test_stop_and_a_new_supervisor_lose_no_route(mesh: Mesh) -> None:
    """An agent's stop() closes BIRD with `graceful restart`: nothing is withdrawn while it is
    away, and the next agent's supervisor starts BIRD with recovery (-R)."""
    state_dir = mesh.dir / "node-1"
    with Watch(mesh) as watch:
        mesh.birds["node-1"].stop()
        assert not (state_dir / "bird.pid").exists()  # BIRD removes it when it exits cleanly
        again = mesh.birds["node-1"] = Bird(state_dir, netns=netns_path(mesh.netns["node-1"]))
        assert again.apply(mesh.desired("node-1"))
        pid = again.status().pid
        assert pid is not None
        mesh.pids.add(pid)
        assert b"-R" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        wait_until(lambda: mesh.established("node-1", sessions=2), CONVERGE_S, "node-1's sessions")
        wait_until(mesh.converged, CONVERGE_S, "the routes to settle")
    assert watch.samples > 20 and watch.missing == []


def test_a_new_supervisor_adopts_a_bird_left_running(mesh: Mesh) -> None:
    """A BIRD left running (as by an agent that was killed) is adopted by the next supervisor,
    which reconfigures it instead of starting another, and stops it in the end."""
    state_dir = mesh.dir / "node-1"
    mesh.birds["node-1"].stop()
    left = subprocess.Popen(
        [
            "nsenter",
            f"--net={netns_path(mesh.netns['node-1'])}",
            "bird",
            "-f",
            "-R",
            "-c",
            str(state_dir / "bird.conf"),
            "-s",
            str(state_dir / "bird.ctl"),
            "-P",
            str(state_dir / "bird.pid"),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    mesh.pids.add(left.pid)
    again = mesh.birds["node-1"] = Bird(state_dir, netns=netns_path(mesh.netns["node-1"]))
    wait_until(lambda: answers(again.control), CONVERGE_S, "the left-over BIRD to answer")
    wait_until((state_dir / "bird.pid").exists, CONVERGE_S, "the left-over BIRD's pid file")

    assert again.apply(mesh.desired("node-1"))
    assert again.status().pid == left.pid
    wait_until(lambda: recovered(again.control), CONVERGE_S, "the left-over BIRD to end its recovery")
    assert again.apply(mesh.desired("node-1", ("node-1", "node-2")))  # a reconfigure, through its socket
    wait_until(
        lambda: str(block(3)) not in mesh.bird_routes("node-1"), WITHDRAW_S, "node-1 to drop node-3's block"
    )
    assert again.status().pid == left.pid
    again.stop()
    assert left.wait(timeout=10) == 0
