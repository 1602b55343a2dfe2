"""The agent's metrics and HTTP endpoint without root: a real CNI service over SQLite (fake pod
plumbing, as in test_cni_service), a real network controller that is never started (nothing
touches the kernel), and scrapes parsed by prometheus_client's own parser."""

from __future__ import annotations

import ipaddress
import json
import math
import sqlite3
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import cni_env, net_conf, wait_until
from tests.unit.agent_controller import Clock, publish, unstarted_controller
from tests.unit.test_cni_service import Agent
from trellis.agent.config import AgentConfig
from trellis.agent.http import NOT_FOLLOWING, AgentHttpServer, Health, serving
from trellis.agent.metrics import AgentMetrics
from trellis.agent.network import READY_LAG_S, ClusterView, NetworkController
from trellis.datastore.base import KV, Event, EventKind
from trellis.ipam.allocator import Ipam
from trellis.model.ipam import Allocation, Attachment, Block
from trellis.model.node import STATUS_FILE, Node

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics: AgentMetrics) -> Samples:
    """Every sample of a scrape in the Prometheus text format, parsed: (name, labels) -> value."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


# -- CNI requests ------------------------------------------------------------------------------


def test_cni_requests_are_counted_by_command_and_result(tmp_path: Path) -> None:
    """Results are `ok` or the CNI error code of the reply; an unknown command is `other`."""
    agent = Agent(tmp_path)
    metrics = AgentMetrics()
    handle = metrics.instrument_cni(agent.service.handle)
    try:
        for container in ("c1", "c2"):
            assert handle(*_request("ADD", container))[0] == 0
        assert handle(*_request("DEL", "c1"))[0] == 0
        agent.store.down = True
        assert handle(*_request("ADD", "c3"))[0] == 1
        agent.store.down = False
        assert handle(*_request("HELLO", "c4"))[0] == 1
    finally:
        agent.store.close()
    samples = scrape(metrics)
    assert value(samples, "trellis_cni_requests_total", command="ADD", result="ok") == 2
    assert value(samples, "trellis_cni_requests_total", command="DEL", result="ok") == 1
    assert value(samples, "trellis_cni_requests_total", command="ADD", result="11") == 1
    assert value(samples, "trellis_cni_requests_total", command="other", result="4") == 1
    assert value(samples, "trellis_cni_request_duration_seconds_count", command="ADD") == 3
    assert value(samples, "trellis_cni_request_duration_seconds_bucket", command="DEL", le="+Inf") == 1


def _request(command: str, container: str) -> tuple[dict[str, str], bytes]:
    return cni_env(command, CNI_CONTAINERID=container), net_conf()


def test_every_agent_counts_in_a_registry_of_its_own() -> None:
    first, second = AgentMetrics(), AgentMetrics()
    first.reconcile_failed("datastore")
    assert value(scrape(first), "trellis_reconcile_errors_total", cause="datastore") == 1
    assert ("trellis_reconcile_errors_total", frozenset({("cause", "datastore")})) not in scrape(second)
    assert not [name for name in REGISTRY._names_to_collectors if name.startswith("trellis")]


def test_agent_info_names_node_backend_and_datastore() -> None:
    metrics = AgentMetrics({"node": "node-1", "backend": "vxlan", "datastore": "etcd"})
    assert value(scrape(metrics), "trellis_agent_info", node="node-1", backend="vxlan", datastore="etcd") == 1


# -- reconcile steps ---------------------------------------------------------------------------


def test_a_step_is_timed_even_when_it_fails() -> None:
    metrics = AgentMetrics()
    with metrics.timing("nftables"):
        pass
    with pytest.raises(OSError), metrics.timing("nftables"):
        raise OSError("refused")
    samples = scrape(metrics)
    assert value(samples, "trellis_reconcile_duration_seconds_count", kind="nftables") == 2
    assert ("trellis_reconcile_duration_seconds_count", frozenset({("kind", "routes")})) not in samples


# -- datastore sync ----------------------------------------------------------------------------


def test_sync_state_follows_what_the_view_receives() -> None:
    clock = Clock()
    metrics = AgentMetrics(clock=clock)
    view = ClusterView(metrics)
    before = scrape(metrics)
    assert value(before, "trellis_datastore_in_sync") == 0
    assert math.isnan(value(before, "trellis_datastore_seconds_since_event"))

    view.on_snapshot([], 5)
    clock.now += 2.5
    samples = scrape(metrics)
    assert value(samples, "trellis_datastore_in_sync") == 1
    assert value(samples, "trellis_datastore_revision") == 5
    assert value(samples, "trellis_datastore_snapshots_total") == 1
    assert value(samples, "trellis_datastore_seconds_since_event") == 2.5

    view.on_update([Event(EventKind.DELETE, "/trellis/x", None, 7)])
    assert value(scrape(metrics), "trellis_datastore_revision") == 7
    assert value(scrape(metrics), "trellis_datastore_seconds_since_event") == 0

    view.on_out_of_sync("etcd: connection refused")
    assert value(scrape(metrics), "trellis_datastore_in_sync") == 0
    view.on_snapshot([], 9)
    samples = scrape(metrics)
    assert value(samples, "trellis_datastore_in_sync") == 1
    assert value(samples, "trellis_datastore_snapshots_total") == 2


# -- node state, from the last status ----------------------------------------------------------

STATUS: dict[str, Any] = {
    "node": "node-1",
    "revision": 42,
    "endpoints_with_policy": 2,
    "blocks": [
        {"cidr": "10.244.0.0/26", "used": 64, "size": 64},
        {"cidr": "10.244.0.64/26", "used": 3, "size": 64},
    ],
    "endpoints": 66,
    "policies": {"networkpolicies": 4, "clusternetworkpolicies": 1},
    "nftables": {"chains": 9, "rules": 31},
    "bgp": [
        {"name": "node_2", "state": "up", "info": "Established", "established": True},
        {"name": "node_3", "state": "start", "info": "Active", "established": False},
    ],
}


def test_node_gauges_report_the_last_status_and_forget_what_it_no_longer_holds() -> None:
    metrics = AgentMetrics()
    assert ("trellis_programmed_revision", frozenset()) not in scrape(metrics)
    metrics.programmed(STATUS)
    samples = scrape(metrics)
    assert value(samples, "trellis_programmed_revision") == 42
    assert value(samples, "trellis_ipam_block_addresses_in_use", block="10.244.0.0/26") == 64
    assert value(samples, "trellis_ipam_block_addresses_in_use", block="10.244.0.64/26") == 3
    assert value(samples, "trellis_ipam_block_addresses", block="10.244.0.64/26") == 64
    assert value(samples, "trellis_endpoints") == 66
    assert value(samples, "trellis_policy_endpoints") == 2
    assert value(samples, "trellis_policies", kind="networkpolicies") == 4
    assert value(samples, "trellis_nftables_rules") == 31
    assert value(samples, "trellis_nftables_chains") == 9
    assert value(samples, "trellis_bgp_sessions") == 2
    assert value(samples, "trellis_bgp_sessions_established") == 1

    metrics.programmed({**STATUS, "blocks": STATUS["blocks"][1:], "bgp": []})
    samples = scrape(metrics)
    assert ("trellis_ipam_block_addresses_in_use", frozenset({("block", "10.244.0.0/26")})) not in samples
    assert value(samples, "trellis_bgp_sessions") == 0
    without_bgp = {key: item for key, item in STATUS.items() if key != "bgp"}
    metrics.programmed(without_bgp)
    assert ("trellis_bgp_sessions", frozenset()) not in scrape(metrics)


def test_openmetrics_when_the_scraper_asks_for_it() -> None:
    body, content_type = AgentMetrics().render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


# -- the HTTP endpoint and readiness -----------------------------------------------------------

BLOCK = Block(ipaddress.IPv4Network("10.244.0.0/26"), "node-1").with_allocation(
    ipaddress.IPv4Address("10.244.0.1"), Allocation(Attachment("c1", "eth0"), "default/a")
)


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[tuple[NetworkController, Clock]]:
    clock = Clock()
    with unstarted_controller(AgentConfig(node="node-1", state_dir=tmp_path), clock) as network:
        yield network, clock


def get(url: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def base_url(server: AgentHttpServer | None) -> str:
    assert server is not None
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def endpoint(controller: tuple[NetworkController, Clock]) -> Iterator[str]:
    """The controller's metrics and probes on a free loopback port: its base URL."""
    network, _ = controller
    with serving(("127.0.0.1", 0), network.metrics, network) as server:
        yield base_url(server)


def test_ready_only_in_sync_and_programmed(
    controller: tuple[NetworkController, Clock], endpoint: str, tmp_path: Path
) -> None:
    """Readiness follows the sync state and the revision the kernel reflects (status.json's)."""
    network, clock = controller
    assert get(f"{endpoint}/healthz")[0] == 200
    assert get(f"{endpoint}/readyz")[::2] == (503, "datastore not in sync: no snapshot yet\n")

    network.view.on_snapshot([], 2)
    assert get(f"{endpoint}/readyz")[::2] == (503, "kernel not programmed yet\n")

    publish(network, 3, {BLOCK.key: BLOCK.to_json()})
    assert get(f"{endpoint}/readyz")[::2] == (200, "ok\n")
    written = json.loads((tmp_path / STATUS_FILE).read_text())
    assert written["revision"] == 3 and written["endpoints"] == 1
    assert written["blocks"] == [{"cidr": "10.244.0.0/26", "used": 1, "size": 64}]
    assert written["datastore"] == {"kind": "sqlite", "in_sync": True}

    network.view.on_update([Event(EventKind.DELETE, "/trellis/x", None, 4)])
    assert get(f"{endpoint}/readyz")[0] == 200, "a pass in flight keeps the node ready"
    clock.now += READY_LAG_S + 1
    assert get(f"{endpoint}/readyz")[::2] == (503, "kernel programmed to revision 3, datastore at 4\n")

    network.view.on_out_of_sync("etcd: connection refused")
    assert get(f"{endpoint}/readyz")[::2] == (503, "datastore not in sync: etcd: connection refused\n")


def test_metrics_are_served_with_the_status_the_agent_wrote(
    controller: tuple[NetworkController, Clock], endpoint: str
) -> None:
    network, _ = controller
    publish(network, 3, {BLOCK.key: BLOCK.to_json()})
    status, content_type, body = get(f"{endpoint}/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    assert value(samples, "trellis_ipam_block_addresses_in_use", block="10.244.0.0/26") == 1
    assert value(samples, "trellis_datastore_in_sync") == 1
    assert get(f"{endpoint}/nothing")[0] == 404


def test_without_a_network_controller_the_agent_is_live_but_never_ready() -> None:
    with serving(("127.0.0.1", 0), AgentMetrics(), None) as server:
        base = base_url(server)
        assert get(f"{base}/healthz")[0] == 200
        assert get(f"{base}/readyz")[::2] == (503, NOT_FOLLOWING + "\n")


def test_a_taken_address_fails_naming_it() -> None:
    health: Health | None = None
    with serving(("127.0.0.1", 0), AgentMetrics(), health) as server:
        assert server is not None
        port = server.server_address[1]
        with (
            pytest.raises(RuntimeError, match=rf"HTTP endpoint 127\.0\.0\.1:{port}: Address already in use"),
            serving(("127.0.0.1", port), AgentMetrics(), health),
        ):
            pass


@pytest.mark.parametrize(
    ("text", "endpoint"),
    [
        ("127.0.0.1:9617", ("127.0.0.1", 9617)),
        ("[::1]:80", ("::1", 80)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("", None),
    ],
)
def test_http_address_is_host_and_port(text: str, endpoint: tuple[str, int] | None) -> None:
    assert AgentConfig(node="n", http_address=text).http_endpoint == endpoint


@pytest.mark.parametrize("text", ["9617", ":9617", "localhost:http", "127.0.0.1:70000"])
def test_a_malformed_http_address_is_refused_at_configuration(text: str) -> None:
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        AgentConfig(node="n", http_address=text)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_value_written_past_the_api_makes_the_agent_not_ready_naming_its_key(
    controller: tuple[NetworkController, Clock], tmp_path: Path
) -> None:
    """A value the store cannot decode (written by hand, as `etcdctl put` can) is a datastore
    error the syncer retries on: the agent stays live, and is not ready, saying which key."""
    network, _ = controller
    publish(network, 3, {BLOCK.key: BLOCK.to_json()})
    assert network.liveness() is None and network.readiness() is None
    with sqlite3.connect(tmp_path / "trellis.db") as db:
        db.execute("INSERT INTO kv VALUES ('/trellis/x', 'not JSON', 9, 0)")
    network.syncer.start()
    try:
        wait_until(lambda: network.readiness() is not None, 30, "the agent to be not ready")
        assert network.liveness() is None
        assert (network.readiness() or "").startswith(
            "datastore not in sync: key /trellis/x: value is not JSON"
        )
    finally:
        network.syncer.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the bug, on purpose
def test_a_syncer_that_died_makes_the_agent_neither_live_nor_ready(
    controller: tuple[NetworkController, Clock], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug that ends the syncer's thread leaves the agent following nothing: its probes must
    say so, so that the kubelet restarts it."""
    network, _ = controller
    publish(network, 3, {BLOCK.key: BLOCK.to_json()})

    def broken(items: list[KV], revision: int) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(network.view, "on_snapshot", broken)
    network.syncer.start()
    try:
        wait_until(lambda: network.liveness() is not None, 30, "the syncer's end to show")
        assert network.liveness() == "thread syncer /trellis/ ended"
        assert network.readiness() == "thread syncer /trellis/ ended"
    finally:
        network.syncer.stop()


def test_a_node_without_an_address_for_its_tunnel_retries_and_is_not_ready(tmp_path: Path) -> None:
    """With every address of the pool taken, the VTEP gets none: the reconciler must keep
    trying (addresses come back as pods go) and say why the node is not ready, not end."""
    pool = ipaddress.IPv4Network("10.244.0.0/30")
    config = AgentConfig(node="node-1", state_dir=tmp_path, pools=(pool,), block_prefixlen=30)
    with unstarted_controller(config, Clock()) as network:
        other = Ipam(network.store, "node-2", (pool,), 30)
        for i in range(pool.num_addresses):
            other.assign(Attachment(f"c{i}", "eth0"), f"default/p{i}")
        network.start()
        try:
            errors = ("trellis_reconcile_errors_total", frozenset({("cause", "addresses")}))
            wait_until(
                lambda: errors in scrape(network.metrics) or bool(network.liveness()), 30, "a failed pass"
            )
            assert network.liveness() is None
            assert (network.readiness() or "").startswith(
                "no address for this node: pod node node-1 tunnel: "
            )
        finally:
            network.stop()


def test_an_unexpected_error_in_a_pass_is_retried_and_makes_the_node_not_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A malformed object or a bug in one pass must not end the reconciler: the node keeps its
    kernel state, says why it is not ready, and the next pass tries again."""
    config = AgentConfig(node="node-1", state_dir=tmp_path, backend="host-gw")
    with unstarted_controller(config, Clock()) as network:
        passes: list[int] = []

        def register() -> None:  # the real one touches this namespace's kernel
            network._node = Node("node-1", ipaddress.IPv4Interface("172.31.0.11/24"), "", None)

        def reconcile() -> None:
            passes.append(1)
            raise ValueError("block /trellis/ipam/blocks/x: 'cidr' missing")

        monkeypatch.setattr(network, "_register", register)
        monkeypatch.setattr(network, "_keepalive", lambda: None)
        monkeypatch.setattr(network, "reconcile", reconcile)
        network.view.on_snapshot([], 1)
        network.start()
        try:
            errors = ("trellis_reconcile_errors_total", frozenset({("cause", "internal")}))
            wait_until(lambda: errors in scrape(network.metrics), 30, "a failed pass")
            network.view.changed.set()
            wait_until(lambda: len(passes) >= 2, 30, "a second pass")
            assert network.liveness() is None
            assert (
                network.readiness()
                == "internal error: ValueError: block /trellis/ipam/blocks/x: 'cidr' missing"
            )
        finally:
            network.stop()
