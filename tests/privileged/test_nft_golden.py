"""Every golden nftables ruleset loads into a real kernel, and lists back.

The unit tests prove the renderer emits the golden JSON and that the JSON means what the
oracle says; this proves nft and the kernel accept it (set types, concatenations, interval
sets of interface name patterns, verdict maps). Each file goes into its own throwaway network
namespace `trlp-<random>`, deleted afterwards even on failure.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.privileged.nodes import run

pytestmark = pytest.mark.privileged

GOLDEN = Path(__file__).parent.parent / "golden"


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"trlp-{secrets.token_hex(4)}"
    run("ip", "netns", "add", name)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.mark.parametrize("golden", sorted(GOLDEN.glob("nft_*.json")), ids=lambda p: p.name)
def test_golden_ruleset_loads(golden: Path, netns: str, tmp_path: Path) -> None:
    commands = json.loads(golden.read_text())
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps({"nftables": [{"metainfo": {"json_schema_version": 1}}, *commands]}))
    run("ip", "netns", "exec", netns, "nft", "-j", "-f", str(batch))
    listed = json.loads(run("ip", "netns", "exec", netns, "nft", "-j", "list", "table", "inet", "trl"))
    rules = [item["rule"] for item in listed["nftables"] if "rule" in item]
    assert len(rules) == sum(1 for command in commands if "rule" in command.get("add", {}))
    # loading twice replaces the table (add, delete, add) instead of failing or doubling it
    run("ip", "netns", "exec", netns, "nft", "-j", "-f", str(batch))
    again = json.loads(run("ip", "netns", "exec", netns, "nft", "-j", "list", "table", "inet", "trl"))
    assert len([item for item in again["nftables"] if "rule" in item]) == len(rules)
