"""Parsing Kubernetes objects: the API's defaults, empty versus missing, and one-line errors."""

from __future__ import annotations

import copy
import ipaddress
import re
from typing import Any

import pytest

from trellis.model.k8s import (
    NAMESPACE_NAME_LABEL,
    Action,
    ClusterTier,
    ContainerPort,
    Direction,
    InvalidObject,
    NamedPort,
    NetworksPeer,
    NodesPeer,
    PodsPeer,
    PortRange,
    Protocol,
    UnsupportedPeer,
    parse_cluster_network_policy,
    parse_namespace,
    parse_network_policy,
    parse_node,
    parse_pod,
)
from trellis.model.selector import EVERYTHING, LabelSelector

INGRESS, EGRESS = Direction.INGRESS, Direction.EGRESS
APP_A = LabelSelector.of(app="a")


def np(spec: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"namespace": "x", "name": "p"}, "spec": spec}


def cnp(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "c"},
        "spec": {"tier": "Admin", "priority": 10, "subject": {"namespaces": {}}, **spec},
    }


def test_namespace_gets_its_name_label() -> None:
    ns = parse_namespace({"metadata": {"name": "x", "labels": {"team": "a"}}})
    assert dict(ns.labels) == {"team": "a", NAMESPACE_NAME_LABEL: "x"}


def test_pod() -> None:
    pod = parse_pod(
        {
            "metadata": {"namespace": "x", "name": "a", "labels": {"app": "a"}},
            "spec": {
                "nodeName": "node-1",
                "containers": [
                    {
                        "ports": [
                            {"name": "http", "containerPort": 80},
                            {"containerPort": 53, "protocol": "UDP"},
                        ]
                    },
                    {"name": "no-ports"},
                ],
            },
            "status": {"podIP": "10.244.0.5", "phase": "Running"},
        }
    )
    assert (pod.key, pod.node, pod.ip, pod.networked) == (
        "x/a",
        "node-1",
        ipaddress.IPv4Address("10.244.0.5"),
        True,
    )
    assert pod.ports == (ContainerPort("http", 80, Protocol.TCP), ContainerPort("", 53, Protocol.UDP))


@pytest.mark.parametrize(
    ("changes", "networked"),
    [
        ({"status": {}}, False),
        ({"status": {"podIP": ""}}, False),
        ({"spec": {"hostNetwork": True}, "status": {"podIP": "172.30.0.11"}}, False),
        ({"status": {"podIP": "10.244.0.5", "phase": "Succeeded"}}, False),
        ({"status": {"podIP": "10.244.0.5", "phase": "Pending"}}, True),
    ],
)
def test_which_pods_policy_can_select(changes: dict[str, Any], networked: bool) -> None:
    assert parse_pod({"metadata": {"namespace": "x", "name": "a"}, **changes}).networked is networked


def test_node_keeps_ipv4_internal_and_external_addresses() -> None:
    node = parse_node(
        {
            "metadata": {"name": "n", "labels": {"zone": "a"}},
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": "172.30.0.11"},
                    {"type": "ExternalIP", "address": "203.0.113.9"},
                    {"type": "InternalIP", "address": "fd00::1"},
                    {"type": "Hostname", "address": "n"},
                ]
            },
        }
    )
    assert node.addresses == (ipaddress.IPv4Address("172.30.0.11"), ipaddress.IPv4Address("203.0.113.9"))


@pytest.mark.parametrize(
    ("spec", "types"),
    [
        ({}, {INGRESS}),
        ({"policyTypes": []}, {INGRESS}),
        ({"egress": []}, {INGRESS}),
        ({"egress": [{}]}, {INGRESS, EGRESS}),
        ({"ingress": [{}], "egress": [{}], "policyTypes": ["Egress"]}, {EGRESS}),
        ({"policyTypes": ["Ingress", "Egress"]}, {INGRESS, EGRESS}),
    ],
)
def test_policy_types_default_as_the_api_server_sets_them(
    spec: dict[str, Any], types: set[Direction]
) -> None:
    assert parse_network_policy(np(spec)).policy_types == types


def test_missing_pod_selector_selects_the_whole_namespace() -> None:
    assert parse_network_policy(np({})).pod_selector == EVERYTHING
    assert parse_network_policy(np({"podSelector": None})).subject == PodsPeer("x", EVERYTHING)


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ({"podSelector": {"matchLabels": {"app": "a"}}}, PodsPeer("x", APP_A)),
        ({"podSelector": {}}, PodsPeer("x", EVERYTHING)),
        ({"namespaceSelector": {"matchLabels": {"app": "a"}}}, PodsPeer(APP_A, EVERYTHING)),
        ({"namespaceSelector": {}}, PodsPeer(EVERYTHING, EVERYTHING)),
        (
            {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "a"}}},
            PodsPeer(EVERYTHING, APP_A),
        ),
        (
            {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
            NetworksPeer((ipaddress.IPv4Network("10.0.0.0/8"),), (ipaddress.IPv4Network("10.1.0.0/16"),)),
        ),
        ({"ipBlock": {"cidr": "10.0.0.1/8"}}, NetworksPeer((ipaddress.IPv4Network("10.0.0.0/8"),))),
    ],
)
def test_network_policy_peers(peer: dict[str, Any], expected: object) -> None:
    policy = parse_network_policy(np({"ingress": [{"from": [peer]}]}))
    assert policy.ingress[0].peers == (expected,)


@pytest.mark.parametrize(
    ("rule", "peers", "ports"),
    [
        ({}, None, None),
        ({"from": [], "ports": []}, None, None),
        ({"ports": [{}]}, None, (PortRange(Protocol.TCP),)),
        ({"ports": [{"protocol": "UDP"}]}, None, (PortRange(Protocol.UDP, 0, 65535),)),
        ({"ports": [{"port": 80}]}, None, (PortRange(Protocol.TCP, 80, 80),)),
        (
            {"ports": [{"port": 80, "endPort": 90, "protocol": "SCTP"}]},
            None,
            (PortRange(Protocol.SCTP, 80, 90),),
        ),
        ({"ports": [{"port": "http"}]}, None, (NamedPort("http", Protocol.TCP),)),
    ],
)
def test_network_policy_rules_empty_and_missing(rule: dict[str, Any], peers: object, ports: object) -> None:
    parsed = parse_network_policy(np({"ingress": [rule]})).ingress[0]
    assert (parsed.action, parsed.peers, parsed.ports) == (Action.ACCEPT, peers, ports)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"ingress": [{"from": [{}]}]},
            "spec.ingress[0].from[0]: must specify a peer (podSelector, namespaceSelector or ipBlock)",
        ),
        (
            {"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]},
            "spec.egress[0].to[0]: may not specify both ipBlock and another peer",
        ),
        (
            {"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]}]},
            "spec.ingress[0].from[0].ipBlock.except[0]: 11.0.0.0/16 must be a strict subset of 10.0.0.0/8",
        ),
        (
            {"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/8"]}}]}]},
            "spec.ingress[0].from[0].ipBlock.except[0]: 10.0.0.0/8 must be a strict subset of 10.0.0.0/8",
        ),
        (
            {"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0/8"}}]}]},
            "spec.ingress[0].from[0].ipBlock.cidr: '10.0.0/8' does not appear to be an IPv4 or IPv6 network",
        ),
        (
            {"ingress": [{"ports": [{"port": 90, "endPort": 80}]}]},
            "spec.ingress[0].ports[0].endPort: 80 is not in 90..65535",
        ),
        (
            {"ingress": [{"ports": [{"port": "http", "endPort": 80}]}]},
            "spec.ingress[0].ports[0].endPort: may not be used with a named port",
        ),
        (
            {"ingress": [{"ports": [{"endPort": 80}]}]},
            "spec.ingress[0].ports[0].endPort: may not be used without port",
        ),
        ({"ingress": [{"ports": [{"port": 0}]}]}, "spec.ingress[0].ports[0].port: 0 is not in 1..65535"),
        (
            {"ingress": [{"ports": [{"port": "HTTP"}]}]},
            "spec.ingress[0].ports[0].port: 'HTTP' is not a valid port name (IANA_SVC_NAME)",
        ),
        (
            {"ingress": [{"ports": [{"port": "80"}]}]},
            "spec.ingress[0].ports[0].port: '80' is not a valid port name (IANA_SVC_NAME)",
        ),
        (
            {"ingress": [{"ports": [{"port": 80, "protocol": "tcp"}]}]},
            "spec.ingress[0].ports[0].protocol: 'tcp' is not one of TCP, UDP, SCTP",
        ),
        ({"policyTypes": ["ingress"]}, "spec.policyTypes[0]: 'ingress' is not one of Ingress, Egress"),
        (
            {"podSelector": {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["b"]}]}},
            "spec.podSelector.matchExpressions[0].values: must be empty for Exists",
        ),
        ({"ingress": {}}, "spec.ingress: must be a list"),
    ],
)
def test_network_policy_errors_name_object_and_field(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidObject, match=f"^{re.escape('NetworkPolicy x/p: ' + message)}$"):
        parse_network_policy(np(spec))


def test_unreadable_objects_are_named_as_far_as_possible() -> None:
    with pytest.raises(InvalidObject, match=r"^NetworkPolicy \?: object: must be an object$"):
        parse_network_policy([])
    with pytest.raises(InvalidObject, match=r"^NetworkPolicy x/p: spec: required$"):
        parse_network_policy({"metadata": {"namespace": "x", "name": "p"}})
    with pytest.raises(InvalidObject, match=r"^Pod x/a: status.podIP: .*"):
        parse_pod({"metadata": {"namespace": "x", "name": "a"}, "status": {"podIP": "fd00::1"}})


FULL_CNP = cnp(
    subject={"pods": {"namespaceSelector": {"matchLabels": {"app": "a"}}, "podSelector": {}}},
    ingress=[
        {
            "name": "first",
            "action": "Pass",
            "from": [{"namespaces": {}}, {"pods": {"podSelector": {"matchLabels": {"app": "a"}}}}],
            "protocols": [
                {"tcp": {"destinationPort": {"number": 80}}},
                {"udp": {"destinationPort": {"range": {"start": 1000, "end": 2000}}}},
                {"destinationNamedPort": "http"},
            ],
        }
    ],
    egress=[
        {"action": "Deny", "to": [{"networks": ["10.0.0.0/8", "fd00::/8"]}, {"nodes": {}}]},
        {"action": "Accept", "to": [{"domainNames": ["*.example.com"]}, {"somethingNew": {}}]},
    ],
)


def test_cluster_network_policy() -> None:
    policy = parse_cluster_network_policy(FULL_CNP)
    assert (policy.key, policy.tier, policy.priority) == ("c", ClusterTier.ADMIN, 10)
    assert policy.subject == PodsPeer(APP_A, EVERYTHING)
    (rule,) = policy.ingress
    assert (rule.name, rule.action) == ("first", Action.PASS)
    assert rule.peers == (PodsPeer(EVERYTHING), PodsPeer(EVERYTHING, APP_A))  # missing namespaceSelector: all
    assert rule.ports == (
        PortRange(Protocol.TCP, 80, 80),
        PortRange(Protocol.UDP, 1000, 2000),
        NamedPort("http"),
    )
    deny, accept = policy.egress
    assert deny.peers == (
        NetworksPeer((ipaddress.IPv4Network("10.0.0.0/8"), ipaddress.IPv6Network("fd00::/8"))),
        NodesPeer(EVERYTHING),
    )
    assert deny.ports is None
    assert accept.peers == (UnsupportedPeer("domainNames"), UnsupportedPeer("somethingNew"))


def _with(path: list[Any], value: Any) -> dict[str, Any]:
    obj = copy.deepcopy(FULL_CNP)
    target = obj
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return obj


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (_with(["spec", "tier"], "Developer"), "spec.tier: 'Developer' is not one of Admin, Baseline"),
        (_with(["spec", "priority"], 1001), "spec.priority: 1001 is not in 0..1000"),
        (_with(["spec", "priority"], "1"), "spec.priority: must be an integer"),
        (_with(["spec", "subject"], {}), "spec.subject: one of namespaces, pods is required"),
        (
            _with(["spec", "subject"], {"namespaces": {}, "pods": {"podSelector": {}}}),
            "spec.subject: exactly one of namespaces, pods may be set, not namespaces, pods",
        ),
        (_with(["spec", "subject"], {"pods": {}}), "spec.subject.pods.podSelector: required"),
        (_with(["spec", "ingress", 0, "from"], []), "spec.ingress[0].from: must have 1 to 25 items, not 0"),
        (
            _with(["spec", "ingress"], [{"action": "Deny", "from": [{"namespaces": {}}]}] * 26),
            "spec.ingress: must have 0 to 25 items, not 26",
        ),
        (
            _with(["spec", "ingress", 0, "action"], "Allow"),
            "spec.ingress[0].action: 'Allow' is not one of Accept, Deny, Pass",
        ),
        (
            _with(["spec", "ingress", 0, "name"], "n" * 101),
            "spec.ingress[0].name: longer than 100 characters",
        ),
        (
            _with(["spec", "ingress", 0, "protocols"], []),
            "spec.ingress[0].protocols: must have 1 to 25 items, not 0",
        ),
        (
            _with(["spec", "ingress", 0, "protocols", 0], {}),
            "spec.ingress[0].protocols[0]: one of tcp, udp, sctp, destinationNamedPort is required",
        ),
        (
            _with(["spec", "ingress", 0, "protocols", 0], {"tcp": {}}),
            "spec.ingress[0].protocols[0].tcp.destinationPort: required",
        ),
        (
            _with(["spec", "ingress", 0, "protocols", 0], {"tcp": {"destinationPort": {"number": 0}}}),
            "spec.ingress[0].protocols[0].tcp.destinationPort.number: 0 is not in 1..65535",
        ),
        (
            _with(
                ["spec", "ingress", 0, "protocols", 0],
                {"tcp": {"destinationPort": {"range": {"start": 9, "end": 9}}}},
            ),
            "spec.ingress[0].protocols[0].tcp.destinationPort.range: start 9 must be less than end 9",
        ),
        (
            _with(
                ["spec", "ingress", 0, "protocols", 0],
                {"tcp": {"destinationPort": {"number": 1, "range": {"start": 1, "end": 2}}}},
            ),
            "spec.ingress[0].protocols[0].tcp.destinationPort: "
            "exactly one of number, range may be set, not number, range",
        ),
        (
            _with(["spec", "ingress", 0, "from", 0], {"namespaces": {}, "pods": {"podSelector": {}}}),
            "spec.ingress[0].from[0]: exactly one of namespaces, pods may be set, not namespaces, pods",
        ),
        (
            _with(["spec", "egress", 0, "to", 0], {"networks": ["10.0.0.1/8"]}),
            "spec.egress[0].to[0].networks[0]: 10.0.0.1/8 has host bits set",
        ),
        (
            _with(["spec", "egress", 0, "protocols"], [{"destinationNamedPort": "http"}]),
            "spec.egress[0].protocols: "
            "networks/nodes/domainNames peer cannot be set with destinationNamedPort",
        ),
        (
            _with(["spec", "egress", 1, "action"], "Deny"),
            "spec.egress[1].to[0].domainNames: domainNames is only supported in Accept rules",
        ),
    ],
)
def test_cluster_network_policy_errors_name_object_and_field(obj: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidObject, match=f"^{re.escape('ClusterNetworkPolicy c: ' + message)}$"):
        parse_cluster_network_policy(obj)


def test_an_ingress_peer_of_an_egress_only_kind_is_unknown_there() -> None:
    """`networks` is no ingress peer: to an ingress rule it is a field from a newer API (fail closed)."""
    policy = parse_cluster_network_policy(
        cnp(ingress=[{"action": "Deny", "from": [{"networks": ["10.0.0.0/8"]}]}])
    )
    assert policy.ingress[0].peers == (UnsupportedPeer("networks"),)
