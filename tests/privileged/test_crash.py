"""A SIGKILLed agent, started again, adopts the kernel it finds and sweeps only its own stale objects.

Restartable at any moment (DESIGN.md §2): the new agent never flushes live pod state. The test
compares the node's kernel before the kill and after the new agent's first programming pass:
every link keeps its index (nothing re-created), pod addresses and routes stay, and of the
objects planted before the kill only those Trellis marks as its own (a block route with its
route protocol, an FDB entry and a neighbour on `trl.vxlan`) are gone, while look-alikes it
does not own (a route in the pool without its protocol, another table, another veth) stay.
"""

from __future__ import annotations

import json
import signal
from typing import Any

import pytest

from tests.privileged.nodes import UPLINK, Node, Pod, ip_json
from trellis.model.naming import ROUTE_PROTOCOL
from trellis.model.node import STATUS_FILE

pytestmark = pytest.mark.privileged

VXLAN = "trl.vxlan"
STALE_MAC = "02:00:00:00:00:99"
OWNED_STALE = (
    ("route", "add", "10.244.250.0/26", "via", "192.0.2.77", "dev", UPLINK, "proto", str(ROUTE_PROTOCOL)),
    ("neigh", "replace", "10.244.251.0", "lladdr", STALE_MAC, "dev", VXLAN, "nud", "permanent"),
)
"""A block route of a node that is gone, and its VXLAN neighbour: Trellis' own, and stale."""
FOREIGN = (
    ("route", "add", "10.244.252.0/26", "via", "192.0.2.78", "dev", UPLINK, "proto", "static"),
    ("link", "add", "trlt-keep0", "type", "veth", "peer", "name", "trlt-keep1"),
)
"""Look-alikes someone else made: a route into the pool without Trellis' protocol, a veth."""
FOREIGN_TABLE = "trltkeep"


def canonical(items: list[dict[str, Any]]) -> set[str]:
    return {json.dumps(item, sort_keys=True) for item in items}


def kernel_state(node: Node, pods: list[Pod]) -> dict[str, set[str]]:
    """What the node and its pods hold: links by name and index, IPv4 routes of every table,
    permanent neighbours, `trl.vxlan`'s FDB, nftables tables; each pod's links, addresses, routes."""
    state = {
        "node links": {f"{link['ifname']}#{link['ifindex']}" for link in ip_json(node.netns, "link", "show")},
        "node routes": canonical(ip_json(node.netns, "-4", "route", "show", "table", "all")),
        "node neighbours": canonical(ip_json(node.netns, "neigh", "show", "nud", "permanent")),
        "vxlan fdb": canonical(json.loads(node.exec_in_node("bridge", "-j", "fdb", "show", "dev", VXLAN))),
        "nft tables": set(node.exec_in_node("nft", "list", "tables").splitlines()),
    }
    for pod in pods:
        state[f"{pod.netns} links"] = {
            f"{link['ifname']}#{link['ifindex']}" for link in ip_json(pod.netns, "link", "show")
        }
        state[f"{pod.netns} addresses"] = canonical(ip_json(pod.netns, "-4", "addr", "show"))
        state[f"{pod.netns} routes"] = canonical(ip_json(pod.netns, "-4", "route", "show", "table", "all"))
    return state


def plant(node: Node, *objects: tuple[str, ...]) -> None:
    for args in objects:
        node.exec_in_node("ip", *args)


def test_restarted_agent_adopts_the_kernel_and_sweeps_only_its_stale_objects(node: Node) -> None:
    """Three pods, then foreign look-alikes and stale objects of Trellis' own; SIGKILL and start
    again: after the new agent's first pass the kernel is as before the stale objects came, to
    the link index; the pods pass CHECK, and a new pod gets an address of its own."""
    pods = node.new_pods(3)
    for pod in pods:
        node.runtime.add(pod.container_id, pod.path)
    node.wait_programmed()
    plant(node, *FOREIGN)
    node.exec_in_node("nft", "add", "table", "inet", FOREIGN_TABLE)
    before = kernel_state(node, pods)
    plant(node, *OWNED_STALE)
    node.exec_in_node("bridge", "fdb", "append", STALE_MAC, "dev", VXLAN, "dst", "192.0.2.77")
    assert kernel_state(node, pods) != before, "the stale objects were planted"

    node.stop_agent(signal.SIGKILL)
    (node.dir / STATUS_FILE).unlink()  # so that waiting for it waits for the new agent's pass
    node.start_agent()
    node.wait_programmed()

    after = kernel_state(node, pods)
    assert after == before, {k: (before[k] ^ after[k]) for k in before if before[k] != after[k]}
    for pod in pods:
        node.runtime.check(pod.container_id, pod.path)
    fresh = node.new_pod()
    address = node.runtime.add(fresh.container_id, fresh.path)["ips"][0]["address"]
    assert fresh.addresses() == {address}
    assert address not in {a for pod in pods for a in pod.addresses()}
