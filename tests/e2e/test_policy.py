"""NetworkPolicy and ClusterNetworkPolicy on real packets: the unit truth tables, run in one lab (root).

One lab of three nodes holds the cluster of the upstream e2e suite, as `tests/unit/policy_cluster`
defines it: namespaces x, y, z (labelled `ns=<name>`), pods a, b, c in each (labelled
`pod=<name>`, declaring the named ports `serve-80-tcp` ... as upstream's pods do), placed on the
nodes as the unit cluster places them. Every scenario of `tests/unit/test_policy_truth_tables.py`
is applied with `trellis lab apply` (which returns once every agent has programmed it), probed
with real TCP and UDP packets on ports 80 and 81 (all pairs at once: about a second), compared
cell for cell with the very matrices the unit test expects of the oracle, then taken back
(policies deleted, relabelled pods and namespaces labelled as before).

The scenarios are written for the unit cluster's addresses; the lab's IPAM picks others, so
`ipBlock` and `networks` CIDRs are translated: one covering the whole pool stays, a smaller one
becomes the /32s of the lab's pods it covers.

Then what only a lab shows: `policy explain` names the policy that dropped a probe and its
kernel counter went up; `policy diff` predicts exactly the change `apply` then makes on real
packets; a label change moves a pod into and out of a policy; a pod whose Pod object is missing
gets no traffic (fail closed).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import yaml

from tests.e2e.labs import LAB_ROOT, Lab, built
from tests.unit.policy_cluster import (
    NAMESPACES,
    PODS,
    POOL,
    admin,
    datastore_key,
    from_,
    match,
    namespace,
    network_policy,
    pod,
    pod_ip,
    pod_node,
)
from tests.unit.test_policy_truth_tables import SCENARIOS, Scenario
from trellis.datastore.sqlite import SqliteDatastore
from trellis.lab.policy import NO_POD_OBJECT
from trellis.model.k8s import POD_PREFIX, Protocol

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds a lab of network namespaces"),
]

API_VERSIONS = {
    "Namespace": "v1",
    "Pod": "v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "ClusterNetworkPolicy": "policy.networking.k8s.io/v1beta1",
}
POLICY_KINDS = ("NetworkPolicy", "ClusterNetworkPolicy")
BASE = {datastore_key(obj): obj for obj in (*map(namespace, NAMESPACES), *map(pod, PODS))}
"""The cluster's namespaces and pods, by datastore key (the lab makes the Node objects itself)."""
Cell = tuple[int, str, str, str]
"""(port, protocol, from, to)."""
WORDS = {True: "open", False: "blocked"}


def manifest(objects: Sequence[dict[str, Any]]) -> str:
    """Kubernetes YAML of the unit cluster's objects (which leave apiVersion out)."""
    return yaml.safe_dump_all([{"apiVersion": API_VERSIONS[o["kind"]], **o} for o in objects])


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """One lab for the whole file: 3 nodes, the 9 pods; removed afterwards whatever happened."""
    with built(tmp_path_factory.mktemp("policy"), "--nodes", "3") as made:
        made.apply(manifest(list(BASE.values())))
        placed = {p["name"]: p["node"] for p in made.status()["pods"]}
        assert placed == {key: pod_node(key) for key in PODS}
        yield made


@pytest.fixture(scope="module")
def addresses(lab: Lab) -> dict[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """Each pod's address in the unit cluster -> its address in the lab."""
    return {pod_ip(p["name"]): ipaddress.IPv4Address(p["ip"]) for p in lab.status()["pods"]}


def _networks(cidr: str, addresses: dict[ipaddress.IPv4Address, ipaddress.IPv4Address]) -> list[str]:
    network = ipaddress.IPv4Network(cidr)
    if POOL.subnet_of(network):
        return [cidr]
    return [f"{lab_ip}/32" for unit_ip, lab_ip in sorted(addresses.items()) if unit_ip in network]


def translate(value: Any, addresses: dict[ipaddress.IPv4Address, ipaddress.IPv4Address]) -> Any:
    """`value` with the unit cluster's pod addresses in ipBlock and networks peers made the lab's."""
    if isinstance(value, list):
        return [translate(item, addresses) for item in value]
    if not isinstance(value, dict):
        return value
    out = {key: translate(item, addresses) for key, item in value.items()}
    if "ipBlock" in value:
        block = value["ipBlock"]
        (cidr,) = _networks(block["cidr"], addresses)
        excepts = [net for item in block.get("except", []) for net in _networks(item, addresses)]
        out["ipBlock"] = {"cidr": cidr, **({"except": excepts} if excepts else {})}
    if "networks" in value:
        out["networks"] = [net for item in value["networks"] for net in _networks(item, addresses)]
    return out


def take_back(lab: Lab, objects: Sequence[dict[str, Any]]) -> None:
    """Delete the policies of `objects`, and label the pods and namespaces it changed as before."""
    policies = [o for o in objects if o["kind"] in POLICY_KINDS]
    relabelled = [BASE[datastore_key(o)] for o in objects if o["kind"] not in POLICY_KINDS]
    if policies:
        lab.apply(manifest(policies), command="delete")
    if relabelled:
        lab.apply(manifest(relabelled))


def cells(matrices: list[dict[str, Any]]) -> dict[Cell, bool]:
    return {
        (m["port"], m["protocol"], src, dst): ok
        for m in matrices
        for src, row in m["matrix"].items()
        for dst, ok in row.items()
    }


@pytest.mark.parametrize("case", SCENARIOS)
def test_truth_table_on_real_packets(
    lab: Lab, addresses: dict[ipaddress.IPv4Address, ipaddress.IPv4Address], case: Scenario
) -> None:
    """Every cell of the probe's four matrices is what the unit truth table expects."""
    lab.apply(manifest([translate(o, addresses) for o in case.objects]))
    try:
        measured = cells(lab.probe())
    finally:
        take_back(lab, case.objects)
    expected = {
        (port, protocol, src, dst): case.expect(port, Protocol(protocol)).allowed[(src, dst)]
        for port, protocol, src, dst in measured
    }
    differing = [
        f"{protocol} {port} {src} -> {dst}: expected {WORDS[expected[cell]]}, probe says {WORDS[ok]}"
        for cell, ok in sorted(measured.items())
        if ok != expected[cell]
        for port, protocol, src, dst in [cell]
    ]
    assert len(measured) == 4 * 72
    assert not differing, f"{case.name}: {len(differing)} cell(s) differ:\n" + "\n".join(differing)


def test_explain_names_the_policy_and_its_counter_counts_the_probe(lab: Lab) -> None:
    deny = network_policy("deny", ingress=[])
    lab.apply(manifest([deny]))
    try:
        assert lab.probe("--port", "80", "--protocol", "TCP")["matrix"]["y/a"]["x/b"] is False
        explained = lab.policy("explain", "y/a", "x/b", "--port", "80", "--protocol", "TCP")
        table = lab.run("explain", "y/a", "x/b", "--port", "80", group="policy")
    finally:
        take_back(lab, [deny])
    assert explained["allowed"] is False
    egress, ingress = explained["decisions"]
    assert (egress["pod"], egress["allowed"], egress["tier"]) == ("y/a", True, None)
    assert (ingress["direction"], ingress["pod"], ingress["node"]) == ("Ingress", "x/b", pod_node("x/b"))
    assert (ingress["tier"], ingress["policy"], ingress["rule"]) == (
        "networkpolicy",
        "x/deny",
        "default deny",
    )
    assert ingress["comment"] == "networkpolicy x/deny default deny"
    assert ingress["chain"].startswith("ingress_trl") and ingress["chain"].endswith("_networkpolicy")
    assert ingress["packets"] > 0, "the probe's SYNs met the rule that dropped them"
    assert "x/deny" in table and "denied" in table


def test_diff_predicts_exactly_what_apply_changes_on_real_packets(lab: Lab) -> None:
    objects = [
        pod("x/c", labels={"pod": "b"}),
        network_policy(
            "from-b", pod_selector=match(pod="a"), ingress=[{"from": [{"podSelector": match(pod="b")}]}]
        ),
        admin(
            "no-z", 5, {"namespaces": match(ns="y")}, ingress=[from_("Deny", {"namespaces": match(ns="z")})]
        ),
    ]
    path = lab.file(manifest(objects))
    predicted = lab.policy("diff", "-f", path)
    before = cells(lab.probe())
    lab.run("apply", "-f", path)
    try:
        after = cells(lab.probe())
    finally:
        take_back(lab, objects)
    changed = {(*cell, ok) for cell, ok in after.items() if before[cell] != ok}
    assert changed == {
        (c["port"], c["protocol"], c["from"], c["to"], c["after"]) for c in predicted["changes"]
    }
    assert predicted["summary"]["changed"] == len(changed) > 0
    assert predicted["new_pods"] == []


def test_a_label_change_moves_a_pod_into_and_out_of_a_policy(lab: Lab) -> None:
    policy = network_policy(
        "from-b", pod_selector=match(pod="a"), ingress=[{"from": [{"podSelector": match(pod="b")}]}]
    )
    lab.apply(manifest([policy]))

    def reaches_x_a() -> dict[str, bool]:
        row = lab.probe("--port", "80", "--protocol", "TCP")["matrix"]
        return {src: row[src]["x/a"] for src in ("x/b", "x/c")}

    try:
        assert reaches_x_a() == {"x/b": True, "x/c": False}
        assert "pod/x/c configured" in lab.apply(manifest([pod("x/c", labels={"pod": "b"})]))
        assert reaches_x_a() == {"x/b": True, "x/c": True}
        assert "pod/x/c configured" in lab.apply(manifest([pod("x/c")]))
        assert reaches_x_a() == {"x/b": True, "x/c": False}
    finally:
        take_back(lab, [policy, pod("x/c")])


def test_a_pod_without_its_pod_object_gets_no_traffic(lab: Lab) -> None:
    """The sandbox runs, its Pod object is gone: every agent drops it both ways (fail closed)."""
    store = SqliteDatastore(LAB_ROOT / lab.name / "datastore.db")
    try:
        kv = store.get(POD_PREFIX + "y/c")
        assert kv is not None
        store.delete(kv.key, kv.mod_revision)
        lab.programmed(store.snapshot(kv.key).revision)
        try:
            measured = cells(lab.probe())
            explained = lab.policy("explain", "x/a", "y/c", "--port", "80")
        finally:
            lab.programmed(store.put(kv.key, kv.value))
    finally:
        store.close()
    for (port, protocol, src, dst), ok in measured.items():
        assert ok is ("y/c" not in (src, dst)), f"{protocol} {port} {src} -> {dst}"
    closed = explained["decisions"][-1]
    assert (closed["pod"], closed["rule"], closed["chain"]) == ("y/c", NO_POD_OBJECT, "forward")
    assert closed["packets"] > 0
    assert lab.probe("--port", "80", "--protocol", "TCP")["matrix"]["x/a"]["y/c"] is True, (
        "back, it is let in"
    )
