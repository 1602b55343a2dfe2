"""The lab's ToR (BGP topology tor): FRR's config against a golden file, and the BGPPeer that
makes every node's BIRD peer with it (no root; the e2e test runs the real FRR)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from trellis.calc.bgp import Role, compute_bgp, parse_bgp_objects
from trellis.lab.bgp import check_subnets
from trellis.lab.errors import LabError
from trellis.lab.frr import ORIGINATED, TOR_ASN, Tor, peer_object, render_bgpd, render_zebra, session_name
from trellis.lab.state import LabState, plan_nodes
from trellis.model.node import Node

GOLDEN = Path(__file__).parent.parent / "golden"
Net = ipaddress.IPv4Network
SUBNET = Net("172.31.7.0/24")
TOR = Tor(
    "trl-lab-tor",
    ipaddress.IPv4Interface("172.31.7.253/24"),
    (Net("10.244.0.0/16"), Net("10.245.0.0/16")),
    password="pw-123_x",
)


@pytest.mark.parametrize(("name", "text"), [("frr_tor_bgpd.conf", render_bgpd(TOR))])
def test_bgpd_config_matches_golden(name: str, text: str) -> None:
    """Regenerate with TRELLIS_UPDATE_GOLDEN=1 after a deliberate change, and review the diff."""
    golden = GOLDEN / name
    if os.environ.get("TRELLIS_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()


def test_configs_hold_what_the_topology_needs() -> None:
    bgpd = render_bgpd(TOR)
    assert "bgp listen range 172.31.7.0/24 peer-group NODES" in bgpd  # nodes that join later too
    assert "neighbor NODES password pw-123_x" in bgpd and "network 192.0.2.0/24" in bgpd
    assert "seq 5 permit 10.244.0.0/16 le 32" in bgpd and "seq 10 permit 10.245.0.0/16 le 32" in bgpd
    assert "password" not in render_bgpd(Tor(TOR.netns, TOR.address, TOR.pools))
    assert " ip address 192.0.2.1/24\n" in render_zebra(TOR)


def test_every_node_peers_with_the_tor_with_its_password_and_takes_its_prefix() -> None:
    state = LabState("lab", "bgp", "sqlite", [SUBNET], plan_nodes("lab", [SUBNET], 3), bgp_topology="tor")
    tor = Tor.of(state, password="pw")
    assert tor.address == ipaddress.IPv4Interface("172.31.7.253/24") and tor.netns == "trl-lab-tor"
    key, body = peer_object(tor)
    bgp = parse_bgp_objects({key: body})
    assert not bgp.problems
    nodes = {n.name: Node(n.name, n.underlay) for n in state.nodes}
    for node in nodes.values():
        desired = compute_bgp(node, nodes, [], tor.pools, bgp)
        (peer,) = [s for s in desired.sessions if s.role is Role.PEER]
        assert peer.name == session_name(tor)  # what `lab status` picks out of BIRD's sessions
        assert (peer.neighbor, peer.neighbor_asn, peer.password) == (tor.address.ip, TOR_ASN, "pw")
        assert peer.accept == (ORIGINATED.network,)
        assert len(desired.sessions) == 3 and not desired.problems  # the mesh stays


def test_tor_needs_one_subnet() -> None:
    check_subnets("tor", 1)
    check_subnets("mesh", 2)
    with pytest.raises(LabError, match="tor needs one underlay subnet, not 2"):
        check_subnets("tor", 2)
