"""Join convergence: from `trellis lab node add` to the new node's pod being routed by every other node.

What it measures, per join of a node to a running 3-node lab (a Trellis lab per set-up: vxlan
with SQLite, vxlan with etcd, host-gw with SQLite for contrast, and bgp with SQLite), `--joins`
times (default 5):
  (i)   `trellis lab node add NAME`: the command's wall time, until the node is registered and
        every agent has programmed its Node object;
  (ii)  from `trellis lab apply --no-wait` of one Pod pinned to the new node (spec.nodeName) to
        the moment a block route (route protocol 222, or `bird` with backend bgp; prefix shorter
        than /32) covering the pod's IP is in the kernel of every other node;
  total from `node add` being issued to that same moment: the target is at most 1 s, and 4 s
  with bgp (BIRD's sessions must come up first: the bgp issue measured 3.3 s for that).
With vxlan the new agent claims its first block when it registers (its VTEP address comes from
IPAM), so that block's route usually reaches the other nodes during `node add` and the pod
lands in a block already routed: (ii) is then 0. With host-gw the pod's CNI ADD claims the
block, so (ii) shows the pod-driven path: block claim, datastore write, the other agents'
watch and reconcile. With bgp the pod's block reaches the others only once the new node's BIRD
has its sessions up (the full mesh: the lab's default BGP topology); the set-up puts a pod on
each base node first, and the new node's kernel holding a BIRD route to every base pod's block
marks its sessions established (BIRD sends a peer's routes as soon as the session is up). That
moment is shown beside the total, from `node add` and from the new agent's process start, and
split at the start of the new node's BIRD (its PID from `lab status`): the agent's start-up
until it starts BIRD, then BIRD's wait until its sessions are up (its `connect delay time`).
Beside them, from the same run, to show where the time goes: from the new agent's process
start (/proc/PID/stat, 1/HZ resolution) to the block routed everywhere (the agent's share: its
start-up, datastore sync, block claim and registration, the other agents' watch and
reconcile); from the apply to the pod's own /32 route on its node (set during its CNI ADD: the
local floor) and from that route to the block routed everywhere (the propagation of a
pod-claimed block); and the start-up of the `trellis` command alone, which every lab command
pays before it does anything.

How the kernels are read: one `ip -n trl-<lab>-<node> -j -batch -` per node stays running and
is sent `route show proto 222` (and `route show proto 12`, BIRD's, with bgp) every `--poll-ms`
(default 5 ms), so a poll costs a netlink dump, not an exec. The new node's is started as soon
as its namespace is mounted, before its agent runs, so nothing it sees predates the watch. A
route first seen by a poll appeared after the previous poll of that node began: the interval
between those two bounds the resolution. The time of a route is the end of the
poll that first saw it (an upper bound); the output gives the poll interval's p50 and the
largest such bound among the routes counted.

Each join adds node `j<k>`, measures, then removes it (`node remove`), so every sample has the
same three other nodes. Teardown always runs: every `ip` process ended by its PID, `trellis lab
down` for every lab. Nothing outside the labs' namespaces is touched.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rich.console import Console

from common.host import BenchError, Scratch, scratch, stop
from common.lab import TRELLIS, Lab, lab, pods_manifest
from common.report import count, finish_facts, load_line, main, median, run_facts, table, verdict

SETUPS = ("vxlan/sqlite", "vxlan/etcd", "host-gw/sqlite", "bgp/sqlite")
"""backend/datastore; the issue asks for vxlan with both datastores, host-gw shows the pod-driven
path; bgp is the BGP issue's (host-gw in the same run is its reference: the same pod-driven path
without BGP sessions)."""
BACKENDS = ("vxlan", "host-gw", "bgp")
BASE_NODES = 3
TARGET_S = {"vxlan": 1.0, "host-gw": 1.0, "bgp": 4.0}
"""The issues' targets by backend: node add issued -> the new node's block routed by every other node."""
DEADLINE_S = 10.0
"""After the apply, how long to wait for the routes before the join counts as failed."""
QUERIES = {"bgp": ("route show proto 222\n", "route show proto 12\n")}
"""Per backend, what a poll asks `ip -batch`: pods' /32 routes are protocol 222 with every
backend, block routes too except with bgp, whose BIRD installs them as protocol 12 (`bird`).
By number: iproute2 6.1 caches the last protocol name it looked up, and after a numeric one
`proto bird` in the same batch means the number before it."""
DEFAULT_QUERIES = ("route show proto 222\n",)
NETNS_DIR = Path("/run/netns")


def _pipe(stream: IO[str] | None) -> IO[str]:
    if stream is None:
        raise BenchError("a pipe that was asked for is missing")
    return stream


@dataclass(frozen=True)
class Seen:
    at: float
    """End of the first poll that saw the route (perf_counter seconds): an upper bound."""
    bound: float
    """That poll's end minus the previous poll's start: the route appeared within this much before `at`."""


def _seen(seen: Seen | None) -> Seen:
    if seen is None:
        raise BenchError("a route counted as seen is missing")
    return seen


@dataclass
class RouteWatch:
    """Routes of one namespace (`queries`), read by a long-running `ip -j -batch -` (no exec per poll)."""

    netns: str
    proc: subprocess.Popen[str]
    queries: tuple[str, ...]
    baseline: frozenset[str] = frozenset()
    first_seen: dict[str, Seen] = field(default_factory=dict)
    """Destination -> when the first poll that saw it ended; baseline excluded."""
    gaps: list[float] = field(default_factory=list)
    """Per poll: its end minus the previous poll's start, the bound on when a new route appeared."""
    _last_start: float | None = None

    @classmethod
    def start(cls, run_: Scratch, netns: str, queries: tuple[str, ...]) -> RouteWatch:
        proc = subprocess.Popen(
            ["ip", "-n", netns, "-j", "-batch", "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        watch = cls(netns, run_.track(proc), queries)
        watch.reset()
        return watch

    def reset(self, baseline: bool = True) -> None:
        """Forget what was seen; the routes present now are the baseline (or none: every route is new)."""
        self.baseline = frozenset(self.query()) if baseline else frozenset()
        self.first_seen, self.gaps, self._last_start = {}, [], None

    def query(self) -> list[str]:
        stdin, stdout = _pipe(self.proc.stdin), _pipe(self.proc.stdout)
        stdin.write("".join(self.queries))
        stdin.flush()
        dsts = []
        for _ in self.queries:
            line = stdout.readline()
            if not line:
                raise BenchError(f"ip -n {self.netns} -batch exited {self.proc.poll()}")
            dsts += [str(route["dst"]) for route in json.loads(line)]
        return dsts

    def poll(self) -> None:
        started = time.perf_counter()
        dsts = self.query()
        ended = time.perf_counter()
        gap = ended - (self._last_start if self._last_start is not None else started)
        for dst in dsts:
            if dst not in self.baseline and dst not in self.first_seen:
                self.first_seen[dst] = Seen(ended, gap)
        if self._last_start is not None:
            self.gaps.append(gap)
        self._last_start = started

    def covering(self, ip: str, block: bool) -> Seen | None:
        """When a route covering `ip` was first seen: a block (shorter than /32) or the /32 itself."""
        address = ipaddress.ip_address(ip)
        for dst, seen in self.first_seen.items():
            net = ipaddress.ip_network(dst)
            if address in net and (net.prefixlen < net.max_prefixlen) == block:
                return seen
        return None


def process_start(pid: int) -> float:
    """When process `pid` started, on the perf_counter clock (field 22 of /proc/PID/stat, in ticks
    since boot; this clock and the boot-time clock differ by a constant while the machine runs)."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])
    offset = time.perf_counter() - time.clock_gettime(time.CLOCK_BOOTTIME)
    return ticks / os.sysconf("SC_CLK_TCK") + offset


@dataclass
class Steps:
    """The lab commands of one join, run by a thread while the main thread polls the kernels."""

    made: Lab
    node: str
    pod: str
    times: dict[str, float] = field(default_factory=dict)
    pod_ip: str | None = None
    """Set once the apply returned and `lab status` gave the pod's IP (read here: not in the poll loop)."""
    agent_started: float | None = None
    """When the new node's agent process started (perf_counter seconds, 1/HZ resolution)."""
    bird_started: float | None = None
    """When the new node's BIRD started, with backend bgp (as `agent_started`)."""
    error: BaseException | None = None
    added: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def __call__(self) -> None:
        try:
            self.times["add"] = time.perf_counter()
            self.made.node_add(self.node)
            self.times["added"] = time.perf_counter()
            self.added.set()
            self.times["apply"] = time.perf_counter()
            self.made.apply(pods_manifest([(self.pod, self.node)]), wait=False)
            self.times["applied"] = time.perf_counter()
            status = self.made.status()
            pods = {p["name"]: p.get("ip") for p in status["pods"]}
            (node,) = [n for n in status["nodes"] if n["name"] == self.node]
            self.agent_started = process_start(int(node["agent_pid"]))
            if node.get("bird_pid") is not None:
                self.bird_started = process_start(int(node["bird_pid"]))
            self.pod_ip = str(pods[f"default/{self.pod}"])
        except BaseException as err:  # handed to the main thread, which raises it
            self.error = err
        finally:
            self.added.set()
            self.done.set()


def mounted(netns: str) -> bool:
    """Whether namespace `netns` is mounted (the lab creates its file first, then binds the
    namespace onto it: `ip -n` on the bare file would fail)."""
    try:
        return (NETNS_DIR / netns).stat().st_dev != NETNS_DIR.stat().st_dev
    except FileNotFoundError:
        return False


def join_once(
    run_: Scratch,
    made: Lab,
    others: list[RouteWatch],
    node: str,
    poll_s: float,
    base_ips: Sequence[str] = (),
) -> dict[str, Any]:
    """Node `node` joins, a pod on it is applied; returns the times; the node is removed again.

    `base_ips`: pods on the other nodes, whose blocks the new node must route too before the
    join counts as done (with bgp: its sessions are up).
    """
    for watch in others:
        watch.reset()
    steps = Steps(made, node, f"{node}-pod")
    thread = threading.Thread(target=steps, name=f"join-{node}", daemon=True)
    thread.start()
    watches = list(others)
    local: RouteWatch | None = None
    pod_ip: str | None = None
    deadline = float("inf")
    try:
        while True:
            for watch in watches:
                watch.poll()
            if steps.error is not None:
                raise steps.error
            if local is None and mounted(made.node_netns(node)):
                local = RouteWatch.start(run_, made.node_netns(node), others[0].queries)  # as the others
                local.reset(baseline=False)
                watches.append(local)
            if pod_ip is None and steps.pod_ip is not None:
                pod_ip = steps.pod_ip
                deadline = time.perf_counter() + DEADLINE_S
            if pod_ip is not None and local is not None:
                missing = [w.netns for w in others if w.covering(pod_ip, block=True) is None]
                unrouted = [ip for ip in base_ips if local.covering(ip, block=True) is None]
                if local.covering(pod_ip, block=False) is not None and not missing and not unrouted:
                    break
                if time.perf_counter() > deadline:
                    raise BenchError(
                        f"{node}: after {DEADLINE_S:.0f} s pod {pod_ip} not routed by {missing or 'none'}, "
                        f"and {node} not routing the pods {unrouted or 'none'}"
                    )
            time.sleep(poll_s)
        thread.join()
    except BaseException:
        _leave(made, node, local, thread, quiet=True)
        raise
    _leave(made, node, local, thread, quiet=False)
    assert local is not None and pod_ip is not None and steps.agent_started is not None
    t = steps.times
    seen = {w.netns: _seen(w.covering(pod_ip, block=True)) for w in others}
    own = _seen(local.covering(pod_ip, block=False))
    routed = {ns: v.at - t["add"] for ns, v in seen.items()}
    all_routed = max(routed.values())
    apply_at = t["apply"] - t["add"]
    gaps = [g for w in watches for g in w.gaps]
    sessions = [_seen(local.covering(ip, block=True)) for ip in base_ips]
    bound = max(v.bound for v in [*seen.values(), own, *sessions])
    up = max(v.at for v in sessions) if sessions else None
    if up is not None and steps.bird_started is None:
        raise BenchError(f"{node}: `lab status` gave no PID of its BIRD")
    return {
        "node": node,
        "pod_ip": pod_ip,
        "node_add_s": round(t["added"] - t["add"], 4),
        "apply_wall_s": round(t["applied"] - t["apply"], 4),
        "apply_to_routed_s": round(max(0.0, all_routed - apply_at), 4),
        "routed_before_apply": all_routed <= apply_at,
        "total_s": round(all_routed, 4),
        "local_route_after_apply_s": round(own.at - t["apply"], 4),
        "local_to_routed_s": round(max(v.at for v in seen.values()) - own.at, 4),
        "agent_start_to_routed_s": round(all_routed - (steps.agent_started - t["add"]), 4),
        "routed_s_per_node": {ns: round(v, 4) for ns, v in routed.items()},
        **(
            {
                "sessions_s": round(up - t["add"], 4),
                "agent_start_to_sessions_s": round(up - steps.agent_started, 4),
                "agent_start_to_bird_s": round(steps.bird_started - steps.agent_started, 4),
                "bird_start_to_sessions_s": round(up - steps.bird_started, 4),
            }
            if up is not None and steps.bird_started is not None  # both or neither (checked above)
            else {}
        ),
        "poll_gap_ms": {"p50": round(median(gaps) * 1000, 2), "max": round(max(gaps) * 1000, 2)},
        "detection_bound_ms": round(bound * 1000, 2),
    }


def _leave(made: Lab, node: str, local: RouteWatch | None, thread: threading.Thread, quiet: bool) -> None:
    """After a join: its watch ended by PID, its commands finished, the node removed again."""
    if local is not None:
        stop(local.proc)
    thread.join()
    try:
        made.node_remove(node)
    except BenchError as err:
        if not quiet:
            raise
        print(f"{node}: {err}", file=sys.stderr)  # the error already unwinding matters more


def base_pods(made: Lab) -> list[str]:
    """One pod on each base node (so that each owns a block); their IPs."""
    pods = [(f"base-{k}", f"node-{k}") for k in range(1, BASE_NODES + 1)]
    made.apply(pods_manifest(pods))
    return [made.pod_ip(f"default/{name}") for name, _ in pods]


def measure_setup(setup: str, joins: int, warmup: int, poll_s: float, console: Console) -> dict[str, Any]:
    backend, datastore = setup.split("/")
    name = f"j{backend[0]}{datastore[0]}-{secrets.token_hex(2)}"
    samples: list[dict[str, Any]] = []
    queries = QUERIES.get(backend, DEFAULT_QUERIES)
    with lab(name, BASE_NODES, backend, datastore) as made, scratch("trlj") as run_:
        base_ips = base_pods(made) if backend == "bgp" else []
        others = [
            RouteWatch.start(run_, made.node_netns(f"node-{k}"), queries) for k in range(1, BASE_NODES + 1)
        ]
        for k in range(warmup + joins):
            sample = join_once(run_, made, others, f"j{k}", poll_s, base_ips)
            sample["warmup"] = k < warmup
            samples.append(sample)
            console.print(
                f"{setup} {sample['node']}{' (warm-up)' if k < warmup else ''}: node add "
                f"{sample['node_add_s']:.3f} s, routed everywhere {sample['total_s']:.3f} s after it"
            )
    measured = [s for s in samples if not s["warmup"]]

    def stat(key: str) -> dict[str, float]:
        values = [float(s[key]) for s in measured]
        return {"p50": round(median(values), 4), "max": round(max(values), 4)}

    gaps_p50 = [float(s["poll_gap_ms"]["p50"]) for s in measured]
    bounds = [float(s["detection_bound_ms"]) for s in measured]
    return {
        "backend": backend,
        "datastore": datastore,
        "summary": {
            key: stat(key)
            for key in (
                "node_add_s",
                "apply_to_routed_s",
                "total_s",
                "local_route_after_apply_s",
                "local_to_routed_s",
                "agent_start_to_routed_s",
                "apply_wall_s",
                *(
                    (
                        "sessions_s",
                        "agent_start_to_sessions_s",
                        "agent_start_to_bird_s",
                        "bird_start_to_sessions_s",
                    )
                    if base_ips
                    else ()
                ),
            )
        },
        "routed_before_apply": sum(bool(s["routed_before_apply"]) for s in measured),
        "poll_gap_ms": {
            "p50": round(median(gaps_p50), 2),
            "max_at_detection": max(bounds),
        },
        "target_s": TARGET_S[backend],
        "met": {
            "p50": median([float(s["total_s"]) for s in measured]) <= TARGET_S[backend],
            "max": max(float(s["total_s"]) for s in measured) <= TARGET_S[backend],
        },
        "joins": samples,
    }


def cli_startup(count: int = 5) -> float:
    """Median wall time of `trellis lab --help`: the start-up every lab command pays."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        subprocess.run([TRELLIS, "lab", "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return round(median(times), 4)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    facts = run_facts()
    console = Console(stderr=True)
    setups = {
        setup: measure_setup(setup, args.joins, args.warmup, args.poll_ms / 1000, console)
        for setup in args.setups
    }
    return {
        "benchmark": "join_convergence",
        **finish_facts(facts),
        "base_nodes": BASE_NODES,
        "joins": args.joins,
        "warmup": args.warmup,
        "poll_ms": args.poll_ms,
        "target": "node add issued -> pod's block routed on every other node <= target_s of the set-up",
        "cli_startup_s": cli_startup(),
        "setups": setups,
    }


def render(result: dict[str, Any]) -> None:
    console = Console()
    out = table(
        f"Join convergence, s ({result['joins']} joins per set-up, {result['base_nodes']} nodes; p50 / max)",
        [
            "backend/datastore",
            "(i) node add",
            "(ii) apply -> routed",
            "total",
            "target",
            "p50",
            "max",
            "agent start -> routed",
            "apply -> local /32",
            "local /32 -> routed",
        ],
    )
    for setup, r in result["setups"].items():
        s = r["summary"]

        def cell(key: str, s: dict[str, Any] = s) -> str:
            return f"{s[key]['p50']:.3f} / {s[key]['max']:.3f}"

        out.add_row(
            setup,
            cell("node_add_s"),
            cell("apply_to_routed_s"),
            cell("total_s"),
            f"<= {r['target_s']:.1f}",
            verdict(r["met"]["p50"]),
            verdict(r["met"]["max"]),
            cell("agent_start_to_routed_s"),
            cell("local_route_after_apply_s"),
            cell("local_to_routed_s"),
        )
    console.print(out)
    console.print(
        "total: from `node add` issued to a block route covering the pod's IP in every other node's kernel. "
        "agent start: the new agent's process start (/proc, 1/HZ resolution). local /32: the pod's own "
        "route on its node, set during its CNI ADD; local /32 -> routed: how long the other nodes took "
        "after it (negative: before it)."
    )
    for setup, r in result["setups"].items():
        console.print(
            f"{setup}: block routed on every other node before the pod was applied in "
            f"{r['routed_before_apply']} of {result['joins']} joins; apply --no-wait wall "
            f"{r['summary']['apply_wall_s']['p50']:.3f} s (p50); poll interval p50 "
            f"{r['poll_gap_ms']['p50']:.1f} ms; each time is late by at most "
            f"{r['poll_gap_ms']['max_at_detection']:.1f} ms (the slowest poll that saw a counted route)"
        )
        if "sessions_s" in r["summary"]:
            console.print(
                f"{setup}: BIRD sessions of the new node up (a route to every base node's pod in its kernel) "
                f"{r['summary']['sessions_s']['p50']:.3f} s after `node add` issued "
                f"(max {r['summary']['sessions_s']['max']:.3f}), "
                f"{r['summary']['agent_start_to_sessions_s']['p50']:.3f} s after its agent started "
                f"(max {r['summary']['agent_start_to_sessions_s']['max']:.3f}): the agent started BIRD "
                f"{r['summary']['agent_start_to_bird_s']['p50']:.3f} s after its own start "
                f"(max {r['summary']['agent_start_to_bird_s']['max']:.3f}), the sessions were up "
                f"{r['summary']['bird_start_to_sessions_s']['p50']:.3f} s after BIRD started "
                f"(max {r['summary']['bird_start_to_sessions_s']['max']:.3f})"
            )
    console.print(f"reference: `trellis lab --help` start-up alone {result['cli_startup_s']:.3f} s (p50)")
    console.print(load_line(result))


def _setups(text: str) -> Sequence[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    for setup in chosen:
        backend, _, datastore = setup.partition("/")
        if backend not in BACKENDS or datastore not in ("sqlite", "etcd"):
            raise argparse.ArgumentTypeError(f"{setup!r}: expected BACKEND/DATASTORE, e.g. vxlan/etcd")
    return chosen


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0] if __doc__ else None)
    parser.add_argument("--joins", type=count(1), default=5, help="measured joins per set-up (default 5)")
    parser.add_argument("--warmup", type=count(0), default=1, help="unmeasured joins first (default 1)")
    parser.add_argument("--poll-ms", type=float, default=5.0, help="pause between route polls (default 5)")
    parser.add_argument(
        "--setups", type=_setups, default=list(SETUPS), help=f"comma-separated (default {','.join(SETUPS)})"
    )
    return main(parser, measure, render, "join_convergence", argv)


if __name__ == "__main__":
    sys.exit(cli())
