"""The node's place in the cluster: registration, and routes to every other node's blocks.

Data flows one way (DESIGN.md §2): the syncer feeds `ClusterView` every object under
`/trellis/`; an update only stores it and wakes the reconciler. The reconciler, one thread,
computes the desired state with pure code (`calc`: routes, and the policy of every local
pod) and hands it to the drivers, which diff against the kernel and change only what
differs. Nothing is written to the kernel before the first snapshot has arrived, so a
restarted agent adopts live state instead of flushing it. After each pass the agent writes
`status.json` with the datastore revision the kernel now reflects: that is how a caller
(the lab's `apply`) knows a change is programmed on this node.

Liveness: the node's object is held under a datastore lease renewed every third of its TTL.
An agent that stops or dies leaves it to expire, so a restart (upgrade, crash) within the TTL
disturbs nothing; removing a node is deleting its object, and its routes vanish everywhere at
once. Blocks of a node absent longer than the grace period are given back to the pool by
whichever agent notices first (compare-and-swap makes that safe when several do), unless the
cluster still lists the node (its Kubernetes Node object exists) and the block still holds pod
addresses: an agent that crash-loops for minutes must not see its running pods' addresses
handed to another node.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trellis.agent.config import AgentConfig
from trellis.agent.metrics import AgentMetrics
from trellis.bgp.bird import Bird, BirdError
from trellis.calc.bgp import compute_bgp, parse_bgp_objects
from trellis.calc.cluster import Cluster, parse_cluster
from trellis.calc.policy import PolicyCalculator, PolicyReader, PolicyState
from trellis.calc.routes import DesiredRoutes, compute_routes
from trellis.dataplane.kernel.netlink import KernelError, SocketPool, enable_forwarding
from trellis.dataplane.kernel.nft import NftError, Table
from trellis.dataplane.kernel.overlay import Overlay, VxlanSpec
from trellis.dataplane.render.nft import NatState, TableRenderer
from trellis.datastore.base import KV, Conflict, Datastore, DatastoreError, Event, EventKind, LeaseExpired
from trellis.datastore.syncer import Syncer
from trellis.ipam.allocator import AddressesExhausted, Ipam, block_usage
from trellis.model.ipam import BLOCK_PREFIX, INTERNAL_PREFIX, Attachment, Block, block_key
from trellis.model.k8s import CLUSTER_NETWORK_POLICY_PREFIX, NETWORK_POLICY_PREFIX
from trellis.model.k8s import NODE_PREFIX as K8S_NODE_PREFIX
from trellis.model.naming import host_veth_name
from trellis.model.node import STATUS_FILE, Node

log = logging.getLogger(__name__)

CLUSTER_PREFIX = "/trellis/"
VTEP_ATTACHMENT = Attachment(INTERNAL_PREFIX + "vtep", "trl.vxlan")
"""The IPAM handle of the node's tunnel address."""
RESYNC_S = 30.0
"""Diff against the kernel at least this often, repairing what others changed; between
resyncs, an unchanged desired state costs no kernel read (pod ADDs wake the reconciler)."""
ROUTED_BACKENDS = ("vxlan", "host-gw", "vxlan-cross-subnet")
"""Backends whose routes the agent programs itself (bgp's come from BIRD)."""
COALESCE_S = 0.01
"""After a change, wait this long for the rest of its burst before reconciling (seconds)."""
READY_LAG_S = 10.0
"""How long the kernel may trail the datastore's last change and the node still be ready: a
pass in flight is normal, a reconciler that has not completed one for this long is not (seconds)."""
POLICY_KINDS = {
    "networkpolicies": NETWORK_POLICY_PREFIX,
    "clusternetworkpolicies": CLUSTER_NETWORK_POLICY_PREFIX,
}
"""Policy objects counted in `status.json`: kind -> key prefix."""


@dataclass(frozen=True)
class LocalEndpoint:
    pod: str
    interface: str
    address: ipaddress.IPv4Address


class ClusterView:
    """Every object under `/trellis/`, as the syncer delivers it (a SyncConsumer)."""

    def __init__(self, metrics: AgentMetrics | None = None) -> None:
        self._lock = threading.Lock()
        self._objects: dict[str, dict[str, Any]] = {}
        self._revision = 0
        self.metrics = metrics or AgentMetrics()
        self.changed = threading.Event()
        self.synced = threading.Event()
        """Set while the view follows the datastore: from a snapshot until the next outage."""
        self.sync_problem = "no snapshot yet"
        """Why the view is not in sync, while it is not."""

    def on_snapshot(self, items: list[KV], revision: int) -> None:
        with self._lock:
            self._objects = {kv.key: kv.value for kv in items}
            self._revision = revision
        log.info("datastore in sync at revision %d (%d objects)", revision, len(items))
        self.metrics.datastore_synced(revision)
        self.synced.set()
        self.changed.set()

    def on_update(self, events: list[Event]) -> None:
        with self._lock:
            for event in events:
                if event.kind is EventKind.PUT and event.value is not None:
                    self._objects[event.key] = event.value
                else:
                    self._objects.pop(event.key, None)
            self._revision = max(self._revision, events[-1].mod_revision)
        self.metrics.datastore_updated(self._revision)
        self.changed.set()

    def on_out_of_sync(self, reason: str) -> None:
        log.warning("datastore out of sync (%s): keeping the kernel as it is until it returns", reason)
        self.sync_problem = reason
        self.synced.clear()
        self.metrics.datastore_lost()

    def objects(self) -> tuple[dict[str, dict[str, Any]], int]:
        """A copy of every object, and the store revision it reflects."""
        with self._lock:
            return dict(self._objects), self._revision

    @property
    def revision(self) -> int:
        with self._lock:
            return self._revision


class NetworkController:
    def __init__(
        self,
        config: AgentConfig,
        store: Datastore,
        ipam: Ipam,
        pool: SocketPool,
        uplink: tuple[str, ipaddress.IPv4Interface],
        mtu: int,
        clock: Callable[[], float] = time.monotonic,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or AgentMetrics()
        self.store = store
        self.ipam = ipam
        self.overlay = Overlay(pool)
        self.uplink_name, self.underlay = uplink
        self.mtu = mtu
        self.clock = clock
        self.view = ClusterView(self.metrics)
        self.syncer = Syncer(store, CLUSTER_PREFIX, self.view)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lease = 0
        self._node: Node | None = None
        self._absent_since: dict[str, float] = {}
        self._reader = PolicyReader()
        self._calculator = PolicyCalculator()
        self._renderer = TableRenderer()
        self._table = Table()
        """The node's `inet trl`: updated in place after a change; replaced whole at a resync
        only if another nftables transaction came between (or on the first pass)."""
        self._last_routes: DesiredRoutes | None = None
        self._last_full = float("-inf")
        self._problems: dict[str, tuple[str, ...]] = {}
        self._programmed: tuple[int, float] | None = None
        """(revision, clock time) of the last pass that programmed the kernel completely."""
        self._failure: str | None = None
        """Why the last pass failed; None once one succeeds."""
        self.bird = Bird(config.state_dir) if config.backend == "bgp" else None
        """The node's BIRD, for the bgp backend: it learns and installs the routes to other nodes."""

    @property
    def period_s(self) -> float:
        """Longest wait between two passes (each renews the lease and rewrites status.json; seconds)."""
        return min(RESYNC_S, self.config.node_ttl_s / 3)

    @property
    def uses_vxlan(self) -> bool:
        return self.config.backend in ("vxlan", "vxlan-cross-subnet")

    def start(self) -> None:
        self.syncer.start()
        thread = threading.Thread(target=self._run, name="network", daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        """Stop following the cluster; the kernel keeps what it holds, the lease runs out.

        BIRD is told to restart gracefully: peers and this kernel keep its routes until a
        new agent brings it back. Unless the node was removed from the cluster: then BIRD
        closes its sessions and every peer, external routers too, drops its routes at once.
        """
        self._stopping.set()
        self.view.changed.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self.syncer.stop()
        if self.bird is not None:
            self.bird.stop(leaving=self._removed())

    def _removed(self) -> bool:
        """Whether this node's object is gone from the datastore (an operator removed the node,
        or its lease ran out: either way its peers no longer route to it). Asked of the
        datastore, not of the view, which may lag; when it cannot answer, the node stays."""
        if self._node is None:
            return False
        try:
            return self.store.get(self._node.key) is None
        except DatastoreError as err:
            log.warning("cannot tell whether this node was removed (%s): BIRD keeps its routes", err)
            return False

    def _run(self) -> None:
        while not self._stopping.is_set() and not self.view.synced.wait(timeout=0.5):
            pass
        registered_at = 0.0
        while not self._stopping.is_set():
            try:
                if self._node is None:
                    self._register()
                    registered_at = self.clock()
                elif self.clock() - registered_at >= self.config.node_ttl_s / 3:
                    self._keepalive()
                    registered_at = self.clock()
                self.reconcile()
            except DatastoreError as err:
                log.warning("datastore unavailable, keeping the kernel as it is: %s", err)
                self._failed("datastore", f"datastore unavailable: {err}")
            except (KernelError, NftError, BirdError, OSError) as err:
                log.error("programming the kernel failed (retried on the next change or resync): %s", err)
                self._failed("dataplane", f"programming the kernel failed: {err}")
            except AddressesExhausted as err:  # for the VTEP: retried, pods' addresses come back
                log.error("no address for this node (retried on the next change or resync): %s", err)
                self._failed("addresses", f"no address for this node: {err}")
            except Exception as err:  # a bug, or an object no parser expected: not a reason to stop
                log.exception("reconcile failed (retried on the next change or resync)")
                self._failed("internal", f"internal error: {type(err).__name__}: {err}")
            if self.view.changed.wait(timeout=self.period_s):
                # Let a burst (a pod ADD writes its block, then its Pod object) land first, and
                # keep this pass off the CPU while the CNI request that caused it finishes.
                self._stopping.wait(COALESCE_S)
            self.view.changed.clear()

    def _register(self) -> None:
        vtep_mac, vtep_ip = "", None
        if self.uses_vxlan:
            vtep_ip = self.ipam.assign(VTEP_ATTACHMENT, f"node {self.config.node} tunnel")
            spec = VxlanSpec(
                vni=self.config.vxlan_vni,
                port=self.config.vxlan_port,
                underlay_ip=self.underlay.ip,
                underlay_dev=self.uplink_name,
                mtu=self.mtu,
                vtep_ip=vtep_ip,
            )
            vtep_mac = self.overlay.ensure_vxlan(spec)
        else:
            self.overlay.remove_vxlan()
        enable_forwarding()
        node = Node(self.config.node, self.underlay, vtep_mac, vtep_ip)
        self._lease = self.store.grant_lease(self.config.node_ttl_s)
        self.store.put(node.key, node.to_json(), lease=self._lease)
        self._node = node
        log.info(
            "node %s registered: underlay %s on %s%s",
            node.name,
            node.underlay,
            self.uplink_name,
            f", VTEP {vtep_mac} {vtep_ip}" if vtep_ip else "",
        )

    def _keepalive(self) -> None:
        try:
            self.store.keepalive(self._lease)
        except LeaseExpired:
            log.warning("node lease expired: registering again")
            self._node = None
            self._register()

    def reconcile(self) -> None:
        """Program the kernel for what the view holds now, then publish the revision it reflects."""
        objects, revision = self.view.objects()
        cluster = parse_cluster(objects)
        resync = self.clock() - self._last_full >= RESYNC_S
        if self.config.backend in ROUTED_BACKENDS:
            desired = compute_routes(self.config.backend, self.config.node, cluster.nodes, cluster.blocks)
            if resync or desired != self._last_routes:
                with self.metrics.timing("routes"):
                    changes = self.overlay.apply(desired, self.uplink_name)
                self._last_routes = desired
                if changes:
                    log.info(
                        "routes: %d added, %d removed (%d routes, %d VXLAN peers)",
                        changes.added,
                        changes.removed,
                        len(desired.routes),
                        len(desired.peers),
                    )
            self._report_problems("routes", desired.problems)
        elif self.bird is not None and self._node is not None:
            with self.metrics.timing("bgp"):
                self._apply_bgp(objects, cluster)
        local = self._local_endpoints(objects)
        policy = self._policy(objects, local) if self.config.policy else None
        self._apply_table(cluster, local, policy, force=resync)
        if resync:
            self._last_full = self.clock()
        self._release_dead_blocks(cluster, objects)
        self._publish(revision, objects, local, policy)

    def _apply_bgp(self, objects: dict[str, dict[str, Any]], cluster: Cluster) -> None:
        assert self.bird is not None and self._node is not None
        inputs, _ = self._reader.read(objects)  # node labels, parsed once for BGP and policy
        labels = {name: node.labels for name, node in inputs.nodes.items()}
        desired = compute_bgp(
            self._node, cluster.nodes, cluster.blocks, self.config.pools, parse_bgp_objects(objects), labels
        )
        if self.bird.apply(desired):
            log.info(
                "BIRD configured: AS %d, %d sessions, %d own blocks",
                desired.asn,
                len(desired.sessions),
                len(desired.blocks),
            )
        self._report_problems("bgp", desired.problems)

    def _local_blocks(self, objects: dict[str, dict[str, Any]]) -> list[Block]:
        return [
            Block.from_json(value)
            for key, value in objects.items()
            if key.startswith(BLOCK_PREFIX) and value.get("node") == self.config.node
        ]

    def _local_endpoints(self, objects: dict[str, dict[str, Any]]) -> list[LocalEndpoint]:
        """Every pod attached on this node, from its blocks' allocations."""
        return [
            LocalEndpoint(allocation.pod, host_veth_name(allocation.attachment), address)
            for block in self._local_blocks(objects)
            for address, allocation in block.allocations.items()
            if not allocation.attachment.internal
        ]

    def _policy(self, objects: dict[str, dict[str, Any]], local: list[LocalEndpoint]) -> PolicyState:
        with self.metrics.timing("policy"):
            inputs, errors = self._reader.read(objects)
            state = self._calculator.compute(inputs, self.config.node, {e.interface: e.pod for e in local})
        self._report_problems("policy objects", errors)
        self._report_problems("endpoints", state.problems)
        return state

    def _apply_table(
        self, cluster: Cluster, local: list[LocalEndpoint], policy: PolicyState | None, force: bool
    ) -> None:
        nodes = frozenset(ipaddress.IPv4Network(f"{n.underlay.ip}/32") for n in cluster.nodes.values())
        pools = frozenset(self.config.pools)
        sources = frozenset((e.interface, e.address) for e in local)
        table = self._renderer.render(
            NatState(pod_nets=pools, cluster_nets=pools | nodes, pod_sources=sources), policy
        )
        changed = table != self._table.held
        if force or changed:
            with self.metrics.timing("nftables"):
                done = self._table.program(table, resync=force)
            if done.refused is not None:
                log.warning("nftables refused updating table inet trl, replaced it whole: %s", done.refused)
            if changed:
                log.info(
                    "nftables table inet trl %s, %d commands (%d cluster destinations, %s)",
                    "replaced" if done.replaced else "updated",
                    done.commands,
                    len(pools | nodes),
                    "policy off" if policy is None else f"{len(policy.endpoints)} endpoints with policy",
                )

    def _report_problems(self, what: str, problems: tuple[str, ...]) -> None:
        """Log each problem once, when it appears, not on every reconcile (a burst of pods would
        otherwise log every earlier pod's problem again on each pass)."""
        known = set(self._problems.get(what, ()))
        for problem in problems:
            if problem not in known:
                log.warning("%s: %s", what, problem)
        self._problems[what] = problems

    def _publish(
        self,
        revision: int,
        objects: dict[str, dict[str, Any]],
        local: list[LocalEndpoint],
        policy: PolicyState | None,
    ) -> None:
        """`status.json` in the state dir: the datastore revision the kernel now reflects, and
        what the node holds (`trellis status` shows it; the metrics' node gauges read it)."""
        status = {
            "node": self.config.node,
            "revision": revision,
            "backend": self.config.backend,
            "policy": policy is not None,
            "endpoints_with_policy": 0 if policy is None else len(policy.endpoints),
            "problems": [p for problems in self._problems.values() for p in problems],
            "written_at": time.time(),
            "period_s": self.period_s,
            "datastore": {"kind": self.config.datastore, "in_sync": self.view.synced.is_set()},
            "blocks": [
                {"cidr": str(b.cidr), "used": b.used, "size": b.size}
                for b in block_usage(self._local_blocks(objects))
            ],
            "endpoints": len(local),
            "policies": {
                kind: sum(1 for key in objects if key.startswith(prefix))
                for kind, prefix in POLICY_KINDS.items()
            },
            "nftables": {
                "chains": len(held.chains) if (held := self._table.held) else 0,
                "rules": held.rule_count if held else 0,
            },
        }
        if self.bird is not None:
            try:
                protocols = self.bird.status().protocols
            except BirdError as err:
                log.warning("BIRD status unavailable: %s", err)
                protocols = ()
            status["bgp"] = [
                {"name": p.name, "state": p.state, "info": p.info, "established": p.established}
                for p in protocols
                if p.proto == "BGP"
            ]
        path = self.config.state_dir / STATUS_FILE
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(status, indent=2) + "\n")
        tmp.replace(path)
        self.metrics.programmed(status)
        self._programmed, self._failure = (revision, self.clock()), None

    def _failed(self, cause: str, reason: str) -> None:
        """A pass failed: counted, and the node is not ready until one succeeds."""
        self.metrics.reconcile_failed(cause)
        self._failure = reason

    def liveness(self) -> str | None:
        """Why the agent should be restarted (its reconciler's or syncer's thread died: the
        kernel no longer follows the datastore), None while they run."""
        threads = [*self._threads, *([self.syncer.thread] if self.syncer.thread else [])]
        dead = [thread.name for thread in threads if not thread.is_alive()]
        return f"thread {', '.join(dead)} ended" if dead else None

    def readiness(self) -> str | None:
        """Why the node is not ready, None when it is: the datastore is in sync and the kernel
        programmed to its last change (or a pass completed less than READY_LAG_S ago), and the
        threads that keep it so run."""
        if (dead := self.liveness()) is not None:
            return dead
        if not self.view.synced.is_set():
            return f"datastore not in sync: {self.view.sync_problem}"
        if self._failure is not None:
            return self._failure
        if self._programmed is None:
            return "kernel not programmed yet"
        programmed, at = self._programmed
        revision = self.view.revision
        if programmed < revision and self.clock() - at > READY_LAG_S:
            return f"kernel programmed to revision {programmed}, datastore at {revision}"
        return None

    def _release_dead_blocks(self, cluster: Cluster, objects: dict[str, dict[str, Any]]) -> None:
        now = self.clock()
        owners = {owner for _, owner in cluster.blocks}
        for name in owners - set(cluster.nodes):
            since = self._absent_since.setdefault(name, now)
            if now - since < self.config.dead_node_grace_s:
                continue
            listed = K8S_NODE_PREFIX + name in objects
            for cidr, owner in cluster.blocks:
                if owner != name:
                    continue
                kv = self.store.get(block_key(cidr))
                if kv is None:
                    continue
                block = Block.from_json(kv.value)
                if block.node != name:
                    continue  # released by another agent and claimed since: the view lags
                if listed and not block.workload_free:
                    continue  # its pods may still run: wait for the Node object's deletion
                try:
                    self.store.delete(kv.key, kv.mod_revision)
                    log.info("released block %s of node %s (absent for %.0f s)", cidr, name, now - since)
                except Conflict:
                    pass  # another agent did it, or the node came back
        for name in set(self._absent_since) - owners:
            del self._absent_since[name]
        for name in set(self._absent_since) & set(cluster.nodes):
            del self._absent_since[name]
