"""`trellis lab demo`: the guided tour of DESIGN.md §4, on real namespaces, processes and packets.

The tour: up with three nodes, a namespace and three pods spread over them (attached through
the real CNI executable), what a pod and its node hold (the routes to the other nodes'
blocks), the status, the reachability matrix across nodes, and egress: a pod reaches the lab's
external host, which sees the pod's node as the source, while a pod reached inside the cluster
sees the pod itself. Then a policy: what it would change (`trellis policy diff`, computed by
the oracle), the matrix measured again after applying it, and why one pair is now denied
(`trellis policy explain`, with the kernel counter of the rule that dropped the probe's
packets). Then down. Once `up` has made the lab, `down` runs whatever happens; a lab of that
name made by someone else is left alone. The exit code says whether every pair was reachable,
egress was masqueraded, the policy changed exactly the predicted cells and the denied pair's
rule counted packets, so `make demo` is also a smoke test.
"""

from __future__ import annotations

import subprocess
import time

from rich.console import Console
from rich.syntax import Syntax

from trellis.lab import cluster, policy
from trellis.lab.errors import LabError
from trellis.lab.manifest import parse
from trellis.lab.probe import Check, Matrix, ask, checks_for
from trellis.lab.process import in_netns
from trellis.lab.state import LabPaths, LabState, load
from trellis.lab.views import diff_table, explanation_table, matrix_table, nodes_table, pods_table
from trellis.model.k8s import Protocol

NODES = 3
MANIFEST = """\
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels: {team: blue}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: demo, labels: {app: web}}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: demo, labels: {app: web}}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: demo, labels: {app: db}}
"""
POLICY = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: demo}
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-from-web, namespace: demo}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 80, protocol: TCP}]
"""
POLICY_CHECK = Check(80, "TCP")
"""The matrix the policy step shows (every check changes alike but for the allowed port)."""
DENIED = ("demo/c", "demo/a")
"""The pair the policy step explains: the database may not call the web pods."""


def _show(console: Console, netns: str, command: list[str]) -> None:
    """Run `command` inside `netns` and print it with its output."""
    out = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
        preexec_fn=in_netns(netns),
    )
    console.print(f"  [dim]{netns}[/] $ {' '.join(command)}")
    for line in (out.stdout + out.stderr).rstrip().splitlines():
        console.print(f"    {line}", highlight=False, markup=False)


def _egress(console: Console, state: LabState) -> bool:
    """Pod a asks the external host and pod b whom they see; True if the first saw a's node, b saw a."""
    pod, peer = state.pods["demo/a"], state.pods["demo/b"]
    node = state.node(pod.node)
    assert pod.ip is not None and peer.ip is not None
    outside = ask(pod.netns, state.external.ip, 80).split()[-1]
    inside = ask(pod.netns, peer.ip, 80).split()[-1]
    console.print(f"  demo/a {pod.ip} on {node.name} ({node.underlay.ip}) asks each server whom it sees:")
    console.print(f"    external host {state.external.ip} sees [bold]{outside}[/]: the node (masqueraded)")
    console.print(f"    pod demo/b {peer.ip} sees [bold]{inside}[/]: the pod itself")
    return outside == str(node.underlay.ip) and inside == str(pod.ip)


def _tour(name: str, console: Console) -> bool:
    paths = LabPaths(name)
    console.rule("2. Pods: attached by the real CNI executable, spread over the nodes")
    console.print(Syntax(MANIFEST, "yaml", theme="ansi_dark"))
    cluster.apply(name, parse(MANIFEST, "demo manifest"), report=lambda line: console.print(f"  {line}"))

    console.rule("3. A pod's /32, and its node's routes to the other nodes' blocks")
    state = load(paths)
    pod = state.pods["demo/a"]
    _show(console, pod.netns, ["ip", "-4", "-br", "addr", "show", "eth0"])
    _show(console, pod.netns, ["ip", "route"])
    _show(console, state.node(pod.node).netns, ["ip", "route", "show", "proto", "222"])

    console.rule("4. Status")
    console.print(nodes_table(state, cluster.node_status(paths, state)))
    console.print(pods_table(state))

    console.rule("5. Reachability across nodes, measured with real TCP and UDP packets")
    started = time.monotonic()
    matrices = cluster.measure(paths, state, checks_for(None, None))
    for matrix in matrices:
        console.print(matrix_table(matrix))
    everything = all(m.reachable == m.pairs for m in matrices)
    verdict = "every pair reachable" if everything else "[red]some pairs unreachable[/]"
    console.print(f"  {len(matrices)} matrices in {time.monotonic() - started:.1f} s: {verdict}")

    console.rule("6. Egress: the external host sees the node, pods see the pod")
    masqueraded = _egress(console, state)
    if not masqueraded:
        console.print("  [red]egress was not masqueraded as expected[/]")
    before = next(m for m in matrices if m.check == POLICY_CHECK)
    return everything and masqueraded and _policy(console, paths, before)


def _cells(matrix: Matrix) -> dict[tuple[str, str], bool]:
    return {(src, dst): ok for src, row in matrix.results.items() for dst, ok in row.items()}


def _policy(console: Console, paths: LabPaths, before: Matrix) -> bool:
    """Preview, apply and measure a policy, then explain a pair it denies; True if all agree."""
    console.rule("7. A policy: what it would change, the oracle's answer before anything is applied")
    console.print(Syntax(POLICY, "yaml", theme="ansi_dark"))
    objects = parse(POLICY, "demo policy")
    predicted = policy.diff(paths, load(paths), objects, [POLICY_CHECK])
    console.print(diff_table(predicted))

    console.rule("8. Applied: every agent programs it, and the matrix is measured again")
    cluster.apply(paths.name, objects, report=lambda line: console.print(f"  {line}"))
    state = load(paths)
    (after,) = cluster.measure(paths, state, [POLICY_CHECK])
    console.print(matrix_table(after))
    old, new = _cells(before), _cells(after)
    measured = {(src, dst, ok) for (src, dst), ok in new.items() if old[(src, dst)] != ok}
    expected = {(c.src, c.dst, c.after) for c in predicted.changes}
    agree = measured == expected
    console.print("  exactly the predicted cells changed" if agree else "  [red]not the predicted change[/]")

    console.rule(f"9. Why {DENIED[0]} no longer reaches {DENIED[1]}, and the kernel rule that dropped it")
    explanation = policy.explain(paths, state, *DENIED, POLICY_CHECK.port, Protocol(POLICY_CHECK.protocol))
    console.print(explanation_table(explanation))
    counted = not explanation.allowed and bool(explanation.steps[-1].packets)
    if not counted:
        console.print("  [red]the denying rule counted no packet[/]")
    return agree and counted


def run(name: str, console: Console) -> int:
    console.rule(f"[bold]Trellis lab demo[/] (lab {name})")
    console.rule(f"1. Up: a fabric, {NODES} nodes with supervised agents, an external host")
    cluster.up(name, nodes=NODES, report=lambda line: console.print(f"  {line}"))
    ok = False
    try:
        ok = _tour(name, console)
    except LabError as err:
        console.print(f"[red]demo failed:[/] {err}")
    finally:
        console.rule("10. Down: every namespace, link, process and file of the lab")
        cluster.down(name)
        console.print(f"  lab {name} removed")
    return 0 if ok else 1
