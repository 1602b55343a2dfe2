"""Throughput across nodes: Trellis pod->pod (vxlan, host-gw, bgp) beside node->node and a Flannel-style path.

What it measures: iperf3 TCP throughput (receiver's Gbit/s), one stream and two (`-P 2`), for
  - pod->pod across nodes in a Trellis lab with backend `vxlan`, in one with `host-gw` and in
    one with `bgp` (BIRD's routes: its mesh of two nodes); `--backends` picks some of them;
  - node->node between the same two nodes' underlay addresses, over the same fabric (in each
    lab: the reference each lab's pod->pod figure is divided by);
  - a hand-built Flannel-style path in this run's own namespaces (`trlq-<tag>-*`): two nodes on
    a bridge, each with a `cni0`-like bridge (`trlq-cni0`), a veth pod on it, a VXLAN device
    (`trlq.vx`: VNI 1, UDP 8472, nolearning, one static FDB and one permanent neighbour entry
    per remote node, a route per remote subnet, as Flannel's vxlan backend programs them), and
    Flannel's masquerade/forward rules as an nftables table (so conntrack runs, as on a real
    Flannel node); plus node->node over its own bridge (measured when vxlan is, its comparison).
Every measurement is taken `--repeat` times (default 3), interleaved across paths in a rotating
order so that the machine's background load falls on every path alike; the table shows the
median and the spread.

Why: the multi-node issue's targets, measured on the same machine in the same run: routed
pod->pod (host-gw) at least 0.90x node->node, VXLAN pod->pod at least 0.85x node->node; and the
BGP issue's, routed pod->pod with bgp at least 0.90x node->node. The
Flannel-style path shows what the routed veth (no bridge) gains over bridge + VXLAN. DESIGN.md §5
lists one-off figures for this machine (veth pair 21.4 Gbit/s, bridge 16.6, VXLAN 15.5, routed
host-gw 14.5): a different set-up, shown for orientation only; the ratios use this run's figures.

Teardown always runs: `trellis lab down` for both labs, this run's namespaces deleted, every
iperf3 server ended by its PID. Nothing outside the labs' and this run's namespaces is touched.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from common.host import BenchError, Scratch, in_netns, ip, run, scratch, wait_for_text
from common.lab import Lab, lab, pods_manifest
from common.report import count, finish_facts, load_line, main, median, run_facts, table, verdict

NETNS_PREFIX = "trlq"
"""Prefix of the Flannel-style path's namespaces (and the only ones of its own it removes)."""
UNDERLAY = "198.18.0"
"""RFC 2544 benchmarking range: the Flannel-style nodes' underlay, node k at .(10+k)/24."""
POD_NET = "198.19"
"""Node k's pod subnet 198.19.k.0/24: `trlq-cni0` .1, the pod .2, the VTEP address .0/32."""
VXLAN_MTU = 1450
"""Pod, bridge and VXLAN MTU of the Flannel-style path: the uplink's 1500 less 50, as Flannel."""
STREAMS = (1, 2)
TARGETS = {"vxlan": 0.85, "host-gw": 0.90, "bgp": 0.90}
"""The issues' targets: pod->pod throughput at least this multiple of node->node, same fabric."""
BACKENDS = tuple(TARGETS)
ROUTED_S = 30.0
"""How long after the pods' apply pod->pod may take to answer (bgp: BIRD's sessions come up first)."""
DESIGN_REFERENCE = {"veth pair": 21.4, "bridge": 16.6, "VXLAN": 15.5, "routed host-gw": 14.5}
"""DESIGN.md §5, Gbit/s, single stream, measured once on this machine in another set-up."""
ROUTED_VS_BRIDGED = ("vxlan pod->pod", "flannel-style pod->pod")
"""Trellis' routed veth + VXLAN against bridge + veth + VXLAN: what the missing bridge gains."""
FLANNEL_NFT = f"""
table ip trlq {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {POD_NET}.0.0/16 ip daddr {POD_NET}.0.0/16 return
        ip saddr {POD_NET}.0.0/16 ip daddr != 224.0.0.0/4 masquerade
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        ip saddr {POD_NET}.0.0/16 accept
        ip daddr {POD_NET}.0.0/16 accept
    }}
}}
"""
"""Flannel's iptables rules (POSTROUTING RETURN/MASQUERADE, FORWARD ACCEPT) as nftables."""


@dataclass(frozen=True)
class Flow:
    """One path to measure: where the client and the server run, and what the client connects to."""

    key: str
    """e.g. "vxlan pod->pod"."""
    client: list[str]
    """Command prefix that runs the client at the source."""
    server: list[str]
    """Command prefix that runs the server at the destination."""
    dst: str
    reference: str | None = None
    """Key of the flow this one is divided by (node->node over the same fabric)."""
    target: float | None = None


@dataclass(frozen=True)
class Sample:
    gbps: float
    """Receiver's throughput, Gbit/s (after the omitted first second)."""
    retransmits: int
    cpu_sender: float
    cpu_receiver: float


def trellis_flows(stack: ExitStack, name: str, backend: str) -> list[Flow]:
    """A 2-node lab with a pod on each node: pod->pod and node->node, on `stack` (down at its end)."""
    made: Lab = stack.enter_context(lab(name, nodes=2, backend=backend))
    made.apply(pods_manifest([("tput-a", "node-1"), ("tput-b", "node-2")]))
    wait_reachable(made, "default/tput-a", made.pod_ip("default/tput-b"))
    status = made.status()
    underlay = {node["name"]: node["underlay_ip"] for node in status["nodes"]}
    node, pod = f"{backend} node->node", f"{backend} pod->pod"
    return [
        Flow(
            node,
            in_netns(made.node_netns("node-1")),
            in_netns(made.node_netns("node-2")),
            underlay["node-2"],
        ),
        Flow(
            pod,
            made.exec_prefix("default/tput-a"),
            made.exec_prefix("default/tput-b"),
            made.pod_ip("default/tput-b"),
            reference=node,
            target=TARGETS[backend],
        ),
    ]


def wait_reachable(made: Lab, pod: str, dst: str) -> None:
    """Return once `pod` gets an answer from `dst` (one ping at a time, each waiting up to 1 s);
    BenchError after ROUTED_S."""
    deadline = time.monotonic() + ROUTED_S
    while True:
        try:
            run([*made.exec_prefix(pod), "ping", "-n", "-q", "-c", "1", "-W", "1", dst])
            return
        except BenchError:
            if time.monotonic() > deadline:
                raise BenchError(
                    f"lab {made.name}: {pod} gets no answer from {dst} after {ROUTED_S:.0f} s"
                ) from None


def _mac(k: int) -> str:
    return f"02:74:72:6c:00:{k:02x}"


def flannel_flows(run_: Scratch) -> list[Flow]:
    """Two Flannel-style nodes (bridge `cni0` + veth pod + static VXLAN) on a bridge of their own."""
    fabric = run_.netns("fab")
    ip("-n", fabric, "link", "add", "trlq-br0", "type", "bridge")
    ip("-n", fabric, "link", "set", "trlq-br0", "up")
    nodes, pods = {}, {}
    for k in (1, 2):
        node = nodes[k] = run_.netns(f"n{k}")
        pod = pods[k] = run_.netns(f"p{k}")
        port, underlay, subnet = f"trlq-p{k}", f"{UNDERLAY}.{10 + k}", f"{POD_NET}.{k}"
        ip("-n", fabric, "link", "add", port, "type", "veth", "peer", "name", "trlq-eth0", "netns", node)
        ip("-n", fabric, "link", "set", port, "master", "trlq-br0", "up")
        ip("-n", node, "addr", "add", f"{underlay}/24", "dev", "trlq-eth0")
        ip("-n", node, "link", "set", "trlq-eth0", "up")
        run([*in_netns(node), "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        mtu = str(VXLAN_MTU)
        ip("-n", node, "link", "add", "trlq-cni0", "mtu", mtu, "type", "bridge")
        ip("-n", node, "addr", "add", f"{subnet}.1/24", "dev", "trlq-cni0")
        ip("-n", node, "link", "set", "trlq-cni0", "up")
        ip(
            "-n",
            node,
            "link",
            "add",
            "trlq-veth",
            "mtu",
            mtu,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "mtu",
            mtu,
            "netns",
            pod,
        )
        ip("-n", node, "link", "set", "trlq-veth", "master", "trlq-cni0", "up")
        ip("-n", pod, "addr", "add", f"{subnet}.2/24", "dev", "eth0")
        ip("-n", pod, "link", "set", "eth0", "up")
        ip("-n", pod, "route", "add", "default", "via", f"{subnet}.1")
        ip(
            "-n", node, "link", "add", "trlq.vx", "address", _mac(k), "mtu", mtu, "type", "vxlan",
            "id", "1", "local", underlay, "dev", "trlq-eth0", "dstport", "8472", "nolearning",
        )  # fmt: skip
        ip("-n", node, "addr", "add", f"{subnet}.0/32", "dev", "trlq.vx")
        ip("-n", node, "link", "set", "trlq.vx", "up")
        run([*in_netns(node), "nft", "-f", "-"], stdin=FLANNEL_NFT)
    for k, j in ((1, 2), (2, 1)):
        vtep, remote = f"{POD_NET}.{j}.0", f"{UNDERLAY}.{10 + j}"
        run(
            [
                "bridge",
                "-n",
                nodes[k],
                "fdb",
                "append",
                _mac(j),
                "dev",
                "trlq.vx",
                "dst",
                remote,
                "self",
                "permanent",
            ]
        )
        ip("-n", nodes[k], "neigh", "replace", vtep, "lladdr", _mac(j), "dev", "trlq.vx", "nud", "permanent")
        ip("-n", nodes[k], "route", "add", f"{POD_NET}.{j}.0/24", "via", vtep, "dev", "trlq.vx", "onlink")
    node = "flannel-style node->node"
    return [
        Flow(node, in_netns(nodes[1]), in_netns(nodes[2]), f"{UNDERLAY}.12"),
        Flow(
            "flannel-style pod->pod",
            in_netns(pods[1]),
            in_netns(pods[2]),
            f"{POD_NET}.2.2",
            reference=node,
        ),
    ]


def path_mtu(flow: Flow) -> dict[str, Any]:
    """The source's interface towards the destination and its MTU (`ip route get`, then `ip link`)."""
    route = json.loads(run([*flow.client, "ip", "-j", "route", "get", flow.dst]))[0]
    link = json.loads(run([*flow.client, "ip", "-j", "link", "show", "dev", route["dev"]]))[0]
    return {"dev": route["dev"], "mtu": link["mtu"]}


def start_servers(run_: Scratch, flows: Sequence[Flow]) -> None:
    """One `iperf3 -s` per destination, for the whole run (iperf3 serves one test at a time)."""
    for n, flow in enumerate(flows):
        proc, log = run_.spawn([*flow.server, "iperf3", "-s", "--forceflush"], f"iperf3-server-{n}.log")
        wait_for_text(proc, log, "Server listening")


def iperf(flow: Flow, seconds: int, streams: int) -> Sample:
    argv = [*flow.client, "iperf3", "-c", flow.dst, "-t", str(seconds), "-O", "1", "-P", str(streams), "-J"]
    end = json.loads(run(argv, timeout=seconds + 60))["end"]
    return Sample(
        gbps=end["sum_received"]["bits_per_second"] / 1e9,
        retransmits=int(end["sum_sent"].get("retransmits", 0)),
        cpu_sender=end["cpu_utilization_percent"]["host_total"],
        cpu_receiver=end["cpu_utilization_percent"]["remote_total"],
    )


def rounds(flows: Sequence[Flow], repeat: int) -> Iterator[tuple[Flow, int]]:
    """Every (flow, streams) `repeat` times; each round starts one flow later than the previous."""
    for r in range(repeat):
        for n in range(len(flows)):
            flow = flows[(n + r) % len(flows)]
            for streams in STREAMS:
                yield flow, streams


def summarize(
    flows: Sequence[Flow], samples: dict[tuple[str, int], list[Sample]], mtus: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for flow in flows:
        per_streams: dict[str, Any] = {}
        for streams in STREAMS:
            got = samples[flow.key, streams]
            gbps = [s.gbps for s in got]
            per_streams[str(streams)] = {
                "gbps": round(median(gbps), 2),
                "min": round(min(gbps), 2),
                "max": round(max(gbps), 2),
                "samples_gbps": [round(v, 3) for v in gbps],
                "retransmits": [s.retransmits for s in got],
                "cpu_sender_pct": [round(s.cpu_sender, 1) for s in got],
                "cpu_receiver_pct": [round(s.cpu_receiver, 1) for s in got],
            }
        paths[flow.key] = {
            "dst": flow.dst,
            "source_interface": mtus[flow.key],
            "reference": flow.reference,
            "streams": per_streams,
        }
    comparisons = [(f.key, f.reference, f.target) for f in flows if f.reference is not None]
    if all(key in paths for key in ROUTED_VS_BRIDGED):
        comparisons.append((ROUTED_VS_BRIDGED[0], ROUTED_VS_BRIDGED[1], None))
    ratios = []
    for key, reference, target in comparisons:
        for streams in STREAMS:
            mine = paths[key]["streams"][str(streams)]["gbps"]
            ref = paths[reference]["streams"][str(streams)]["gbps"]
            ratio = round(mine / ref, 3)
            ratios.append(
                {
                    "path": key,
                    "reference": reference,
                    "streams": streams,
                    "ratio": ratio,
                    "target": target,
                    "met": None if target is None else ratio >= target,
                }
            )
    return {"paths": paths, "ratios": ratios}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    facts = run_facts()
    console = Console(stderr=True)
    tag = secrets.token_hex(2)
    with ExitStack() as stack:
        flows = [
            flow
            for backend in args.backends
            for flow in trellis_flows(stack, f"tp{backend[0]}-{tag}", backend)
        ]
        run_ = stack.enter_context(scratch(NETNS_PREFIX, tag))  # closed first: servers end before labs go
        if "vxlan" in args.backends:
            flows += flannel_flows(run_)
        start_servers(run_, flows)
        mtus = {flow.key: path_mtu(flow) for flow in flows}
        samples: dict[tuple[str, int], list[Sample]] = {}
        plan = list(rounds(flows, args.repeat))
        for n, (flow, streams) in enumerate(plan, 1):
            sample = iperf(flow, args.seconds, streams)
            samples.setdefault((flow.key, streams), []).append(sample)
            console.print(f"[{n}/{len(plan)}] {flow.key}, {streams} stream(s): {sample.gbps:.2f} Gbit/s")
    summary = summarize(flows, samples, mtus)
    return {
        "benchmark": "throughput",
        **finish_facts(facts),
        "iperf3": run(["iperf3", "--version"]).splitlines()[0],
        "seconds": args.seconds,
        "repeat": args.repeat,
        "statistic": "median of the repeats; Gbit/s at the receiver, first second omitted",
        "backends": list(args.backends),
        "targets": {f"{backend} pod->pod / node->node": TARGETS[backend] for backend in args.backends},
        "design_reference_gbps": DESIGN_REFERENCE,
        **summary,
    }


def render(result: dict[str, Any]) -> None:
    console = Console()
    paths: dict[str, Any] = result["paths"]
    figures = table(
        f"iperf3 TCP throughput, Gbit/s (median of {result['repeat']} x {result['seconds']} s; min-max)",
        [
            "path",
            *(f"{s} stream{'s' if s > 1 else ''}" for s in STREAMS),
            "retransmits (1 stream)",
            "source MTU",
        ],
    )
    for key, path in paths.items():
        cells = [
            f"{path['streams'][str(s)]['gbps']:.2f} ({path['streams'][str(s)]['min']:.1f}-"
            f"{path['streams'][str(s)]['max']:.1f})"
            for s in STREAMS
        ]
        source = path["source_interface"]
        figures.add_row(
            key,
            *cells,
            "/".join(map(str, path["streams"]["1"]["retransmits"])),
            f"{source['mtu']} ({source['dev']})",
        )
    console.print(figures)
    bridged = any(r["reference"] == ROUTED_VS_BRIDGED[1] for r in result["ratios"])
    ratios = table(
        "Ratios: pod->pod / node->node over the same fabric"
        + ("; routed veth / bridge (both VXLAN)" if bridged else ""),
        ["path", "divided by", "streams", "Gbit/s", "reference", "ratio", "target", ""],
    )
    for r in result["ratios"]:
        mine = paths[r["path"]]["streams"][str(r["streams"])]["gbps"]
        ref = paths[r["reference"]]["streams"][str(r["streams"])]["gbps"]
        target = f">= {r['target']:.2f}" if r["target"] is not None else ""
        ratios.add_row(
            r["path"],
            r["reference"],
            str(r["streams"]),
            f"{mine:.2f}",
            f"{ref:.2f}",
            f"{r['ratio']:.3f}x",
            target,
            "" if r["met"] is None else verdict(r["met"]),
        )
    console.print(ratios)
    design = ", ".join(f"{k} {v}" for k, v in result["design_reference_gbps"].items())
    console.print(f"DESIGN.md §5 (another set-up, one stream, for orientation): {design} Gbit/s")
    console.print(load_line(result))


def _backends(text: str) -> list[str]:
    chosen = [b.strip() for b in text.split(",") if b.strip()]
    unknown = [b for b in chosen if b not in BACKENDS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"{text!r}: expected some of {','.join(BACKENDS)}")
    return chosen


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=count(2), default=5, help="seconds per iperf3 test (default 5)")
    parser.add_argument(
        "--repeat", type=count(1), default=3, help="tests per path and stream count (default 3)"
    )
    parser.add_argument(
        "--backends",
        type=_backends,
        default=list(BACKENDS),
        help=f"comma-separated, each a lab of its own (default {','.join(BACKENDS)}; "
        "the Flannel-style path comes with vxlan)",
    )
    return main(parser, measure, render, "throughput", argv)


if __name__ == "__main__":
    sys.exit(cli())
