"""Many pods at once, and an agent SIGKILLed in the middle of bursts of them.

The crash test runs `TRELLIS_CRASH_ROUNDS` rounds (default 5; `make crash` runs many more).
Each round's kill point comes from a seeded RNG: the seed is printed, and a failing run is
replayed with `TRELLIS_CRASH_SEED=<seed>`. The kill point is random on purpose; nothing waits
on time for correctness: the assertions hold wherever the kill lands.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import wait_until
from tests.privileged.nodes import Node, Pod, ip_json
from trellis.dataplane.kernel.netns import enter
from trellis.lab.runtime import CniRuntime, PluginError
from trellis.model.ipam import Attachment
from trellis.model.naming import ROUTE_PROTOCOL, host_veth_name

pytestmark = pytest.mark.privileged

CRASH_ROUNDS = int(os.environ.get("TRELLIS_CRASH_ROUNDS", "5"))
ADDS_PER_ROUND = 24
DELS_PER_ROUND = 12
"""At most this many live pods are deleted per round, in the same burst as its ADDs."""
CRASH_WORKERS = 8
"""Requests in flight at once in a crash round (a runtime's own concurrency)."""
MAX_KILL_DELAY_S = 0.02
"""The kill lands a random 0..this many seconds after a random number of requests completed."""
FORGET = 0.5
"""Chance that the runtime lost track of a failed request and leaves it to GC instead of a DEL."""
CUT = "malformed reply"
"""Words of the plugin's error when the agent died holding the request (not: was already gone)."""


class Burst:
    """CNI requests run by `workers` threads that entered the node's namespace, as a runtime's
    exec workers do; the first `workers` start together. Each outcome is recorded."""

    def __init__(self, node: Node, requests: list[tuple[str, Pod]], workers: int) -> None:
        # No namespace given: the runtime execs in the calling thread, which entered the node's.
        self._runtime = CniRuntime(node.conflist, [node.bin_dir], node.dir / "cache")
        self.added: dict[Attachment, str] = {}
        self.deleted: set[Attachment] = set()
        self.failed: dict[Attachment, PluginError] = {}
        self._lock = threading.Lock()
        start = threading.Barrier(min(workers, len(requests)), timeout=120)

        def ready() -> None:
            enter(node.netns)
            start.wait()

        self._pool = ThreadPoolExecutor(max_workers=workers, initializer=ready)
        self._futures = [self._pool.submit(self._run, command, pod) for command, pod in requests]

    def _run(self, command: str, pod: Pod) -> None:
        try:
            if command == "ADD":
                result = self._runtime.add(pod.container_id, pod.path)
            else:
                self._runtime.delete(pod.container_id, pod.path)
        except PluginError as err:
            with self._lock:
                self.failed[pod.attachment] = err
            return
        with self._lock:
            if command == "ADD":
                self.added[pod.attachment] = str(result["ips"][0]["address"])
            else:
                self.deleted.add(pod.attachment)

    @property
    def completed(self) -> int:
        with self._lock:
            return len(self.added) + len(self.deleted) + len(self.failed)

    def finish(self) -> None:
        """Wait for every request; re-raise anything but a plugin error."""
        self._pool.shutdown(wait=True)
        for future in self._futures:
            future.result()


def test_200_adds_at_once_get_200_distinct_addresses(node: Node) -> None:
    """200 ADDs started together all succeed, with 200 different addresses, as stored and as plumbed."""
    pods = node.new_pods(200)
    burst = Burst(node, [("ADD", pod) for pod in pods], workers=200)
    burst.finish()
    assert burst.failed == {}
    assert len(set(burst.added.values())) == 200
    assert node.allocations() == burst.added
    assert node.host_veths() == {host_veth_name(pod.attachment) for pod in pods}


def pod_routes(node: Node) -> set[tuple[str, str]]:
    """(destination, device) of every Trellis route in the node without a gateway: the pods' /32s."""
    routes = ip_json(node.netns, "-4", "route", "show", "proto", str(ROUTE_PROTOCOL))
    return {(f"{r['dst']}/32", r["dev"]) for r in routes if "gateway" not in r}


def assert_node_holds_exactly(node: Node, live: dict[Attachment, tuple[Pod, str]], replay: str) -> None:
    """IPAM, host veths, pod routes and pod interfaces agree with the runtime's live pods, and
    with nothing else: no leaked or duplicate address, no orphan veth, no stale route."""
    wanted = {attachment: address for attachment, (_, address) in live.items()}
    stored = node.allocations()  # fails on an address held twice
    leaked = {a: address for a, address in stored.items() if a not in wanted}
    assert not leaked, f"addresses of no live pod: {leaked} ({replay})"
    assert stored == wanted, f"IPAM differs from the live pods ({replay})"
    assert node.host_veths() == {host_veth_name(a) for a in live}, f"orphan or missing host veths ({replay})"
    assert pod_routes(node) == {(address, host_veth_name(a)) for a, address in wanted.items()}, replay
    for attachment, (pod, address) in live.items():
        assert pod.addresses() == {address}, f"{attachment}: interface differs from IPAM ({replay})"


class CrashRounds:
    """The runtime's side of the crash test: the pods it believes live, and what happened."""

    def __init__(self, node: Node, seed: int) -> None:
        self.node = node
        self.seed = seed
        self.replay = f"replay: TRELLIS_CRASH_SEED={seed}"
        self.live: dict[Attachment, tuple[Pod, str]] = {}
        self.totals: Counter[str] = Counter()

    def run(self, round_: int) -> None:
        """ADD fresh pods and DEL some live ones at once, kill the agent at a random point,
        start it again, recover as a runtime does, and check the node holds exactly what lives.

        The round's RNG is seeded by (seed, round) and draws the kill point first, so a replay
        kills at the same point of each round's burst, whatever the rounds before it did.
        """
        rng = random.Random(f"{self.seed}/{round_}")
        kill_at, delay_s = rng.random(), rng.uniform(0, MAX_KILL_DELAY_S)
        removing = [
            self.live[a][0] for a in rng.sample(sorted(self.live), min(len(self.live), DELS_PER_ROUND))
        ]
        requests = [("ADD", pod) for pod in self.node.new_pods(ADDS_PER_ROUND)]
        requests += [("DEL", pod) for pod in removing]
        rng.shuffle(requests)
        # A wave of requests is still to come when the kill is due.
        kill_after = int(kill_at * (len(requests) - CRASH_WORKERS))
        print(
            f"round {round_}: kill after {kill_after} of {len(requests)} requests + {delay_s * 1000:.1f} ms"
        )
        burst = self._kill_mid_burst(requests, kill_after, delay_s)
        assert {err.code for err in burst.failed.values()} <= {11}, f"{burst.failed} ({self.replay})"
        assert len(set(burst.added.values())) == len(burst.added), f"an address given twice ({self.replay})"
        self.node.start_agent()
        forgotten = self._recover(requests, burst, rng)
        assert_node_holds_exactly(self.node, self.live, f"round {round_}, {self.replay}")
        for _, pod in requests:
            if pod.attachment not in self.live:
                self.node.delete_netns(pod)
        self.totals.update(
            ADD=ADDS_PER_ROUND,
            DEL=len(removing),
            failed=len(burst.failed),
            cut_in_flight=sum(CUT in err.msg for err in burst.failed.values()),
            left_to_gc=forgotten,
        )

    def _kill_mid_burst(self, requests: list[tuple[str, Pod]], kill_after: int, delay_s: float) -> Burst:
        burst = Burst(self.node, requests, CRASH_WORKERS)
        wait_until(lambda: burst.completed >= kill_after, 60, f"{kill_after} requests to complete")
        time.sleep(delay_s)  # the random kill point, not synchronisation
        self.node.stop_agent(signal.SIGKILL)
        burst.finish()
        return burst

    def _recover(self, requests: list[tuple[str, Pod]], burst: Burst, rng: random.Random) -> int:
        """DEL each request that failed, but those the runtime lost track of (as after its own
        crash), then GC with the pods it keeps, which must collect those; returns their number."""
        self.live.update(
            {a: (pod, burst.added[a]) for _, pod in requests if (a := pod.attachment) in burst.added}
        )
        forgotten = 0
        for command, pod in requests:
            if pod.attachment in burst.failed:
                if rng.random() < FORGET:
                    forgotten += 1
                else:
                    self.node.runtime.delete(pod.container_id, pod.path)
            if command == "DEL" or pod.attachment in burst.failed:
                self.live.pop(pod.attachment, None)
        self.node.runtime.gc([(a.container_id, a.ifname) for a in self.live])
        return forgotten


def test_agent_killed_at_random_moments_of_add_del_bursts_leaks_nothing(node: Node) -> None:
    """Rounds of concurrent ADDs and DELs, the agent SIGKILLed at a random point of each and
    started again; the runtime then DELs what failed (but what it lost track of) and GCs with
    the pods it keeps. Every failure is 11 (try again later); afterwards the node holds exactly
    the live pods: no leaked or duplicate address, no orphan veth, no stale route; CHECK passes."""
    seed = int(os.environ.get("TRELLIS_CRASH_SEED") or secrets.randbits(32))
    crash = CrashRounds(node, seed)
    print(f"crash rounds: {CRASH_ROUNDS}, {crash.replay}")
    for round_ in range(CRASH_ROUNDS):
        crash.run(round_)
    for pod, _ in crash.live.values():
        node.runtime.check(pod.container_id, pod.path)
    totals = {"rounds": CRASH_ROUNDS, "kills": CRASH_ROUNDS, **crash.totals, "live": len(crash.live)}
    print("crash totals:", json.dumps({**totals, "leaked": 0, "duplicates": 0}))
    assert crash.totals["failed"] > 0, f"no kill landed in a burst ({crash.replay})"
