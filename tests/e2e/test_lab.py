"""The lab end to end on one node, through the real `trellis lab` CLI (root).

Each test builds a lab of its own (`e2e-<random>`), applies pods that the real plugin attaches,
and checks what a user would: packets flow, `exec` and `env` work, a killed agent comes back.
The fixture always runs `trellis lab down`, then checks that no `trl-<lab>-...` namespace, no
process the lab recorded and no file of the lab is left, even when the test failed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.labs import LAB_ROOT, TRELLIS, Lab, built, netns_names
from tests.helpers import stored_allocations, wait_until
from trellis.datastore.sqlite import SqliteDatastore

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds a lab of network namespaces"),
]

RESTART_TIMEOUT_S = 20.0
STATUS_DEADLINE_S = 30.0
"""How long `lab status` may take with a frozen agent (its own wait for each agent is 2 s)."""

MANIFEST = """\
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {team: red}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: web}}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {app: web}}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: x, labels: {app: db}}
---
apiVersion: v1
kind: Pod
metadata: {name: custom, namespace: x}
spec:
  containers:
  - name: main
    ports:
    - {name: http, containerPort: 8080}
    - {name: dns, containerPort: 5353, protocol: UDP}
"""
DEFAULT_PODS = ["x/a", "x/b", "x/c"]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """A one-node lab, up and ready; removed afterwards whatever happened."""
    with built(tmp_path, "--nodes", "1") as made:
        yield made


@pytest.fixture
def pods(lab: Lab) -> Lab:
    """The lab with namespace x and pods a, b, c (default ports) and custom (8080/TCP, 5353/UDP)."""
    lab.apply(MANIFEST)
    return lab


def test_every_pod_reaches_every_other_on_80_and_81_tcp_and_udp(pods: Lab) -> None:
    matrices = pods.probe()
    assert [(m["port"], m["protocol"]) for m in matrices] == [
        (80, "TCP"),
        (81, "TCP"),
        (80, "UDP"),
        (81, "UDP"),
    ]
    for m in matrices:
        rows = m["matrix"]
        assert sorted(rows) == [*DEFAULT_PODS, "x/custom"]
        for src, row in rows.items():
            assert src not in row, "a pod does not probe itself"
            for dst in DEFAULT_PODS:
                if dst != src:
                    assert row[dst] is True, f"{m['protocol']} {m['port']}: {src} -> {dst} unreachable"
            if src != "x/custom":
                assert row["x/custom"] is False, "custom listens only on its declared ports"


def test_a_pod_listens_on_its_declared_ports(pods: Lab) -> None:
    for port, protocol in (("8080", "TCP"), ("5353", "UDP")):
        matrix = pods.probe("--port", port, "--protocol", protocol)
        assert (matrix["port"], matrix["protocol"]) == (int(port), protocol)
        assert all(matrix["matrix"][src]["x/custom"] for src in DEFAULT_PODS)


def test_exec_runs_inside_the_pod(pods: Lab) -> None:
    ip = pods.pod("x/a")["ip"]
    out = pods.run("exec", "x/a", "--", "ip", "-4", "addr")
    assert f"inet {ip}/32" in out
    assert pods.run("exec", "x/b", "--", "ip", "route").startswith("default via 169.254.1.1 dev eth0")
    assert pods.run("exec", "x/nope", "--", "true", check=False).startswith("1\n")


def test_env_lets_a_person_call_the_plugin_by_hand(lab: Lab) -> None:
    exports = dict(
        line.removeprefix("export ").split("=", 1) for line in lab.run("env", "node-1").splitlines()
    )
    assert set(exports) == {"CNI_PATH", "NETCONFPATH", "CNI_CONF", "TRELLIS_NETNS"}
    conflist = json.loads(Path(exports["CNI_CONF"]).read_text())
    assert Path(exports["CNI_CONF"]).parent == Path(exports["NETCONFPATH"])
    conf = json.dumps(
        {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **conflist["plugins"][0]}
    )
    plugin = exports["CNI_PATH"].split(":")[0] + "/trellis"

    def by_hand(command: str) -> str:
        proc = subprocess.run(
            [
                *("ip", "netns", "exec", exports["TRELLIS_NETNS"]),
                *("env", f"CNI_COMMAND={command}", f"CNI_PATH={exports['CNI_PATH']}", plugin),
            ],
            input=conf,
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, f"{command}: {proc.stdout} {proc.stderr}"
        return proc.stdout

    assert "1.1.0" in json.loads(by_hand("VERSION"))["supportedVersions"]
    assert by_hand("STATUS") == ""


def test_status_json_has_the_documented_shape(pods: Lab) -> None:
    status = pods.status()
    assert {"name", "backend", "datastore", "nodes", "pods"} <= set(status)
    assert (status["name"], status["backend"], status["datastore"]) == (pods.name, "vxlan", "sqlite")
    (node,) = status["nodes"]
    assert {"name", "netns", "underlay_ip", "agent_pid", "ready"} <= set(node)
    assert (node["name"], node["netns"], node["ready"]) == ("node-1", f"trl-{pods.name}-node-1", True)
    assert isinstance(node["agent_pid"], int)
    assert sorted(p["name"] for p in status["pods"]) == [*DEFAULT_PODS, "x/custom"]
    for pod in status["pods"]:
        assert {"name", "node", "netns", "ip"} <= set(pod)
        assert pod["node"] == "node-1" and pod["netns"] in pods.namespaces() and pod["ip"]
    assert len({p["ip"] for p in status["pods"]}) == 4


def test_a_killed_agent_is_restarted_and_pods_keep_working(pods: Lab) -> None:
    old = pods.status()["nodes"][0]["agent_pid"]
    os.kill(old, signal.SIGKILL)

    def restarted() -> bool:
        node = pods.status()["nodes"][0]
        return node["agent_pid"] not in (None, old) and node["ready"] is True

    wait_until(restarted, RESTART_TIMEOUT_S, "the supervisor to restart the killed agent")
    assert pods.status()["nodes"][0]["agent_restarts"] >= 1
    matrix = pods.probe("--port", "80", "--protocol", "TCP")["matrix"]
    assert all(matrix[src][dst] for src in DEFAULT_PODS for dst in DEFAULT_PODS if src != dst)
    assert "created" in pods.apply(MANIFEST.replace("name: c,", "name: d,"))  # the new agent attaches


def test_status_reports_a_frozen_agent_as_not_answering(lab: Lab) -> None:
    """A frozen agent's socket still takes connections and never answers: status must not wait
    the plugin's 120 s for it (STATUS_DEADLINE_S is far below that)."""
    pid = lab.node("node-1")["agent_pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        status = subprocess.run(
            [str(TRELLIS), "lab", "status", "--name", lab.name, "--output", "json"],
            capture_output=True,
            text=True,
            check=True,
            timeout=STATUS_DEADLINE_S,
        )
        table = lab.run("status")
    finally:
        os.kill(pid, signal.SIGCONT)
    (node,) = json.loads(status.stdout)["nodes"]
    assert (node["agent_pid"], node["ready"], node["answering"]) == (pid, False, False), node
    assert "answering" in table, table  # "not answering", wrapped at 80 columns
    wait_until(lambda: lab.node("node-1")["ready"], RESTART_TIMEOUT_S, "the thawed agent to answer again")


def test_deleting_a_pod_releases_it(pods: Lab) -> None:
    gone = pods.pod("x/b")
    out = pods.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: x}\n", command="delete")
    assert out.strip() == "pod/x/b deleted"
    assert gone["netns"] not in netns_names()
    assert "x/b" not in [p["name"] for p in pods.status()["pods"]]
    store = SqliteDatastore(LAB_ROOT / pods.name / "datastore.db")
    try:
        held = {attachment.container_id for _, _, attachment in stored_allocations(store)}
    finally:
        store.close()
    assert gone["container_id"] not in held and pods.pod("x/a")["container_id"] in held
    routes = subprocess.run(
        ["ip", "-n", f"trl-{pods.name}-node-1", "route", "show", "proto", "222"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert gone["ip"] not in routes.split()
    matrix = pods.probe("--port", "80", "--protocol", "TCP")["matrix"]
    assert sorted(matrix) == ["x/a", "x/c", "x/custom"]


def test_reapplying_with_new_labels_updates_them_in_place(pods: Lab) -> None:
    before = pods.pod("x/a")
    out = pods.apply(
        MANIFEST.replace(
            "{name: a, namespace: x, labels: {app: web}}", "{name: a, namespace: x, labels: {app: api}}"
        )
    )
    assert "pod/x/a configured" in out and "pod/x/b unchanged" in out
    after = pods.pod("x/a")
    assert after["labels"] == {"app": "api"}
    assert (after["ip"], after["container_id"]) == (before["ip"], before["container_id"])
    namespaces = {n["name"]: n["labels"] for n in pods.status()["namespaces"]}
    assert namespaces["x"] == {"team": "red", "kubernetes.io/metadata.name": "x"}
    assert namespaces["default"] == {"kubernetes.io/metadata.name": "default"}


def test_a_bad_manifest_applies_nothing(lab: Lab) -> None:
    bad = MANIFEST + "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: i}\n"
    path = lab.tmp_path / "bad.yaml"
    path.write_text(bad)
    result = lab.run("apply", "-f", str(path), check=False)
    code, stderr = result.split("\n", 1)
    assert code == "1"
    assert stderr.strip() == (
        f"trellis lab apply: {path}: document 6: kind 'Ingress' is not supported by the lab "
        "(supported: Namespace, Pod, NetworkPolicy, ClusterNetworkPolicy, BGPConfiguration, BGPPeer)"
    )
    status = lab.status()
    assert status["pods"] == [] and [n["name"] for n in status["namespaces"]] == ["default"]
    assert lab.namespaces() == {f"trl-{lab.name}-{ns}" for ns in ("fabric", "ext", "node-1")}


def test_expected_failures_are_one_line_without_traceback(lab: Lab) -> None:
    for args in (
        ("up", "--nodes", "1"),
        ("apply", "-f", "/nonexistent.yaml"),
        ("env", "node-7"),
        ("exec", "default/nope", "--", "true"),
    ):
        code, stderr = lab.run(*args, check=False).split("\n", 1)
        assert code == "1" and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, args
    orphan = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: nowhere}\n"
    assert "namespace 'nowhere' does not exist" in lab.run("apply", "-f", "-", check=False, stdin=orphan)


def test_down_removes_a_half_built_lab(tmp_path: Path) -> None:
    """`up` killed part-way leaves a lab that `down` still removes completely."""
    lab = Lab(tmp_path)
    up = subprocess.Popen([str(TRELLIS), "lab", "up", "--name", lab.name, "--nodes", "1"])
    try:
        wait_until(lambda: f"trl-{lab.name}-fabric" in netns_names(), 30, "up to create the fabric")
        up.kill()
        up.wait()
    finally:
        up.kill()
        up.wait()
        assert lab.run("down").strip() == f"lab {lab.name} removed"
        lab.check_gone()
    assert "does not exist" in lab.run("down")


def test_up_leaves_namespaces_it_did_not_make(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    foreign = f"trl-{lab.name}-node-1"
    subprocess.run(["ip", "netns", "add", foreign], check=True)
    try:
        result = lab.run("up", "--nodes", "1", check=False)
        assert result.startswith("1\n") and f"network namespace {foreign} already exists" in result
        assert foreign in netns_names()
        assert not (LAB_ROOT / lab.name).exists()
    finally:
        subprocess.run(["ip", "netns", "del", foreign], check=True)
    lab.check_gone()
