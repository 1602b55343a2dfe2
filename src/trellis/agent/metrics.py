"""The agent's Prometheus metrics: one registry per agent, filled from a few one-line call sites.

Why a registry of our own and not prometheus_client's global one: tests run several agents'
worth of metrics in one process, and each must count only its own. Why two kinds of metric:
what happens (CNI requests, reconcile passes, datastore events) is counted as it happens;
what the node holds (blocks and their usage, endpoints, policies, nftables rules, BGP
sessions) is read at scrape time from the last status the agent wrote (`status.json`, see
`trellis.agent.network`), so a metric can never disagree with `trellis status`, and a block
given back to the pool disappears from the scrape instead of lingering at its last value.

Labels are bounded: commands are the six of CNI (anything else is `other`), results are `ok`
or a CNI error code, kinds and causes are fixed words, blocks are this node's few CIDRs. No
label carries a pod, a container or a policy name.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from trellis.agent.server import Handler
from trellis.cni.spec import COMMANDS

PREFIX = "trellis"
CNI_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""CNI request latency buckets (seconds): an ADD takes milliseconds, a datastore outage seconds."""
RECONCILE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Reconcile step buckets (seconds): an unchanged diff is sub-millisecond, a large table hundreds."""


class AgentMetrics:
    """Every metric of one agent, in a registry of its own (`render` is what /metrics serves)."""

    def __init__(
        self, agent: Mapping[str, str] | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """`agent`: labels of `trellis_agent_info` (node, backend, datastore); `clock` (seconds,
        monotonic) times the age of the last datastore event."""
        self.registry = registry = CollectorRegistry()
        self.clock = clock
        self._lock = threading.Lock()
        self._status: Mapping[str, Any] = {}
        self._last_event: float | None = None
        Info(f"{PREFIX}_agent", "The agent's node, backend and datastore kind.", registry=registry).info(
            dict(agent or {})
        )
        self.cni_requests = Counter(
            f"{PREFIX}_cni_requests",
            "CNI requests served, by command and result (ok, or the CNI error code).",
            ["command", "result"],
            registry=registry,
        )
        self.cni_duration = Histogram(
            f"{PREFIX}_cni_request_duration_seconds",
            "Time to serve a CNI request, by command (seconds).",
            ["command"],
            registry=registry,
            buckets=CNI_BUCKETS_S,
        )
        self.reconcile_duration = Histogram(
            f"{PREFIX}_reconcile_duration_seconds",
            "Time of one reconcile step, by kind: routes (programming them), bgp (configuring "
            "BIRD), policy (computing it), nftables (updating the inet trl table) (seconds).",
            ["kind"],
            registry=registry,
            buckets=RECONCILE_BUCKETS_S,
        )
        self.reconcile_errors = Counter(
            f"{PREFIX}_reconcile_errors",
            "Reconcile passes that failed, by cause: datastore, dataplane, addresses (none "
            "left for the node's tunnel) or internal (a bug) (retried on the next change or resync).",
            ["cause"],
            registry=registry,
        )
        self.in_sync = Gauge(
            f"{PREFIX}_datastore_in_sync",
            "1 while the agent follows the datastore; 0 before the first snapshot and during outages.",
            registry=registry,
        )
        self.revision = Gauge(
            f"{PREFIX}_datastore_revision",
            "Datastore revision of the last snapshot or change the agent received.",
            registry=registry,
        )
        self.snapshots = Counter(
            f"{PREFIX}_datastore_snapshots",
            "Full listings of the datastore: the first sync, then one per resync (outage, compaction).",
            registry=registry,
        )
        Gauge(
            f"{PREFIX}_datastore_seconds_since_event",
            "Seconds since the agent last received a snapshot or a change (NaN before the first).",
            registry=registry,
        ).set_function(self._seconds_since_event)
        registry.register(_StatusCollector(self))

    def instrument_cni(self, handler: Handler) -> Handler:
        """`handler` (the CNI service), counted and timed per request."""

        def counted(env: dict[str, str], stdin: bytes) -> tuple[int, bytes]:
            command = env.get("CNI_COMMAND", "")
            command = command if command in COMMANDS else "other"
            started = time.perf_counter()
            code, out = handler(env, stdin)
            self.cni_duration.labels(command).observe(time.perf_counter() - started)
            self.cni_requests.labels(command, cni_result(code, out)).inc()
            return code, out

        return counted

    def timing(self, kind: str) -> AbstractContextManager[Any]:
        """`with metrics.timing("routes"):` observes the block's duration, even when it raises."""
        timer: AbstractContextManager[Any] = self.reconcile_duration.labels(kind).time()
        return timer

    def reconcile_failed(self, cause: str) -> None:
        self.reconcile_errors.labels(cause).inc()

    def datastore_synced(self, revision: int) -> None:
        """A full snapshot at `revision` arrived: in sync from here on."""
        self.snapshots.inc()
        self.in_sync.set(1)
        self._event(revision)

    def datastore_updated(self, revision: int) -> None:
        self._event(revision)

    def datastore_lost(self) -> None:
        self.in_sync.set(0)

    def _event(self, revision: int) -> None:
        self.revision.set(revision)
        with self._lock:
            self._last_event = self.clock()

    def _seconds_since_event(self) -> float:
        with self._lock:
            return math.nan if self._last_event is None else self.clock() - self._last_event

    def programmed(self, status: Mapping[str, Any]) -> None:
        """The status the agent just wrote (`status.json`): what the node-state gauges report."""
        with self._lock:
            self._status = status

    def status(self) -> Mapping[str, Any]:
        with self._lock:
            return self._status

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """(body, content type) of a scrape, in the format the `Accept` header asks for."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


def cni_result(code: int, out: bytes) -> str:
    """`ok`, or the CNI error code the reply carries (`error` when it carries none)."""
    if code == 0:
        return "ok"
    try:
        return str(int(json.loads(out)["code"]))
    except (ValueError, KeyError, TypeError):
        return "error"


class _StatusCollector(Collector):
    """The node-state gauges, read at scrape time from the last status the agent wrote."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        status = self.metrics.status()
        if not status:
            return
        yield _gauge(
            "programmed_revision", "Datastore revision the node's kernel reflects.", status["revision"]
        )
        in_use = GaugeMetricFamily(
            f"{PREFIX}_ipam_block_addresses_in_use",
            "Addresses allocated in each of this node's blocks (pods and the node's tunnel address).",
            labels=["block"],
        )
        size = GaugeMetricFamily(
            f"{PREFIX}_ipam_block_addresses", "Addresses in each of this node's blocks.", labels=["block"]
        )
        for block in status["blocks"]:
            in_use.add_metric([block["cidr"]], block["used"])
            size.add_metric([block["cidr"]], block["size"])
        yield in_use
        yield size
        yield _gauge("endpoints", "Pods attached on this node.", status["endpoints"])
        yield _gauge(
            "policy_endpoints", "Pods on this node with a computed policy.", status["endpoints_with_policy"]
        )
        policies = GaugeMetricFamily(
            f"{PREFIX}_policies", "Policy objects in the cluster, by kind.", labels=["kind"]
        )
        for kind, count in status["policies"].items():
            policies.add_metric([kind], count)
        yield policies
        yield _gauge("nftables_chains", "Chains in the node's inet trl table.", status["nftables"]["chains"])
        yield _gauge("nftables_rules", "Rules in the node's inet trl table.", status["nftables"]["rules"])
        if "bgp" in status:
            sessions = status["bgp"]
            yield _gauge("bgp_sessions", "BGP sessions BIRD has configured.", len(sessions))
            yield _gauge(
                "bgp_sessions_established",
                "BGP sessions in state Established.",
                sum(1 for session in sessions if session["established"]),
            )


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", text, value=value)
