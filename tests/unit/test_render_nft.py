"""The nftables renderer against its golden file, and the cluster parser."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

from trellis.calc.cluster import parse_cluster
from trellis.dataplane.render.nft import NatState, render_table
from trellis.model.ipam import Block
from trellis.model.node import Node

GOLDEN = Path(__file__).parent.parent / "golden"
Net = ipaddress.IPv4Network


def test_nat_table_matches_golden() -> None:
    """Regenerate with TRELLIS_UPDATE_GOLDEN=1 after a deliberate change, and review the diff."""
    state = NatState(
        pod_nets=frozenset({Net("10.244.0.0/16")}),
        cluster_nets=frozenset({Net("10.244.0.0/16"), Net("172.30.0.11/32"), Net("172.30.0.12/32")}),
    )
    rendered = json.dumps(render_table(state), indent=2, sort_keys=True) + "\n"
    golden = GOLDEN / "nft_nat.json"
    if os.environ.get("TRELLIS_UPDATE_GOLDEN"):
        golden.write_text(rendered)
    assert rendered == golden.read_text()


def test_empty_sets_render_without_elements() -> None:
    commands = render_table(NatState(frozenset(), frozenset()))
    sets = [c["add"]["set"] for c in commands if "set" in c.get("add", {})]
    assert [s["name"] for s in sets] == ["pod_nets", "cluster_nets"]
    assert all("elem" not in s for s in sets)


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
