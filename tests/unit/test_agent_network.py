"""ClusterView: what the syncer delivers, the revision it reflects, and the reconciler's wake-ups."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from tests.unit.agent_controller import Clock, unstarted_controller
from trellis.agent.config import AgentConfig
from trellis.agent.network import ClusterView
from trellis.calc.cluster import parse_cluster
from trellis.datastore.base import KV, Event, EventKind
from trellis.model.ipam import INTERNAL_PREFIX, Allocation, Attachment, Block
from trellis.model.k8s import NODE_PREFIX as K8S_NODE_PREFIX
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


@pytest.mark.parametrize(
    ("listed", "pods", "released"),
    [
        (False, False, True),
        (False, True, True),
        (True, False, True),
        (True, True, False),
    ],
    ids=["node deleted, empty", "node deleted, pods", "node listed, empty", "node listed, pods kept"],
)
def test_blocks_of_an_absent_node_go_back_after_the_grace_unless_its_pods_may_still_run(
    tmp_path: Path, listed: bool, pods: bool, released: bool
) -> None:
    """An agent crash-looping past the grace keeps the addresses its running pods hold, as long as
    the cluster lists its Node; a deleted Node's blocks go back to the pool."""
    clock = Clock(0.0)
    config = AgentConfig(node="node-1", state_dir=tmp_path, dead_node_grace_s=60)
    block = Block(ipaddress.IPv4Network("10.244.0.64/26"), "node-2").with_allocation(
        ipaddress.IPv4Address("10.244.0.64"), Allocation(Attachment(INTERNAL_PREFIX + "vtep", "vxlan"), "")
    )
    if pods:
        block = block.with_allocation(
            ipaddress.IPv4Address("10.244.0.65"), Allocation(Attachment("c", "eth0"), "x/a")
        )
    objects = {block.key: block.to_json(), **({K8S_NODE_PREFIX + "node-2": {}} if listed else {})}
    with unstarted_controller(config, clock) as controller:
        store = controller.store
        store.create(block.key, block.to_json())
        for now in (0.0, 59.0):
            clock.now = now
            controller._release_dead_blocks(parse_cluster(objects), objects)
            assert store.get(block.key) is not None, f"released before the grace, at {now} s"
        clock.now = 61.0
        controller._release_dead_blocks(parse_cluster(objects), objects)
        assert (store.get(block.key) is None) == released


def test_a_dead_nodes_block_already_claimed_by_another_node_is_left_alone(tmp_path: Path) -> None:
    """Another agent may have released the dead node's block, and a third node claimed it, before
    this agent's view shows either: the block the store holds now is the new owner's, with its
    pods, and must not go back to the pool."""
    clock = Clock(0.0)
    config = AgentConfig(node="node-1", state_dir=tmp_path, dead_node_grace_s=60)
    cidr = ipaddress.IPv4Network("10.244.0.64/26")
    seen = Block(cidr, "node-2")  # what the view still holds: the dead node's
    now = Block(cidr, "node-3").with_allocation(cidr[1], Allocation(Attachment("c", "eth0"), "x/a"))
    objects = {seen.key: seen.to_json()}
    with unstarted_controller(config, clock) as controller:
        controller.store.create(now.key, now.to_json())
        for clock.now in (0.0, 61.0):
            controller._release_dead_blocks(parse_cluster(objects), objects)
        kv = controller.store.get(now.key)
        assert kv is not None and Block.from_json(kv.value) == now
