"""etcd outage: what a running cluster loses while its etcd is down, and how soon it converges
after etcd returns (issue 6, point 3; tests/e2e/test_outage.py is the short variant).

Set-up: a lab of 3 nodes (vxlan) on etcd, pods a, b, c (one per node) and a NetworkPolicy
that lets only b into c (tests/fixtures/lab/outage.yaml, which the e2e test applies too).
Then `trellis lab datastore stop` kills etcd (SIGKILL; the lab keeps it down) for
`--outage-s` (default 60 s, six times the node lease's TTL), and `datastore start` brings it
back on its data.

What it reports, each beside its reference from the same run:
- packets lost: three pings (a->b, b->c, c->a: every node sends and answers), every 20 ms from
  before the stop until a pod applied after etcd's return is programmed. Target: 0.
- policy during the outage: rounds of TCP probes of every pair, each compared with the matrix
  measured before the stop (the denied pair must stay denied).
- a CNI ADD during the outage: its answer (11, "try again later", expected) and wall time,
  beside a CNI STATUS with etcd up, exec'd the same way (the reference: an exec, one agent
  round trip, one datastore read).
- convergence after etcd returns: the wall time of `lab apply` of a new pod (it returns once
  every agent has programmed it) issued as soon as `datastore start` returned, beside the same
  apply before the outage: the difference is the agents' resync (their syncers retry at most
  every 2 s) and their first reconcile.
- nothing lost: every pod's address and every agent (PID, restarts) before and after.

Everything it makes is a lab (`lab down` always runs) and a namespace `trlo-<tag>-late` for the
refused ADD; its pings are ended by their PIDs. Nothing outside them is touched.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from common.host import BenchError, Scratch, in_netns, scratch
from common.lab import Lab, lab, pods_manifest, trellis
from common.report import count, finish_facts, load_line, main, median, run_facts, table, verdict

NETNS_PREFIX = "trlo"
NODES = 3
PINGS = (("default/a", "default/b"), ("default/b", "default/c"), ("default/c", "default/a"))
PING_INTERVAL_S = 0.02
FLOWING_S = 10.0
SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) received")
MANIFEST = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "lab" / "outage.yaml"
"""Pods a, b, c (one per node) and a NetworkPolicy that lets only b into c (shared with the e2e test)."""


def lab_cmd(made: Lab, *args: str) -> str:
    return trellis("lab", *args, "--name", made.name)


def tcp_matrix(made: Lab) -> dict[str, dict[str, bool]]:
    matrix: dict[str, dict[str, bool]] = json.loads(
        lab_cmd(made, "probe", "--port", "80", "--protocol", "TCP", "--output", "json")
    )["matrix"]
    return matrix


def timed(action: Any) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


class Ping:
    """`ping` from one pod to another, its output in a file; `finish()` ends it by PID (SIGINT,
    which makes it print its summary) and returns (transmitted, received)."""

    def __init__(self, run_: Scratch, made: Lab, src: str, dst: str) -> None:
        self.label = f"{src} -> {dst}"
        self.log = run_.tmp / f"ping-{len(list(run_.tmp.glob('ping-*')))}.log"
        with self.log.open("w") as out:
            self.proc = run_.track(
                subprocess.Popen(
                    [*made.exec_prefix(src), "ping", "-n", "-i", str(PING_INTERVAL_S), made.pod_ip(dst)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )

    def flowing(self) -> bool:
        if self.proc.poll() is not None:
            raise BenchError(
                f"ping {self.label} exited {self.proc.returncode}: {self.log.read_text()[-500:]}"
            )
        return "bytes from" in self.log.read_text()

    def finish(self) -> tuple[int, int]:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=30)
        found = SUMMARY.search(self.log.read_text())
        if found is None:
            raise BenchError(f"ping {self.label} printed no summary: {self.log.read_text()[-500:]}")
        return int(found[1]), int(found[2])


def by_hand(
    made: Lab, command: str, netns: str = "", container: str = ""
) -> tuple[float, int, dict[str, Any]]:
    """CNI `command` exec'd in node-1's namespace as a runtime does: (seconds, exit code, reply)."""
    exports = dict(
        line.removeprefix("export ").split("=", 1) for line in lab_cmd(made, "env", "node-1").splitlines()
    )
    conflist = json.loads(Path(exports["CNI_CONF"]).read_text())
    conf = {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **conflist["plugins"][0]}
    env = [f"CNI_COMMAND={command}", f"CNI_PATH={exports['CNI_PATH']}"]
    if netns:
        env += [f"CNI_CONTAINERID={container}", f"CNI_NETNS=/run/netns/{netns}", "CNI_IFNAME=eth0"]
        env += ["CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=late"]
    plugin = exports["CNI_PATH"].split(":")[0] + "/trellis"
    started = time.perf_counter()
    done = subprocess.run(
        [*in_netns(exports["TRELLIS_NETNS"]), "env", *env, plugin],
        input=json.dumps(conf),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return time.perf_counter() - started, done.returncode, json.loads(done.stdout or "{}")


def survivors(made: Lab) -> dict[str, Any]:
    """Every pod's address and every agent's (PID, restarts)."""
    status = made.status()
    return {
        "pods": {p["name"]: p["ip"] for p in status["pods"]},
        "agents": {n["name"]: [n["agent_pid"], n["agent_restarts"]] for n in status["nodes"]},
    }


def wait_flowing(pings: list[Ping]) -> None:
    deadline = time.monotonic() + FLOWING_S
    while not all(p.flowing() for p in pings):
        if time.monotonic() > deadline:
            raise BenchError(f"pings not answered after {FLOWING_S:.0f} s")
        time.sleep(0.05)


def during_outage(made: Lab, run_: Scratch, outage_s: float, expected: Any, samples: int) -> dict[str, Any]:
    """With etcd down: refused ADDs, then probe rounds until `outage_s` has passed since `stop`."""
    stopped = time.monotonic()
    late = run_.netns("late")
    adds = [by_hand(made, "ADD", late, f"outage-{k}") for k in range(samples)]
    codes = sorted({code for _, code, _ in adds})
    replies = sorted({(reply.get("code"), reply.get("msg")) for _, _, reply in adds})
    rounds = unchanged = 0
    while time.monotonic() - stopped < outage_s:
        rounds += 1
        unchanged += tcp_matrix(made) == expected
    return {
        "add_s": [round(s, 4) for s, _, _ in adds],
        "add_exit_codes": codes,
        "add_replies": [{"code": code, "msg": msg} for code, msg in replies],
        "probe_rounds": rounds,
        "probe_rounds_unchanged": unchanged,
        "outage_s": round(time.monotonic() - stopped, 2),
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    facts = run_facts()
    console = Console(stderr=True)
    name = f"eo-{secrets.token_hex(2)}"
    with lab(name, NODES, "vxlan", "etcd") as made, scratch(NETNS_PREFIX) as run_:
        made.apply(MANIFEST.read_text())
        status_ref = [by_hand(made, "STATUS")[0] for _ in range(args.samples)]
        apply_ref_s = timed(lambda: made.apply(pods_manifest([("ref", "node-1")])))
        expected = tcp_matrix(made)
        before = survivors(made)
        pings = [Ping(run_, made, src, dst) for src, dst in PINGS]
        wait_flowing(pings)
        console.print(f"{name}: pings flowing; stopping etcd for {args.outage_s:.0f} s")
        lab_cmd(made, "datastore", "stop")
        outage = during_outage(made, run_, args.outage_s, expected, args.samples)
        start_s = timed(lambda: lab_cmd(made, "datastore", "start"))
        apply_after_s = timed(lambda: made.apply(pods_manifest([("late", "node-1")])))
        console.print(
            f"{name}: etcd back in {start_s:.2f} s; new pod programmed everywhere {apply_after_s:.2f} s later"
        )
        counts = {p.label: p.finish() for p in pings}
        after = survivors(made)
    kept = {k: v for k, v in after["pods"].items() if k != "default/late"} == before["pods"]
    lost = {label: sent - got for label, (sent, got) in counts.items()}
    return {
        "benchmark": "etcd_outage",
        **finish_facts(facts),
        "nodes": NODES,
        "outage_target_s": args.outage_s,
        "ping_interval_s": PING_INTERVAL_S,
        "pings": {label: {"transmitted": sent, "received": got} for label, (sent, got) in counts.items()},
        "packets_lost": sum(lost.values()),
        "packets_lost_target": 0,
        "during_outage": outage,
        "cni_add_p50_s": round(median(outage["add_s"]), 4),
        "cni_status_ref_p50_s": round(median(status_ref), 4),
        "etcd_start_s": round(start_s, 3),
        "apply_after_s": round(apply_after_s, 3),
        "apply_ref_s": round(apply_ref_s, 3),
        "apply_ratio": round(apply_after_s / apply_ref_s, 2),
        "nothing_lost": kept and after["agents"] == before["agents"] and "default/late" in after["pods"],
        "before": before,
        "after": after,
        "met": {
            "packets": sum(lost.values()) == 0,
            "policy": outage["probe_rounds_unchanged"] == outage["probe_rounds"],
            "add_code_11": outage["add_exit_codes"] == [1]
            and all(r["code"] == 11 for r in outage["add_replies"]),
        },
    }


def render(result: dict[str, Any]) -> None:
    console = Console()
    outage = result["during_outage"]
    out = table(
        f"etcd down {outage['outage_s']:.0f} s, 3 nodes (vxlan)", ["figure", "measured", "reference", "met"]
    )
    out.add_row(
        "packets lost (3 pings, 20 ms)",
        f"{result['packets_lost']} of {sum(p['transmitted'] for p in result['pings'].values())}",
        "0",
        verdict(result["met"]["packets"]),
    )
    out.add_row(
        "probe rounds matching the matrix before",
        f"{outage['probe_rounds_unchanged']} of {outage['probe_rounds']}",
        "all",
        verdict(result["met"]["policy"]),
    )
    codes = ",".join(str(r["code"]) for r in outage["add_replies"])
    out.add_row(
        "CNI ADD during the outage (p50)",
        f"code {codes}, {result['cni_add_p50_s'] * 1000:.0f} ms",
        f"STATUS, etcd up: {result['cni_status_ref_p50_s'] * 1000:.0f} ms",
        verdict(result["met"]["add_code_11"]),
    )
    out.add_row("etcd start until healthy", f"{result['etcd_start_s']:.2f} s", "", "")
    out.add_row(
        "apply of a pod, programmed on every node",
        f"{result['apply_after_s']:.2f} s right after etcd returned",
        f"{result['apply_ref_s']:.2f} s before the outage (x{result['apply_ratio']:.2f})",
        "",
    )
    out.add_row(
        "pods' addresses and agents unchanged",
        str(result["nothing_lost"]),
        "True",
        verdict(result["nothing_lost"]),
    )
    console.print(out)
    for reply in outage["add_replies"]:
        console.print(f"ADD reply: {reply['msg']}")
    console.print(load_line(result))


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0] if __doc__ else None)
    parser.add_argument("--outage-s", type=float, default=60.0, help="how long etcd stays down (default 60)")
    parser.add_argument(
        "--samples", type=count(1), default=5, help="refused ADDs and STATUS references (default 5)"
    )
    return main(parser, measure, render, "etcd_outage", argv, omit=("before", "after"))


if __name__ == "__main__":
    sys.exit(cli())
