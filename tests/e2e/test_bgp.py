"""The bgp backend in the lab, through the real `trellis lab` CLI (root): BIRD on every node.

One lab per topology (BIRD sessions take 1-2 s to establish). Checks what an operator would:
every node's kernel holds `proto bird` routes to the other nodes' pods, every pod reaches
every other one, `lab status` shows the sessions established, an agent killed mid-traffic
loses no ping (BIRD outlives it), a removed node is withdrawn from the others within 5 s,
and BGP objects are applied and deleted like other kinds. With a ToR running FRR (a router
nobody here wrote), FRR learns every node's blocks over MD5-signed sessions and routes back
to pods, and every pod reaches the prefix FRR originates; a node removed from the lab is
dropped by FRR within 5 s, not kept as a stale route for the graceful restart time.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.labs import ASK, TRELLIS, Lab, built, pods_manifest, rx_packets
from tests.helpers import wait_until
from trellis.lab.frr import FRR_TMP
from trellis.lab.process import ProcessRef

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds labs of network namespaces"),
]

ESTABLISH_S = 15.0
WITHDRAW_S = 5.0
PING_COUNT = 200


def bird_routes(lab: Lab, node: str) -> list[ipaddress.IPv4Network]:
    """The destinations of the routes BIRD learned and installed in the node's kernel (not its
    own blocks' blackholes)."""
    return [ipaddress.IPv4Network(r["dst"]) for r in lab.routes(node, "bird") if r.get("type") != "blackhole"]


def own_blocks(lab: Lab, node: str) -> list[str]:
    """The node's blocks: the blackholes its BIRD originates them from."""
    return [r["dst"] for r in lab.routes(node, "bird") if r.get("type") == "blackhole"]


def routed_by_bird(lab: Lab, node: str, ip: str) -> bool:
    return any(ipaddress.IPv4Address(ip) in dst for dst in bird_routes(lab, node))


def converged(lab: Lab, pods: dict[str, str]) -> bool:
    """Every node's kernel holds a BIRD route to every pod on another node (pod name -> node)."""
    ips = {name: lab.pod(f"default/{name}")["ip"] for name in pods}
    nodes = set(pods.values())
    return all(
        routed_by_bird(lab, node, ips[name])
        for node in nodes
        for name, where in pods.items()
        if where != node
    )


def sessions(lab: Lab) -> dict[str, list[dict[str, str]]]:
    return {node["name"]: node["bgp"] for node in lab.status()["nodes"]}


def all_reachable(matrix: dict[str, Any]) -> bool:
    return all(ok for row in matrix["matrix"].values() for ok in row.values())


def build_pods(lab: Lab, count: int) -> dict[str, str]:
    pods = {f"p{k}": f"node-{k}" for k in range(1, count + 1)}
    lab.apply(pods_manifest(pods))
    wait_until(lambda: converged(lab, pods), ESTABLISH_S, "every node to learn every other node's blocks")
    matrix = lab.probe("--port", "80", "--protocol", "TCP")
    assert all_reachable(matrix), matrix
    return pods


def test_mesh_routes_pods_survives_an_agent_kill_and_withdraws_a_removed_node(tmp_path: Path) -> None:
    with built(tmp_path, "--nodes", "3", "--backend", "bgp") as lab:
        assert lab.status()["bgp_topology"] == "mesh"
        pods = build_pods(lab, 3)
        wait_until(
            lambda: all(len(s) == 2 and all(x["state"] == "up" for x in s) for s in sessions(lab).values()),
            ESTABLISH_S,
            "every mesh session to be established",
        )
        assert all(x["name"].startswith("mesh_") for s in sessions(lab).values() for x in s)
        assert "BGP" in lab.run("status")  # the table's column (wrapped at 80 columns here)

        # An agent killed mid-traffic: BIRD keeps running, the supervisor restarts the agent.
        p2 = lab.pod("default/p2")
        old = lab.node("node-1")["agent_pid"]
        ping = subprocess.Popen(
            [
                *(str(TRELLIS), "lab", "exec", "--name", lab.name, "default/p1", "--"),
                *("ping", "-n", "-q", "-i", "0.02", "-W", "1", "-c", str(PING_COUNT), p2["ip"]),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            flowing = rx_packets(p2["netns"]) + 10
            wait_until(lambda: rx_packets(p2["netns"]) >= flowing, ESTABLISH_S, "the ping to flow")
            os.kill(old, signal.SIGKILL)
            wait_until(
                lambda: lab.node("node-1")["agent_pid"] not in (None, old) and lab.node("node-1")["ready"],
                20.0,
                "the supervisor to restart node-1's agent",
            )
            out, err = ping.communicate(timeout=30)
        finally:
            ping.kill()
            ping.wait()
        assert f"{PING_COUNT} packets transmitted, {PING_COUNT} received, 0% packet loss" in out, out + err

        # BGP objects through apply/delete, validated up front.
        peer = (
            "apiVersion: trellis.dev/v1\nkind: BGPPeer\nmetadata: {name: tor}\n"
            "spec: {peerIP: 172.31.250.1, asNumber: 65000, node: node-1}\n"
        )
        assert "bgppeer/tor created" in lab.apply(peer)
        assert "bgppeer/tor deleted" in lab.apply(peer, "delete")
        refused = lab.run("apply", "-f", lab.file(peer.replace("65000", "0")), check=False)
        assert refused.startswith("1\n") and "spec.asNumber" in refused, refused

        # A removed node is withdrawn from the others within WITHDRAW_S.
        p3 = lab.pod("default/p3")["ip"]
        lab.run("node remove", "node-3")
        wait_until(
            lambda: not any(routed_by_bird(lab, n, p3) for n in ("node-1", "node-2")),
            WITHDRAW_S,
            "node-3's block to be withdrawn",
        )
        del pods["p3"]
        assert converged(lab, pods)


def test_route_reflectors_route_every_pod(tmp_path: Path) -> None:
    with built(tmp_path, "--nodes", "4", "--backend", "bgp", "--bgp-topology", "rr") as lab:
        assert lab.status()["bgp_topology"] == "rr"
        build_pods(lab, 4)
        names = {node: sorted(x["name"].split("_")[0] for x in s) for node, s in sessions(lab).items()}
        assert names == {
            "node-1": ["client", "client", "rr"],
            "node-2": ["client", "client", "rr"],
            "node-3": ["rr", "rr"],
            "node-4": ["rr", "rr"],
        }, names


def vtysh(tor: dict[str, Any], command: str) -> Any:
    """FRR's JSON answer to `command`, through the ToR's vty socket directory."""
    out = subprocess.run(
        ["vtysh", "--vty_socket", tor["vty_socket_dir"], "-c", command],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return json.loads(out)


def in_tor(tor: dict[str, Any], *command: str) -> str:
    """What `command` prints, run in the ToR's namespace."""
    return subprocess.run(
        ["ip", "netns", "exec", tor["netns"], *command],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout


def test_tor_with_frr_learns_every_block_routes_back_to_pods_and_is_reached_from_them(tmp_path: Path) -> None:
    with built(tmp_path, "--nodes", "3", "--backend", "bgp", "--bgp-topology", "tor") as lab:
        tor = lab.status()["tor"]
        daemons = {daemon: tor[f"{daemon}_pid"] for daemon in ("zebra", "bgpd")}
        assert all(daemons.values()), tor
        lab.processes.update(ProcessRef.of(pid) for pid in daemons.values())  # none may outlive `down`
        pods = build_pods(lab, 3)  # every kernel routes the others' pods (proto bird); every pair connects
        underlay = {node["name"]: node["underlay_ip"] for node in lab.status()["nodes"]}
        blocks = {block: underlay[node] for node in underlay for block in own_blocks(lab, node)}
        assert len(blocks) >= len(underlay), blocks

        # FRR learned every node's blocks, next hop the node, and zebra installed them.
        def frr_routes_every_block() -> bool:
            routes = vtysh(tor, "show ip route json")
            return all(
                [
                    (r["protocol"], r.get("installed"), [h.get("ip") for h in r["nexthops"]])
                    for r in routes.get(b, [])
                ]
                == [("bgp", True, [ip])]
                for b, ip in blocks.items()
            )

        wait_until(frr_routes_every_block, ESTABLISH_S, "FRR to install every node's blocks")
        learned = vtysh(tor, "show ip bgp json")["routes"]
        assert {b: [h["ip"] for h in learned[b][0]["nexthops"]] for b in blocks} == {
            b: [ip] for b, ip in blocks.items()
        }

        # Every node took the ToR's prefix from it, and the sessions are signed (TCP MD5).
        def routes_to_tor(node: str) -> list[str]:
            return [r.get("gateway", "") for r in lab.routes(node, "bird") if r["dst"] == tor["originates"]]

        wait_until(
            lambda: all(routes_to_tor(node) == [tor["ip"]] for node in underlay),
            ESTABLISH_S,
            f"every node to route {tor['originates']} via the ToR",
        )
        signed = in_tor(tor, "ss", "-tnHie", "state", "established", "sport", "=", ":179")
        assert all(f"md5keys:{ip}/32" in signed for ip in underlay.values()), signed

        # Pods reach the ToR's prefix; the ToR reaches every pod (its kernel's BGP routes).
        for pod, node in pods.items():
            lab.run(
                "exec", f"default/{pod}", "--", "ping", "-n", "-c", "2", "-i", "0.2", "-W", "2", "192.0.2.1"
            )
            ip = lab.pod(f"default/{pod}")["ip"]
            answer = in_tor(tor, sys.executable, "-I", "-c", ASK, ip, "80").strip()
            assert answer.startswith(f"default/{pod} "), (node, answer)

        # `lab status` shows each node's session with the ToR as its BIRD reports it.
        wait_until(
            lambda: (
                sorted(s["node"] for s in lab.status()["tor"]["sessions"] if s["info"] == "Established")
                == sorted(underlay)
            ),
            ESTABLISH_S,
            "every node's session with the ToR to show Established",
        )
        assert "ToR" in lab.run("status")

        # A node removed for good: its agent, finding its node deleted, has BIRD close the
        # sessions, so FRR (which knows nothing of the datastore) drops its blocks at once
        # instead of keeping them stale for the graceful restart time (120 s).
        gone = {b for b, ip in blocks.items() if ip == underlay["node-3"]}
        p3 = lab.pod("default/p3")["ip"]
        lab.run("node remove", "node-3")

        def tor_forgot_node_3() -> bool:
            learned, installed = vtysh(tor, "show ip bgp json")["routes"], vtysh(tor, "show ip route json")
            return not gone & (set(learned) | set(installed))

        wait_until(tor_forgot_node_3, WITHDRAW_S, "FRR to drop node-3's blocks (not keep them stale)")
        wait_until(
            lambda: not any(routed_by_bird(lab, node, p3) for node in ("node-1", "node-2")),
            WITHDRAW_S,
            "node-1 and node-2 to drop node-3's block",
        )
        learned = vtysh(tor, "show ip bgp json")["routes"]
        assert {b for b in blocks if b not in gone} <= set(learned), learned  # the others' stay
    assert not [d for d, pid in daemons.items() if (FRR_TMP / f"{d}.{pid}").exists()], "FRR left files"
