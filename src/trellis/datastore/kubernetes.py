"""The Kubernetes API as a Datastore: the store of a Trellis installed on a cluster.

Why: on a cluster, the API server already holds what the agents compute from (Nodes, Pods,
Namespaces, NetworkPolicies, ClusterNetworkPolicies), and is the one store every node can
reach; Calico's and Cilium's Kubernetes datastores make the same choice. Trellis' own state
becomes resources of its own API group (`deploy/crds.yaml`). The agent, IPAM and the
calculation are unchanged: `kube_resources.RESOURCES` maps each key prefix to a resource.

How the Protocol maps:
- revision: an object's resourceVersion, which is etcd's revision (`kube_resources.revision`);
- `get`, `create`, `update`, `delete`: GET, POST, PUT with `metadata.resourceVersion`,
  DELETE with a resourceVersion precondition; 409 AlreadyExists is AlreadyExists, 409
  Conflict and 404 on a compare-and-swap are Conflict;
- `put`: read, then create or compare-and-swap, again on a race (custom resources take no
  update without a resourceVersion);
- `snapshot`: a list per resource, all at one revision: the first is a consistent read at the
  newest revision R, the others `resourceVersion=R&resourceVersionMatch=Exact`; so a watch
  from R sees exactly the later changes;
- `watch`: long-lived watches per resource with bookmarks, merged (`kube_watch`); a 410 Gone is
  `Compacted`, and the syncer lists again;
- leases: `coordination.k8s.io` Leases that the agents expire themselves (`kube_leases`).
The cluster's objects are read-only here: writing one is an error, and the agent never tries.
"""

from __future__ import annotations

import builtins
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx2

from trellis.datastore.base import (
    KV,
    AlreadyExists,
    Compacted,
    Conflict,
    DatastoreError,
    Event,
    Snapshot,
    Unavailable,
)
from trellis.datastore.kube_api import LIST_TIMEOUT_S, TIMEOUT_S, ApiClient, ApiFailure, delete_options
from trellis.datastore.kube_leases import Leases
from trellis.datastore.kube_resources import API_VERSION, Resource, resource_for, resources_under, revision
from trellis.datastore.kube_watch import Follower

PUT_ATTEMPTS = 5
"""Read-then-write rounds of `put` before giving up to writers racing it."""


class KubernetesDatastore:
    """The `kubernetes` Datastore: the API server a kubeconfig names, or the in-cluster one."""

    def __init__(
        self,
        kubeconfig: str = "",
        *,
        transport: httpx2.BaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        timeout_s: float = TIMEOUT_S,
        list_timeout_s: float = LIST_TIMEOUT_S,
        watch_timeout_s: int = 300,
        sweep_interval_s: float = 5.0,
        page_size: int = 500,
    ) -> None:
        """`kubeconfig`: a file, empty for in-cluster; `transport` replaces the network (tests);
        `clock` judges lease expiry (seconds); `timeout_s` bounds each read of a request for one
        object, `list_timeout_s` of a page of a list (seconds, see `kube_api`); `watch_timeout_s`
        is how long the server keeps a watch open before it is reopened; `sweep_interval_s`
        how often expired leases are looked for (math.inf: never); `page_size` the objects per
        list request."""
        self.api = ApiClient(
            kubeconfig, transport=transport, timeout_s=timeout_s, list_timeout_s=list_timeout_s
        )
        self.leases = Leases(self.api, clock, sweep_interval_s)
        self.watch_timeout_s = watch_timeout_s
        self.page_size = page_size
        self._followers: dict[str, Follower] = {}
        self._lock = threading.Lock()

    # -- reads -------------------------------------------------------------------------------

    def get(self, key: str) -> KV | None:
        self.leases.sweep_if_due()
        resource = resource_for(key)
        try:
            obj = self.api.call("GET", resource.object_path(key))
        except ApiFailure as err:
            if err.status.code == 404:
                return None
            raise
        return KV(key, resource.value(obj), revision(obj))

    def list(self, prefix: str) -> list[KV]:
        return self.snapshot(prefix).items

    def snapshot(self, prefix: str) -> Snapshot:
        self.leases.sweep_if_due()
        resources = resources_under(prefix)
        items: list[KV] = []
        at: int | None = None
        for resource in resources:
            objects, at = self._list(resource, at)
            items += [
                KV(key, resource.value(obj), revision(obj))
                for obj in objects
                if (key := resource.key(obj)).startswith(prefix)
            ]
        if at is None:
            kinds = ", ".join(r.kind for r in resources)
            raise DatastoreError(f"prefix {prefix}: the API server serves none of {kinds}")
        return Snapshot(sorted(items, key=lambda kv: kv.key), at)

    def _list(self, resource: Resource, at: int | None) -> tuple[builtins.list[dict[str, Any]], int | None]:
        """Every object of `resource` at revision `at` (None: the newest), and that revision.

        An optional resource the server does not serve is empty (and says nothing of revisions).
        """
        # Trellis' own kinds are small, and IPAM lists its blocks on a CNI ADD's path: the short
        # time-out; the cluster's kinds (every Pod) the list one.
        read_s = self.api.timeout_s if resource.api_version == API_VERSION else self.api.list_timeout_s
        params = {"limit": str(self.page_size)}
        if at is not None:
            params |= {"resourceVersion": str(at), "resourceVersionMatch": "Exact"}
        objects: builtins.list[dict[str, Any]] = []
        while True:
            try:
                page = self.api.call("GET", resource.collection_path(), params=params, read_s=read_s)
            except ApiFailure as err:
                if err.status.expired:
                    raise Compacted(
                        f"list of {resource.plural} at revision {at}: {err.status.message}"
                    ) from err
                if resource.optional and err.status.code == 404:
                    return [], at
                if err.status.code == 404 and resource.api_version == API_VERSION:
                    raise DatastoreError(f"{err} (is deploy/crds.yaml applied?)") from err
                raise
            objects += page["items"]
            if at is None:
                at = revision(page)
            token = page["metadata"].get("continue")
            if not token:
                return objects, at
            # A continued list stays at the first page's revision; it takes no resourceVersion.
            params = {"limit": str(self.page_size), "continue": token}

    def watch(self, prefix: str, after_revision: int, timeout_s: float) -> builtins.list[Event]:
        self.leases.sweep_if_due()
        if after_revision <= 0:
            raise Compacted(f"watch of {prefix}: the API keeps no history from revision {after_revision}")
        with self._lock:
            follower = self._followers.get(prefix)
            if follower is None or follower.mark != after_revision:
                if follower is not None:
                    follower.stop()
                follower = Follower(
                    self.api, resources_under(prefix), prefix, after_revision, self.watch_timeout_s
                )
                self._followers[prefix] = follower
        try:
            return follower.take(timeout_s)
        except DatastoreError:
            with self._lock:
                if self._followers.get(prefix) is follower:
                    del self._followers[prefix]
            raise

    # -- writes ------------------------------------------------------------------------------

    def create(self, key: str, value: dict[str, Any], lease: int = 0) -> int:
        self.leases.sweep_if_due()
        resource = resource_for(key)
        body = resource.body(key, value, lease)
        try:
            collection = resource.object_path(key).rsplit("/", 1)[0]  # the object's, namespace and all
            obj = self.api.call("POST", collection, body=body)
        except ApiFailure as err:
            if err.status.reason == "AlreadyExists":
                raise AlreadyExists(key) from err
            raise
        return self._written(key, resource, obj, lease)

    def update(self, key: str, value: dict[str, Any], mod_revision: int, lease: int = 0) -> int:
        self.leases.sweep_if_due()
        resource = resource_for(key)
        body = resource.body(key, value, lease, mod_revision)
        if mod_revision <= 0:
            # resourceVersion 0 would mean "unconditional" to the API server.
            raise Conflict(f"{key}: not at revision {mod_revision}")
        try:
            obj = self.api.call("PUT", resource.object_path(key), body=body)
        except ApiFailure as err:
            if err.status.code in (404, 409):
                raise Conflict(f"{key}: not at revision {mod_revision}") from err
            raise
        return self._written(key, resource, obj, lease)

    def _written(self, key: str, resource: Resource, obj: dict[str, Any], lease: int) -> int:
        written = revision(obj)
        self.leases.confirm(lease, key, resource, written)
        return written

    def put(self, key: str, value: dict[str, Any], lease: int = 0) -> int:
        for _ in range(PUT_ATTEMPTS):
            current = self.get(key)
            try:
                if current is None:
                    return self.create(key, value, lease)
                return self.update(key, value, current.mod_revision, lease)
            except (AlreadyExists, Conflict):
                continue
        raise Unavailable(f"{key}: others changed it during each of {PUT_ATTEMPTS} writes")

    def delete(self, key: str, mod_revision: int) -> None:
        self.leases.sweep_if_due()
        resource = resource_for(key)
        resource.check_writable(key)
        if mod_revision <= 0:
            raise Conflict(f"{key}: not at revision {mod_revision}")
        try:
            self.api.call("DELETE", resource.object_path(key), body=delete_options(mod_revision))
        except ApiFailure as err:
            if err.status.code in (404, 409):
                raise Conflict(f"{key}: not at revision {mod_revision}") from err
            raise

    # -- leases ------------------------------------------------------------------------------

    def grant_lease(self, ttl_s: int) -> int:
        self.leases.sweep_if_due()
        return self.leases.grant(ttl_s)

    def keepalive(self, lease: int) -> None:
        self.leases.sweep_if_due()
        self.leases.keepalive(lease)

    def revoke_lease(self, lease: int) -> None:
        self.leases.revoke(lease)

    def close(self) -> None:
        """Stop every watch (its streams shut down, its threads end) and release connections."""
        with self._lock:
            for follower in self._followers.values():
                follower.stop()
            self._followers.clear()
        self.api.close()
