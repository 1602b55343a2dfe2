"""`trellis status`: what the node's agent last reported, for a person or (`--output json`) a script.

Why a file and not a request to the agent: the agent rewrites `status.json` in its state
directory after every reconcile pass, at least once per period (`period_s` in the file), so
reading it needs no socket, no port and no permission beyond the directory's, and works the
same whether the agent runs under systemd, in a DaemonSet's pod or in a lab's node. What the
file cannot say is that the agent has stopped writing: a status older than STALE_PERIODS of
its periods is reported as stale, and the command fails, as it does when there is no status.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from trellis.agent.config import DEFAULT_STATE_DIR
from trellis.model.node import STATUS_FILE

STALE_PERIODS = 3
"""A status older than this many of the agent's periods is stale (the agent stopped or is stuck)."""
REQUIRED = ("node", "revision", "backend", "written_at", "period_s", "datastore", "blocks", "endpoints")
"""Keys without which a status cannot be shown (an agent older than this command writes fewer)."""
POLICY_KINDS = {"networkpolicies": "NetworkPolicy", "clusternetworkpolicies": "ClusterNetworkPolicy"}


class StatusError(Exception):
    """No status to show, or a stale one: the message is the command's one line of output."""


def read_status(state_dir: Path) -> dict[str, Any]:
    """The agent's `status.json` in `state_dir`; StatusError when there is none or it is unusable."""
    path = state_dir / STATUS_FILE
    try:
        status = json.loads(path.read_text())
    except FileNotFoundError:
        raise StatusError(
            f"no agent status at {path}: the agent is not running there, or has not yet synced "
            f"with the datastore (is --state-dir the agent's?)"
        ) from None
    except (OSError, ValueError) as err:
        raise StatusError(f"{path}: unreadable agent status: {err}") from None
    if not isinstance(status, dict):
        raise StatusError(f"{path}: not an agent status (a JSON object)")
    missing = [key for key in REQUIRED if key not in status]
    if missing:
        raise StatusError(f"{path}: no {', '.join(missing)}: written by an older agent, restart it")
    return status


def staleness(status: dict[str, Any], now: float) -> str | None:
    """Why `status` is stale at wall-clock time `now` (seconds), None while it is fresh."""
    age = now - float(status["written_at"])
    period = float(status["period_s"])
    if age <= STALE_PERIODS * period:
        return None
    return (
        f"the agent of node {status['node']} last reported {age:.0f} s ago (it does every "
        f"{period:.1f} s): it is stopped, or cannot reach the datastore or program the kernel "
        f"(its log and /readyz say which)"
    )


def with_age(status: dict[str, Any], now: float) -> dict[str, Any]:
    """`status` with `age_s` (seconds since written) and `stale` added: the JSON output."""
    age = round(now - float(status["written_at"]), 3)
    return {**status, "age_s": age, "stale": staleness(status, now) is not None}


def render(status: dict[str, Any], now: float) -> Table:
    """The status as a two-column table for people."""
    table = Table(title=f"node {status['node']}", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    datastore = status["datastore"]
    sync = "[green]in sync[/]" if datastore["in_sync"] else "[red]out of sync[/]"
    table.add_row("agent", f"reported {now - float(status['written_at']):.1f} s ago")
    table.add_row(
        "datastore", f"{datastore['kind']}, {sync}, kernel programmed to revision {status['revision']}"
    )
    table.add_row("backend", status["backend"])
    table.add_row("blocks", _blocks(status["blocks"]))
    with_policy = f" ({status['endpoints_with_policy']} with policy)" if status.get("policy") else ""
    table.add_row("endpoints", f"{status['endpoints']}{with_policy}")
    if status.get("policy"):
        table.add_row("policy", _policy(status))
    else:
        table.add_row("policy", "not enforced (--policy off)")
    if "bgp" in status:
        table.add_row("BGP sessions", _sessions(status["bgp"]))
    problems = status.get("problems") or []
    table.add_row("problems", "\n".join(f"[yellow]{p}[/]" for p in problems) or "none")
    return table


def _blocks(blocks: list[dict[str, Any]]) -> str:
    return (
        "\n".join(f"{b['cidr']}: {b['used']} of {b['size']} addresses in use" for b in blocks) or "none yet"
    )


def _policy(status: dict[str, Any]) -> str:
    counts = status.get("policies", {})
    objects = ", ".join(f"{counts.get(key, 0)} {name}" for key, name in POLICY_KINDS.items())
    table = status.get("nftables", {})
    return f"{objects}; table inet trl: {table.get('chains', 0)} chains, {table.get('rules', 0)} rules"


def _sessions(sessions: list[dict[str, Any]]) -> str:
    established = sum(1 for s in sessions if s.get("established"))
    lines = [f"{established} of {len(sessions)} established"]
    for session in sessions:
        colour = "green" if session.get("established") else "red"
        lines.append(f"{session['name']} [{colour}]{session['info'] or session['state']}[/]")
    return "\n".join(lines)


def _status(args: argparse.Namespace) -> int:
    now = time.time()
    try:
        status = read_status(args.state_dir)
    except StatusError as err:
        print(f"trellis status: {err}", file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps(with_age(status, now), indent=2))
    else:
        Console().print(render(status, now))
    stale = staleness(status, now)
    if stale is not None:
        print(f"trellis status: stale: {stale}", file=sys.stderr)
        return 1
    return 0


def add_status_parser(sub: Any) -> None:
    text = "what this node's agent last reported: datastore sync, backend, blocks, endpoints, policy, BGP"
    parser: argparse.ArgumentParser = sub.add_parser("status", help=text, description=text)
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"the agent's --state-dir (default {DEFAULT_STATE_DIR})",
    )
    parser.add_argument("--output", choices=("text", "json"), default="text", help="default text")
    parser.set_defaults(func=_status)
