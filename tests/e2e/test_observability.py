"""The agents' metrics, probes and `trellis status` in a lab, through the real CLI (root).

One lab of two nodes on etcd: pods are added through the real CNI plugin, then each node's
agent is scraped from inside the node's namespace, as a Prometheus on the node (or the
kubelet's probes) would reach it on loopback. Its counters must agree with what the lab did,
its IPAM gauges with the datastore, and `trellis status` with both. Stopping the lab's etcd
then makes every agent unready, and starting it makes them ready again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.labs import LAB_ROOT, TRELLIS, Lab, built, pods_manifest
from tests.helpers import wait_until
from trellis.agent.config import DEFAULT_HTTP_ADDRESS

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds a lab of network namespaces"),
]

OUTAGE_S = 20.0
"""How long agents may take to notice etcd gone, or back (their syncer retries with a back-off)."""
GET = (
    "import sys, urllib.error, urllib.request\n"
    "try:\n"
    "    reply = urllib.request.urlopen(sys.argv[1], timeout=5)\n"
    "except urllib.error.HTTPError as err:\n"
    "    reply = err\n"
    "print(reply.status)\n"
    "print(reply.read().decode(), end='')\n"
)
"""Run in a node's namespace: prints the HTTP status of a GET, then the body."""
PLACEMENT = {"a1": "node-1", "a2": "node-1", "b1": "node-2"}


def get(lab: Lab, node: str, path: str) -> tuple[int, str]:
    """(HTTP status, body) of a GET of the node agent's `path`, from inside the node's namespace."""
    url = f"http://{DEFAULT_HTTP_ADDRESS}{path}"
    out = subprocess.run(
        ["ip", "netns", "exec", f"trl-{lab.name}-{node}", sys.executable, "-I", "-c", GET, url],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    status, _, body = out.partition("\n")
    return int(status), body


def scrape(lab: Lab, node: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, body = get(lab, node, "/metrics")
    assert status == 200, body
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def node_status(lab: Lab, node: str) -> dict[str, Any]:
    """`trellis status --output json` for the node's agent (by its state directory)."""
    state_dir = LAB_ROOT / lab.name / "nodes" / node
    proc = subprocess.run(
        [str(TRELLIS), "status", "--state-dir", str(state_dir), "--output", "json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    status: dict[str, Any] = json.loads(proc.stdout)
    return status


def all_ready(lab: Lab, expect: int) -> bool:
    return all(get(lab, node, "/readyz")[0] == expect for node in ("node-1", "node-2"))


def test_agents_report_what_they_served_and_readiness_follows_the_datastore(tmp_path: Path) -> None:
    with built(tmp_path, "--nodes", "2", "--datastore", "etcd") as lab:
        lab.apply(pods_manifest(PLACEMENT))
        for node in ("node-1", "node-2"):
            pods = sum(1 for where in PLACEMENT.values() if where == node)
            samples = scrape(lab, node)
            added = samples[("trellis_cni_requests_total", frozenset({("command", "ADD"), ("result", "ok")}))]
            assert added == pods, f"{node}: {added} ADDs counted, {pods} pods added"
            in_use = {
                dict(labels)["block"]: count
                for (name, labels), count in samples.items()
                if name == "trellis_ipam_block_addresses_in_use"
            }
            assert sum(in_use.values()) == pods + 1, f"{node}: {in_use} (pods and the VXLAN tunnel address)"
            assert samples[("trellis_datastore_in_sync", frozenset())] == 1
            assert get(lab, node, "/healthz") == (200, "ok\n")
            assert get(lab, node, "/readyz") == (200, "ok\n")

            status = node_status(lab, node)
            assert (status["node"], status["stale"], status["datastore"]) == (
                node,
                False,
                {"kind": "etcd", "in_sync": True},
            )
            assert status["endpoints"] == pods
            assert {b["cidr"]: b["used"] for b in status["blocks"]} == in_use

        lab.run("datastore stop")
        wait_until(lambda: all_ready(lab, 503), OUTAGE_S, "every agent to be unready without etcd")
        _, reason = get(lab, "node-1", "/readyz")
        assert reason.startswith("datastore not in sync: etcd "), reason
        assert scrape(lab, "node-1")[("trellis_datastore_in_sync", frozenset())] == 0
        assert get(lab, "node-1", "/healthz")[0] == 200, "an outage is no reason to restart the agent"

        lab.run("datastore start")
        wait_until(lambda: all_ready(lab, 200), OUTAGE_S, "every agent to be ready with etcd back")
