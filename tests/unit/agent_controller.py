"""A network controller for unit tests: real SQLite, a settable clock, and never started, so
nothing touches the kernel."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from trellis.agent.config import AgentConfig
from trellis.agent.network import NetworkController
from trellis.dataplane.kernel.netlink import SocketPool
from trellis.datastore.base import KV
from trellis.datastore.sqlite import SqliteDatastore
from trellis.ipam.allocator import Ipam


class Clock:
    """A monotonic clock the test sets (seconds)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@contextmanager
def unstarted_controller(config: AgentConfig, clock: Clock | None = None) -> Iterator[NetworkController]:
    """A network controller over SQLite in `config.state_dir` that is never started."""
    store = SqliteDatastore(config.state_dir / "trellis.db")
    ipam = Ipam(store, config.node, config.pools, config.block_prefixlen)
    uplink = ("trlt-up", ipaddress.IPv4Interface("172.31.0.11/24"))
    try:
        yield NetworkController(config, store, ipam, SocketPool(), uplink, 1450, clock=clock or Clock())
    finally:
        store.close()


def publish(network: NetworkController, revision: int, objects: dict[str, dict[str, Any]]) -> None:
    """Deliver `objects` as a snapshot at `revision`, then compute the policy and end a pass as
    reconcile() does (which would also program the kernel): status.json written, the revision
    programmed."""
    network.view.on_snapshot([KV(key, item, revision) for key, item in objects.items()], revision)
    local = network._local_endpoints(objects)
    policy = network._policy(objects, local) if network.config.policy else None
    network._publish(revision, objects, local, policy)
