"""CNI concurrency: 200 pods added at once on one node, then deleted at once, against the Go reference.

What it measures: a container runtime that starts (then stops) 200 pods on one node in the same
instant, as kubelet may after a node reboot or in a large rollout. 200 threads, each already
in the node's namespace, wait at a barrier and then exec the plugin together; for every ADD
(then every DEL) the time from the barrier to its reply, and the burst's wall time from the
barrier to the last reply. Trellis (the `trellis` plugin and a real `trellis agent`) and
Debian's Go `bridge` + `host-local` (cniVersion 1.0.0; host-local serialises on a file lock)
run the same bursts in the same node namespace, alternately first, for several rounds. Every
ADD must succeed with an address no other pod of the burst holds, and every DEL succeed.
Beside it: the agent's own time per request, from its log ("ADD ... done in X ms").

Why: issue 6, point 5: 200 ADDs at once on one node all succeed, with distinct addresses;
report p50/p99, against a reference measured in the same run.

The node, the agent and the reference configuration are `common/cni.py`'s, as in
`cni_latency`. Everything runs in throwaway namespaces named `trlb-<tag>-*`; teardown always runs
and removes exactly what the run made.
"""

from __future__ import annotations

import argparse
import re
import secrets
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from rich.console import Console

from common.cni import cni_node, wait_ready
from common.host import BenchError, Scratch, run, scratch
from common.report import count, finish_facts, load_line, main, run_facts, table
from trellis.dataplane.kernel.netns import enter, netns_path
from trellis.lab.runtime import CniRuntime, PluginError

NETNS_PREFIX = "trlb"
"""Prefix of every namespace this benchmark creates (and the only ones it removes)."""
BARRIER_TIMEOUT_S = 120.0
"""How long a burst's threads wait for each other at the start line (seconds)."""
AGENT_DONE = re.compile(r"\b(ADD|DEL) bench/\S+ done in ([0-9.]+) ms")
RIVALS = ("trellis", "reference")
COMMANDS = ("ADD", "DEL")


def create_pods(run_: Scratch, role: str, pods: int) -> list[str]:
    """`pods` empty namespaces `<prefix>-<tag>-<role><n>`, made in one `ip -batch` (recorded first)."""
    names = [f"{run_.prefix}-{run_.tag}-{role}{n}" for n in range(pods)]
    run_.namespaces.extend(names)
    run(["ip", "-batch", "-"], stdin="".join(f"netns add {name}\n" for name in names))
    return [netns_path(name) for name in names]


def burst(
    pool: ThreadPoolExecutor, runtime: CniRuntime, command: str, pods: list[tuple[str, str]]
) -> tuple[list[float], float, list[dict[str, Any]]]:
    """`command` (ADD or DEL) for every `(container ID, netns)` of `pods`, all at once.

    Returns each request's milliseconds from the start line to its reply, the wall time from
    the first start to the last reply (ms), and the ADD results; BenchError naming the first
    request that failed.
    """
    start_line = threading.Barrier(len(pods), timeout=BARRIER_TIMEOUT_S)

    def one(container_id: str, netns: str) -> tuple[float, float, dict[str, Any]]:
        args = {"IgnoreUnknown": "1", "K8S_POD_NAMESPACE": "bench", "K8S_POD_NAME": container_id[:12]}
        start_line.wait()
        started = time.perf_counter()
        try:
            if command == "ADD":
                result = runtime.add(container_id, netns, args=args)
            else:
                runtime.delete(container_id, netns, args=args)
                result = {}
        except PluginError as err:
            raise BenchError(f"{runtime.network} {command} in {netns}: {err}") from None
        return started, time.perf_counter(), result

    done = [future.result() for future in [pool.submit(one, cid, netns) for cid, netns in pods]]
    latencies = [(end - started) * 1000 for started, end, _ in done]
    wall = (max(end for _, end, _ in done) - min(started for started, _, _ in done)) * 1000
    return latencies, wall, [result for _, _, result in done]


def distinct_addresses(what: str, results: list[Any]) -> None:
    """BenchError unless every ADD result holds an address of its own."""
    addresses = [str(result["ips"][0]["address"]) for result in results]
    if len(set(addresses)) != len(addresses):
        raise BenchError(f"{what}: {len(addresses) - len(set(addresses))} addresses handed out twice")


def run_rounds(
    pool: ThreadPoolExecutor, runtimes: dict[str, CniRuntime], pods: dict[str, list[str]], rounds: int
) -> dict[str, list[float]]:
    """Per round, each rival's ADD burst then its DEL burst, the rivals' order alternating.

    Returns milliseconds per quantity: "<rival> <command>" (each request) and "... wall".
    """
    samples: dict[str, list[float]] = {}
    for round_ in range(rounds):
        order = RIVALS if round_ % 2 == 0 else tuple(reversed(RIVALS))
        for rival in order:
            attached = [(secrets.token_hex(32), netns) for netns in pods[rival]]
            for command in COMMANDS:
                latencies, wall, results = burst(pool, runtimes[rival], command, attached)
                if command == "ADD":
                    distinct_addresses(f"{rival} round {round_}", results)
                samples.setdefault(f"{rival} {command}", []).extend(latencies)
                samples.setdefault(f"{rival} {command} wall", []).append(wall)
    return samples


def agent_samples(log: Path) -> dict[str, list[float]]:
    """The agent's own milliseconds per ADD and DEL, from its "ADD bench/... done in X ms" lines."""
    samples: dict[str, list[float]] = {}
    for command, ms in AGENT_DONE.findall(log.read_text()):
        samples.setdefault(f"agent {command}", []).append(float(ms))
    return samples


def percentiles(values: list[float]) -> dict[str, float]:
    if len(values) == 1:
        return dict.fromkeys(("p50", "p99", "max"), round(values[0], 1))
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": round(cuts[49], 1), "p99": round(cuts[98], 1), "max": round(max(values), 1)}


def ratios(summary: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Trellis over the reference, per command, for each request and for the burst's wall time."""
    return {
        f"{command}{suffix}": {
            p: round(summary[f"trellis {command}{suffix}"][p] / summary[f"reference {command}{suffix}"][p], 2)
            for p in ("p50", "p99")
        }
        for command in COMMANDS
        for suffix in ("", " wall")
    }


def measure(pods: int, rounds: int) -> dict[str, Any]:
    facts = run_facts()
    with scratch(NETNS_PREFIX) as run_, ExitStack() as stack:
        node = cni_node(run_)
        agent, log = node.start_agent()
        # Not in the node: the burst's threads entered it themselves (pool initializer).
        runtimes = {
            "trellis": stack.enter_context(node.trellis(in_node=False)),
            "reference": stack.enter_context(node.reference(in_node=False)),
        }
        with node.trellis() as status:
            wait_ready(agent, status, log)
        pod_netns = {rival: create_pods(run_, rival[:3], pods) for rival in RIVALS}
        pool = stack.enter_context(
            ThreadPoolExecutor(
                max_workers=pods, thread_name_prefix="burst", initializer=enter, initargs=(node.netns,)
            )
        )
        run_rounds(pool, runtimes, {r: p[:1] for r, p in pod_netns.items()}, 1)  # warm-up: the bridge, caches
        samples = run_rounds(pool, runtimes, pod_netns, rounds)
        samples.update(agent_samples(log))
    summary = {quantity: percentiles(values) for quantity, values in samples.items()}
    return {
        "benchmark": "cni_concurrency",
        **finish_facts(facts),
        "pods": pods,
        "rounds": rounds,
        "reference": "Debian containernetworking-plugins bridge + host-local, cniVersion 1.0.0",
        "ms": summary,
        "ratio": ratios(summary),
        "samples_ms": {q: [round(v, 2) for v in values] for q, values in samples.items()},
    }


def render(result: dict[str, Any]) -> None:
    summary: dict[str, dict[str, float]] = result["ms"]
    console = Console()
    latency = table(
        f"{result['pods']} CNI requests at once on one node, ms ({result['rounds']} rounds; each: "
        "from the start line to its reply; wall: to the burst's last reply; ref: Go bridge + host-local)",
        ["", "trellis p50", "p99", "max", "ref p50", "p99", "max", "ratio p50", "p99"],
    )
    for command in COMMANDS:
        for suffix, label in (("", "each"), (" wall", "wall")):
            mine, ref = summary[f"trellis {command}{suffix}"], summary[f"reference {command}{suffix}"]
            ratio = result["ratio"][f"{command}{suffix}"]
            figures = [mine["p50"], mine["p99"], mine["max"], ref["p50"], ref["p99"], ref["max"]]
            latency.add_row(
                f"{command} {label}",
                *(f"{v:.0f}" for v in figures),
                f"{ratio['p50']:.2f}x",
                f"{ratio['p99']:.2f}x",
            )
    console.print(latency)
    agent = table("The agent's own time per request (from its log), ms", ["", "p50", "p99", "max"])
    for command in COMMANDS:
        own = summary.get(f"agent {command}")
        if own:
            agent.add_row(command, *(f"{own[p]:.1f}" for p in ("p50", "p99", "max")))
    console.print(agent)
    console.print(
        f"all {result['pods'] * result['rounds']} ADDs and DELs per rival succeeded; "
        "every burst's addresses distinct"
    )
    console.print(load_line(result))


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0] if __doc__ else None)
    parser.add_argument("--pods", type=count(2), default=200, help="requests per burst (default 200)")
    parser.add_argument("--rounds", type=count(1), default=3, help="bursts per rival and command (default 3)")
    return main(
        parser,
        lambda args: measure(args.pods, args.rounds),
        render,
        "cni_concurrency",
        argv,
        omit=("samples_ms",),
    )


if __name__ == "__main__":
    sys.exit(cli())
