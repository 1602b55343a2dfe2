"""The policy calculation: its shape (tiers, sets, ports), problems, and sequences of states."""

from __future__ import annotations

import ipaddress
import json
import random
from collections.abc import Mapping
from typing import Any

import pytest

from tests.unit.policy_changes import ChangingCluster
from tests.unit.policy_cluster import (
    NAT,
    NODES,
    PODS,
    SERVE_PORTS,
    Cluster,
    base_objects,
    cluster_policy,
    datastore_key,
    inputs_of,
    interface,
    match,
    namespace,
    network_policy,
    pod,
    pod_ip,
)
from trellis.calc.policy import (
    _MANY_PODS,
    NamedPortMatch,
    Outcome,
    PolicyCalculator,
    PolicyInputs,
    PolicyReader,
    PolicyState,
    TierKind,
    compute_policy,
    read_policy_inputs,
)
from trellis.dataplane.render.nft import render_table
from trellis.model.k8s import Action, PortRange, Protocol

TCP, UDP = Protocol.TCP, Protocol.UDP
Net = ipaddress.IPv4Network


def state_of(*objects: Mapping[str, Any], node: str = "node-1", pods: tuple[str, ...] = PODS) -> PolicyState:
    inputs = inputs_of(*objects)
    local = {interface(key): key for key in pods if inputs.pods[key].node == node}
    return compute_policy(inputs, node, local)


def endpoint(state: PolicyState, key: str) -> Any:
    return state.endpoints[interface(key)]


def test_unrestricted_pods_have_empty_programs() -> None:
    state = state_of()
    assert {e.pod for e in state.endpoints.values()} == {"x/a", "y/a", "z/a"}
    assert all(e.ingress == () and e.egress == () for e in state.endpoints.values())
    assert state.address_sets == {} and state.port_sets == {} and state.problems == ()


def test_isolation_without_rules_is_a_tier_that_denies() -> None:
    state = state_of(network_policy("deny", ingress=[]))
    (tier,) = endpoint(state, "x/a").ingress
    assert (tier.kind, tier.rules, tier.policies, tier.default) == (
        TierKind.NETWORK_POLICY,
        (),
        ("x/deny",),
        Outcome.DENY,
    )
    assert endpoint(state, "x/a").egress == () and endpoint(state, "y/a").ingress == ()


def test_equal_selectors_share_one_address_set() -> None:
    """Written as matchLabels in one policy and matchExpressions in another: one set, two rules."""
    state = state_of(
        network_policy("labels", ingress=[{"from": [{"namespaceSelector": match(ns="y")}]}]),
        network_policy(
            "expressions",
            pod_selector=match(pod="a"),
            ingress=[
                {
                    "from": [
                        {
                            "namespaceSelector": {
                                "matchExpressions": [{"key": "ns", "operator": "In", "values": ["y"]}]
                            }
                        }
                    ]
                }
            ],
        ),
    )
    (tier,) = endpoint(state, "x/a").ingress
    assert [r.origin.policy for r in tier.rules] == ["x/expressions", "x/labels"]
    assert tier.rules[0].peers == tier.rules[1].peers
    (only,) = state.address_sets.values()
    assert only.peer == "pods * in namespaces ns=y"
    assert only.networks == (Net("10.244.2.10/31"), Net("10.244.2.12/32"))


def test_address_sets_hold_only_pods_with_addresses_of_their_own() -> None:
    host = pod("y/h", ip="172.30.0.11")
    host["spec"]["hostNetwork"] = True
    pending = pod("y/p", ip="10.244.9.1")
    del pending["status"]["podIP"]
    done = pod("y/d", ip="10.244.9.2")
    done["status"]["phase"] = "Failed"
    state = state_of(
        host, pending, done, network_policy("p", ingress=[{"from": [{"namespaceSelector": {}}]}])
    )
    (only,) = state.address_sets.values()
    assert sum(net.num_addresses for net in only.networks) == len(PODS)


def test_ip_block_except_and_ipv6_blocks() -> None:
    state = state_of(
        network_policy(
            "p",
            ingress=[
                {"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/9", "10.128.0.0/10"]}}]},
                {"from": [{"ipBlock": {"cidr": "fd00::/8"}}]},
            ],
        )
    )
    by_peer = {s.peer: s.networks for s in state.address_sets.values()}
    assert by_peer == {
        "networks 10.0.0.0/8 except 10.0.0.0/9,10.128.0.0/10": (Net("10.192.0.0/10"),),
        "networks fd00::/8": (),
    }


def test_ingress_named_ports_resolve_on_the_endpoint_itself() -> None:
    """`web` is 8080 on x/a and 9090 on y/a: each endpoint's chain gets its own number."""
    web = network_policy("web", namespace="x", ingress=[{"ports": [{"port": "web"}]}])
    web_y = network_policy("web", namespace="y", ingress=[{"ports": [{"port": "web"}]}])
    state = state_of(
        pod("x/a", ports=[{"name": "web", "containerPort": 8080}]),
        pod("y/a", ports=[{"name": "web", "containerPort": 9090, "protocol": "TCP"}]),
        pod("z/a", ports=[]),
        web,
        web_y,
    )
    assert endpoint(state, "x/a").ingress[0].rules[0].ports.ranges == (PortRange(TCP, 8080, 8080),)
    assert endpoint(state, "y/a").ingress[0].rules[0].ports.ranges == (PortRange(TCP, 9090, 9090),)
    assert state.port_sets == {}


def test_pods_alike_share_their_tiers() -> None:
    """Replicas (same namespace, labels and ports) get the very same tiers, computed once; a pod
    whose named port means another number gets its own ingress tier, and shares its egress."""
    web = network_policy("web", ingress=[{"ports": [{"port": "web"}]}], egress=[{"ports": [{"port": 53}]}])
    replica, other = "x/a2", "x/a3"
    state = state_of(
        pod("x/a", ports=[{"name": "web", "containerPort": 8080}]),
        pod(replica, {"pod": "a"}, [{"name": "web", "containerPort": 8080}], ip="10.244.1.20"),
        pod(other, {"pod": "a"}, [{"name": "web", "containerPort": 9090}], ip="10.244.1.21"),
        web,
        pods=(*PODS, replica, other),
    )
    a, twin, unlike = (endpoint(state, key) for key in ("x/a", replica, other))
    assert a.ingress[0] is twin.ingress[0] and a.egress[0] is twin.egress[0]
    assert unlike.ingress[0].rules[0].ports.ranges == (PortRange(TCP, 9090, 9090),)
    assert unlike.ingress[0] is not a.ingress[0] and unlike.egress[0] is a.egress[0]


def test_egress_named_ports_become_one_set_per_name() -> None:
    state = state_of(
        network_policy(
            "p", egress=[{"ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}], types=["Egress"]
        )
    )
    (rule,) = endpoint(state, "x/a").egress[0].rules
    assert rule.ports.named == (NamedPortMatch("port_serve-81-udp", UDP),)
    elements = state.port_sets["port_serve-81-udp"].elements
    assert elements == tuple(sorted((pod_ip(key), UDP, 81) for key in PODS))


def test_rule_ports_are_merged_and_unresolvable_rules_left_out() -> None:
    state = state_of(
        network_policy(
            "p",
            ingress=[
                {
                    "ports": [
                        {"port": 80},
                        {"port": 81, "endPort": 90},
                        {"port": 85},
                        {"protocol": "UDP"},
                        {"port": 53, "protocol": "UDP"},
                    ]
                },
                {"ports": [{"port": "no-such-port"}]},
            ],
        )
    )
    (tier,) = endpoint(state, "x/a").ingress
    (rule,) = tier.rules
    assert rule.ports.ranges == (PortRange(TCP, 80, 90), PortRange(UDP, 0, 65535))


def test_admin_policies_by_priority_then_name_rules_as_written() -> None:
    deny = {"action": "Deny", "from": [{"namespaces": {}}]}
    state = state_of(
        cluster_policy("late", "Admin", 9, {"namespaces": {}}, ingress=[deny]),
        cluster_policy("b-early", "Admin", 1, {"namespaces": {}}, ingress=[deny, {**deny, "name": "second"}]),
        cluster_policy("a-early", "Admin", 1, {"namespaces": {}}, ingress=[deny]),
        cluster_policy("base", "Baseline", 0, {"namespaces": {}}, ingress=[deny]),
    )
    (admin, base) = endpoint(state, "x/a").ingress
    assert [str(r.origin) for r in admin.rules] == [
        "admin a-early ingress[0]",
        "admin b-early ingress[0]",
        "admin b-early ingress[1] second",
        "admin late ingress[0]",
    ]
    assert (base.kind, base.default) == (TierKind.BASELINE, Outcome.ALLOW)


def test_a_cluster_policy_without_rules_for_a_direction_leaves_it_alone() -> None:
    state = state_of(
        cluster_policy(
            "in-only",
            "Admin",
            1,
            {"namespaces": {}},
            ingress=[{"action": "Deny", "from": [{"namespaces": {}}]}],
        )
    )
    assert endpoint(state, "x/a").egress == ()


def test_unsupported_peers_fail_closed() -> None:
    state = state_of(
        cluster_policy(
            "future",
            "Admin",
            1,
            {"namespaces": {}},
            ingress=[
                {"action": "Accept", "from": [{"newKind": {}}]},
                {"action": "Pass", "from": [{"newKind": {}}]},
            ],
        )
    )
    (rule,) = endpoint(state, "x/a").ingress[0].rules
    assert (rule.action, rule.peers, rule.ports, rule.origin.index) == (Action.DENY, None, None, 1)


def test_problems_name_the_endpoint() -> None:
    inputs = inputs_of()
    state = compute_policy(inputs, "node-2", {"trl00000000001": "x/a", "trl00000000002": "x/gone"})
    assert state.problems == (
        "pod x/a (trl00000000001) is attached on node-2 but its spec.nodeName is 'node-1'",
        "pod x/gone (trl00000000002): no pod object yet; its traffic is dropped",
    )
    assert list(state.endpoints) == ["trl00000000001"]


def test_a_workload_attached_without_kubernetes_is_open_even_under_default_deny() -> None:
    """No namespace, no labels: no policy can select it, so it is not isolated (nor dropped)."""
    inputs = inputs_of(network_policy("deny-all", "x", {}, ingress=[], types=["Ingress", "Egress"]))
    state = compute_policy(inputs, "node-1", {"trl00000000003": "c0ffee123456"})
    assert state.endpoints["trl00000000003"].ingress == () == state.endpoints["trl00000000003"].egress
    assert state.problems == ()


def test_every_interface_of_a_pod_gets_the_pods_programs() -> None:
    """A pod with two interfaces on the node (a second network, or a stale sandbox's until CNI
    DEL): both carry the pod's programs, neither is dropped as having none; once the stale one
    detaches, the live one keeps its very policy."""
    isolating = network_policy(
        "p", pod_selector=match(pod="a"), ingress=[{"from": [{"podSelector": match(pod="b")}]}]
    )
    inputs = inputs_of(isolating)
    live, stale = interface("x/a"), interface("x/a", "net1")
    calculator = PolicyCalculator()
    both = calculator.compute(inputs, "node-1", {stale: "x/a", live: "x/a"})
    assert both.problems == () and set(both.endpoints) == {live, stale}
    assert both.endpoints[live] == both.endpoints[stale]
    (tier,) = both.endpoints[live].ingress
    assert (both.endpoints[live].pod, tier.kind, tier.policies) == ("x/a", TierKind.NETWORK_POLICY, ("x/p",))
    assert both == compute_policy(inputs, "node-1", {live: "x/a", stale: "x/a"})
    one = calculator.compute(inputs, "node-1", {live: "x/a"})
    assert list(one.endpoints) == [live] and one.endpoints[live] is both.endpoints[live]
    assert one.address_sets == both.address_sets


def test_read_policy_inputs_skips_invalid_objects_and_says_why() -> None:
    store = {datastore_key(obj): obj for obj in base_objects()}
    store["/trellis/k8s/networkpolicies/x/bad"] = {
        "metadata": {"namespace": "x", "name": "bad"},
        "spec": {"ingress": [{"from": [{}]}]},
    }
    store["/trellis/k8s/other/thing"] = {"ignored": True}
    inputs, errors = read_policy_inputs(store)
    assert errors == (
        "/trellis/k8s/networkpolicies/x/bad: NetworkPolicy x/bad: spec.ingress[0].from[0]: "
        "must specify a peer (podSelector, namespaceSelector or ipBlock)",
    )
    assert inputs.network_policies == {} and len(inputs.pods) == len(PODS)


def _render(objects: list[dict[str, Any]] | None) -> dict[str, str]:
    """Each node's rendered table, as text; None is the empty datastore."""
    if objects is None:
        return {n: json.dumps(render_table(NAT, compute_policy(PolicyInputs(), n, {}))) for n in NODES}
    cluster = Cluster(*objects)
    return {n: json.dumps(render_table(NAT, cluster.oracle.state(n))) for n in NODES}


STATES: list[tuple[list[dict[str, Any]], dict[tuple[str, str], bool]]] = [
    ([], {("y/a", "x/a"): True}),
    (
        [network_policy("deny", ingress=[])],
        {("y/a", "x/a"): False, ("x/b", "x/a"): False, ("x/a", "y/a"): True},
    ),
    (
        [
            network_policy("deny", ingress=[]),
            cluster_policy(
                "y-in",
                "Admin",
                1,
                {"namespaces": match(ns="x")},
                ingress=[{"action": "Accept", "from": [{"namespaces": match(ns="y")}]}],
            ),
        ],
        {("y/a", "x/a"): True, ("z/a", "x/a"): False},
    ),
    (
        [
            pod("x/c", labels={"pod": "b"}),
            network_policy(
                "b", pod_selector=match(pod="a"), ingress=[{"from": [{"podSelector": match(pod="b")}]}]
            ),
        ],
        {("x/c", "x/a"): True, ("x/b", "x/a"): True, ("y/a", "x/a"): False},
    ),
    ([namespace("y", team="t")], {("y/a", "x/a"): True}),
]


@pytest.mark.parametrize("order", ["forward", "reversed", "with-empties", "shuffled"])
def test_sequences_of_states(order: str) -> None:
    """Each state gives the same answers and the same tables whatever came before it (Felix's
    calc-graph tests: sequences reversed, with empty states in between)."""
    expected = [_render(objects) for objects, _ in STATES]
    empty = _render(None)
    sequence: list[int | None] = list(range(len(STATES)))
    if order == "reversed":
        sequence.reverse()
    elif order == "with-empties":
        sequence = [i for n in sequence for i in (None, n)] + [None]
    elif order == "shuffled":
        random.Random(7).shuffle(sequence)
    for index in sequence:
        if index is None:
            assert _render(None) == empty
            assert all('"ingress"' in text for text in empty.values())
            continue
        objects, facts = STATES[index]
        assert _render(objects) == expected[index]
        cluster = Cluster(*objects)
        for (src, dst), allowed in facts.items():
            assert cluster.allowed(src, dst, 80, TCP) is allowed, (index, src, dst)


def test_object_order_does_not_matter() -> None:
    objects = [
        *base_objects(),
        network_policy("a", ingress=[{"from": [{"namespaceSelector": match(ns="y")}]}]),
        network_policy("b", pod_selector=match(pod="a"), egress=[{"ports": [{"port": "serve-80-tcp"}]}]),
        cluster_policy(
            "c", "Admin", 3, {"namespaces": {}}, ingress=[{"action": "Pass", "from": [{"namespaces": {}}]}]
        ),
        pod("x/a", ports=[*SERVE_PORTS, {"name": "web", "containerPort": 8080}]),
    ]
    items = list({datastore_key(o): o for o in objects}.items())
    local = [(interface(key), key) for key in ("x/a", "y/a", "z/a")]
    states, tables = [], set()
    for seed in range(4):
        random.Random(seed).shuffle(items)
        random.Random(seed).shuffle(local)
        inputs, _ = read_policy_inputs(dict(items))
        states.append(compute_policy(inputs, "node-1", dict(local)))
        tables.add(json.dumps(render_table(NAT, states[-1])))
    assert all(state == states[0] for state in states) and len(tables) == 1


@pytest.mark.parametrize("seed", range(4))
def test_a_calculator_with_memory_computes_what_a_new_one_does(seed: int) -> None:
    """Change after change, the reader and calculator the agent keeps give the state a fresh
    computation gives; with nothing changed, the very same state (the renderer skips by identity)."""
    cluster, reader, calculator = ChangingCluster(random.Random(seed)), PolicyReader(), PolicyCalculator()
    for step in range(150):
        what = cluster.change()
        inputs, errors = reader.read(cluster.objects)
        state = calculator.compute(inputs, "node-1", cluster.local)
        fresh, fresh_errors = read_policy_inputs(cluster.objects)
        assert (inputs, errors) == (fresh, fresh_errors), f"step {step}: {what}"
        assert state == compute_policy(fresh, "node-1", cluster.local), f"step {step}: {what}"
        again, _ = reader.read(dict(cluster.objects))
        assert again is inputs and calculator.compute(again, "node-1", dict(cluster.local)) is state


@pytest.mark.parametrize("seed", range(2))
def test_bursts_of_changes_are_computed_as_afresh(seed: int) -> None:
    """Hundreds of changes between two computations (a burst, a new snapshot): the calculator
    checks each changed pod against each set when a few pods changed, and makes every pod set
    again when more than `_MANY_PODS` did; both give what a new calculator gives."""
    cluster, reader, calculator = ChangingCluster(random.Random(seed)), PolicyReader(), PolicyCalculator()
    last, changed = PolicyInputs(), []
    for burst in range(5):
        for _ in range(250):
            cluster.change()
        inputs, _ = reader.read(cluster.objects)
        changed.append(sum(last.pods.get(k) != inputs.pods.get(k) for k in last.pods.keys() | inputs.pods))
        state = calculator.compute(inputs, "node-1", cluster.local)
        assert state == compute_policy(inputs, "node-1", cluster.local), f"burst {burst}"
        last = inputs
    assert min(changed[1:]) <= _MANY_PODS < max(changed), changed


def test_reading_again_parses_only_what_changed() -> None:
    """Objects policy does not read differently (a pod's annotations) change nothing at all; a
    changed pod is a new object beside the very same others."""
    store = {datastore_key(obj): obj for obj in base_objects()}
    reader = PolicyReader()
    inputs, _ = reader.read(store)
    annotated = {**store["/trellis/k8s/pods/x/a"], "annotations": {"seen": "now"}}
    assert reader.read({**store, "/trellis/k8s/pods/x/a": annotated})[0] is inputs
    relabelled = pod("x/a", labels={"pod": "a", "color": "red"})
    after, _ = reader.read({**store, "/trellis/k8s/pods/x/a": relabelled})
    assert after is not inputs and after.pods["x/a"].labels["color"] == "red"
    assert all(after.pods[key] is inputs.pods[key] for key in PODS if key != "x/a")
    assert after.namespaces is not inputs.namespaces and after.namespaces == inputs.namespaces
    gone = {key: value for key, value in store.items() if not key.endswith("/x/b")}
    assert "x/b" not in reader.read(gone)[0].pods


def test_an_unchanged_endpoint_keeps_its_very_policy() -> None:
    """A pod ADD elsewhere in the namespace: the other endpoints' policies are the same objects."""
    objects = [*base_objects(), network_policy("p", ingress=[{"from": [{"podSelector": match(pod="b")}]}])]
    store = {datastore_key(obj): obj for obj in objects}
    local = {interface(key): key for key in ("x/a", "y/a", "z/a")}
    reader, calculator = PolicyReader(), PolicyCalculator()
    before = calculator.compute(reader.read(store)[0], "node-1", local)
    added = pod("x/new", labels={"pod": "b"}, ip="10.244.1.13")
    after = calculator.compute(
        reader.read({**store, datastore_key(added): added})[0],
        "node-1",
        {**local, interface("x/new"): "x/new"},
    )
    assert all(after.endpoints[name] is policy for name, policy in before.endpoints.items())
    (peers,) = after.address_sets.values()
    assert peers.networks == (Net("10.244.1.11/32"), Net("10.244.1.13/32"))
