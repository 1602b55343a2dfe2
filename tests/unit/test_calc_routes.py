"""The pure route/FDB calculation: joins, leaves, restarts and reordered updates."""

from __future__ import annotations

import ipaddress
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trellis.calc.routes import Route, VxlanPeer, compute_routes
from trellis.model.node import Node

Net = ipaddress.IPv4Network
Addr = ipaddress.IPv4Address


def node(i: int, subnet: int = 0) -> Node:
    return Node(
        name=f"node-{i}",
        underlay=ipaddress.IPv4Interface(f"172.30.{subnet}.{10 + i}/24"),
        vtep_mac=f"02:00:00:00:00:{i:02x}",
        vtep_ip=Addr(f"10.244.{i}.0"),
    )


def block(i: int, j: int = 0) -> tuple[Net, str]:
    return Net(f"10.244.{i}.{64 * j}/26"), f"node-{i}"


NODES = {n.name: n for n in (node(1), node(2), node(3))}
BLOCKS = [block(1), block(2), block(2, 1), block(3)]


def test_vxlan_routes_every_remote_block_over_its_vtep() -> None:
    got = compute_routes("vxlan", "node-1", NODES, BLOCKS)
    assert got.routes == {
        Route(Net("10.244.2.0/26"), Addr("10.244.2.0"), True),
        Route(Net("10.244.2.64/26"), Addr("10.244.2.0"), True),
        Route(Net("10.244.3.0/26"), Addr("10.244.3.0"), True),
    }
    assert got.peers == {
        VxlanPeer("02:00:00:00:00:02", Addr("10.244.2.0"), Addr("172.30.0.12")),
        VxlanPeer("02:00:00:00:00:03", Addr("10.244.3.0"), Addr("172.30.0.13")),
    }
    assert got.problems == ()


def test_host_gw_routes_via_underlay() -> None:
    got = compute_routes("host-gw", "node-2", NODES, BLOCKS)
    assert got.routes == {
        Route(Net("10.244.1.0/26"), Addr("172.30.0.11"), False),
        Route(Net("10.244.3.0/26"), Addr("172.30.0.13"), False),
    }
    assert got.peers == frozenset()


def test_host_gw_names_a_node_on_another_subnet() -> None:
    nodes = {**NODES, "node-4": node(4, subnet=1)}
    got = compute_routes("host-gw", "node-1", nodes, [*BLOCKS, block(4)])
    assert Net("10.244.4.0/26") not in {r.dst for r in got.routes}
    assert len(got.problems) == 1
    assert "node-4" in got.problems[0] and "one L2 segment" in got.problems[0]


def test_cross_subnet_is_direct_inside_and_vxlan_across() -> None:
    nodes = {**NODES, "node-4": node(4, subnet=1)}
    got = compute_routes("vxlan-cross-subnet", "node-1", nodes, [*BLOCKS, block(4)])
    by_dst = {r.dst: r for r in got.routes}
    assert by_dst[Net("10.244.2.0/26")] == Route(Net("10.244.2.0/26"), Addr("172.30.0.12"), False)
    assert by_dst[Net("10.244.4.0/26")] == Route(Net("10.244.4.0/26"), Addr("10.244.4.0"), True)
    assert {p.underlay_ip for p in got.peers} == {Addr("172.30.1.14")}


def test_leave_removes_routes_and_peer() -> None:
    before = compute_routes("vxlan", "node-1", NODES, BLOCKS)
    nodes = {k: v for k, v in NODES.items() if k != "node-3"}
    after = compute_routes("vxlan", "node-1", nodes, [b for b in BLOCKS if b[1] != "node-3"])
    assert before.routes - after.routes == {Route(Net("10.244.3.0/26"), Addr("10.244.3.0"), True)}
    assert {p.vtep_mac for p in before.peers - after.peers} == {"02:00:00:00:00:03"}


def test_blocks_of_an_unregistered_node_are_not_routed_yet() -> None:
    """A block claim can arrive before its node's registration: nothing half-made is routed."""
    got = compute_routes("vxlan", "node-1", NODES, [*BLOCKS, (Net("10.244.9.0/26"), "node-9")])
    assert Net("10.244.9.0/26") not in {r.dst for r in got.routes}


def test_node_without_vtep_yet_is_reported_not_routed() -> None:
    nodes = {**NODES, "node-2": Node("node-2", ipaddress.IPv4Interface("172.30.0.12/24"))}
    got = compute_routes("vxlan", "node-1", nodes, BLOCKS)
    assert all(r.gateway != Addr("10.244.2.0") for r in got.routes)
    assert got.problems == ("node node-2: no VXLAN tunnel endpoint registered yet",)


def test_local_node_not_registered() -> None:
    got = compute_routes("vxlan", "node-7", NODES, BLOCKS)
    assert got.routes == frozenset() and got.problems == ("node node-7 is not registered yet",)


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="bgp2"):
        compute_routes("bgp2", "node-1", NODES, BLOCKS)


@pytest.mark.parametrize("backend", ["vxlan", "host-gw", "vxlan-cross-subnet"])
def test_restart_and_reordering_give_the_same_answer(backend: str) -> None:
    """The result depends on the set of facts, not the order they arrived in."""
    expected = compute_routes(backend, "node-1", NODES, BLOCKS)
    for order in itertools.permutations(BLOCKS):
        nodes = dict(reversed(list(NODES.items())))
        assert compute_routes(backend, "node-1", nodes, order) == expected


@given(st.lists(st.tuples(st.integers(1, 6), st.integers(0, 3)), max_size=20))
def test_never_routes_own_blocks_and_one_peer_per_remote(claims: list[tuple[int, int]]) -> None:
    nodes = {n.name: n for n in map(node, range(1, 7))}
    blocks = [block(i, j) for i, j in claims]
    got = compute_routes("vxlan", "node-1", nodes, blocks)
    assert all(not r.dst.subnet_of(Net("10.244.1.0/24")) for r in got.routes)
    assert len(got.peers) == 5
    assert {r.dst for r in got.routes} == {cidr for cidr, owner in blocks if owner != "node-1"}
