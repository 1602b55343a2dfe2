"""The lab across nodes, through the real `trellis lab` CLI (root): routing, membership, egress, restarts.

Each test builds a lab of its own with few pods (one or two per node) and checks what an
operator would: every pod reaches every other one whatever the backend and datastore; a
removed node's routes vanish from every other kernel and an added node's pods are reachable;
egress to the lab's external host leaves with the node's address while pod-to-pod traffic
keeps the pod's; agents killed mid-traffic lose no packet and flush nothing; VXLAN is used
only across subnets with vxlan-cross-subnet. Every lab is removed afterwards, even on failure.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.labs import LAB_ROOT, TRELLIS, built, netns_names, pods_manifest, rx_packets
from tests.helpers import wait_until
from trellis.datastore.sqlite import SqliteDatastore

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds labs of network namespaces"),
]

CONVERGE_S = 10.0
RESTART_TIMEOUT_S = 20.0
PING_COUNT = 300
"""Pings 20 ms apart: 6 s of traffic, long enough for two agents to be killed and come back."""
REMOVED_ROUTES = re.compile(r"routes: \d+ added, [1-9]\d* removed")


def all_reachable(matrices: list[dict[str, Any]]) -> bool:
    return all(ok for m in matrices for row in m["matrix"].values() for ok in row.values())


@pytest.mark.parametrize(
    ("backend", "datastore"), [("vxlan", "sqlite"), ("host-gw", "etcd"), ("vxlan", "etcd")]
)
def test_every_pod_reaches_every_other_across_three_nodes(
    tmp_path: Path, backend: str, datastore: str
) -> None:
    with built(tmp_path, "--nodes", "3", "--backend", backend, "--datastore", datastore) as lab:
        status = lab.status()
        assert (status["backend"], status["datastore"]) == (backend, datastore)
        if datastore == "etcd":
            url = f"http://{status['underlay'].removesuffix('0/24')}1:2379"
            assert status["datastore_location"] == url and status["etcd_pid"] is not None
            for node in status["nodes"]:
                command = Path(f"/proc/{node['agent_pid']}/cmdline").read_bytes().decode()
                assert f"\0--datastore\0etcd\0--datastore-location\0{url}\0" in command
        placement = {"a1": "node-1", "a2": "node-1", "b": "node-2", "c": "node-3"}
        lab.apply(pods_manifest(placement))
        assert {p["name"]: p["node"] for p in lab.status()["pods"]} == {
            f"default/{pod}": node for pod, node in placement.items()
        }
        matrices = lab.probe("--port", "80")
        assert [m["protocol"] for m in matrices] == ["TCP", "UDP"]
        assert all_reachable(matrices), matrices


def test_a_removed_node_leaves_no_route_behind_and_an_added_node_joins(tmp_path: Path) -> None:
    with built(tmp_path, "--nodes", "3") as lab:
        lab.apply(pods_manifest({"p1": "node-1", "p2": "node-2", "p3": "node-3"}))
        gone = lab.pod("default/p3")
        assert all(lab.route_to(node, gone["ip"]) for node in ("node-1", "node-2"))

        out = lab.run("node remove", "node-3")
        assert "pod/default/p3 deleted" in out

        def unrouted() -> bool:
            return all(lab.route_to(node, gone["ip"]) is None for node in ("node-1", "node-2"))

        wait_until(unrouted, CONVERGE_S, "node-1 and node-2 to drop the routes to node-3's block")
        assert f"trl-{lab.name}-node-3" not in netns_names()
        assert [n["name"] for n in lab.status()["nodes"]] == ["node-1", "node-2"]
        store = SqliteDatastore(LAB_ROOT / lab.name / "datastore.db")
        try:
            assert store.get("/trellis/nodes/node-3") is None
        finally:
            store.close()

        assert "node-4: joined" in lab.run("node add", "node-4")
        assert lab.node("node-4")["ready"] is True
        lab.apply(pods_manifest({"p4": "node-4"}))
        new = lab.pod("default/p4")
        assert all(lab.route_to(node, new["ip"]) for node in ("node-1", "node-2")), "apply waits for routes"
        matrix = lab.probe("--port", "80", "--protocol", "TCP")["matrix"]
        assert sorted(matrix) == ["default/p1", "default/p2", "default/p4"]
        assert all(ok for row in matrix.values() for ok in row.values()), matrix


def test_egress_leaves_with_the_node_address_and_pod_traffic_keeps_the_pod_address(tmp_path: Path) -> None:
    with built(tmp_path, "--nodes", "2") as lab:
        lab.apply(pods_manifest({"p1": "node-1", "p2": "node-2"}))
        status = lab.status()
        external = status["external"]
        assert external["netns"] == f"trl-{lab.name}-ext" and external["netns"] in lab.namespaces()
        node_ips = {n["name"]: n["underlay_ip"] for n in status["nodes"]}
        assert external["ip"] not in node_ips.values() and not external["ip"].startswith("10.244.")
        for pod, node in (("p1", "node-1"), ("p2", "node-2")):
            assert lab.ask(f"default/{pod}", external["ip"]) == f"external {node_ips[node]}"
        p1, p2 = lab.pod("default/p1"), lab.pod("default/p2")
        assert lab.ask("default/p1", p2["ip"]) == f"default/p2 {p1['ip']}"
        assert lab.ask("default/p2", p1["ip"]) == f"default/p1 {p2['ip']}"


def test_agents_killed_mid_traffic_lose_no_packet_and_flush_nothing(tmp_path: Path) -> None:
    nodes = ("node-1", "node-2")
    with built(tmp_path, "--nodes", "2") as lab:
        lab.apply(pods_manifest({"p1": "node-1", "p2": "node-2"}))
        p1, p2 = lab.pod("default/p1"), lab.pod("default/p2")
        peers = {"node-1": p2["ip"], "node-2": p1["ip"]}
        before = {node: lab.routes(node) for node in nodes}
        assert all(lab.route_to(node, ip) for node, ip in peers.items())
        old = {node: lab.node(node)["agent_pid"] for node in nodes}
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
            wait_until(lambda: rx_packets(p2["netns"]) >= flowing, CONVERGE_S, "the ping to flow")
            for pid in old.values():
                os.kill(pid, signal.SIGKILL)
            gaps: list[str] = []

            def restarted() -> bool:
                gaps.extend(node for node, ip in peers.items() if lab.route_to(node, ip) is None)
                now = {n["name"]: n for n in lab.status()["nodes"]}
                return all(now[n]["agent_pid"] not in (None, old[n]) and now[n]["ready"] for n in nodes)

            wait_until(restarted, RESTART_TIMEOUT_S, "the supervisor to restart both agents")
            assert ping.poll() is None, "both agents came back while the ping still ran"
            assert not gaps, f"a block route went missing on {gaps}"

            def reconciled() -> bool:
                """Each new agent has registered and then replaced its table: its first reconcile is done."""
                since = [lab.agent_log(n).rsplit(f"node {n} registered", 1) for n in nodes]
                return all(len(parts) == 2 and "table inet trl replaced" in parts[1] for parts in since)

            wait_until(reconciled, CONVERGE_S, "the restarted agents to reconcile")
            assert {node: lab.routes(node) for node in nodes} == before, "the kernel kept every route"
            out, err = ping.communicate(timeout=30)
        finally:
            ping.kill()
            ping.wait()
        assert f"{PING_COUNT} packets transmitted, {PING_COUNT} received, 0% packet loss" in out, out + err
        for node in nodes:
            log = lab.agent_log(node)
            assert log.count(f"agent for node {node} serving") == log.count(f"node {node} registered") == 2
            assert not REMOVED_ROUTES.findall(log) and "re-creating" not in log, log


def test_vxlan_cross_subnet_goes_direct_within_a_subnet_and_over_vxlan_across(tmp_path: Path) -> None:
    with built(tmp_path, "--nodes", "3", "--backend", "vxlan-cross-subnet", "--subnets", "2") as lab:
        status = lab.status()
        subnet = {n["name"]: n["subnet"] for n in status["nodes"]}
        assert len(status["subnets"]) == 2 and subnet["node-1"] == subnet["node-3"] != subnet["node-2"]
        lab.apply(pods_manifest({"p1": "node-1", "p2": "node-2", "p3": "node-3"}))
        ips = {n["name"]: n["underlay_ip"] for n in status["nodes"]}
        pods = {node: lab.pod(f"default/p{node[-1]}")["ip"] for node in ips}

        same = lab.route_to("node-1", pods["node-3"])
        assert same is not None and (same["gateway"], same["dev"]) == (ips["node-3"], "trl-eth0")
        for node, peer in (("node-1", "node-2"), ("node-2", "node-1"), ("node-2", "node-3")):
            across = lab.route_to(node, pods[peer])
            assert across is not None and across["dev"] == "trl.vxlan", (node, peer, across)
            assert across["gateway"] != ips[peer] and "onlink" in across["flags"]
        assert all_reachable(lab.probe("--port", "80"))
        assert lab.ask("default/p2", status["external"]["ip"]) == f"external {ips['node-2']}"


def test_host_gw_across_subnets_routes_within_a_subnet_only_and_says_why(tmp_path: Path) -> None:
    with built(tmp_path, "--nodes", "3", "--backend", "host-gw", "--subnets", "2") as lab:
        lab.apply(pods_manifest({"p1": "node-1", "p2": "node-2", "p3": "node-3"}))
        wait_until(
            lambda: "host-gw needs one L2 segment" in lab.agent_log("node-1"),
            CONVERGE_S,
            "node-1's agent to log why node-2 gets no route",
        )
        assert lab.route_to("node-1", lab.pod("default/p2")["ip"]) is None
        assert lab.route_to("node-1", lab.pod("default/p3")["ip"]) is not None
        matrix = lab.probe("--port", "80", "--protocol", "TCP")["matrix"]
        assert matrix["default/p1"] == {"default/p2": False, "default/p3": True}


def test_apply_names_the_node_that_did_not_program_a_new_pod(tmp_path: Path) -> None:
    """A stopped agent reports no newer revision: `apply` names its node, `--no-wait` does not wait."""
    with built(tmp_path, "--nodes", "2", "--backend", "host-gw") as lab:
        stuck = lab.node("node-2")["agent_pid"]
        os.kill(stuck, signal.SIGSTOP)
        try:
            path = tmp_path / "p1.yaml"
            path.write_text(pods_manifest({"p1": "node-1"}))
            code, stderr = lab.run("apply", "-f", str(path), check=False).split("\n", 1)
            assert code == "1" and "node-2 did not converge: its agent reports revision" in stderr
            path.write_text(pods_manifest({"p2": "node-1"}))
            assert "created" in lab.run("apply", "--no-wait", "-f", str(path))
        finally:
            os.kill(stuck, signal.SIGCONT)
