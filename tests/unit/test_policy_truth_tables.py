"""NetworkPolicy truth tables in the shape of the upstream Kubernetes e2e suite (`netpol`).

Each scenario applies policies to the x/y/z x a/b/c cluster and states the expected 9x9
reachability for TCP and UDP on ports 80 and 81, built as upstream's `Reachability` builds it:
start from all-allowed, deny what the policy isolates, allow what its rules let in. The
expectations come from the Kubernetes documentation and API comments, never from the
calculation; the oracle must produce them, and the rendered nftables of every node, walked
packet by packet, must agree with the oracle on every pair. The last scenarios add
ClusterNetworkPolicy tiers (the network-policy-api's words) to the same shape.

`tests/e2e/test_policy.py` runs these very scenarios in a lab and compares real packets with
the same expected matrices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.unit.policy_cluster import (
    ALL_NAMESPACES,
    FROM_Y,
    NS_X,
    PODS,
    PORTS,
    Cluster,
    admin,
    baseline,
    expression,
    from_,
    match,
    namespace,
    network_policy,
    pod,
    show,
    to,
)
from trellis.model.k8s import Protocol

Select = Callable[[str], bool]
TCP, UDP, SCTP = Protocol.TCP, Protocol.UDP, Protocol.SCTP


def pods(*keys: str) -> Select:
    return lambda key: key in keys


def ns(*names: str) -> Select:
    return lambda key: key.split("/")[0] in names


def every(_: str) -> bool:
    return True


def nobody(_: str) -> bool:
    return False


class Expect:
    """Expected reachability: every pair allowed until told otherwise (upstream's `Reachability`)."""

    def __init__(self) -> None:
        self.allowed = {(s, d): True for s in PODS for d in PODS}

    def set(self, src: Select, dst: Select, value: bool) -> Expect:
        for s, d in self.allowed:
            if src(s) and dst(d):
                self.allowed[(s, d)] = value
        return self

    def allow(self, src: Select, dst: Select) -> Expect:
        return self.set(src, dst, True)

    def __and__(self, other: Expect) -> Expect:
        both = Expect()
        both.allowed = {pair: self.allowed[pair] and other.allowed[pair] for pair in self.allowed}
        return both

    def with_loopback(self) -> dict[tuple[str, str], bool]:
        """A pod reaches itself over its own loopback, whatever the policy (upstream's AllowLoopback)."""
        return {(s, d): allowed or s == d for (s, d), allowed in self.allowed.items()}


def ingress_only(dst: Select, allowed_from: Select = nobody) -> Expect:
    """`dst` is isolated for ingress and lets in only `allowed_from`."""
    return Expect().set(every, dst, False).allow(allowed_from, dst)


def egress_only(src: Select, allowed_to: Select = nobody) -> Expect:
    return Expect().set(src, every, False).allow(src, allowed_to)


def on(port: int, protocol: Protocol, *allowed: tuple[int, Protocol]) -> bool:
    return (port, protocol) in allowed


A = pods("x/a")
Y_BUT_B = {"namespaceSelector": match(ns="y"), "podSelector": expression("pod", "NotIn", "b")}
ALL_PORTS = [(p, proto) for p, proto in PORTS]


@dataclass(frozen=True)
class Scenario:
    name: str
    objects: tuple[dict[str, Any], ...]
    expect: Callable[[int, Protocol], Expect]


def scenario(name: str, *objects: dict[str, Any], expect: Callable[[int, Protocol], Expect]) -> Any:
    return pytest.param(Scenario(name, objects, expect), id=name)


def always(expected: Expect) -> Callable[[int, Protocol], Expect]:
    return lambda port, protocol: expected


def ingress_a(*rules: dict[str, Any], selector: dict[str, Any] | None = None) -> dict[str, Any]:
    """A policy on x/a (or `selector`) with these ingress rules."""
    return network_policy("ingress-a", pod_selector=selector or match(pod="a"), ingress=list(rules))


def egress_a(*rules: dict[str, Any]) -> dict[str, Any]:
    return network_policy("egress-a", pod_selector=match(pod="a"), egress=list(rules), types=["Egress"])


SCENARIOS = [
    scenario(
        "default-deny-ingress",
        network_policy("deny", ingress=[]),
        expect=always(ingress_only(ns("x"))),
    ),
    scenario(
        "default-deny-egress",
        network_policy("deny", types=["Egress"]),
        expect=always(egress_only(ns("x"))),
    ),
    scenario(
        "default-deny-all",
        network_policy("deny", types=["Ingress", "Egress"]),
        expect=always(ingress_only(ns("x")) & egress_only(ns("x"))),
    ),
    scenario("allow-all-ingress", network_policy("allow", ingress=[{}]), expect=always(Expect())),
    scenario(
        "allow-all-egress", network_policy("allow", egress=[{}], types=["Egress"]), expect=always(Expect())
    ),
    scenario(
        "ingress-from-pod-in-same-namespace",
        ingress_a({"from": [{"podSelector": match(pod="b")}]}),
        expect=always(ingress_only(A, pods("x/b"))),
    ),
    scenario(
        "ingress-from-namespace-match-labels",
        ingress_a({"from": [{"namespaceSelector": match(ns="y")}]}),
        expect=always(ingress_only(A, ns("y"))),
    ),
    scenario(
        "ingress-from-namespace-match-expressions-in",
        ingress_a({"from": [{"namespaceSelector": expression("ns", "In", "y")}]}),
        expect=always(ingress_only(A, ns("y"))),
    ),
    scenario(
        "ingress-from-namespace-not-in",
        ingress_a({"from": [{"namespaceSelector": expression("ns", "NotIn", "x")}]}),
        expect=always(ingress_only(A, ns("y", "z"))),
    ),
    scenario(
        "ingress-from-pods-match-expressions-in",
        ingress_a({"from": [{"podSelector": expression("pod", "In", "b", "c")}]}),
        expect=always(ingress_only(A, pods("x/b", "x/c"))),
    ),
    scenario(
        "ingress-pod-selector-or-namespace-selector",
        ingress_a({"from": [{"podSelector": match(pod="b")}, {"namespaceSelector": match(ns="y")}]}),
        expect=always(ingress_only(A, lambda k: k == "x/b" or k.startswith("y/"))),
    ),
    scenario(
        "ingress-pod-selector-and-namespace-selector",
        ingress_a({"from": [{"namespaceSelector": match(ns="y"), "podSelector": match(pod="b")}]}),
        expect=always(ingress_only(A, pods("y/b"))),
    ),
    scenario(
        "ingress-namespace-and-pod-match-expressions",
        ingress_a(
            {
                "from": [
                    {
                        "namespaceSelector": expression("ns", "In", "y", "z"),
                        "podSelector": expression("pod", "In", "a", "b"),
                    }
                ]
            }
        ),
        expect=always(ingress_only(A, pods("y/a", "y/b", "z/a", "z/b"))),
    ),
    scenario(
        "ingress-multiple-peers",
        ingress_a(
            {
                "from": [
                    {"podSelector": match(pod="b")},
                    {"namespaceSelector": match(ns="z"), "podSelector": match(pod="c")},
                ]
            }
        ),
        expect=always(ingress_only(A, pods("x/b", "z/c"))),
    ),
    scenario(
        "ingress-port-81-from-namespace-y",
        ingress_a({"from": [{"namespaceSelector": match(ns="y")}], "ports": [{"port": 81}]}),
        expect=lambda port, proto: ingress_only(A, ns("y") if on(port, proto, (81, TCP)) else nobody),
    ),
    scenario(
        "ingress-port-80-from-all",
        ingress_a({"ports": [{"port": 80}]}),
        expect=lambda port, proto: ingress_only(A, every if on(port, proto, (80, TCP)) else nobody),
    ),
    scenario(
        "ingress-ports-80-and-81",
        ingress_a({"ports": [{"port": 80, "protocol": "TCP"}, {"port": 81, "protocol": "TCP"}]}),
        expect=lambda port, proto: ingress_only(A, every if proto is TCP else nobody),
    ),
    scenario(
        "ingress-named-port-tcp",
        ingress_a({"ports": [{"port": "serve-81-tcp"}]}),
        expect=lambda port, proto: ingress_only(A, every if on(port, proto, (81, TCP)) else nobody),
    ),
    scenario(
        "ingress-named-port-udp",
        ingress_a({"ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}),
        expect=lambda port, proto: ingress_only(A, every if on(port, proto, (81, UDP)) else nobody),
    ),
    scenario(
        "ingress-named-port-protocol-mismatch",
        ingress_a({"ports": [{"port": "serve-81-tcp", "protocol": "UDP"}]}),
        expect=always(ingress_only(A)),
    ),
    scenario(
        "ingress-end-port-80-81",
        ingress_a({"ports": [{"port": 80, "endPort": 81}]}),
        expect=lambda port, proto: ingress_only(A, every if proto is TCP else nobody),
    ),
    scenario(
        "ingress-end-port-81-90",
        ingress_a({"ports": [{"port": 81, "endPort": 90}]}),
        expect=lambda port, proto: ingress_only(A, every if on(port, proto, (81, TCP)) else nobody),
    ),
    scenario(
        "ingress-udp-any-port",
        ingress_a({"ports": [{"protocol": "UDP"}]}),
        expect=lambda port, proto: ingress_only(A, every if proto is UDP else nobody),
    ),
    scenario(
        "ingress-sctp-only",
        ingress_a({"ports": [{"protocol": "SCTP"}]}),
        expect=always(ingress_only(A)),
    ),
    scenario(
        "egress-to-namespace-y",
        egress_a({"to": [{"namespaceSelector": match(ns="y")}]}),
        expect=always(egress_only(A, ns("y"))),
    ),
    scenario(
        "egress-port-80-to-all",
        egress_a({"ports": [{"port": 80}]}),
        expect=lambda port, proto: egress_only(A, every if on(port, proto, (80, TCP)) else nobody),
    ),
    scenario(
        "egress-named-port-udp",
        egress_a({"ports": [{"port": "serve-80-udp", "protocol": "UDP"}]}),
        expect=lambda port, proto: egress_only(A, every if on(port, proto, (80, UDP)) else nobody),
    ),
    scenario(
        "egress-named-port-protocol-mismatch",
        egress_a({"ports": [{"port": "serve-80-udp"}]}),
        expect=always(egress_only(A)),
    ),
    scenario(
        "egress-ip-block-except",
        egress_a({"to": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.2.0/24"]}}]}),
        expect=always(egress_only(A, ns("x", "z"))),
    ),
    scenario(
        "ingress-ip-block-one-pod",
        ingress_a({"from": [{"ipBlock": {"cidr": "10.244.2.11/32"}}]}),
        expect=always(ingress_only(A, pods("y/b"))),
    ),
    scenario(
        "ingress-ip-block-except",
        ingress_a({"from": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.2.0/24"]}}]}),
        expect=always(ingress_only(A, ns("x", "z"))),
    ),
    scenario(
        "ingress-ip-block-everything",
        ingress_a({"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}),
        expect=always(Expect()),
    ),
    scenario(
        "union-of-two-policies",
        network_policy(
            "from-b", pod_selector=match(pod="a"), ingress=[{"from": [{"podSelector": match(pod="b")}]}]
        ),
        network_policy(
            "from-y", pod_selector=match(pod="a"), ingress=[{"from": [{"namespaceSelector": match(ns="y")}]}]
        ),
        expect=always(ingress_only(A, lambda k: k == "x/b" or k.startswith("y/"))),
    ),
    scenario(
        "policy-selecting-no-pod",
        network_policy("nothing", pod_selector=match(pod="d"), ingress=[]),
        expect=always(Expect()),
    ),
    scenario(
        "policy-in-other-namespace",
        network_policy("deny-y-a", namespace="y", pod_selector=match(pod="a"), ingress=[]),
        expect=always(ingress_only(pods("y/a"))),
    ),
    scenario(
        "ingress-and-egress-in-one-policy",
        network_policy(
            "both",
            pod_selector=match(pod="a"),
            ingress=[{"from": [{"podSelector": match(pod="b")}]}],
            egress=[{"to": [{"podSelector": match(pod="c")}]}],
            types=["Ingress", "Egress"],
        ),
        expect=always(ingress_only(A, pods("x/b")) & egress_only(A, pods("x/c"))),
    ),
    scenario(
        "egress-allowed-but-destination-isolated",
        egress_a({"to": [{"podSelector": match(pod="b")}]}),
        network_policy("deny-b", pod_selector=match(pod="b"), ingress=[]),
        expect=always(egress_only(A, pods("x/b")) & ingress_only(pods("x/b"))),
    ),
    scenario(
        "peer-all-pods-in-all-namespaces",
        ingress_a({"from": [{"namespaceSelector": {}, "podSelector": {}}]}),
        expect=always(Expect()),
    ),
    scenario(
        "peer-all-namespaces",
        ingress_a({"from": [{"namespaceSelector": {}}]}),
        expect=always(Expect()),
    ),
    scenario(
        "peer-empty-pod-selector-is-own-namespace",
        ingress_a({"from": [{"podSelector": {}}]}),
        expect=always(ingress_only(A, ns("x"))),
    ),
    scenario(
        "egress-rules-imply-both-types",
        network_policy("egress", pod_selector=match(pod="a"), egress=[{"to": [{"namespaceSelector": {}}]}]),
        expect=always(ingress_only(A)),
    ),
    scenario(
        "empty-egress-list-implies-ingress-only",
        network_policy("ingress", pod_selector=match(pod="a"), egress=[]),
        expect=always(ingress_only(A)),
    ),
    scenario(
        "egress-type-ignores-ingress-rules",
        network_policy("egress", pod_selector=match(pod="a"), ingress=[{}], types=["Egress"]),
        expect=always(egress_only(A)),
    ),
    scenario(
        "target-match-labels-and-expressions",
        network_policy(
            "a-only",
            pod_selector={
                "matchLabels": {"pod": "a"},
                "matchExpressions": [{"key": "pod", "operator": "NotIn", "values": ["b"]}],
            },
            ingress=[],
        ),
        expect=always(ingress_only(A)),
    ),
    scenario(
        "target-does-not-exist-selects-all",
        network_policy(
            "unlabelled",
            pod_selector={"matchExpressions": [{"key": "role", "operator": "DoesNotExist"}]},
            ingress=[],
        ),
        expect=always(ingress_only(ns("x"))),
    ),
    scenario(
        "ingress-from-namespaces-with-label",
        namespace("x", team="t"),
        namespace("y", team="t"),
        ingress_a(
            {"from": [{"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "Exists"}]}}]}
        ),
        expect=always(ingress_only(A, ns("x", "y"))),
    ),
    scenario(
        "default-deny-with-same-namespace-allowed",
        network_policy("deny", ingress=[]),
        network_policy("same-namespace", ingress=[{"from": [{"podSelector": {}}]}]),
        expect=always(ingress_only(ns("x"), ns("x"))),
    ),
    scenario(
        "egress-deny-x-ingress-allow-y",
        network_policy("deny", types=["Egress"]),
        network_policy("allow", namespace="y", ingress=[{}]),
        expect=always(egress_only(ns("x"))),
    ),
    scenario(
        "ingress-named-port-from-one-pod",
        ingress_a(
            {
                "from": [{"namespaceSelector": match(ns="y"), "podSelector": match(pod="b")}],
                "ports": [{"port": "serve-81-udp", "protocol": "UDP"}],
            }
        ),
        expect=lambda port, proto: ingress_only(A, pods("y/b") if on(port, proto, (81, UDP)) else nobody),
    ),
    scenario(
        "relabelled-pod-matches",
        pod("x/c", labels={"pod": "b"}),
        ingress_a({"from": [{"podSelector": match(pod="b")}]}),
        expect=always(ingress_only(A, pods("x/b", "x/c"))),
    ),
    scenario(
        "relabelled-namespace-matches",
        namespace("y", team="blue"),
        ingress_a({"from": [{"namespaceSelector": match(team="blue")}]}),
        expect=always(ingress_only(A, ns("y"))),
    ),
    scenario(
        "egress-to-pod-on-port-81",
        egress_a({"to": [{"podSelector": match(pod="b")}], "ports": [{"port": 81}]}),
        expect=lambda port, proto: egress_only(A, pods("x/b") if on(port, proto, (81, TCP)) else nobody),
    ),
    scenario(
        "ingress-from-pods-not-in",
        ingress_a({"from": [{"podSelector": expression("pod", "NotIn", "a")}]}),
        expect=always(ingress_only(A, pods("x/b", "x/c"))),
    ),
    scenario(
        "ingress-from-metadata-name-label",
        ingress_a({"from": [{"namespaceSelector": match(**{"kubernetes.io/metadata.name": "z"})}]}),
        expect=always(ingress_only(A, ns("z"))),
    ),
    scenario(
        "egress-port-range-and-named-port",
        egress_a({"ports": [{"port": 79, "endPort": 80}, {"port": "serve-81-udp", "protocol": "UDP"}]}),
        expect=lambda port, proto: egress_only(A, every if on(port, proto, (80, TCP), (81, UDP)) else nobody),
    ),
    scenario(
        "admin-deny-over-networkpolicy-allow",
        network_policy("allow-all", ingress=[{}]),
        admin("no-y", 10, NS_X, ingress=[from_("Deny", FROM_Y, name="deny-y")]),
        expect=always(Expect().set(ns("y"), ns("x"), False)),
    ),
    scenario(
        "admin-accept-over-networkpolicy-deny",
        network_policy("deny", ingress=[]),
        admin("let-y-in", 10, NS_X, ingress=[from_("Accept", FROM_Y)]),
        expect=always(ingress_only(ns("x"), ns("y"))),
    ),
    scenario(
        "admin-pass-to-networkpolicy",
        admin("pass-y", 1, NS_X, ingress=[from_("Pass", FROM_Y)]),
        admin("deny-all", 2, NS_X, ingress=[from_("Deny", ALL_NAMESPACES)]),
        network_policy(
            "y-b", ingress=[{"from": [{"namespaceSelector": match(ns="y"), "podSelector": match(pod="b")}]}]
        ),
        expect=always(ingress_only(ns("x"), pods("y/b"))),
    ),
    scenario(
        "admin-pass-skips-to-baseline",
        admin("pass-y", 1, NS_X, ingress=[from_("Pass", FROM_Y)]),
        admin("deny-y-z", 2, NS_X, ingress=[from_("Deny", {"namespaces": expression("ns", "In", "y", "z")})]),
        baseline("y-b-only", 1, NS_X, ingress=[from_("Deny", {"pods": Y_BUT_B})]),
        expect=always(Expect().set(ns("y", "z"), ns("x"), False).allow(pods("y/b"), ns("x"))),
    ),
    scenario(
        "baseline-only-where-no-networkpolicy-selects",
        baseline("deny-all", 1, ALL_NAMESPACES, ingress=[from_("Deny", ALL_NAMESPACES)]),
        network_policy("allow-all", ingress=[{}]),
        expect=always(ingress_only(ns("y", "z"))),
    ),
    scenario(
        "baseline-egress-where-networkpolicy-isolates-ingress-only",
        network_policy("in-only", ingress=[{}]),
        baseline("no-egress-to-y", 1, NS_X, egress=[to("Deny", {"namespaces": match(ns="y")})]),
        expect=always(Expect().set(ns("x"), ns("y"), False)),
    ),
    scenario(
        "admin-egress-deny-within-networkpolicy-allow",
        admin("no-z", 1, NS_X, egress=[to("Deny", {"namespaces": match(ns="z")})]),
        network_policy("out", egress=[{}], types=["Egress"]),
        expect=always(Expect().set(ns("x"), ns("z"), False)),
    ),
    scenario(
        "admin-deny-named-port",
        admin(
            "no-81",
            1,
            NS_X,
            ingress=[from_("Deny", ALL_NAMESPACES, protocols=[{"destinationNamedPort": "serve-81-tcp"}])],
        ),
        expect=lambda port, proto: Expect().set(every, ns("x"), not on(port, proto, (81, TCP))),
    ),
    scenario(
        "admin-deny-port-range-and-number",
        admin(
            "ports",
            1,
            NS_X,
            ingress=[
                from_(
                    "Deny",
                    ALL_NAMESPACES,
                    protocols=[
                        {"tcp": {"destinationPort": {"range": {"start": 80, "end": 81}}}},
                        {"udp": {"destinationPort": {"number": 81}}},
                    ],
                )
            ],
        ),
        expect=lambda port, proto: Expect().set(every, ns("x"), on(port, proto, (80, UDP))),
    ),
    scenario(
        "admin-pods-subject",
        admin(
            "a-only",
            1,
            {"pods": {"namespaceSelector": match(ns="x"), "podSelector": match(pod="a")}},
            ingress=[from_("Deny", ALL_NAMESPACES)],
        ),
        expect=always(ingress_only(A)),
    ),
]


@pytest.mark.parametrize("case", SCENARIOS)
def test_truth_table(case: Scenario) -> None:
    """The oracle gives the expected matrix on every port and protocol; the kernel tables agree."""
    cluster = Cluster(*case.objects)
    for port, protocol in PORTS:
        expected = case.expect(port, protocol).with_loopback()
        oracle = cluster.matrix(port, protocol)
        assert oracle == expected, f"{case.name} {port}/{protocol}: oracle\n{show(oracle, expected)}"
        kernel = cluster.kernel_matrix(port, protocol)
        assert kernel == {k: v for k, v in oracle.items() if k in kernel}, (
            f"{case.name} {port}/{protocol}: nftables\n{show(kernel, oracle)}"
        )


def test_there_are_at_least_forty_scenarios() -> None:
    assert len(SCENARIOS) >= 40
    assert len({p.id for p in SCENARIOS}) == len(SCENARIOS)
