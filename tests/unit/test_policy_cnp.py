"""ClusterNetworkPolicy tiers, actions and priorities, against the network-policy-api's words.

Every test states a few connections and the tier, policy and rule that must decide them (what
`trellis policy explain` will print), then checks that the rendered nftables of every node
agree with the oracle on every pod pair, port and protocol.
"""

from __future__ import annotations

import ipaddress

import pytest

from tests.unit.policy_cluster import (
    ALL_NAMESPACES,
    FROM_Y,
    NS_X,
    PODS,
    PORTS,
    SERVE_PORTS,
    Cluster,
    admin,
    baseline,
    from_,
    match,
    network_policy,
    node_ip,
    pod,
    to,
)
from trellis.calc.policy import TierKind
from trellis.model.k8s import Protocol

TCP, UDP = Protocol.TCP, Protocol.UDP
EXTERNAL = [
    ipaddress.IPv4Address("8.8.8.8"),
    ipaddress.IPv4Address("1.1.1.1"),
    *map(node_ip, ("node-1", "node-2")),
]


def decided(
    cluster: Cluster, src: str | ipaddress.IPv4Address, dst: str, port: int = 80, protocol: Protocol = TCP
) -> tuple[bool, str, str, str]:
    """(allowed, tier, policy, rule) of the deciding decision."""
    verdict = cluster.oracle.evaluate(src, dst, port, protocol)
    deciding = verdict.deciding
    return verdict.allowed, str(deciding.tier or ""), deciding.policy, deciding.rule


def assert_kernel_agrees(cluster: Cluster) -> None:
    """Every pod pair, port and protocol, and pods to and from a few outside addresses."""
    for port, protocol in PORTS:
        pairs: list[tuple[str | ipaddress.IPv4Address, str | ipaddress.IPv4Address]] = [
            (s, d) for s in PODS for d in PODS if s != d
        ]
        pairs += [(p, ip) for p in PODS for ip in EXTERNAL] + [(ip, p) for p in PODS for ip in EXTERNAL]
        for src, dst in pairs:
            assert cluster.kernel_allowed(src, dst, port, protocol) == cluster.allowed(
                src, dst, port, protocol
            ), f"{src} -> {dst} {port}/{protocol}: {cluster.oracle.evaluate(src, dst, port, protocol)}"


def test_admin_deny_overrides_a_network_policy_allow() -> None:
    cluster = Cluster(
        network_policy("allow-all", ingress=[{}]),
        admin("no-y", 10, NS_X, ingress=[from_("Deny", FROM_Y, name="deny-y")]),
    )
    assert decided(cluster, "y/a", "x/a") == (False, "admin", "no-y", "ingress[0] deny-y")
    assert decided(cluster, "z/a", "x/a") == (True, "networkpolicy", "x/allow-all", "ingress[0]")
    assert_kernel_agrees(cluster)


def test_admin_accept_overrides_a_network_policy_deny() -> None:
    cluster = Cluster(
        network_policy("deny", ingress=[]),
        admin("let-y-in", 10, NS_X, ingress=[from_("Accept", FROM_Y)]),
    )
    assert decided(cluster, "y/b", "x/a") == (True, "admin", "let-y-in", "ingress[0]")
    assert decided(cluster, "x/b", "x/a") == (False, "networkpolicy", "x/deny", "default deny")
    assert_kernel_agrees(cluster)


def test_pass_hands_the_decision_to_network_policy() -> None:
    cluster = Cluster(
        admin("pass-y", 1, NS_X, ingress=[from_("Pass", FROM_Y)]),
        admin("deny-all", 2, NS_X, ingress=[from_("Deny", ALL_NAMESPACES)]),
        network_policy(
            "y-b", ingress=[{"from": [{"namespaceSelector": match(ns="y"), "podSelector": match(pod="b")}]}]
        ),
    )
    assert decided(cluster, "y/b", "x/a") == (True, "networkpolicy", "x/y-b", "ingress[0]")
    assert decided(cluster, "y/a", "x/a")[:2] == (False, "networkpolicy")
    assert decided(cluster, "z/a", "x/a") == (False, "admin", "deny-all", "ingress[0]")
    assert_kernel_agrees(cluster)


def test_pass_without_network_policy_goes_to_baseline() -> None:
    cluster = Cluster(
        admin("pass-y", 1, NS_X, ingress=[from_("Pass", FROM_Y)]),
        baseline("no-y", 1, ALL_NAMESPACES, ingress=[from_("Deny", FROM_Y)]),
    )
    assert decided(cluster, "y/a", "x/a") == (False, "baseline", "no-y", "ingress[0]")
    assert decided(cluster, "z/a", "x/a") == (True, "baseline", "", "no rule matched")
    assert_kernel_agrees(cluster)


def test_baseline_applies_only_where_no_network_policy_selects_the_pod() -> None:
    cluster = Cluster(
        baseline("deny-all", 1, ALL_NAMESPACES, ingress=[from_("Deny", ALL_NAMESPACES)]),
        network_policy("allow-all", ingress=[{}]),
    )
    for src in PODS:
        for dst in PODS:
            expected = dst.startswith("x/") or src == dst
            assert cluster.allowed(src, dst, 80, TCP) == expected, (src, dst)
    assert decided(cluster, "x/a", "y/a") == (False, "baseline", "deny-all", "ingress[0]")
    assert_kernel_agrees(cluster)


def test_baseline_is_decided_per_direction() -> None:
    """A NetworkPolicy for egress only leaves the pod's ingress to the Baseline tier."""
    cluster = Cluster(
        network_policy("egress-only", egress=[{}], types=["Egress"]),
        baseline("deny-in", 1, ALL_NAMESPACES, ingress=[from_("Deny", ALL_NAMESPACES)]),
        baseline("deny-out", 2, ALL_NAMESPACES, egress=[to("Deny", ALL_NAMESPACES)]),
    )
    assert decided(cluster, "x/b", "x/a") == (False, "baseline", "deny-in", "ingress[0]")
    verdict = cluster.oracle.evaluate("x/a", "y/a", 80, TCP)
    assert not verdict.allowed and str(verdict.decisions[0]).startswith(
        "egress of x/a: allowed by networkpolicy"
    )
    assert decided(cluster, "y/a", "z/a") == (False, "baseline", "deny-out", "egress[0]")
    assert_kernel_agrees(cluster)


@pytest.mark.parametrize(("accept", "deny", "allowed"), [(10, 20, True), (20, 10, False)])
def test_lower_priority_value_goes_first(accept: int, deny: int, allowed: bool) -> None:
    cluster = Cluster(
        admin("accept-y", accept, NS_X, ingress=[from_("Accept", FROM_Y)]),
        admin("deny-y", deny, NS_X, ingress=[from_("Deny", FROM_Y)]),
    )
    assert decided(cluster, "y/a", "x/a")[:3] == (allowed, "admin", "accept-y" if allowed else "deny-y")
    assert_kernel_agrees(cluster)


def test_equal_priorities_are_ordered_by_name() -> None:
    """The API leaves the order open; Trellis makes it stable: by name."""
    cluster = Cluster(
        admin("b-deny", 5, NS_X, ingress=[from_("Deny", FROM_Y)]),
        admin("a-accept", 5, NS_X, ingress=[from_("Accept", FROM_Y)]),
    )
    assert decided(cluster, "y/a", "x/a")[:3] == (True, "admin", "a-accept")


def test_rules_of_a_policy_apply_in_written_order() -> None:
    y_b = {"pods": {"namespaceSelector": match(ns="y"), "podSelector": match(pod="b")}}
    cluster = Cluster(
        network_policy("deny", ingress=[]),
        admin(
            "ordered", 1, NS_X, ingress=[from_("Deny", y_b, name="not-b"), from_("Accept", FROM_Y, name="y")]
        ),
    )
    assert decided(cluster, "y/b", "x/a") == (False, "admin", "ordered", "ingress[0] not-b")
    assert decided(cluster, "y/a", "x/a") == (True, "admin", "ordered", "ingress[1] y")
    assert_kernel_agrees(cluster)


def test_ingress_named_port() -> None:
    cluster = Cluster(
        admin(
            "no-81",
            1,
            NS_X,
            ingress=[from_("Deny", ALL_NAMESPACES, protocols=[{"destinationNamedPort": "serve-81-tcp"}])],
        ),
    )
    assert not cluster.allowed("y/a", "x/a", 81, TCP)
    assert cluster.allowed("y/a", "x/a", 80, TCP) and cluster.allowed("y/a", "x/a", 81, UDP)
    assert_kernel_agrees(cluster)


def test_egress_named_port_resolves_on_each_destination() -> None:
    """`web` is 8080 on x/a and 9090 on y/a: one rule, different numbers per destination pod."""
    cluster = Cluster(
        pod("x/a", ports=[*SERVE_PORTS, {"name": "web", "containerPort": 8080}]),
        pod("y/a", ports=[*SERVE_PORTS, {"name": "web", "containerPort": 9090}]),
        admin(
            "no-web",
            1,
            {"pods": {"podSelector": match(pod="b")}},
            egress=[to("Deny", ALL_NAMESPACES, protocols=[{"destinationNamedPort": "web"}])],
        ),
    )
    for dst, web, other in (("x/a", 8080, 9090), ("y/a", 9090, 8080)):
        assert not cluster.allowed("x/b", dst, web, TCP)
        assert cluster.allowed("x/b", dst, other, TCP)
        assert cluster.allowed("x/b", dst, web, UDP)
        for port in (web, other):
            assert cluster.kernel_allowed("x/b", dst, port, TCP) == cluster.allowed("x/b", dst, port, TCP)
    assert_kernel_agrees(cluster)


def test_egress_accept_leaves_the_destination_ingress_to_decide() -> None:
    cluster = Cluster(
        admin("x-out", 1, NS_X, egress=[to("Accept", ALL_NAMESPACES)]),
        network_policy("deny", namespace="y", ingress=[]),
    )
    verdict = cluster.oracle.evaluate("x/a", "y/a", 80, TCP)
    assert not verdict.allowed
    assert [(d.direction, d.allowed, d.tier) for d in verdict.decisions] == [
        ("Egress", True, TierKind.ADMIN),
        ("Ingress", False, TierKind.NETWORK_POLICY),
    ]
    assert cluster.allowed("x/a", "z/a", 80, TCP)
    assert_kernel_agrees(cluster)


def test_networks_peer_matches_outside_and_inside_the_cluster() -> None:
    cluster = Cluster(
        admin(
            "no-dns",
            1,
            NS_X,
            egress=[to("Deny", {"networks": ["8.8.8.0/24"]}), to("Deny", {"networks": ["10.244.2.0/24"]})],
        ),
    )
    assert not cluster.allowed("x/a", ipaddress.IPv4Address("8.8.8.8"), 53, UDP)
    assert cluster.allowed("x/a", ipaddress.IPv4Address("1.1.1.1"), 53, UDP)
    assert decided(cluster, "x/a", "y/c") == (False, "admin", "no-dns", "egress[1]")
    assert cluster.allowed("x/a", "z/c", 80, TCP)
    assert_kernel_agrees(cluster)


def test_nodes_peer_and_the_own_node() -> None:
    """node-2 is in zone-1; a pod always reaches its own node (not filtered)."""
    cluster = Cluster(
        admin("no-zone-1", 1, ALL_NAMESPACES, egress=[to("Deny", {"nodes": match(zone="zone-1")})])
    )
    assert not cluster.allowed("x/a", node_ip("node-2"), 10250, TCP)  # x/a is on node-1
    assert cluster.allowed("x/b", node_ip("node-2"), 10250, TCP)  # x/b is on node-2: its own node
    assert cluster.allowed("x/a", node_ip("node-3"), 10250, TCP)
    assert_kernel_agrees(cluster)


def test_pods_subject() -> None:
    cluster = Cluster(
        admin(
            "a-only",
            1,
            {"pods": {"namespaceSelector": match(ns="x"), "podSelector": match(pod="a")}},
            ingress=[from_("Deny", ALL_NAMESPACES)],
        )
    )
    assert not cluster.allowed("y/a", "x/a", 80, TCP)
    assert cluster.allowed("y/a", "x/b", 80, TCP) and cluster.allowed("x/a", "y/a", 80, TCP)
    assert_kernel_agrees(cluster)


def test_an_unknown_peer_fails_closed() -> None:
    """The API: an unknown peer makes a Deny or Pass rule deny all, and an Accept rule match nothing."""
    cluster = Cluster(
        network_policy("deny", ingress=[]),
        admin(
            "future",
            1,
            NS_X,
            ingress=[from_("Accept", {"futurePeer": {}})],
            egress=[to("Pass", {"futurePeer": {}})],
        ),
    )
    assert decided(cluster, "y/a", "x/a")[:2] == (False, "networkpolicy")
    assert decided(cluster, "x/a", "y/a") == (False, "admin", "future", "egress[0]")
    assert_kernel_agrees(cluster)


def test_domain_names_are_not_supported_and_match_nothing() -> None:
    cluster = Cluster(
        admin(
            "dns",
            1,
            NS_X,
            egress=[
                to("Accept", {"domainNames": ["*.example.com"]}),
                to("Deny", {"networks": ["0.0.0.0/0"]}),
            ],
        )
    )
    assert decided(cluster, "x/a", "y/a") == (False, "admin", "dns", "egress[1]")
    assert_kernel_agrees(cluster)


def test_port_numbers_ranges_and_protocols() -> None:
    cluster = Cluster(
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
                        {"sctp": {"destinationPort": {"number": 80}}},
                    ],
                )
            ],
        )
    )
    assert [cluster.allowed("y/a", "x/a", port, proto) for port, proto in PORTS] == [
        False,
        False,
        True,
        False,
    ]
    assert not cluster.allowed("y/a", "x/a", 80, Protocol.SCTP)
    assert cluster.kernel_allowed("y/a", "x/a", 80, Protocol.SCTP) is False
    assert_kernel_agrees(cluster)


def test_pass_in_the_last_tier_allows() -> None:
    cluster = Cluster(
        baseline("pass", 1, NS_X, ingress=[from_("Pass", ALL_NAMESPACES), from_("Deny", ALL_NAMESPACES)])
    )
    assert decided(cluster, "y/a", "x/a") == (True, "baseline", "pass", "ingress[0]")
    assert_kernel_agrees(cluster)


def test_admin_egress_deny_within_a_network_policy_allow() -> None:
    cluster = Cluster(
        admin("no-z", 1, NS_X, egress=[to("Deny", {"namespaces": match(ns="z")})]),
        network_policy("out", egress=[{}], types=["Egress"]),
    )
    assert decided(cluster, "x/a", "z/b") == (False, "admin", "no-z", "egress[0]")
    egress = cluster.oracle.evaluate("x/a", "y/b", 80, TCP).decisions[0]
    assert (egress.allowed, egress.tier, egress.policy) == (True, "networkpolicy", "x/out")
    assert_kernel_agrees(cluster)


def test_verdict_reads_as_an_explanation() -> None:
    cluster = Cluster(network_policy("deny", namespace="y", ingress=[]))
    verdict = cluster.oracle.evaluate("x/a", "y/a", 80, TCP)
    assert str(verdict) == (
        "egress of x/a: allowed, no policy applies to the pod; "
        "ingress of y/a: denied by networkpolicy y/deny default deny"
    )
    assert str(cluster.oracle.evaluate("x/a", "x/a", 80, TCP)) == "allowed, loopback: never leaves the pod"


def test_kernel_comments_name_the_rule_the_oracle_names() -> None:
    """What `explain` will line up: the oracle's decision and the comment of the rule the packet met."""
    cluster = Cluster(
        network_policy("allow-all", ingress=[{}]),
        admin("no-y", 10, NS_X, ingress=[from_("Deny", FROM_Y, name="deny-y")]),
    )
    egress_hop, ingress_hop = cluster.kernel_hops("y/b", "x/a", 80, TCP)  # node-2, then node-1
    assert egress_hop == (True, [])  # y/b is unrestricted: no map element, the chain's policy accepts
    assert ingress_hop == (
        False,
        ["ingress policy of the pod that receives", "admin no-y ingress[0] deny-y: Deny"],
    )
    assert decided(cluster, "y/b", "x/a") == (False, "admin", "no-y", "ingress[0] deny-y")
    assert cluster.kernel_hops("z/a", "x/a", 80, TCP)[-1] == (
        True,
        [
            "ingress policy of the pod that receives",
            "admin no rule matched",
            "networkpolicy x/allow-all ingress[0]: Accept",
        ],
    )
    assert cluster.kernel_hops("x/a", node_ip("node-1"), 80, TCP) == []
