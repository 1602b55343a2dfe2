"""ClusterView: what the syncer delivers, the revision it reflects, and the reconciler's wake-ups."""

from __future__ import annotations

import ipaddress

import pytest

from trellis.agent.network import ClusterView
from trellis.datastore.base import KV, Event, EventKind
from trellis.model.ipam import Allocation, Attachment, Block
from trellis.model.node import Node

BLOCK = Block(ipaddress.IPv4Network("10.244.0.0/26"), "node-1")
NODE = Node("node-1", ipaddress.IPv4Interface("172.31.0.11/24"), "02:00:00:00:00:01", None)


def synced_view() -> ClusterView:
    view = ClusterView()
    view.on_snapshot([KV(BLOCK.key, BLOCK.to_json(), 1), KV(NODE.key, NODE.to_json(), 2)], 2)
    assert view.synced.is_set() and view.changed.is_set()
    view.changed.clear()
    return view


def put(key: str, value: dict[str, object], revision: int = 3) -> Event:
    return Event(EventKind.PUT, key, value, revision)


def test_every_change_wakes_the_reconciler_and_advances_the_revision() -> None:
    """A pod allocation changes no route but can change policy (a new local endpoint)."""
    view = synced_view()
    allocated = BLOCK.with_allocation(
        ipaddress.IPv4Address("10.244.0.1"), Allocation(Attachment("c", "eth0"), "x/a")
    )
    view.on_update([put(BLOCK.key, allocated.to_json(), revision=7)])
    assert view.changed.is_set()
    objects, revision = view.objects()
    assert revision == 7 and objects[BLOCK.key] == allocated.to_json()


@pytest.mark.parametrize(
    "event",
    [
        put(Block(BLOCK.cidr, "node-2").key, Block(BLOCK.cidr, "node-2").to_json()),
        put(
            Block(ipaddress.IPv4Network("10.244.0.64/26"), "node-1").key,
            {"cidr": "10.244.0.64/26", "node": "node-1"},
        ),
        Event(EventKind.DELETE, BLOCK.key, None, 3),
        put(NODE.key, NODE.to_json()),
        Event(EventKind.DELETE, NODE.key, None, 3),
    ],
    ids=["block changes owner", "new block", "block released", "node put", "node gone"],
)
def test_routing_changes_wake_the_reconciler(event: Event) -> None:
    view = synced_view()
    view.on_update([event])
    assert view.changed.is_set()


def test_node_deletion_reaches_the_cluster() -> None:
    view = synced_view()
    view.on_update([Event(EventKind.DELETE, NODE.key, None, 3)])
    objects, _ = view.objects()
    assert NODE.key not in objects
