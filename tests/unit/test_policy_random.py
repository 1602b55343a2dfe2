"""Random policies on the x/y/z cluster: the rendered nftables always agree with the oracle.

Hypothesis draws pod labels, NetworkPolicies and ClusterNetworkPolicies from a small grammar
(every selector form, peer kind, port kind, action and tier) and checks every pod pair on
every probed port, plus traffic to and from an outside address, on both.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.policy_cluster import (
    PODS,
    PORTS,
    Cluster,
    cluster_policy,
    expression,
    match,
    network_policy,
    pod,
)

OUTSIDE = ipaddress.IPv4Address("192.0.2.7")
POD_SELECTORS = st.sampled_from(
    [
        {},
        match(color="red"),
        match(pod="a"),
        expression("color", "NotIn", "red"),
        expression("color", "Exists"),
    ]
)
NS_SELECTORS = st.sampled_from(
    [{}, match(ns="x"), expression("ns", "In", "y", "z"), expression("ns", "NotIn", "y")]
)
NETWORKS = st.sampled_from(["10.244.1.0/24", "10.244.2.8/30", "192.0.2.0/24", "0.0.0.0/0"])
NP_PORTS = st.sampled_from(
    [
        {"port": 80},
        {"port": 81, "protocol": "UDP"},
        {"port": 80, "endPort": 81},
        {"protocol": "UDP"},
        {"port": "serve-81-tcp"},
        {"port": "serve-80-udp", "protocol": "UDP"},
        {"port": "serve-80-udp"},
    ]
)
CNP_PORTS = st.sampled_from(
    [
        {"tcp": {"destinationPort": {"number": 80}}},
        {"udp": {"destinationPort": {"range": {"start": 80, "end": 81}}}},
        {"sctp": {"destinationPort": {"number": 81}}},
    ]
)
CNP_NAMED_PORTS = st.sampled_from(
    [{"destinationNamedPort": "serve-81-tcp"}, {"destinationNamedPort": "serve-80-udp"}]
)


@st.composite
def np_peer(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["pod", "namespace", "both", "ipBlock"]))
    if kind == "ipBlock":
        return {
            "ipBlock": {
                "cidr": "10.244.0.0/16",
                "except": draw(st.lists(st.just("10.244.3.0/24"), max_size=1)),
            }
        }
    peer: dict[str, Any] = {}
    if kind in ("pod", "both"):
        peer["podSelector"] = draw(POD_SELECTORS)
    if kind in ("namespace", "both"):
        peer["namespaceSelector"] = draw(NS_SELECTORS)
    return peer


@st.composite
def np_rule(draw: st.DrawFn, peers_field: str) -> dict[str, Any]:
    rule: dict[str, Any] = {}
    if draw(st.booleans()):
        rule[peers_field] = draw(st.lists(np_peer(), min_size=1, max_size=2))
    if draw(st.booleans()):
        rule["ports"] = draw(st.lists(NP_PORTS, min_size=1, max_size=2))
    return rule


@st.composite
def a_network_policy(draw: st.DrawFn, index: int) -> dict[str, Any]:
    return network_policy(
        f"np-{index}",
        namespace=draw(st.sampled_from(["x", "y", "z"])),
        pod_selector=draw(POD_SELECTORS),
        ingress=draw(st.none() | st.lists(np_rule("from"), max_size=2)),
        egress=draw(st.none() | st.lists(np_rule("to"), max_size=2)),
        types=draw(st.none() | st.sampled_from([["Ingress"], ["Egress"], ["Ingress", "Egress"]])),
    )


@st.composite
def cnp_rule(draw: st.DrawFn, egress: bool) -> dict[str, Any]:
    kinds = ["namespaces", "pods", *(["networks", "nodes"] if egress else [])]
    peers = []
    for kind in draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=2)):
        if kind == "namespaces":
            peers.append({"namespaces": draw(NS_SELECTORS)})
        elif kind == "pods":
            peers.append(
                {"pods": {"namespaceSelector": draw(NS_SELECTORS), "podSelector": draw(POD_SELECTORS)}}
            )
        elif kind == "networks":
            peers.append({"networks": draw(st.lists(NETWORKS, min_size=1, max_size=2, unique=True))})
        else:
            peers.append({"nodes": draw(st.sampled_from([{}, match(zone="zone-1")]))})
    rule: dict[str, Any] = {
        "action": draw(st.sampled_from(["Accept", "Deny", "Pass"])),
        "to" if egress else "from": peers,
    }
    ports = CNP_PORTS if any("networks" in p or "nodes" in p for p in peers) else CNP_PORTS | CNP_NAMED_PORTS
    if draw(st.booleans()):
        rule["protocols"] = draw(st.lists(ports, min_size=1, max_size=2))
    return rule


@st.composite
def a_cluster_policy(draw: st.DrawFn, index: int) -> dict[str, Any]:
    subject = draw(
        st.sampled_from(["namespaces", "pods"]).map(
            lambda kind: (
                {"namespaces": match(ns="x")}
                if kind == "namespaces"
                else {"pods": {"podSelector": match(color="red")}}
            )
        )
    )
    return cluster_policy(
        f"cnp-{index}",
        draw(st.sampled_from(["Admin", "Baseline"])),
        draw(st.integers(0, 3)),
        subject,
        ingress=draw(st.lists(cnp_rule(egress=False), max_size=2)),
        egress=draw(st.lists(cnp_rule(egress=True), max_size=2)),
    )


@st.composite
def objects(draw: st.DrawFn) -> list[dict[str, Any]]:
    colours = draw(st.lists(st.sampled_from(["red", "blue", None]), min_size=len(PODS), max_size=len(PODS)))
    pods = [
        pod(key, labels={"pod": key.split("/")[1], **({"color": colour} if colour else {})})
        for key, colour in zip(PODS, colours, strict=True)
    ]
    policies = [draw(a_network_policy(i)) for i in range(draw(st.integers(0, 3)))]
    policies += [draw(a_cluster_policy(i)) for i in range(draw(st.integers(0, 3)))]
    return [*pods, *policies]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(objects())
def test_kernel_agrees_with_the_oracle(drawn: list[dict[str, Any]]) -> None:
    cluster = Cluster(*drawn)
    for port, protocol in PORTS:
        for src in PODS:
            destinations: list[str | ipaddress.IPv4Address] = [*(p for p in PODS if p != src), OUTSIDE]
            for dst in destinations:
                expected = cluster.allowed(src, dst, port, protocol)
                assert cluster.kernel_allowed(src, dst, port, protocol) == expected, (
                    f"{src} -> {dst} {port}/{protocol}: {cluster.oracle.evaluate(src, dst, port, protocol)}"
                )
            assert cluster.kernel_allowed(OUTSIDE, src, port, protocol) == cluster.allowed(
                OUTSIDE, src, port, protocol
            )
