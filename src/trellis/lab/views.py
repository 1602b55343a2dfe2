"""How the lab shows itself to people: rich tables of nodes, pods, reachability and policy.

Machines get `--output json` (built in `cluster.status_json`, `probe.Matrix.to_json` and the
`to_json` of `policy.Explanation` and `policy.Diff`); these tables are for eyes only, shared by
the CLI and the demo.
"""

from __future__ import annotations

from rich.table import Table

from trellis.lab.cluster import NodeStatus
from trellis.lab.policy import Diff, Explanation
from trellis.lab.probe import Matrix
from trellis.lab.state import LabState


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def nodes_table(state: LabState, nodes: list[NodeStatus]) -> Table:
    backend = state.backend if state.bgp_topology is None else f"{state.backend} ({state.bgp_topology})"
    table = Table(
        title=f"lab {state.name}: backend {backend}, datastore {state.datastore}, "
        f"underlay {', '.join(map(str, state.subnets))}",
        title_justify="left",
    )
    bgp = state.bgp_topology is not None
    columns = ["node", "netns", "underlay", "agent PID", "restarts", "ready"]
    for column in [*columns, "BGP sessions"] if bgp else columns:
        table.add_column(column)
    for node in nodes:
        row = [
            node.name,
            node.netns,
            str(node.underlay),
            "-" if node.agent is None else str(node.agent.pid),
            str(node.restarts),
            "[green]yes[/]" if node.ready else "[red]no[/]" if node.answering else "[red]not answering[/]",
        ]
        table.add_row(*row, *([_sessions(node.bgp)] if bgp else []))
    return table


def _sessions(sessions: list[dict[str, str]]) -> str:
    """One line per session: BIRD's protocol name, state (green when up, else red) and info."""
    lines = []
    for session in sessions:
        colour = "green" if session["state"] == "up" else "red"
        lines.append(f"{session['name']} [{colour}]{session['state']}[/] {session['info']}")
    return "\n".join(lines) or "-"


def pods_table(state: LabState) -> Table:
    table = Table(title=f"{len(state.pods)} pod(s)", title_justify="left")
    for column in ("pod", "node", "IP", "ports", "labels"):
        table.add_column(column)
    for pod in sorted(state.pods.values(), key=lambda p: p.key):
        table.add_row(
            pod.key,
            pod.node,
            "-" if pod.ip is None else str(pod.ip),
            " ".join(map(str, pod.ports)),
            _labels(pod.labels),
        )
    return table


def matrix_table(matrix: Matrix) -> Table:
    """Rows are sources, columns destinations; the diagonal (a pod to itself) is not probed."""
    names = list(matrix.results)
    table = Table(
        title=f"{matrix.check}: {matrix.reachable} of {matrix.pairs} pairs reachable",
        title_justify="left",
    )
    table.add_column("from \\ to")
    for name in names:
        table.add_column(name, justify="center")
    for src in names:
        row = matrix.results[src]
        cells = [
            "[dim]·[/]" if dst not in row else "[green]✓[/]" if row[dst] else "[red]✗[/]" for dst in names
        ]
        table.add_row(src, *cells)
    return table


def _verdict(allowed: bool) -> str:
    return "[green]allowed[/]" if allowed else "[red]denied[/]"


def explanation_table(explanation: Explanation) -> Table:
    """One row per decision on the connection's path, with the kernel rule that made it."""
    e = explanation
    table = Table(
        title=f"{e.src} -> {e.dst} {e.protocol} {e.port}: {_verdict(e.allowed)}", title_justify="left"
    )
    for column in ("direction", "pod", "node", "verdict", "decided by", "nft chain"):
        table.add_column(column)
    table.add_column("packets", justify="right")
    for step in e.steps:
        d = step.decision
        table.add_row(
            str(d.direction or "-"),
            d.pod,
            step.node,
            _verdict(d.allowed),
            " ".join(part for part in (d.tier or "", d.policy, d.rule) if part),
            step.rule.chain if step.rule else "-",
            "-" if step.packets is None else str(step.packets),
        )
    return table


def diff_table(diff: Diff) -> Table:
    """The cells that would change, each with who decides after the change."""
    summary = diff.to_json()["summary"]
    table = Table(
        title=f"{summary['changed']} of {diff.pairs * len(diff.checks)} cells change "
        f"({summary['allowed']} allowed, {summary['denied']} denied; "
        f"{', '.join(map(str, diff.checks))})",
        title_justify="left",
    )
    for column in ("check", "from", "to", "before", "after", "decided by (after)"):
        table.add_column(column)
    for change in diff.changes:
        table.add_row(
            str(change.check),
            change.src,
            change.dst,
            _verdict(not change.after),
            _verdict(change.after),
            change.reason,
        )
    return table
