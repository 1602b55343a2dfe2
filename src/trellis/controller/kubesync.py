"""kube-sync: the cluster's Kubernetes objects, mirrored into the etcd the agents read.

Why: with `--datastore etcd` the agents compute policy from the Nodes, Namespaces, Pods,
NetworkPolicies and ClusterNetworkPolicies under `/trellis/k8s/` of that etcd, and nothing
else puts them there (in the lab, the lab does: `lab/kube.py`). Calico's kube-controllers copy
Kubernetes objects into its etcd for the same reason. kube-sync follows the API server with the
`kubernetes` datastore's read side (the key table of `kube_resources`, a snapshot of every kind
at one revision, then a watch per kind) through the agents' own Syncer on `/trellis/k8s/`, and
writes each object into the target under the same key with the same value. That value is what
the `kubernetes` datastore hands the agents on a cluster, which `calc/` parses, so an agent
cannot tell which of the two stores it reads.

Reconcile on every snapshot, then apply events, writing only what differs:
- a snapshot (the start, a re-list after a 410 Gone, after a failure on either side) reads the
  target's keys under the prefix, puts each object whose value differs, and deletes every key
  the cluster no longer holds. So a restart, or a start on an etcd already in sync, writes
  nothing, and whatever was missed while kube-sync was away or failing is made right;
- an event is put or deleted only when the target holds something else, judged by the copy
  kept of what the target holds (what was read, then what was written).
A write that fails (etcd away) or a delete that finds the key changed by someone else
(`Conflict`: deletes compare the revision last read or written) raises out of the consumer:
the Syncer then lists the cluster again after its back-off, and that snapshot reconciles.

One replica, no leader election: two would write the same values twice and turn each other's
deletes into conflicts (harmless, but wasted). `deploy/kube-sync.yaml` runs one, with
`strategy: Recreate` so that an old and a new one do not overlap during a rollout.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import Any

import httpx2

from trellis.datastore.base import KV, Datastore, Event, EventKind
from trellis.datastore.kubernetes import KubernetesDatastore
from trellis.datastore.syncer import Syncer
from trellis.model.k8s import K8S_PREFIX

log = logging.getLogger(__name__)


@dataclass
class Tally:
    """What one snapshot or one batch of events did to the target (keys)."""

    put: int = 0
    deleted: int = 0
    unchanged: int = 0

    def __str__(self) -> str:
        return f"{self.put} put, {self.deleted} deleted, {self.unchanged} unchanged"


class Mirror:
    """The Syncer's consumer that makes `target`'s keys under `prefix` what the source holds."""

    def __init__(self, target: Datastore, prefix: str = K8S_PREFIX) -> None:
        self.target = target
        self.prefix = prefix
        self.held: dict[str, KV] = {}
        """What the target holds under the prefix, by key: as read at the last snapshot, then written."""

    def reconcile(self, items: list[KV]) -> Tally:
        """Make the target's keys under the prefix exactly `items` (the source's, whole)."""
        self.held = {kv.key: kv for kv in self.target.list(self.prefix)}
        tally = Tally()
        wanted = {kv.key: kv.value for kv in items}
        for key, value in wanted.items():
            self._put(key, value, tally)
        for key in sorted(self.held.keys() - wanted.keys()):
            self._delete(key, tally)
        return tally

    def apply(self, events: list[Event]) -> Tally:
        """Apply the source's changes to the target, oldest first."""
        tally = Tally()
        for event in events:
            if event.kind is EventKind.PUT:
                assert event.value is not None
                self._put(event.key, event.value, tally)
            elif event.key in self.held:
                self._delete(event.key, tally)
            else:
                tally.unchanged += 1
        return tally

    def _put(self, key: str, value: dict[str, Any], tally: Tally) -> None:
        held = self.held.get(key)
        if held is not None and held.value == value:
            tally.unchanged += 1
            return
        revision = self.target.put(key, value)
        self.held[key] = KV(key, value, revision)
        tally.put += 1
        log.debug("put %s (target revision %d)", key, revision)

    def _delete(self, key: str, tally: Tally) -> None:
        self.target.delete(key, self.held[key].mod_revision)
        del self.held[key]
        tally.deleted += 1
        log.debug("deleted %s", key)

    # -- the SyncConsumer protocol -------------------------------------------------------------

    def on_snapshot(self, items: list[KV], revision: int) -> None:
        tally = self.reconcile(items)
        log.info("in sync with the cluster at revision %d: %d objects; %s", revision, len(items), tally)

    def on_update(self, events: list[Event]) -> None:
        tally = self.apply(events)
        if tally.put or tally.deleted:
            log.info("%d changes up to cluster revision %d: %s", len(events), events[-1].mod_revision, tally)

    def on_out_of_sync(self, reason: str) -> None:
        log.warning("%s; the target keeps what it holds until the cluster is listed again", reason)


def open_cluster(kubeconfig: str, *, transport: httpx2.BaseTransport | None = None) -> KubernetesDatastore:
    """The API server as a store to read `/trellis/k8s/` from: `kubeconfig` a file, empty for
    in-cluster; `transport` replaces the network (tests). It never looks at Leases: kube-sync
    holds none, and its RBAC reads the cluster's objects alone. DatastoreError on a bad kubeconfig."""
    return KubernetesDatastore(kubeconfig, transport=transport, sweep_interval_s=math.inf)


def run(source: Datastore, target: Datastore, stop: threading.Event) -> None:
    """Mirror `source`'s `/trellis/k8s/` into `target` until `stop` is set (on a thread of the
    Syncer's; returns within one watch time-out of `stop`)."""
    syncer = Syncer(source, K8S_PREFIX, Mirror(target))
    syncer.start()
    try:
        stop.wait()
    finally:
        syncer.stop()
