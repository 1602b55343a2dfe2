"""Agent restart: from SIGKILL to the first pod ADD the new agent serves, against a cold start.

What it measures, per sample, on a fresh node namespace with its own state directory:
1. cold start (the reference): `trellis agent` started on an empty state dir and an empty
   datastore; the time from starting the process to the first CNI ADD that succeeds.
2. restart: with `--pods` pods attached, SIGKILL the agent, reap it, start it again at once (as
   a supervisor does) on the same state dir and datastore; the time from the SIGKILL to the
   first ADD of a new pod that succeeds, and its parts: SIGKILL to reaped, start to first ADD.
Meanwhile the runtime retries the ADD every `POLL_S` while it answers 11 (try again later), as
kubelet retries a sandbox; each attempt is one exec of the real plugin. After the first ADD
the node's links are compared with those before the kill: a restart re-creates nothing
(a flushing agent would show here). The datastore is SQLite, as in `cni_latency`.

Why: issue 6, point 2: after a SIGKILL the restarted agent serves new ADDs within 2 s. The
cold start beside it shows what a restart costs over starting at all (the interpreter and its
imports, opening the datastore, the first netlink sockets).

The node and the agent are `common/cni.py`'s, as in `cni_latency`. Everything runs in
throwaway namespaces named `trlb-<tag>-*`, one node per sample; teardown always runs and
removes exactly what the run made, agents ended by their PIDs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import secrets
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from common.cni import cni_node
from common.host import BenchError, Scratch, ip, scratch
from common.report import count, finish_facts, load_line, main, run_facts, table, verdict
from trellis.dataplane.kernel.netns import netns_path
from trellis.lab.runtime import CniRuntime, PluginError

NETNS_PREFIX = "trlb"
"""Prefix of every namespace this benchmark creates (and the only ones it removes)."""
TARGET_S = 2.0
"""The issue's bound: a restarted agent serves a new ADD within this many seconds of the kill."""
POLL_S = 0.01
"""Pause between two ADD attempts that answered 11 (seconds)."""
FIRST_ADD_TIMEOUT_S = 60.0
TRY_AGAIN_LATER = 11


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000


def first_add(runtime: CniRuntime, run_: Scratch, agent: subprocess.Popen[bytes], log: Path) -> int:
    """ADD a fresh pod, again every POLL_S while the answer is 11; returns the attempts made."""
    pod = netns_path(run_.netns(f"p{secrets.token_hex(2)}", loopback=False))
    container_id = secrets.token_hex(32)
    deadline = time.monotonic() + FIRST_ADD_TIMEOUT_S
    for attempt in itertools.count(1):
        try:
            runtime.add(container_id, pod)
            return attempt
        except PluginError as err:
            if agent.poll() is not None:
                raise BenchError(f"agent exited {agent.returncode}: {log.read_text()[-1500:]}") from None
            if err.code != TRY_AGAIN_LATER or time.monotonic() > deadline:
                raise BenchError(f"first ADD after {attempt} attempts: {err}") from None
        time.sleep(POLL_S)
    raise AssertionError("itertools.count never ends")


def links(node: str) -> dict[str, int]:
    """Every link of namespace `node`: name -> ifindex."""
    return {link["ifname"]: link["ifindex"] for link in json.loads(ip("-j", "-n", node, "link", "show"))}


def sample(pods: int) -> dict[str, float]:
    """One node: cold start to first ADD, `pods` more ADDs, SIGKILL, restart to first ADD."""
    with scratch(NETNS_PREFIX) as run_:
        node = cni_node(run_)
        with node.trellis() as runtime:
            started = time.perf_counter()
            agent, log = node.start_agent()
            cold_attempts = first_add(runtime, run_, agent, log)
            cold = _ms(started)
            for _ in range(pods):
                runtime.add(secrets.token_hex(32), netns_path(run_.netns(f"p{secrets.token_hex(2)}", False)))
            before = links(node.netns)

            killed = time.perf_counter()
            agent.send_signal(signal.SIGKILL)
            agent.wait()
            reaped = _ms(killed)
            started = time.perf_counter()
            agent, log = node.start_agent()
            attempts = first_add(runtime, run_, agent, log)
            restart, spawn_to_add = _ms(killed), _ms(started)
            after = links(node.netns)
    changed = sorted(name for name, index in before.items() if after.get(name) != index)
    if changed:
        raise BenchError(f"the restarted agent re-created or removed links: {', '.join(changed)}")
    return {
        "cold start to first ADD": cold,
        "SIGKILL to first ADD": restart,
        "SIGKILL to reaped": reaped,
        "restart to first ADD": spawn_to_add,
        "ADD attempts, cold": cold_attempts,
        "ADD attempts, restart": attempts,
    }


def summarize(values: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else values * 9
    return {
        "p50": round(statistics.median(values), 1),
        "p90": round(cuts[8], 1),
        "max": round(max(values), 1),
    }


def measure(samples: int, pods: int) -> dict[str, Any]:
    facts = run_facts()
    runs = [sample(pods) for _ in range(samples)]
    series = {quantity: [run[quantity] for run in runs] for quantity in runs[0]}
    summary = {quantity: summarize(values) for quantity, values in series.items()}
    restart, cold = summary["SIGKILL to first ADD"], summary["cold start to first ADD"]
    return {
        "benchmark": "agent_restart",
        **finish_facts(facts),
        "samples": samples,
        "pods": pods,
        "datastore": "sqlite",
        "reference": "the same agent's cold start on an empty state dir, in the same run",
        "target": f"SIGKILL to first ADD <= {TARGET_S} s (max over samples)",
        "ms": summary,
        "ratio": {p: round(restart[p] / cold[p], 2) for p in ("p50", "p90", "max")},
        "met": restart["max"] <= TARGET_S * 1000,
        "samples_ms": {quantity: [round(v, 1) for v in values] for quantity, values in series.items()},
    }


def render(result: dict[str, Any]) -> None:
    summary: dict[str, dict[str, float]] = result["ms"]
    console = Console()
    times = table(
        f"Agent restart, ms ({result['samples']} samples, {result['pods']} pods on the node at the kill; "
        f"target: SIGKILL to first ADD <= {TARGET_S:.0f} s)",
        ["", "p50", "p90", "max"],
    )
    for quantity in (
        "SIGKILL to first ADD",
        "cold start to first ADD",
        "SIGKILL to reaped",
        "restart to first ADD",
    ):
        times.add_row(quantity, *(f"{summary[quantity][p]:.0f}" for p in ("p50", "p90", "max")))
    ratio = result["ratio"]
    times.add_row("ratio restart / cold start", *(f"{ratio[p]:.2f}x" for p in ("p50", "p90", "max")))
    console.print(times)
    worst, attempts = summary["SIGKILL to first ADD"]["max"], summary["ADD attempts, restart"]
    console.print(
        f"SIGKILL to first ADD, worst of {result['samples']}: {worst:.0f} ms: {verdict(result['met'])}; "
        f"ADD attempts per restart p50 {attempts['p50']:.0f}, max {attempts['max']:.0f}; no link re-created"
    )
    console.print(load_line(result))


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0] if __doc__ else None)
    parser.add_argument("--samples", type=count(1), default=10, help="nodes, each killed once (default 10)")
    parser.add_argument("--pods", type=count(0), default=20, help="pods on the node at the kill (default 20)")
    return main(
        parser,
        lambda args: measure(args.samples, args.pods),
        render,
        "agent_restart",
        argv,
        omit=("samples_ms",),
    )


if __name__ == "__main__":
    sys.exit(cli())
