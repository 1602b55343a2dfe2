"""BGPConfiguration and BGPPeer from Kubernetes-style YAML: defaults, every field, one-line errors."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
import yaml

from trellis.model.bgp import (
    DEFAULT_ASN,
    DEFAULT_CLUSTER_ID,
    BGPConfiguration,
    RouteReflectors,
    parse_configuration,
    parse_peer,
)
from trellis.model.k8s import InvalidObject
from trellis.model.selector import LabelSelector

Net = ipaddress.IPv4Network
Addr = ipaddress.IPv4Address

CONFIGURATION = """
apiVersion: trellis.dev/v1
kind: BGPConfiguration
metadata:
  name: default
spec:
  asNumber: 65100
  nodeToNodeMeshEnabled: false
  nodeASNumbers:
    node-3: 65103
  routeReflectors:
    nodes: [node-1]
    nodeSelector:
      matchLabels: {route-reflector: "true"}
    clusterID: 10.0.0.1
  gracefulRestartTimeSeconds: 300
"""

PEER = """
apiVersion: trellis.dev/v1
kind: BGPPeer
metadata:
  name: tor-a
spec:
  peerIP: 172.30.0.1
  asNumber: 65000
  password: "s3cret pass"
  nodeSelector:
    matchLabels: {rack: a}
  acceptPrefixes: [198.51.100.0/24, 0.0.0.0/0]
"""


def obj(kind: str, spec: dict[str, Any], name: str = "default") -> dict[str, Any]:
    return {"apiVersion": "trellis.dev/v1", "kind": kind, "metadata": {"name": name}, "spec": spec}


def test_configuration_reads_every_field() -> None:
    config = parse_configuration(yaml.safe_load(CONFIGURATION))
    assert config.key == "/trellis/bgp/configurations/default"
    assert (config.asn, config.mesh, config.graceful_restart_s) == (65100, False, 300)
    assert config.node_asn("node-3") == 65103 and config.node_asn("node-1") == 65100
    assert config.route_reflectors == RouteReflectors(
        frozenset({"node-1"}),
        LabelSelector.from_json({"matchLabels": {"route-reflector": "true"}}),
        Addr("10.0.0.1"),
    )


def test_configuration_defaults_as_calico() -> None:
    config = parse_configuration(obj("BGPConfiguration", {}))
    assert config == BGPConfiguration()
    assert (config.asn, config.mesh, config.route_reflectors) == (DEFAULT_ASN, True, None)


def test_route_reflectors_select_by_name_or_label() -> None:
    by_label = parse_configuration(
        obj("BGPConfiguration", {"routeReflectors": {"nodeSelector": {"matchLabels": {"rr": "yes"}}}})
    ).route_reflectors
    assert by_label is not None and by_label.cluster_id == DEFAULT_CLUSTER_ID
    assert by_label.selects("node-9", {"rr": "yes"}) and not by_label.selects("node-9", {"rr": "no"})
    by_name = RouteReflectors(frozenset({"node-1"}))
    assert by_name.selects("node-1", {}) and not by_name.selects("node-2", {"rr": "yes"})


def test_peer_reads_every_field() -> None:
    peer = parse_peer(yaml.safe_load(PEER))
    assert peer.key == "/trellis/bgp/peers/tor-a"
    assert (peer.peer_ip, peer.asn, peer.password) == (Addr("172.30.0.1"), 65000, "s3cret pass")
    assert peer.accept == (Net("0.0.0.0/0"), Net("198.51.100.0/24"))
    assert peer.applies_to("node-1", {"rack": "a"}) and not peer.applies_to("node-1", {"rack": "b"})


def test_peer_for_one_node_or_every_node() -> None:
    base = {"peerIP": "172.30.0.1", "asNumber": 65000}
    one = parse_peer(obj("BGPPeer", {**base, "node": "node-2"}, "rs"))
    assert one.applies_to("node-2", {}) and not one.applies_to("node-1", {})
    every = parse_peer(obj("BGPPeer", base, "rs"))
    assert every.applies_to("node-1", {}) and every.applies_to("node-7", {"rack": "z"})


@pytest.mark.parametrize(
    ("kind", "spec", "message"),
    [
        (
            "BGPConfiguration",
            {"asNumber": 0},
            "BGPConfiguration default: spec.asNumber: 0 is not in 1..4294967295",
        ),
        ("BGPConfiguration", {"asNumber": "64512"}, "spec.asNumber: must be an integer"),
        ("BGPConfiguration", {"asnumber": 1}, "spec.asnumber: unknown field"),
        (
            "BGPConfiguration",
            {"nodeToNodeMeshEnabled": "no"},
            "spec.nodeToNodeMeshEnabled: must be true or false",
        ),
        ("BGPConfiguration", {"nodeASNumbers": {"node-1": -1}}, "spec.nodeASNumbers.node-1: -1 is not in"),
        (
            "BGPConfiguration",
            {"routeReflectors": {"clusterID": "1.2.3.4"}},
            "nodes or nodeSelector is required",
        ),
        (
            "BGPConfiguration",
            {"routeReflectors": {"nodes": ["a"], "clusterID": "x"}},
            "routeReflectors.clusterID",
        ),
        ("BGPConfiguration", {"gracefulRestartTimeSeconds": 5000}, "5000 is not in 1..4095"),
        ("BGPPeer", {"asNumber": 65000}, "BGPPeer default: spec.peerIP: required"),
        ("BGPPeer", {"peerIP": "fd00::1", "asNumber": 1}, "spec.peerIP: "),
        ("BGPPeer", {"peerIP": "10.0.0.1"}, "spec.asNumber: required"),
        (
            "BGPPeer",
            {"peerIP": "10.0.0.1", "asNumber": 1, "password": 'a"b'},
            "spec.password: must be 1 to 80",
        ),
        ("BGPPeer", {"peerIP": "10.0.0.1", "asNumber": 1, "password": "x" * 81}, "spec.password"),
        (
            "BGPPeer",
            {"peerIP": "10.0.0.1", "asNumber": 1, "node": "n", "nodeSelector": {}},
            "spec: node and nodeSelector are mutually exclusive",
        ),
        (
            "BGPPeer",
            {"peerIP": "10.0.0.1", "asNumber": 1, "acceptPrefixes": ["10.0.0.1/8"]},
            "acceptPrefixes[0]",
        ),
        (
            "BGPPeer",
            {"peerIP": "10.0.0.1", "asNumber": 1, "acceptPrefixes": ["fd00::/8"]},
            "not an IPv4 network",
        ),
    ],
)
def test_invalid_fields_are_named_in_one_line(kind: str, spec: dict[str, Any], message: str) -> None:
    parse = parse_configuration if kind == "BGPConfiguration" else parse_peer
    with pytest.raises(InvalidObject) as err:
        parse(obj(kind, spec))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith(f"{kind} default: ")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"apiVersion": "projectcalico.org/v3"}, "apiVersion: must be trellis.dev/v1"),
        ({"kind": "BGPPeer"}, "kind: must be BGPConfiguration"),
        ({"metadata": {"name": "Bad_Name"}}, "metadata.name: 'Bad_Name' is not a DNS subdomain"),
        ({"spec": None}, "spec: required"),
    ],
)
def test_invalid_headers_are_named(change: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidObject, match="^BGPConfiguration .*" + message.replace("(", r"\(")):
        parse_configuration({**obj("BGPConfiguration", {}), **change})


def test_a_name_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(InvalidObject, match="is not a DNS subdomain"):
        parse_configuration(obj("BGPConfiguration", {}, name="x\n"))
