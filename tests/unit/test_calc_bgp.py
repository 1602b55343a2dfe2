"""The pure BGP calculation: mesh, route reflectors, external peers, AS overrides, joins,
leaves and reordered input."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from trellis.calc.bgp import BGPObjects, DesiredBGP, Role, Session, compute_bgp, parse_bgp_objects
from trellis.model.bgp import BGPConfiguration, BGPPeer, RouteReflectors
from trellis.model.node import Node
from trellis.model.selector import LabelSelector

Net = ipaddress.IPv4Network
Addr = ipaddress.IPv4Address
POOLS = (Net("10.244.0.0/16"),)


def node(i: int, subnet: int = 0) -> Node:
    return Node(f"node-{i}", ipaddress.IPv4Interface(f"172.30.{subnet}.{10 + i}/24"))


def nodes(*numbers: int) -> dict[str, Node]:
    return {n.name: n for n in map(node, numbers)}


def block(i: int, j: int = 0) -> tuple[Net, str]:
    return Net(f"10.244.{i}.{64 * j}/26"), f"node-{i}"


def ip(i: int) -> Addr:
    return Addr(f"172.30.0.{10 + i}")


def blocks_of(numbers: Iterable[int]) -> list[tuple[Net, str]]:
    return [block(i) for i in numbers]


def desired(
    local: int,
    cluster: Mapping[str, Node],
    bgp: BGPObjects | None = None,
    labels: Mapping[str, Mapping[str, str]] | None = None,
) -> DesiredBGP:
    numbers = [int(name.removeprefix("node-")) for name in cluster]
    return compute_bgp(
        cluster[f"node-{local}"], cluster, blocks_of(numbers), POOLS, bgp or BGPObjects(), labels
    )


def roles(state: DesiredBGP) -> dict[str, Role]:
    return {s.peer: s.role for s in state.sessions}


def test_mesh_peers_with_every_other_node() -> None:
    got = desired(2, nodes(1, 2, 3))
    assert got.address == ip(2) and got.asn == 64512 and got.cluster_id is None
    assert got.blocks == (Net("10.244.2.0/26"),) and got.pools == POOLS
    assert got.sessions == (
        Session(Role.MESH, ip(1), 64512, "node-1", passive=False),
        Session(Role.MESH, ip(3), 64512, "node-3", passive=True),
    )
    assert [s.name for s in got.sessions] == ["mesh_172_30_0_11", "mesh_172_30_0_13"]
    assert got.problems == ()


def test_originates_all_its_blocks_only() -> None:
    cluster = nodes(1, 2)
    got = compute_bgp(node(1), cluster, [block(2), block(1, 1), block(1)], POOLS, BGPObjects())
    assert got.blocks == (Net("10.244.1.0/26"), Net("10.244.1.64/26"))


def test_a_single_node_has_no_sessions_and_no_problem() -> None:
    got = desired(1, nodes(1))
    assert got.sessions == () and got.problems == ()


RR_CONFIG = BGPConfiguration(
    route_reflectors=RouteReflectors(
        frozenset({"node-1"}),
        LabelSelector.from_json({"matchLabels": {"route-reflector": "true"}}),
        Addr("10.0.0.1"),
    )
)
RR_LABELS = {"node-2": {"route-reflector": "true"}, "node-3": {"route-reflector": "false"}}


def test_route_reflectors_replace_the_mesh() -> None:
    """node-1 (by name) and node-2 (by label) reflect; node-3 and node-4 are their clients."""
    cluster, bgp = nodes(1, 2, 3, 4), BGPObjects(RR_CONFIG)
    reflector = desired(1, cluster, bgp, RR_LABELS)
    assert roles(reflector) == {"node-2": Role.REFLECTOR, "node-3": Role.CLIENT, "node-4": Role.CLIENT}
    assert reflector.cluster_id == Addr("10.0.0.1")
    assert roles(desired(2, cluster, bgp, RR_LABELS)) == {
        "node-1": Role.REFLECTOR,
        "node-3": Role.CLIENT,
        "node-4": Role.CLIENT,
    }
    client = desired(3, cluster, bgp, RR_LABELS)
    assert roles(client) == {"node-1": Role.REFLECTOR, "node-2": Role.REFLECTOR}
    assert client.cluster_id is None
    assert [s.name for s in client.sessions] == ["rr_172_30_0_11", "rr_172_30_0_12"]


def test_route_reflection_needs_one_as() -> None:
    config = BGPConfiguration(
        node_asns={"node-4": 65004}, route_reflectors=RouteReflectors(frozenset({"node-1"}))
    )
    cluster, bgp = nodes(1, 2, 4), BGPObjects(config)
    assert roles(desired(1, cluster, bgp)) == {"node-2": Role.CLIENT}
    lonely = desired(4, cluster, bgp)
    assert lonely.sessions == ()
    assert any("AS 65004" in p and "route reflection needs one AS" in p for p in lonely.problems)
    assert any("node-4 has no BGP session" in p for p in lonely.problems)


def test_per_node_as_overrides_make_mesh_sessions_ebgp() -> None:
    bgp = BGPObjects(BGPConfiguration(asn=65000, node_asns={"node-2": 65002}))
    cluster = nodes(1, 2, 3)
    one = desired(1, cluster, bgp)
    assert one.asn == 65000
    assert {s.peer: s.neighbor_asn for s in one.sessions} == {"node-2": 65002, "node-3": 65000}
    two = desired(2, cluster, bgp)
    assert two.asn == 65002
    assert {s.neighbor_asn for s in two.sessions} == {65000}


TOR = BGPPeer("tor", Addr("172.30.0.1"), 65000, password="s3cret", accept=(Net("0.0.0.0/0"),))
RS = BGPPeer("rs-a", Addr("172.30.0.2"), 65001, node_selector=LabelSelector.of(rack="a"))
PINNED = BGPPeer("only-3", Addr("172.30.0.3"), 65003, node="node-3")


def test_external_peers_global_by_label_and_for_one_node() -> None:
    bgp = BGPObjects(BGPConfiguration(mesh=False), (TOR, RS, PINNED))
    cluster, labels = nodes(1, 2, 3), {"node-1": {"rack": "a"}}
    one = desired(1, cluster, bgp, labels)
    assert one.sessions == (
        Session(Role.PEER, Addr("172.30.0.1"), 65000, "tor", password="s3cret", accept=(Net("0.0.0.0/0"),)),
        Session(Role.PEER, Addr("172.30.0.2"), 65001, "rs-a"),
    )
    assert [s.name for s in one.sessions] == ["peer_172_30_0_1", "peer_172_30_0_2"]
    assert {s.peer for s in desired(2, cluster, bgp, labels).sessions} == {"tor"}
    assert {s.peer for s in desired(3, cluster, bgp, labels).sessions} == {"tor", "only-3"}


def test_external_peers_beside_the_mesh() -> None:
    got = desired(1, nodes(1, 2), BGPObjects(peers=(TOR,)))
    assert roles(got) == {"node-2": Role.MESH, "tor": Role.PEER}


def test_unusable_peers_are_named() -> None:
    far = BGPPeer("far", Addr("192.0.2.1"), 65000)
    itself = BGPPeer("itself", ip(1), 65000)
    twin = BGPPeer("twin", ip(2), 65000)
    got = desired(1, nodes(1, 2), BGPObjects(peers=(far, itself, twin)))
    assert roles(got) == {"node-2": Role.MESH}
    assert got.problems == (
        "BGPPeer far (192.0.2.1) is not on node node-1's subnet 172.30.0.0/24: BGP sessions are "
        "direct, on one L2 segment (peer both with a router there instead)",
        "BGPPeer itself: 172.30.0.11 is this node's own address",
        "BGPPeer twin: 172.30.0.12 already has a session (node-2)",
    )


def test_a_node_on_another_subnet_is_named() -> None:
    cluster = {**nodes(1, 2), "node-5": node(5, subnet=1)}
    got = compute_bgp(node(1), cluster, [], POOLS, BGPObjects())
    assert roles(got) == {"node-2": Role.MESH}
    assert len(got.problems) == 1 and "node node-5 (172.30.1.15)" in got.problems[0]


def test_mesh_off_and_nothing_else_is_a_problem() -> None:
    got = desired(1, nodes(1, 2), BGPObjects(BGPConfiguration(mesh=False)))
    assert got.sessions == ()
    assert got.problems == ("node node-1 has no BGP session: it exchanges no routes",)


def test_join_adds_one_session_and_leave_removes_it() -> None:
    before = desired(1, nodes(1, 2, 3))
    after = desired(1, nodes(1, 2, 3, 4))
    assert set(after.sessions) - set(before.sessions) == {Session(Role.MESH, ip(4), 64512, "node-4", True)}
    assert set(before.sessions) <= set(after.sessions)
    assert desired(1, nodes(1, 2, 3)) == before


def test_unregistered_local_node_still_gets_its_state() -> None:
    """The agent passes its own Node; the datastore may not show it yet."""
    got = compute_bgp(node(1), nodes(2), blocks_of([1, 2]), POOLS, BGPObjects())
    assert roles(got) == {"node-2": Role.MESH} and got.blocks == (Net("10.244.1.0/26"),)


TOPOLOGIES = {
    "mesh": BGPObjects(),
    "mesh with overrides": BGPObjects(BGPConfiguration(node_asns={"node-2": 65002})),
    "route reflectors": BGPObjects(RR_CONFIG),
}


def test_both_ends_agree_on_every_session() -> None:
    """a peers with b exactly when b peers with a; one end waits; roles and AS numbers mirror."""
    mirror = {
        Role.MESH: Role.MESH,
        Role.CLIENT: Role.REFLECTOR,
        Role.REFLECTOR: {Role.REFLECTOR, Role.CLIENT},
    }
    cluster = nodes(1, 2, 3, 4, 5)
    for name, bgp in TOPOLOGIES.items():
        states = {n: desired(int(n[-1]), cluster, bgp, RR_LABELS) for n in cluster}
        for local, state in states.items():
            for session in state.sessions:
                (back,) = [s for s in states[session.peer].sessions if s.peer == local]
                expected = mirror[session.role]
                assert back.role in (expected if isinstance(expected, set) else {expected}), name
                assert back.passive != session.passive, name
                assert (back.neighbor_asn, session.neighbor_asn) == (state.asn, states[session.peer].asn)


@given(order=st.permutations(range(1, 6)), peers=st.permutations([TOR, RS, PINNED]))
def test_reordered_input_gives_the_same_state(order: list[int], peers: list[BGPPeer]) -> None:
    cluster = nodes(*order)
    blocks = [b for i in order for b in (block(i), block(i, 1))]
    for bgp in (BGPObjects(peers=tuple(peers)), BGPObjects(RR_CONFIG, tuple(peers))):
        got = compute_bgp(node(3), cluster, blocks, POOLS, bgp, RR_LABELS)
        reference_bgp = BGPObjects(bgp.configuration, (TOR, RS, PINNED))
        assert got == compute_bgp(
            node(3), nodes(1, 2, 3, 4, 5), sorted(blocks), POOLS, reference_bgp, RR_LABELS
        )


def bgp_object(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "trellis.dev/v1", "kind": kind, "metadata": {"name": name}, "spec": spec}


def test_parse_bgp_objects_takes_default_and_names_what_it_ignores() -> None:
    objects = {
        "/trellis/bgp/configurations/default": bgp_object("BGPConfiguration", "default", {"asNumber": 65010}),
        "/trellis/bgp/configurations/other": bgp_object("BGPConfiguration", "other", {}),
        "/trellis/bgp/peers/tor": bgp_object("BGPPeer", "tor", {"peerIP": "172.30.0.1", "asNumber": 65000}),
        "/trellis/bgp/peers/broken": bgp_object("BGPPeer", "broken", {"peerIP": "nope", "asNumber": 1}),
        "/trellis/nodes/node-1": {"name": "node-1", "underlay": "172.30.0.11/24"},
    }
    parsed = parse_bgp_objects(objects)
    assert parsed.configuration.asn == 65010
    assert [p.name for p in parsed.peers] == ["tor"]
    assert len(parsed.problems) == 2
    assert parsed.problems[0].startswith("BGPConfiguration other: ignored")
    assert parsed.problems[1].startswith("BGPPeer broken: spec.peerIP: ") and parsed.problems[1].endswith(
        "(ignored)"
    )
    assert desired(1, nodes(1, 2), parsed).problems == parsed.problems


def test_no_bgp_objects_means_calico_defaults() -> None:
    assert parse_bgp_objects({}) == BGPObjects()
