"""The lab as API server and policy explainer, without root: the Kubernetes objects it writes,
`explain`'s choice of kernel rule, `diff`'s matrices, and waiting on the agents' status files.

The lab state here holds the upstream suite's nine pods (`policy_cluster`) at the unit
cluster's addresses, so the truth tables' expectations apply to it unchanged.
"""

from __future__ import annotations

import copy
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from tests.unit.policy_cluster import (
    NAMESPACES,
    PODS,
    SERVE_PORTS,
    admin,
    datastore_key,
    from_,
    match,
    network_policy,
    pod_ip,
    pod_node,
)
from tests.unit.test_policy_truth_tables import SCENARIOS, Scenario
from trellis.calc.policy import TierKind
from trellis.dataplane.render.nft import FORWARD, NatState, render_table
from trellis.lab import converge, kube
from trellis.lab.errors import LabError
from trellis.lab.manifest import ContainerPort, NamespaceObject, PodObject, PolicyObject
from trellis.lab.policy import NO_POD_OBJECT, LabPolicy, applied, compare, counter, interface
from trellis.lab.probe import Check
from trellis.lab.state import LabPaths, LabState, Pod, plan_nodes
from trellis.model.k8s import Direction, Protocol, parse_namespace, parse_node, parse_pod

UNDERLAY = [ipaddress.IPv4Network("172.31.0.0/24")]
POOL = ipaddress.IPv4Network("10.244.0.0/16")
CHECKS = [Check(80, "TCP"), Check(81, "TCP"), Check(80, "UDP"), Check(81, "UDP")]


def lab_state() -> LabState:
    """A lab of 3 nodes with the nine pods, attached at the unit cluster's addresses."""
    state = LabState("l", "vxlan", "sqlite", UNDERLAY, plan_nodes("l", UNDERLAY, 3))
    for ns in NAMESPACES:
        state.namespaces[ns] = NamespaceObject(ns, {"ns": ns}).effective_labels
    ports = tuple(map(ContainerPort.from_json, SERVE_PORTS))
    for key in PODS:
        ns, name = key.split("/")
        state.pods[key] = Pod(
            ns,
            name,
            pod_node(key),
            f"trl-l-pod-{ns}-{name}",
            f"c-{ns}-{name}",
            "uid",
            {"pod": name},
            ports,
            pod_ip(key),
        )
    return state


def objects_of(state: LabState, *extra: dict[str, Any]) -> dict[str, Any]:
    """What the lab stores for `state`, with `extra` (unit-cluster objects) added or replacing."""
    written = dict(
        [
            *(kube.namespace_object(ns, {"ns": ns}) for ns in NAMESPACES),
            *(kube.pod_object(state, pod) for pod in state.pods.values()),
            *map(kube.node_object, state.nodes),
        ]
    )
    return {**written, **{datastore_key(obj): obj for obj in extra}}


def test_the_objects_the_lab_writes_are_what_the_agents_read() -> None:
    state = lab_state()
    pod = state.pods["y/b"]
    key, value = kube.pod_object(state, pod)
    parsed = parse_pod(value)
    assert key == "/trellis/k8s/pods/y/b"
    assert (parsed.key, parsed.node, parsed.ip, parsed.phase) == ("y/b", "node-2", pod.ip, "Running")
    assert {(c.name, c.number, c.protocol) for c in parsed.ports} == {
        (p["name"], p["containerPort"], Protocol(str(p["protocol"]))) for p in SERVE_PORTS
    }
    scheduled = parse_pod(kube.pod_object(state, Pod("y", "new", "node-1", "n", "c", "u"))[1])
    assert (scheduled.ip, scheduled.phase, scheduled.node) == (None, "Pending", "node-1")

    node_key, node_value = kube.node_object(state.nodes[1])
    node = parse_node(node_value)
    assert node_key == "/trellis/k8s/nodes/node-2"
    assert (node.labels["kubernetes.io/hostname"], node.addresses) == (
        "node-2",
        (state.nodes[1].underlay.ip,),
    )

    namespace = parse_namespace(kube.namespace_object("x", {"ns": "x"})[1])
    assert dict(namespace.labels) == {"ns": "x", "kubernetes.io/metadata.name": "x"}


@pytest.mark.parametrize("case", SCENARIOS[:: max(1, len(SCENARIOS) // 12)])
def test_the_matrix_is_the_truth_table_on_listening_ports(case: Scenario) -> None:
    policy = LabPolicy(lab_state(), objects_of(lab_state(), *case.objects))
    for check, cells in policy.matrix(CHECKS).items():
        expected = case.expect(check.port, Protocol(check.protocol)).allowed
        assert cells == {pair: ok for pair, ok in expected.items() if pair[0] != pair[1]}, check


def test_a_pod_that_does_not_listen_is_unreachable_whatever_the_policy() -> None:
    state = lab_state()
    state.pods["x/a"] = Pod("x", "a", "node-1", "n", "c-x-a", "u", {"pod": "a"}, (), pod_ip("x/a"))
    cells = LabPolicy(state, objects_of(state)).matrix([Check(80, "TCP")])[Check(80, "TCP")]
    assert not any(ok for (_, dst), ok in cells.items() if dst == "x/a")
    assert all(ok for (_, dst), ok in cells.items() if dst != "x/a")


def test_diff_lists_exactly_the_cells_that_change_and_who_decides_them() -> None:
    state = lab_state()
    deny = network_policy("deny", ingress=[])
    before, after = LabPolicy(state, objects_of(state)), LabPolicy(state, objects_of(state, deny))
    diff = compare(before, after, [Check(80, "TCP")], ["x/new"])
    assert {(c.src, c.dst) for c in diff.changes} == {
        (s, d) for s in PODS for d in PODS if d.startswith("x/") and s != d
    }
    assert not any(c.after for c in diff.changes)
    assert diff.changes[0].reason.endswith("denied by networkpolicy x/deny default deny")
    summary = diff.to_json()
    assert (summary["pairs"], summary["summary"], summary["new_pods"]) == (
        72,
        {"changed": 24, "allowed": 0, "denied": 24},
        ["x/new"],
    )


def test_applied_writes_what_apply_would_write() -> None:
    state = lab_state()
    policy = PolicyObject("NetworkPolicy", "x", "p", {"kind": "NetworkPolicy"})
    written, new = applied(
        state,
        [
            NamespaceObject("y", {"team": "blue"}),
            PodObject("x", "c", {"pod": "b"}),
            PodObject("x", "d"),
            policy,
        ],
    )
    assert written[policy.datastore_key] == policy.body
    assert written["/trellis/k8s/namespaces/y"]["metadata"]["labels"] == {
        "team": "blue",
        "kubernetes.io/metadata.name": "y",
    }
    relabelled = parse_pod(written["/trellis/k8s/pods/x/c"])
    assert (dict(relabelled.labels), relabelled.ip) == ({"pod": "b"}, pod_ip("x/c"))
    assert new == ["x/d"]


def kernel_rules(policy: LabPolicy, node: str) -> list[dict[str, Any]]:
    """The rules of the node's table as `nft -j list` shows them, each having counted one packet.

    A copy: the rendered commands share their constant parts, which must not change.
    """
    commands = render_table(NatState(frozenset({POOL}), frozenset({POOL})), policy.oracle.state(node))
    rules = copy.deepcopy([c["add"]["rule"] for c in commands if "rule" in c.get("add", {})])
    for rule in rules:
        for expr in rule["expr"]:
            if "counter" in expr:
                expr["counter"] = {"packets": 1, "bytes": 60}
    return rules


def test_explain_finds_the_deciding_rule_by_its_chain_and_comment() -> None:
    state = lab_state()
    policy = LabPolicy(
        state,
        objects_of(
            state,
            network_policy("allow-all", ingress=[{}]),
            admin(
                "no-y",
                10,
                {"namespaces": match(ns="x")},
                ingress=[from_("Deny", {"namespaces": match(ns="y")})],
            ),
        ),
    )
    egress, ingress = policy.verdict("y/b", "x/a", 80, Protocol.TCP).decisions
    assert policy.kernel_rule(egress) is None, "y/b is unrestricted: no rule decides"
    rule = policy.kernel_rule(ingress)
    assert rule is not None
    assert (rule.chain, rule.comment) == (
        f"ingress_{interface(state.pods['x/a'])}_admin",
        "admin no-y ingress[0]: Deny",
    )
    assert counter(kernel_rules(policy, "node-1"), rule) == (1, 60)

    (_, allowed) = policy.verdict("z/a", "x/a", 80, Protocol.TCP).decisions
    rule = policy.kernel_rule(allowed)
    assert rule is not None and rule.comment == "networkpolicy x/allow-all ingress[0]: Accept"
    assert counter(kernel_rules(policy, "node-1"), rule) == (1, 60)


def test_a_default_deny_is_found_as_its_tier_default_rule() -> None:
    state = lab_state()
    policy = LabPolicy(state, objects_of(state, network_policy("deny", ingress=[])))
    decision = policy.verdict("y/a", "x/b", 80, Protocol.TCP).deciding
    assert (decision.tier, decision.policy, decision.rule) == (
        TierKind.NETWORK_POLICY,
        "x/deny",
        "default deny",
    )
    rule = policy.kernel_rule(decision)
    assert rule is not None and rule.comment == "networkpolicy x/deny default deny"
    assert counter(kernel_rules(policy, pod_node("x/b")), rule) == (1, 60)


def test_a_pod_without_its_object_is_denied_both_ways_by_the_fail_closed_rule() -> None:
    state = lab_state()
    objects = objects_of(state)
    del objects["/trellis/k8s/pods/y/c"]
    policy = LabPolicy(state, objects)
    for src, dst, direction in (("x/a", "y/c", Direction.INGRESS), ("y/c", "x/a", Direction.EGRESS)):
        verdict = policy.verdict(src, dst, 80, Protocol.TCP)
        closed = verdict.deciding
        assert not verdict.allowed
        assert (closed.pod, closed.direction, closed.rule) == ("y/c", direction, NO_POD_OBJECT)
        rule = policy.kernel_rule(closed)
        assert rule is not None and rule.chain == FORWARD
        assert counter(kernel_rules(policy, pod_node("y/c")), rule) == (1, 60)
    assert policy.verdict("x/a", "y/a", 80, Protocol.TCP).allowed


def write_status(paths: LabPaths, node: str, revision: int) -> None:
    paths.node_dir(node).mkdir(parents=True, exist_ok=True)
    (paths.node_dir(node) / "status.json").write_text(json.dumps({"node": node, "revision": revision}))


def test_converged_once_every_agent_reports_the_lab_s_last_write(tmp_path: Path) -> None:
    paths = LabPaths("l", tmp_path)
    state = LabState("l", "vxlan", "sqlite", UNDERLAY, plan_nodes("l", UNDERLAY, 2))
    state.api_revision = 7
    write_status(paths, "node-1", 9)
    write_status(paths, "node-2", 7)
    converge.programmed(paths, state, timeout_s=0.1)

    write_status(paths, "node-2", 6)
    paths.agent_log("node-2").write_text("agent started\nstuck\n")
    with pytest.raises(LabError) as caught:
        converge.programmed(paths, state, timeout_s=0.1)
    assert str(caught.value).startswith(
        "node-2 did not converge: its agent reports revision 6, not 7 or later"
    )
    assert "stuck" in str(caught.value)
    (paths.node_dir("node-2") / "status.json").unlink()
    with pytest.raises(LabError, match="node-2 did not converge: its agent reports nothing"):
        converge.programmed(paths, state, timeout_s=0.1)
