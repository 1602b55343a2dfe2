"""An etcd outage, and a node lease lost, in a running cluster, through the `trellis lab` CLI (root).

One lab of three nodes on etcd, a pod on each and a NetworkPolicy that denies one pair. First
`trellis lab datastore stop` kills etcd (SIGKILL by its PID; the supervisor keeps it down) for
longer than the node lease's TTL (10 s). Meanwhile a ping crosses nodes without pause, and
rounds of probes check that every pair that could connect still does and the denied pair is
still denied; a CNI ADD answers 11 naming etcd; no agent dies, and no node's routes or nftables
table change. Then `datastore start` brings etcd back on its data: a new pod is attached and
programmed by every agent, reaches all it may, and the datastore holds what it held (same node
registrations, same blocks, same allocations) plus the new pod. The ping lost nothing.

Then an agent frozen (SIGSTOP) past its lease's TTL: etcd deletes its node, the others drop
its routes; thawed, the agent finds its lease gone, registers again, and every pair connects
as before.

bench/etcd_outage.py runs the same story with a 60 s outage and reports the figures.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.labs import TRELLIS, Lab, built, rx_packets
from tests.helpers import stored_allocations, wait_until
from trellis.datastore import Datastore
from trellis.model.ipam import BLOCK_PREFIX
from trellis.model.node import NODE_PREFIX

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds a lab of network namespaces"),
]

OUTAGE_S = 15.0
"""Longer than the node lease's TTL (10 s), so that lease handling is part of the test."""
FLOWING_S = 10.0
CONVERGE_S = 10.0
LEASE_GONE_S = 30.0
"""The lease's TTL (10 s) after the last renewal, and etcd's own sweep, with room to spare."""
NODES = ("node-1", "node-2", "node-3")
PODS = {"default/a": "node-1", "default/b": "node-2", "default/c": "node-3"}
MANIFEST = Path(__file__).resolve().parents[1] / "fixtures" / "lab" / "outage.yaml"
"""Pods a, b, c (one per node) and a NetworkPolicy that lets only b into c (shared with the bench)."""
LATE_POD = """\
apiVersion: v1
kind: Pod
metadata: {name: d, namespace: default, labels: {app: d}}
spec: {nodeName: node-1}
"""
PING_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) received")


def expected(pods: list[str]) -> dict[str, dict[str, bool]]:
    """The reachability the policy allows: everything, but into c only from b."""
    return {
        src: {dst: dst != "default/c" or src == "default/b" for dst in pods if dst != src} for src in pods
    }


def tcp_matrix(lab: Lab) -> dict[str, dict[str, bool]]:
    matrix: dict[str, dict[str, bool]] = lab.probe("--port", "80", "--protocol", "TCP")["matrix"]
    return matrix


def kernel(lab: Lab, node: str) -> tuple[list[dict[str, Any]], str]:
    """The node's routes of protocol 222 and its `inet trl` table without counters."""
    table = subprocess.run(
        ["ip", "netns", "exec", f"trl-{lab.name}-{node}", "nft", "-s", "list", "table", "inet", "trl"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return lab.routes(node), table


def agents(lab: Lab) -> dict[str, tuple[int, int]]:
    """Each node's agent: (PID, restarts)."""
    return {n["name"]: (n["agent_pid"], n["agent_restarts"]) for n in lab.status()["nodes"]}


def held(store: Datastore) -> dict[str, Any]:
    """What must survive the outage: node registrations (key and revision: neither removed nor
    registered again), blocks and their owners, and every pod allocation."""
    return {
        "nodes": {kv.key: kv.mod_revision for kv in store.list(NODE_PREFIX)},
        "blocks": {kv.key: kv.value["node"] for kv in store.list(BLOCK_PREFIX)},
        "allocations": {
            (node, str(address), a.container_id) for node, address, a in stored_allocations(store)
        },
    }


@contextmanager
def pinging(lab: Lab, src: str, dst: str) -> Iterator[list[int]]:
    """Ping `dst` from `src` every 50 ms for the block; yields a list that then holds
    (transmitted, received). The ping is ended by its PID (SIGINT: it prints its summary)."""
    ping = subprocess.Popen(
        [TRELLIS, "lab", "exec", "--name", lab.name, src, "--", "ping", "-n", "-q", "-i", "0.05",
         lab.pod(dst)["ip"]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    counts: list[int] = []
    try:
        netns = lab.pod(dst)["netns"]
        flowing = rx_packets(netns) + 10
        wait_until(lambda: rx_packets(netns) >= flowing, FLOWING_S, f"the ping from {src} to {dst} to flow")
        yield counts
        ping.send_signal(signal.SIGINT)
        out, err = ping.communicate(timeout=30)
        summary = PING_SUMMARY.search(out)
        assert summary is not None, out + err
        counts += [int(summary[1]), int(summary[2])]
    finally:
        ping.kill()
        ping.wait()


def add_by_hand(lab: Lab, node: str, netns: str) -> tuple[int, dict[str, Any]]:
    """CNI ADD of pod default/late on `node`, exec'd there as a runtime does: (exit code, reply)."""
    exports = dict(line.removeprefix("export ").split("=", 1) for line in lab.run("env", node).splitlines())
    conflist = json.loads(Path(exports["CNI_CONF"]).read_text())
    conf = {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **conflist["plugins"][0]}
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "outage-late",
        "CNI_NETNS": f"/run/netns/{netns}",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=late",
        "CNI_PATH": exports["CNI_PATH"],
    }
    proc = subprocess.run(
        ["ip", "netns", "exec", exports["TRELLIS_NETNS"], "env", *(f"{k}={v}" for k, v in env.items()),
         exports["CNI_PATH"].split(":")[0] + "/trellis"],
        input=json.dumps(conf),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )  # fmt: skip
    return proc.returncode, json.loads(proc.stdout or "{}")


@contextmanager
def netns(name: str) -> Iterator[str]:
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Three nodes on etcd, pods a, b, c (one per node), c open to b only; removed afterwards."""
    with built(tmp_path_factory.mktemp("outage"), "--nodes", "3", "--datastore", "etcd") as made:
        made.apply(MANIFEST.read_text())
        yield made


def test_an_etcd_outage_keeps_traffic_and_policy_and_loses_nothing(lab: Lab) -> None:
    before_matrix = tcp_matrix(lab)
    assert before_matrix == expected(list(PODS)), "the policy denies a -> c, and only that"
    url = lab.status()["datastore_location"]
    etcd_pid = lab.status()["etcd_pid"]
    before = lab.datastore(held)
    before_kernel = {node: kernel(lab, node) for node in NODES}
    before_agents = agents(lab)
    programmed = min(lab.revisions().values())
    with pinging(lab, "default/a", "default/b") as ping:
        assert "etcd stopped" in lab.run("datastore stop")
        stopped = time.monotonic()
        assert lab.status()["etcd_pid"] is None and not Path(f"/proc/{etcd_pid}").exists()

        with netns(f"trl-{lab.name}-late") as late:
            code, reply = add_by_hand(lab, "node-1", late)
        assert (code, reply["code"]) == (1, 11), reply
        assert (
            reply["msg"]
            == f"pod default/late: datastore unavailable: etcd {url}: /kv/range: connection refused"
        )

        rounds = 0
        while time.monotonic() - stopped < OUTAGE_S or rounds < 2:
            assert tcp_matrix(lab) == before_matrix, f"round {rounds} of probes during the outage"
            assert {node: kernel(lab, node) for node in NODES} == before_kernel, "routes or table changed"
            assert agents(lab) == before_agents, "an agent died during the outage"
            rounds += 1

        assert "etcd started" in lab.run("datastore start")
        assert "pod/default/d created on node-1" in lab.apply(LATE_POD)  # every agent programmed it
    transmitted, received = ping
    assert received == transmitted, f"{transmitted - received} of {transmitted} pings lost"
    assert transmitted >= OUTAGE_S / 0.05 * 0.5, "the ping ran through the outage"

    revisions = lab.revisions()
    assert min(revisions.values()) > programmed, f"every agent follows etcd again: {revisions}"
    pods = [*PODS, "default/d"]
    assert tcp_matrix(lab) == expected(pods), "the new pod reaches all it may; the policy still holds"
    after = lab.datastore(held)
    d = lab.pod("default/d")
    assert after["nodes"] == before["nodes"], "every node kept its registration and lease"
    assert after["blocks"].items() >= before["blocks"].items(), "no block was released"
    assert after["allocations"] == before["allocations"] | {("node-1", d["ip"], d["container_id"])}
    assert agents(lab) == before_agents, "no agent restarted"
    for node in NODES:
        log = lab.agent_log(node)
        assert "lease expired" not in log and "released block" not in log, log[-3000:]
        assert log.count("datastore out of sync") == 1 and "datastore in sync" in log.split("out of sync")[1]
        routes, _ = kernel(lab, node)
        assert all(route in routes for route in before_kernel[node][0]), f"{node} lost a route"


def test_an_agent_that_lost_its_lease_registers_again(lab: Lab) -> None:
    """node-3's agent frozen (SIGSTOP) past its lease's TTL: etcd deletes its node and the other
    agents drop its routes. Thawed, it finds its lease gone, registers again (the same process),
    its routes come back everywhere, and every pair connects as the policy allows."""
    agent = lab.node("node-3")["agent_pid"]  # not while frozen: `status` asks every agent
    c = lab.pod("default/c")["ip"]
    key = NODE_PREFIX + "node-3"

    def registered() -> int | None:
        return lab.datastore(lambda store: None if (kv := store.get(key)) is None else kv.mod_revision)

    before = registered()
    assert before is not None and lab.route_to("node-1", c) is not None
    os.kill(agent, signal.SIGSTOP)
    try:
        wait_until(lambda: registered() is None, LEASE_GONE_S, "etcd to delete node-3 with its lease")
        wait_until(lambda: lab.route_to("node-1", c) is None, CONVERGE_S, "node-1 to drop node-3's routes")
    finally:
        os.kill(agent, signal.SIGCONT)
    wait_until(lambda: (registered() or 0) > before, CONVERGE_S, "node-3 to register again")
    wait_until(lambda: lab.route_to("node-1", c) is not None, CONVERGE_S, "node-1 to route to c again")
    assert lab.node("node-3")["agent_pid"] == agent
    assert "node lease expired: registering again" in lab.agent_log("node-3")
    assert tcp_matrix(lab) == expected([p["name"] for p in lab.status()["pods"]])
