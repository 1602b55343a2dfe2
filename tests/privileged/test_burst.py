"""Many pods at once, and an agent killed in the middle of them."""

from __future__ import annotations

import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import wait_until
from tests.privileged.nodes import Node, Pod
from trellis.lab.runtime import PluginError
from trellis.model.ipam import Attachment
from trellis.model.naming import host_veth_name

pytestmark = pytest.mark.privileged


class Burst:
    """ADDs of many pods through the runtime from a thread pool, recording each outcome."""

    def __init__(self, node: Node, pods: list[Pod], workers: int) -> None:
        self.node = node
        self.added: dict[Attachment, str] = {}
        self.failed: dict[Attachment, PluginError] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers)
        self._futures = [self._pool.submit(self._add, pod) for pod in pods]

    def _add(self, pod: Pod) -> None:
        try:
            result = self.node.runtime.add(pod.container_id, pod.path)
        except PluginError as err:
            with self._lock:
                self.failed[pod.attachment] = err
            return
        with self._lock:
            self.added[pod.attachment] = str(result["ips"][0]["address"])

    def finish(self) -> None:
        """Wait for every ADD; re-raise anything but a plugin error."""
        self._pool.shutdown(wait=True)
        for future in self._futures:
            future.result()


def test_100_concurrent_adds_get_100_distinct_addresses(node: Node) -> None:
    """100 ADDs at once all succeed, with 100 different addresses, as stored and as plumbed."""
    pods = node.new_pods(100)
    burst = Burst(node, pods, workers=100)
    burst.finish()
    assert burst.failed == {}
    assert len(set(burst.added.values())) == 100
    assert node.allocations() == burst.added
    assert node.host_veths() == {host_veth_name(pod.attachment) for pod in pods}


def test_agent_killed_mid_burst_leaves_no_duplicate_and_gc_no_leak(node: Node) -> None:
    """SIGKILL during a burst of ADDs: each ADD succeeds or fails with 11, no address is given twice;
    after a restart, GC with the runtime's valid attachments leaves exactly those allocated and
    only their host veths, and the valid pods still pass CHECK."""
    pods = node.new_pods(60)
    burst = Burst(node, pods, workers=6)
    wait_until(lambda: len(burst.added) >= 8, 60, "8 pods to be added")
    node.stop_agent(signal.SIGKILL)
    burst.finish()
    assert burst.added and burst.failed, "the kill did not land mid-burst"
    assert {err.code for err in burst.failed.values()} == {11}
    assert len(set(burst.added.values())) == len(burst.added)
    node.start_agent()
    stored = node.allocations()  # fails on an address held twice
    assert all(stored[a] == address for a, address in burst.added.items())

    node.runtime.gc([(a.container_id, a.ifname) for a in burst.added])
    assert node.allocations() == burst.added
    assert node.host_veths() == {host_veth_name(a) for a in burst.added}
    for pod in pods:
        if pod.attachment in burst.added:
            node.runtime.check(pod.container_id, pod.path)
