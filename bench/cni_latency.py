"""CNI latency: Trellis against the Go reference `bridge` + `host-local`, on one node, in one run.

What it measures: the wall time a container runtime spends on one pod's CNI ADD and on its
DEL (exec of the plugin, the plugin's work, its reply), for the `trellis` plugin talking to a
real `trellis agent`, and for Debian's reference `bridge` plugin with `host-local` IPAM. Each
iteration attaches a fresh pod namespace to each, alternating which goes first, so both
share the machine's noise. Beside it: the plugin executable's start-up alone (CNI VERSION,
answered without the agent) against an empty script on the same interpreter (the floor no
Python plugin can beat) and against the Go plugin's start-up; and the agent's own time per
request, read from its log ("ADD ... done in X ms").

Why: the runtime execs the plugin for every pod, so this is Trellis' share of pod start-up.
The target is ADD and DEL p50 at most 1.5x the reference, measured on the same machine.

How plugins are exec'd matters as much as what they do: a Go runtime (containerd, CRI-O)
already lives in the node's namespace and execs with vfork; `CniRuntime` does the same from
worker threads that entered the node namespace (a `preexec_fn` would force a full fork of
this process, about 2 ms more per exec on both sides, which would flatter the ratio).

Everything runs in throwaway namespaces named `trlb-<tag>-*`: the node of
`common/cni.py` (a namespace with an uplink to a second `trlb` namespace), the agent inside
it, and the pods. Teardown always runs and removes exactly what the run made; the machine's own
namespace is never changed.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from rich.console import Console

from common.cni import REFERENCE_CNI_PATH, cni_node, wait_ready
from common.host import Scratch, scratch
from common.report import count, finish_facts, load_line, main, run_facts, table, verdict
from trellis.dataplane.kernel.netns import netns_path
from trellis.lab.runtime import CniRuntime

NETNS_PREFIX = "trlb"
"""Prefix of every namespace this benchmark creates (and the only ones it removes)."""
TARGET_RATIO = 1.5
"""The issue's target: Trellis ADD and DEL p50 at most this multiple of the reference."""
AGENT_DONE = re.compile(r"\b(ADD|DEL) (\S+) done in ([0-9.]+) ms")

Samples = dict[str, list[float]]
"""Milliseconds per measured quantity, e.g. {"trellis ADD": [...], ...}."""
Probe = Callable[[int, bool], dict[str, float]]
"""One step of an iteration: (iteration, measured?) -> {quantity: milliseconds}."""


def floor_script(bin_dir: Path, plugin: Path) -> Path:
    """An empty script on the plugin's own shebang line: `python3 -IS -c pass`, exec'd like the plugin."""
    shebang = plugin.read_text().partition("\n")[0]
    floor = bin_dir / "floor"
    floor.write_text(shebang + "\n")
    floor.chmod(0o755)
    return floor


def _elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def attach_probe(run: Scratch, name: str, runtime: CniRuntime) -> Probe:
    """ADD then DEL of a fresh pod namespace through `runtime`; namespace creation is not timed.

    The pod namespaces are removed at teardown, not here: the kernel dismantles a namespace
    asynchronously, tens of milliseconds of RCU work that would land on whichever probe runs next.
    """

    def probe(i: int, measured: bool) -> dict[str, float]:
        pod = netns_path(run.netns(f"{name[:3]}{i}", loopback=False))
        container_id = secrets.token_hex(32)
        args = {
            "IgnoreUnknown": "1",  # the reference plugins refuse unknown CNI_ARGS without it
            "K8S_POD_NAMESPACE": "bench",
            "K8S_POD_NAME": f"{'m' if measured else 'w'}{i}",
            "K8S_POD_INFRA_CONTAINER_ID": container_id,
        }
        started = time.perf_counter()
        runtime.add(container_id, pod, args=args)
        added = _elapsed_ms(started)
        started = time.perf_counter()
        runtime.delete(container_id, pod, args=args)
        return {f"{name} ADD": added, f"{name} DEL": _elapsed_ms(started)}

    return probe


def timed_probe(name: str, call: Callable[[], object]) -> Probe:
    """The wall time of `call()`, as quantity `name`."""

    def probe(_i: int, _measured: bool) -> dict[str, float]:
        started = time.perf_counter()
        call()
        return {name: _elapsed_ms(started)}

    return probe


def version(runtime: CniRuntime, plugin: Path) -> Callable[[], object]:
    """One exec of `plugin` with CNI_COMMAND=VERSION, exactly as `runtime` execs plugins."""
    stdin = json.dumps({"cniVersion": "1.0.0"}).encode()

    def call() -> None:
        inv = runtime.exec_plugin(plugin, {"CNI_COMMAND": "VERSION"}, stdin)
        if inv.exit_code != 0:
            raise RuntimeError(f"{plugin} VERSION exited {inv.exit_code}: {inv.stderr.decode()[-500:]}")

    return call


def run_probes(rivals: list[Probe], extras: list[Probe], warmup: int, count: int) -> Samples:
    """Per iteration the rivals, then the extras; each group's order reversed every other iteration.

    So each rival runs first (after the previous iteration's extras) as often as second (after
    the other rival): neither always inherits the other's leftover kernel work.
    """
    samples: Samples = {}
    for i in range(warmup + count):
        measured = i >= warmup
        for group in (rivals, extras):
            for probe in group if i % 2 == 0 else reversed(group):
                for quantity, ms in probe(i, measured).items():
                    if measured:
                        samples.setdefault(quantity, []).append(ms)
    return samples


def agent_samples(log: Path) -> Samples:
    """The agent's own time per measured request, from its "ADD <pod> done in X ms" lines."""
    samples: Samples = {}
    for match in AGENT_DONE.finditer(log.read_text()):
        command, pod, ms = match.groups()
        if pod.startswith("bench/m"):
            samples.setdefault(f"agent {command}", []).append(float(ms))
    return samples


def percentiles(values: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": round(cuts[49], 2), "p90": round(cuts[89], 2)}


def summarize(samples: Samples) -> dict[str, dict[str, float]]:
    return {quantity: percentiles(values) for quantity, values in samples.items()}


def ratios(summary: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {
        command: {
            p: round(summary[f"trellis {command}"][p] / summary[f"reference {command}"][p], 2)
            for p in ("p50", "p90")
        }
        for command in ("ADD", "DEL")
    }


def render(result: dict[str, Any]) -> None:
    summary: dict[str, dict[str, float]] = result["ms"]
    ratio: dict[str, dict[str, float]] = result["ratio"]
    console = Console()
    latency = table(
        f"CNI latency, ms ({result['count']} pods each; target: ratio p50 <= {TARGET_RATIO})",
        ["", "trellis p50", "p90", "reference p50", "p90", "ratio p50", "p90", "target"],
    )
    for command in ("ADD", "DEL"):
        mine, ref, r = summary[f"trellis {command}"], summary[f"reference {command}"], ratio[command]
        met = verdict(r["p50"] <= TARGET_RATIO)
        figures = [mine["p50"], mine["p90"], ref["p50"], ref["p90"]]
        latency.add_row(command, *(f"{v:.1f}" for v in figures), f"{r['p50']:.2f}x", f"{r['p90']:.2f}x", met)
    console.print(latency)
    parts = table("Start-up and agent time, ms", ["", "p50", "p90"])
    for quantity, label in (
        ("trellis VERSION", "trellis plugin start-up alone (VERSION, no agent)"),
        ("trellis STATUS", "trellis STATUS (start-up + one agent round trip)"),
        ("floor", "floor: python3 -IS on an empty script"),
        ("reference VERSION", "Go bridge start-up (VERSION)"),
        ("agent ADD", "trellis agent's own ADD (from its log)"),
        ("agent DEL", "trellis agent's own DEL (from its log)"),
    ):
        if quantity in summary:
            parts.add_row(label, f"{summary[quantity]['p50']:.1f}", f"{summary[quantity]['p90']:.1f}")
    if "agent ADD" in summary:
        rest = summary["trellis ADD"]["p50"] - summary["trellis VERSION"]["p50"] - summary["agent ADD"]["p50"]
        parts.add_row("rest of trellis ADD: socket, dispatch (p50 difference)", f"{rest:.1f}", "")
    console.print(parts)
    console.print(load_line(result))


def _interpreter(plugin: Path) -> dict[str, str]:
    shebang = plugin.read_text().partition("\n")[0].removeprefix("#!")
    exe = shebang.split()[0]
    version = subprocess.run(
        [exe, "-c", "import sys; print(sys.version)"], check=True, capture_output=True, text=True
    )
    return {"bench": sys.version, "plugin_shebang": shebang, "plugin": version.stdout.strip()}


def measure(count: int, warmup: int) -> dict[str, Any]:
    facts = run_facts()
    with scratch(NETNS_PREFIX) as run, ExitStack() as stack:
        node = cni_node(run)
        agent, log = node.start_agent()
        trellis = stack.enter_context(node.trellis())
        reference = stack.enter_context(node.reference())
        wait_ready(agent, trellis, log)
        rivals = [attach_probe(run, "trellis", trellis), attach_probe(run, "reference", reference)]
        extras = [
            timed_probe("trellis VERSION", version(trellis, node.plugin)),
            timed_probe("trellis STATUS", trellis.status),
            timed_probe("floor", version(trellis, floor_script(node.bin_dir, node.plugin))),
            timed_probe("reference VERSION", version(reference, REFERENCE_CNI_PATH / "bridge")),
        ]
        samples = run_probes(rivals, extras, warmup, count)
        samples.update(agent_samples(log))
        interpreter = _interpreter(node.plugin)
    summary = summarize(samples)
    return {
        "benchmark": "cni_latency",
        **finish_facts(facts),
        "count": count,
        "warmup": warmup,
        "interpreter": interpreter,
        "reference": "Debian containernetworking-plugins bridge + host-local, cniVersion 1.0.0",
        "target": f"trellis ADD and DEL p50 <= {TARGET_RATIO}x reference",
        "ms": summary,
        "ratio": ratios(summary),
        "samples_ms": {q: [round(v, 3) for v in values] for q, values in samples.items()},
    }


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0] if __doc__ else None)
    parser.add_argument("--count", type=count(2), default=100, help="measured pods per plugin (default 100)")
    parser.add_argument("--warmup", type=count(0), default=5, help="unmeasured iterations first (default 5)")
    return main(
        parser,
        lambda args: measure(args.count, args.warmup),
        render,
        "cni_latency",
        argv,
        omit=("samples_ms",),
    )


if __name__ == "__main__":
    sys.exit(cli())
