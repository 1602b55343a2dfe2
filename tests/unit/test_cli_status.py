"""`trellis status` without root: the status.json it reads is written by a real network controller
(never started, so nothing touches the kernel), and the command runs through the real parser."""

from __future__ import annotations

import ipaddress
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.unit.agent_controller import Clock, publish, unstarted_controller
from tests.unit.test_metrics import BLOCK
from trellis.agent.config import AgentConfig
from trellis.cli.main import build_parser
from trellis.cli.status import STALE_PERIODS, staleness, with_age
from trellis.model.ipam import Block
from trellis.model.k8s import NETWORK_POLICY_PREFIX, POD_PREFIX
from trellis.model.node import STATUS_FILE


def status_command(*args: str) -> int:
    parsed = build_parser().parse_args(["status", *args])
    code: int = parsed.func(parsed)
    return code


def written(state_dir: Path, objects: dict[str, dict[str, Any]], **config: Any) -> dict[str, Any]:
    """The status.json an agent for node-1 writes after programming `objects` at revision 7."""
    agent = AgentConfig(node="node-1", state_dir=state_dir, **config)
    with unstarted_controller(agent, Clock()) as network:
        publish(network, 7, objects)
    status: dict[str, Any] = json.loads((state_dir / STATUS_FILE).read_text())
    return status


def rewrite(state_dir: Path, **changes: Any) -> None:
    path = state_dir / STATUS_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


OBJECTS = {
    BLOCK.key: BLOCK.to_json(),
    Block(ipaddress.IPv4Network("10.244.0.64/26"), "node-2").key: {
        "cidr": "10.244.0.64/26",
        "node": "node-2",
    },
    POD_PREFIX + "default/a": {
        "metadata": {"name": "a", "namespace": "default"},
        "spec": {"nodeName": "node-1"},
    },
    NETWORK_POLICY_PREFIX + "default/deny": {
        "metadata": {"name": "deny", "namespace": "default"},
        "spec": {"podSelector": {}},
    },
}


def test_json_has_what_the_agent_reported_with_its_age(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    written(tmp_path, OBJECTS)
    assert status_command("--state-dir", str(tmp_path), "--output", "json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["node"], shown["revision"], shown["backend"]) == ("node-1", 7, "vxlan")
    assert shown["datastore"] == {"kind": "sqlite", "in_sync": True}
    assert shown["blocks"] == [{"cidr": "10.244.0.0/26", "used": 1, "size": 64}], "only this node's blocks"
    assert (shown["endpoints"], shown["endpoints_with_policy"], shown["problems"]) == (1, 1, [])
    assert shown["policies"] == {"networkpolicies": 1, "clusternetworkpolicies": 0}
    assert shown["stale"] is False and shown["age_s"] >= 0


def test_text_summarises_sync_blocks_endpoints_and_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one line per row
    written(tmp_path, OBJECTS)
    assert status_command("--state-dir", str(tmp_path)) == 0
    out = capsys.readouterr().out
    for words in (
        "node node-1",
        "sqlite, in sync, kernel programmed to revision 7",
        "10.244.0.0/26: 1 of 64 addresses in use",
        "1 (1 with policy)",
        "1 NetworkPolicy, 0 ClusterNetworkPolicy; table inet trl:",
    ):
        assert words in out, out


def test_bgp_sessions_are_counted_and_listed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    written(tmp_path, OBJECTS)
    sessions = [
        {"name": "node_2", "state": "up", "info": "Established", "established": True},
        {"name": "node_3", "state": "start", "info": "Active", "established": False},
    ]
    rewrite(tmp_path, backend="bgp", bgp=sessions)
    assert status_command("--state-dir", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "1 of 2 established" in out and "node_3 Active" in out, out


def test_no_status_means_no_agent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert status_command("--state-dir", str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert f"no agent status at {tmp_path / STATUS_FILE}: the agent is not running there" in err


def test_a_stale_status_is_shown_but_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    written(tmp_path, OBJECTS)
    rewrite(tmp_path, written_at=time.time() - 100, period_s=3.0)
    assert status_command("--state-dir", str(tmp_path), "--output", "json") == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["stale"] is True
    assert re.search(
        r"stale: the agent of node node-1 last reported \d+ s ago \(it does every 3\.0 s\)", captured.err
    )


def test_stale_after_the_agents_periods() -> None:
    status = {"node": "n", "written_at": 1000.0, "period_s": 2.0}
    assert staleness(status, 1000.0 + STALE_PERIODS * 2.0) is None
    assert staleness(status, 1000.1 + STALE_PERIODS * 2.0) is not None
    assert (staleness(status, 1100.0) or "").startswith(
        "the agent of node n last reported 100 s ago (it does every 2.0 s)"
    )
    assert with_age(status, 1002.5) == {**status, "age_s": 2.5, "stale": False}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{not json", "unreadable agent status"),
        ("[]", "not an agent status"),
        ('{"node": "n", "revision": 3}', "no backend, written_at, period_s, datastore, blocks, endpoints"),
    ],
)
def test_an_unusable_status_fails_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, words: str
) -> None:
    (tmp_path / STATUS_FILE).write_text(text)
    assert status_command("--state-dir", str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / STATUS_FILE}: " in err and words in err, err
