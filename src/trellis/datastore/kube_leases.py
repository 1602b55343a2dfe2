"""Datastore leases on the Kubernetes API: `coordination.k8s.io/v1` Leases the agents expire.

Why: Kubernetes has no keys that vanish by themselves, and the agent's node registration
must (an agent gone for longer than its lease's TTL takes its node's routes away, as with the
other stores). So a datastore lease is a Lease object `trellis-lease-<ID>` in the agent's
namespace, labelled `trellis.dev/lease=<ID>`; an object written under the lease carries the
same label. Renewing is updating the Lease.

Who expires it: every agent, on its own clock. A Lease not renewed for its TTL is expired,
judged as the node lifecycle controller judges node Leases: by how long its resourceVersion
has not changed since this store first saw it at that version, never by `renewTime` (clocks
of nodes differ). So a store that just started waits a full TTL before it expires anything,
and so does one that could not read the Leases: while the API server is away nobody can
renew, and a lease must not be held against its agent for that (etcd, likewise, gives every
lease a full TTL when it elects a leader). Stores look at the Leases at most every
`sweep_interval_s`, before any operation (as the SQLite store sweeps before each), so that
leases expire without a thread of their own, and a reader never sees the keys of a lease
expired longer than that ago. The sweep's requests take the short time-out of one object's;
one that times out fails the operation with it, rather than doubling its wait.

Expiring is three steps, each safe to repeat and to race:
1. mark: delete the Lease with a precondition on the resourceVersion judged stale. The
   finalizer `trellis.dev/lease-keys` keeps it, with a deletionTimestamp: a renewal racing
   this fails its own precondition and then sees the mark;
2. delete every object labelled with the lease (each with a precondition: one re-bound
   meanwhile stays);
3. remove the finalizer, which lets the API server delete the Lease.
Any store that finds a marked Lease finishes steps 2 and 3, so a store that dies midway
leaves nothing behind; `kubectl delete lease` also ends a lease cleanly.

A write under a lease checks the Lease after the write, and undoes the write when the Lease
is gone or marked: a check before it could pass just before a mark, and the object would
then outlive step 2.

Unlike etcd, the keys of an expired lease are deleted one by one, each at a revision of its
own: the API has no transaction over several objects.
"""

from __future__ import annotations

import logging
import math
import secrets
import socket
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx2

from trellis.datastore.base import DatastoreError, LeaseExpired, Unavailable
from trellis.datastore.kube_api import ApiClient, ApiFailure, delete_options
from trellis.datastore.kube_resources import LEASE_LABEL, OWNED, Resource, revision, without_managed_fields

log = logging.getLogger(__name__)

FINALIZER = "trellis.dev/lease-keys"
NAME_PREFIX = "trellis-lease-"
ATTEMPTS = 3
"""Tries of a read-modify-write of a Lease before giving up (others change it meanwhile)."""
_GONE = (404, 409)
"""Answers to a request with a precondition: the object is gone, or no longer as read."""


def _now() -> str:
    """Wall-clock time as a MicroTime (what the Lease's times are; informative only)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _marked(obj: dict[str, Any] | None) -> bool:
    """The Lease is gone, or being deleted."""
    return obj is None or bool(obj["metadata"].get("deletionTimestamp"))


class Leases:
    """The datastore's lease calls, for the objects of one API server."""

    def __init__(self, api: ApiClient, clock: Callable[[], float], sweep_interval_s: float) -> None:
        """`clock`: seconds, for judging expiry (monotonic); `sweep_interval_s`: how often to look
        (math.inf: never, for a store that only reads the cluster's objects: kube-sync)."""
        self.api = api
        self.clock = clock
        self.sweep_interval_s = sweep_interval_s
        self.collection = f"apis/coordination.k8s.io/v1/namespaces/{api.namespace}/leases"
        self._seen: dict[int, tuple[str, float]] = {}
        """Lease -> (resourceVersion, clock time it was first seen at)."""
        self._next_sweep = float("-inf") if math.isfinite(sweep_interval_s) else math.inf
        self._sweeping = threading.Lock()

    def _path(self, lease: int) -> str:
        return f"{self.collection}/{NAME_PREFIX}{lease}"

    def _get(self, lease: int) -> dict[str, Any] | None:
        try:
            return self.api.call("GET", self._path(lease))
        except ApiFailure as err:
            if err.status.code == 404:
                return None
            raise

    def grant(self, ttl_s: int) -> int:
        for _ in range(ATTEMPTS):
            lease = secrets.randbelow(2**63 - 1) + 1
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {
                    "name": f"{NAME_PREFIX}{lease}",
                    "labels": {LEASE_LABEL: str(lease)},
                    "finalizers": [FINALIZER],
                },
                "spec": {
                    "holderIdentity": socket.gethostname(),
                    "leaseDurationSeconds": ttl_s,
                    "acquireTime": _now(),
                    "renewTime": _now(),
                },
            }
            try:
                created = self.api.call("POST", self.collection, body=body)
            except ApiFailure as err:
                if err.status.reason == "AlreadyExists":
                    continue
                raise
            self._seen[lease] = (created["metadata"]["resourceVersion"], self.clock())
            return lease
        raise DatastoreError(f"{self.collection}: {ATTEMPTS} random lease names in a row were taken")

    def keepalive(self, lease: int) -> None:
        for _ in range(ATTEMPTS):
            obj = self._get(lease)
            if obj is None or _marked(obj):
                raise LeaseExpired(f"lease {lease}: {self._path(lease)} is gone or being deleted")
            body = {**without_managed_fields(obj), "spec": {**obj["spec"], "renewTime": _now()}}
            try:
                renewed = self.api.call("PUT", self._path(lease), body=body)
            except ApiFailure as err:
                if err.status.code in _GONE:
                    continue  # marked or deleted meanwhile: the next read says which
                raise
            self._seen[lease] = (renewed["metadata"]["resourceVersion"], self.clock())
            return
        raise Unavailable(f"lease {lease}: {self._path(lease)} changed under every renewal")

    def revoke(self, lease: int) -> None:
        obj = self._get(lease)
        if obj is None:
            return
        if not _marked(obj):
            try:
                self.api.call("DELETE", self._path(lease))
            except ApiFailure as err:
                if err.status.code == 404:
                    return
                raise
        self._finish(lease)
        self._seen.pop(lease, None)

    def confirm(self, lease: int, key: str, resource: Resource, written: int) -> None:
        """After writing `key` at revision `written` under `lease`: undo it if the lease is gone."""
        if not lease or not _marked(self._get(lease)):
            return
        try:
            self.api.call("DELETE", resource.object_path(key), body=delete_options(written))
        except ApiFailure as err:
            if err.status.code not in _GONE:
                raise
        raise LeaseExpired(f"lease {lease}: {self._path(lease)} is gone or being deleted; {key} not kept")

    def sweep_if_due(self) -> None:
        """Expire the Leases nobody renewed, at most every `sweep_interval_s`.

        A failure is logged, not raised: it must not fail the operation that happened to sweep;
        except a time-out, which is `Unavailable`: the server took the request and did not
        answer, and the operation would wait on it as long again (a CNI ADD must hear soon).
        """
        now = self.clock()
        if now < self._next_sweep or not self._sweeping.acquire(blocking=False):
            return
        try:
            self._next_sweep = now + self.sweep_interval_s
            self._sweep(now)
        except DatastoreError as err:
            log.warning("expiring leases in %s: %s", self.collection, err)
            self._seen.clear()  # what was seen before an outage says nothing about renewals during it
            if isinstance(err.__cause__, httpx2.TimeoutException):
                raise Unavailable(f"looking for expired leases: {err}") from err
        finally:
            self._sweeping.release()

    def _sweep(self, now: float) -> None:
        listing = self.api.call("GET", self.collection, params={"labelSelector": LEASE_LABEL})
        seen: dict[int, tuple[str, float]] = {}
        for obj in listing["items"]:
            label = obj["metadata"]["labels"][LEASE_LABEL]
            ttl_s = (obj.get("spec") or {}).get("leaseDurationSeconds")
            if not label.isdigit() or not isinstance(ttl_s, int):
                continue  # not one of ours, whatever its label says
            lease = int(label)
            if _marked(obj):
                self._finish(lease)
                continue
            version = obj["metadata"]["resourceVersion"]
            first = self._seen.get(lease)
            if first is None or first[0] != version:
                seen[lease] = (version, now)
            elif now - first[1] < ttl_s:
                seen[lease] = first
            else:
                self._expire(lease, obj)
        self._seen = seen

    def _expire(self, lease: int, obj: dict[str, Any]) -> None:
        try:
            self.api.call("DELETE", self._path(lease), body=delete_options(revision(obj)))
        except ApiFailure as err:
            if err.status.code in _GONE:
                return  # renewed or removed meanwhile
            raise
        log.info(
            "lease %d of %s expired (not renewed for %d s): deleting its objects",
            lease,
            obj["spec"].get("holderIdentity", "?"),
            obj["spec"]["leaseDurationSeconds"],
        )
        self._finish(lease)

    def _finish(self, lease: int) -> None:
        """Delete the objects bound to a marked lease, then let its Lease go."""
        for resource in OWNED:
            bound = self.api.call(
                "GET", resource.collection_path(), params={"labelSelector": f"{LEASE_LABEL}={lease}"}
            )
            for obj in bound["items"]:
                try:
                    self.api.call(
                        "DELETE", resource.object_path(resource.key(obj)), body=delete_options(revision(obj))
                    )
                except ApiFailure as err:
                    if err.status.code not in _GONE:
                        raise
        for _ in range(ATTEMPTS):
            obj = self._get(lease)
            if obj is None:
                return
            body = without_managed_fields(obj)
            body["metadata"]["finalizers"] = [
                f for f in body["metadata"].get("finalizers", []) if f != FINALIZER
            ]
            try:
                self.api.call("PUT", self._path(lease), body=body)
                return
            except ApiFailure as err:
                if err.status.code not in _GONE:
                    raise
        raise Unavailable(f"lease {lease}: {self._path(lease)} changed under every finalizer removal")
