"""The nftables renderer against its golden files, its policy layout, and the cluster parser.

Golden files are loaded into a real kernel by tests/privileged/test_nft_golden.py.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest

from tests.unit.policy_changes import ChangingCluster
from tests.unit.policy_cluster import (
    NAT,
    SERVE_PORTS,
    base_objects,
    cluster_policy,
    datastore_key,
    inputs_of,
    interface,
    match,
    network_policy,
    pod,
    pod_ip,
)
from trellis.calc.cluster import parse_cluster
from trellis.calc.policy import PolicyCalculator, PolicyReader, compute_policy, digest
from trellis.dataplane.render.nft import (
    COMMENT_MAX,
    FORWARD,
    NatState,
    NftTable,
    TableRenderer,
    render_table,
    update_commands,
)
from trellis.model.ipam import Block
from trellis.model.node import Node

GOLDEN = Path(__file__).parent.parent / "golden"
Net = ipaddress.IPv4Network
LOCAL = ("x/a", "y/a", "z/a")
"""The pods of node-1."""
TABLE = {"family": "inet", "table": "trl"}


def assert_golden(name: str, commands: list[dict[str, Any]]) -> None:
    """Regenerate with TRELLIS_UPDATE_GOLDEN=1 after a deliberate change, and review the diff."""
    rendered = json.dumps(commands, indent=2, sort_keys=True) + "\n"
    golden = GOLDEN / name
    if os.environ.get("TRELLIS_UPDATE_GOLDEN"):
        golden.write_text(rendered)
    assert rendered == golden.read_text()


def policy_table(*objects: dict[str, Any]) -> list[dict[str, Any]]:
    """node-1's table for the x/y/z cluster with `objects`."""
    state = compute_policy(inputs_of(*objects), "node-1", {interface(key): key for key in LOCAL})
    assert state.problems == ()
    return render_table(NAT, state)


def test_nat_table_matches_golden() -> None:
    state = NatState(
        pod_nets=frozenset({Net("10.244.0.0/16")}),
        cluster_nets=frozenset({Net("10.244.0.0/16"), Net("172.30.0.11/32"), Net("172.30.0.12/32")}),
    )
    assert_golden("nft_nat.json", render_table(state))


def test_open_policy_table_matches_golden() -> None:
    """No policy: the forward chain, empty maps, every local pod known (nothing dropped)."""
    assert_golden("nft_policy_open.json", policy_table())


def test_network_policy_table_matches_golden() -> None:
    assert_golden(
        "nft_policy_networkpolicy.json",
        policy_table(
            network_policy(
                "web",
                pod_selector=match(pod="a"),
                ingress=[
                    {
                        "from": [
                            {"podSelector": match(pod="b")},
                            {"namespaceSelector": match(ns="y")},
                            {"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}},
                        ],
                        "ports": [
                            {"port": "serve-80-tcp"},
                            {"port": 8000, "endPort": 8080},
                            {"protocol": "UDP"},
                        ],
                    }
                ],
                egress=[
                    {"to": [{"namespaceSelector": {}}], "ports": [{"port": "web"}]},
                    {"ports": [{"port": 53, "protocol": "UDP"}]},
                ],
            ),
            pod("y/b", ports=[*SERVE_PORTS, {"name": "web", "containerPort": 8080}]),
        ),
    )


def test_tiered_policy_table_matches_golden() -> None:
    assert_golden(
        "nft_policy_tiers.json",
        policy_table(
            cluster_policy(
                "security",
                "Admin",
                10,
                {"namespaces": {}},
                ingress=[{"name": "pass-x", "action": "Pass", "from": [{"namespaces": match(ns="x")}]}],
                egress=[
                    {"name": "no-metadata", "action": "Deny", "to": [{"networks": ["169.254.169.254/32"]}]},
                    {
                        "name": "nodes",
                        "action": "Accept",
                        "to": [{"nodes": match(zone="zone-1")}],
                        "protocols": [{"tcp": {"destinationPort": {"number": 10250}}}],
                    },
                    {
                        "name": "sctp",
                        "action": "Deny",
                        "to": [{"pods": {"podSelector": {}}}],
                        "protocols": [{"sctp": {"destinationPort": {"range": {"start": 9000, "end": 9100}}}}],
                    },
                ],
            ),
            cluster_policy(
                "default-deny",
                "Baseline",
                100,
                {"namespaces": {}},
                ingress=[{"action": "Deny", "from": [{"namespaces": {}}]}],
            ),
            network_policy("x-only", ingress=[{"from": [{"podSelector": {}}]}]),
        ),
    )


def test_port_ranges_match_without_inline_sets() -> None:
    """One range is matched directly; equal lists of several share one named set. Never an inline
    set: each is a kernel object of its own, and thousands of them make a transaction take seconds."""
    several = [{"port": 80}, {"port": 8000, "endPort": 8080}]
    commands = policy_table(
        network_policy("one", ingress=[{"ports": [{"port": 53, "protocol": "UDP"}]}]),
        network_policy("two", ingress=[{"ports": several}]),
        network_policy("three", namespace="y", ingress=[{"ports": several}]),
    )
    rules = _filter_rules(commands)
    assert '{"set":' not in json.dumps(rules)
    sets = [
        c["add"]["set"]
        for c in commands
        if c.get("add", {}).get("set", {}).get("name", "").startswith("ports_")
    ]
    assert [(s["type"], s["flags"], s["elem"]) for s in sets] == [
        (
            ["inet_proto", "inet_service"],
            ["interval"],
            [{"concat": [6, 80]}, {"concat": [6, {"range": [8000, 8080]}]}],
        )
    ]
    named = [
        r for r in rules if {"match": {"op": "==", "left": ANY, "right": f"@{sets[0]['name']}"}} in r["expr"]
    ]
    assert {r["comment"] for r in named} == {
        "networkpolicy x/two ingress[0]: Accept",
        "networkpolicy y/three ingress[0]: Accept",
    }
    (direct,) = [r for r in rules if r["comment"] == "networkpolicy x/one ingress[0]: Accept"]
    assert direct["expr"][:2] == [
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": 17}},
        {"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}}, "right": 53}},
    ]


def _filter_rules(commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        c["add"]["rule"]
        for c in commands
        if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] != "postrouting"
    ]


def test_every_filter_rule_counts_and_says_where_it_comes_from() -> None:
    long_name = "p" * 253
    commands = policy_table(
        cluster_policy(
            long_name,
            "Admin",
            1,
            {"namespaces": {}},
            ingress=[{"name": "r" * 100, "action": "Deny", "from": [{"namespaces": {}}]}],
        )
    )
    rules = _filter_rules(commands)
    assert rules and all({"counter": {"packets": 0, "bytes": 0}} in r["expr"] for r in rules)
    assert all(0 < len(r["comment"]) <= COMMENT_MAX for r in rules)
    assert any(r["comment"].startswith(f"admin {long_name[:50]}") for r in rules)


def test_comments_fit_in_their_bytes_whatever_the_rule_is_named() -> None:
    """A rule name is 100 characters of anything: its comment is clipped to COMMENT_MAX bytes,
    not characters, on a character boundary (libnftables aborts the agent on a comment of
    much more than that)."""
    name = "\u9632\u706b" * 50  # 100 characters, 300 bytes
    commands = policy_table(
        cluster_policy(
            "wall",
            "Admin",
            1,
            {"namespaces": {}},
            ingress=[{"name": name, "action": "Deny", "from": [{"namespaces": {}}]}],
        )
    )
    comments = [r["comment"] for r in _filter_rules(commands)]
    assert all(0 < len(c.encode()) <= COMMENT_MAX for c in comments)
    assert any(c.startswith(f"admin wall ingress[0] {name[:30]}") for c in comments)


def test_unrestricted_pods_are_known_but_in_no_map() -> None:
    commands = policy_table(network_policy("deny", ingress=[]))
    added = [c["add"] for c in commands if "add" in c]
    sets = {s["set"]["name"]: s["set"].get("elem", []) for s in added if "set" in s}
    maps = {m["map"]["name"]: m["map"].get("elem", []) for m in added if "map" in m}
    assert sets["endpoints"] == sorted(interface(key) for key in LOCAL)
    assert maps == {
        "egress": [],
        "ingress": [[interface("x/a"), {"jump": {"target": f"ingress_{interface('x/a')}_networkpolicy"}}]],
    }
    assert [c["chain"]["name"] for c in added if "chain" in c] == [
        "postrouting",
        "prerouting",
        FORWARD,
        f"ingress_{interface('x/a')}_networkpolicy",
    ]


def test_empty_sets_render_without_elements() -> None:
    commands = render_table(NatState(frozenset(), frozenset()))
    sets = [c["add"]["set"] for c in commands if "set" in c.get("add", {})]
    assert [s["name"] for s in sets] == ["pod_nets", "cluster_nets", "pod_ifnames", "pod_sources"]
    assert all("elem" not in s for s in sets if s["name"] != "pod_ifnames")


def test_address_sets_hold_no_overlapping_intervals() -> None:
    """A node address inside a pool, or a pool inside another, is one interval: nftables
    refuses a set whose intervals overlap, and with it the whole table."""
    pools = frozenset({Net("10.0.0.0/8"), Net("10.244.0.0/16")})
    nodes = frozenset({Net("10.1.2.3/32"), Net("192.168.1.2/32")})
    table = TableRenderer().render(NatState(pools, pools | nodes))
    assert table.sets["pod_nets"].elements == (Net("10.0.0.0/8"),)
    assert table.sets["cluster_nets"].elements == (Net("10.0.0.0/8"), Net("192.168.1.2/32"))


def test_anti_spoofing_allows_each_pod_interface_its_own_address_only() -> None:
    """Policy or not, the prerouting chain drops a pod's IPv4 sent from any other source."""
    sources = frozenset({("trl0123456789a", ipaddress.IPv4Address("10.244.0.5"))})
    commands = render_table(NatState(frozenset(), frozenset(), pod_sources=sources))
    added = [c["add"] for c in commands if "add" in c]
    (pod_sources,) = [a["set"] for a in added if a.get("set", {}).get("name") == "pod_sources"]
    assert pod_sources["type"] == ["ifname", "ipv4_addr"]
    assert pod_sources["elem"] == [{"concat": ["trl0123456789a", "10.244.0.5"]}]
    (chain,) = [a["chain"] for a in added if a.get("chain", {}).get("name") == "prerouting"]
    assert (chain["hook"], chain["prio"]) == ("prerouting", -300)
    (rule,) = [a["rule"] for a in added if a.get("rule", {}).get("chain") == "prerouting"]
    assert rule["expr"][-1] == {"drop": None}
    assert {
        "match": {
            "op": "!=",
            "left": {
                "concat": [{"meta": {"key": "iifname"}}, {"payload": {"protocol": "ip", "field": "saddr"}}]
            },
            "right": "@pod_sources",
        }
    } in rule["expr"]


def test_table_is_replaced_whole_in_one_batch() -> None:
    """add, delete, add: works whether or not the table exists, in one transaction."""
    commands = render_table(NatState(frozenset(), frozenset()))
    assert [next(iter(c)) for c in commands[:3]] == ["add", "delete", "add"]
    assert all(c[next(iter(c))].get("table", {}).get("name", "trl") == "trl" for c in commands[:3])


def test_parse_cluster_reads_nodes_and_blocks_and_skips_garbage() -> None:
    node = Node("node-1", ipaddress.IPv4Interface("172.30.0.11/24"), "02:00:00:00:00:01", None)
    block = Block(Net("10.244.0.0/26"), "node-1")
    cluster = parse_cluster(
        {
            node.key: node.to_json(),
            block.key: block.to_json(),
            "/trellis/nodes/broken": {"name": "broken"},
            "/trellis/other/thing": {"x": 1},
        }
    )
    assert cluster.nodes == {"node-1": node}
    assert cluster.blocks == ((Net("10.244.0.0/26"), "node-1"),)


@pytest.mark.parametrize("seed", range(3))
def test_a_renderer_with_memory_renders_what_a_new_one_does(seed: int) -> None:
    """Change after change, the agent's renderer (which keeps each unchanged endpoint's chains)
    gives the table a fresh rendering gives; an update to an equal table is no command at all."""
    cluster, reader, renderer = ChangingCluster(random.Random(seed)), PolicyReader(), TableRenderer()
    calculator = PolicyCalculator()
    held = None
    for step in range(100):
        what = cluster.change()
        state = calculator.compute(reader.read(cluster.objects)[0], "node-1", cluster.local)
        table = renderer.render(cluster.nat(), state)
        assert table.commands() == render_table(cluster.nat(), state), f"step {step}: {what}"
        if held is not None:
            assert update_commands(held, table) is not None
        assert update_commands(table, renderer.render(cluster.nat(), state)) == []
        held = table


def _pod_add() -> tuple[NftTable, NftTable, str]:
    """x/a isolated and open to pods b; then a pod b joins on node-1: (before, after, its interface)."""
    policy = network_policy(
        "p", pod_selector=match(pod="a"), ingress=[{"from": [{"podSelector": match(pod="b")}]}]
    )
    store = {datastore_key(obj): obj for obj in (*base_objects(), policy)}
    local = {interface(key): key for key in LOCAL}
    reader, calculator, renderer = PolicyReader(), PolicyCalculator(), TableRenderer()
    nat = NatState(NAT.pod_nets, NAT.cluster_nets, frozenset({(interface("x/a"), pod_ip("x/a"))}))
    before = renderer.render(nat, calculator.compute(reader.read(store)[0], "node-1", local))
    added = pod("x/new", labels={"pod": "b"}, ip="10.244.1.13")
    store[datastore_key(added)] = added
    local[interface("x/new")] = "x/new"
    nat = NatState(
        nat.pod_nets, nat.cluster_nets, nat.pod_sources | {(interface("x/new"), pod_ip("x/a") + 3)}
    )
    after = renderer.render(nat, calculator.compute(reader.read(store)[0], "node-1", local))
    return before, after, interface("x/new")


def test_a_pod_add_changes_elements_and_nothing_else() -> None:
    """The new pod joins the endpoints, its sources and x/a's peer set; it is unrestricted, so
    it gets no chain, and no chain is flushed: every rule keeps its counter."""
    before, after, new = _pod_add()
    commands = update_commands(before, after)
    peers = f"pods_{digest('pods pod=b in namespace x')}"
    assert commands == [
        {"add": {"element": {**TABLE, "name": "pod_sources", "elem": [{"concat": [new, "10.244.1.13"]}]}}},
        {"add": {"element": {**TABLE, "name": "endpoints", "elem": [new]}}},
        {"add": {"element": {**TABLE, "name": peers, "elem": ["10.244.1.13"]}}},
    ]


def test_turning_policy_off_deletes_the_maps_before_the_chains_they_jump_to() -> None:
    """The kernel refuses to delete a chain a verdict map's element still jumps to: the removed
    chains are emptied first, then the maps and sets go, then the chains."""
    before, _, _ = _pod_add()
    commands = update_commands(before, TableRenderer().render(NAT))
    assert commands is not None
    deleted = [next(iter(c["delete"])) for c in commands if "delete" in c and "element" not in c["delete"]]
    assert {"map", "chain"} <= set(deleted)
    assert deleted.index("chain") > max(i for i, kind in enumerate(deleted) if kind in ("map", "set"))
    flushed = max(i for i, c in enumerate(commands) if "flush" in c)
    assert flushed < min(i for i, c in enumerate(commands) if "delete" in c and "element" not in c["delete"])


def test_a_changed_declaration_needs_a_replace() -> None:
    before, after, _ = _pod_add()
    retyped = NftTable(
        {**after.sets, "endpoints": replace(after.sets["endpoints"], declaration={"type": "ipv4_addr"})},
        after.chains,
    )
    assert update_commands(before, retyped) is None
    rehooked = NftTable(
        after.sets,
        {
            **after.chains,
            FORWARD: replace(
                after.chains[FORWARD], hook={"type": "filter", "hook": "input", "prio": 0, "policy": "accept"}
            ),
        },
    )
    assert update_commands(before, rehooked) is None
