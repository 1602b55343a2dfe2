"""Where each datastore key lives in the Kubernetes API: one table, key prefix -> resource.

Why a table: the agent, IPAM and the calculation address everything by key
(`/trellis/ipam/blocks/10.244.1.0-26`, `/trellis/k8s/pods/demo/web`), and stay unchanged when
the keys are Kubernetes objects. Each prefix is one resource; the rest of the key is the
object's name (`<namespace>/<name>` for a namespaced resource).

Two kinds of resource:
- the cluster's (Nodes, Namespaces, Pods, NetworkPolicies, ClusterNetworkPolicies, and the
  BGP settings people apply): Trellis only reads them, and the value is the whole object as
  the API serves it (`model/k8s.py` and `model/bgp.py` parse exactly that shape);
- Trellis' own (node registrations and IPAM blocks, CRDs of `trellis.dev/v1`,
  `deploy/crds.yaml`): the agents write them, and the value is the object's `spec`, so that
  `model.ipam.Block.to_json()` round-trips. Trellis owns these objects whole: a write replaces
  labels and annotations too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trellis.datastore.base import DatastoreError
from trellis.model.bgp import CONFIGURATION_PREFIX, PEER_PREFIX
from trellis.model.ipam import BLOCK_PREFIX
from trellis.model.k8s import (
    CLUSTER_NETWORK_POLICY_PREFIX,
    NAMESPACE_PREFIX,
    NETWORK_POLICY_PREFIX,
    POD_PREFIX,
)
from trellis.model.k8s import NODE_PREFIX as KUBE_NODE_PREFIX
from trellis.model.node import NODE_PREFIX

GROUP = "trellis.dev"
API_VERSION = f"{GROUP}/v1"
LEASE_LABEL = f"{GROUP}/lease"
"""Label binding an object to a lease (its value: the lease ID); Trellis' Lease objects carry it too."""


@dataclass(frozen=True)
class Resource:
    """One Kubernetes resource and the datastore keys that map to its objects."""

    prefix: str
    """Key prefix: the key is `prefix + name`, or `prefix + namespace/name`."""
    api_version: str
    """`v1` for the core group, else `group/version`."""
    kind: str
    plural: str
    namespaced: bool = False
    trellis_owned: bool = False
    """Trellis writes these, and the value is the object's `spec`; the cluster's are read-only
    and the value is the whole object."""
    optional: bool = False
    """An API a cluster may not serve (a CRD of another project): absent, it reads as empty."""

    def collection_path(self) -> str:
        """The URL path of every object of the resource (in all namespaces)."""
        base = "api/v1" if self.api_version == "v1" else f"apis/{self.api_version}"
        return f"{base}/{self.plural}"

    def object_path(self, key: str) -> str:
        """The URL path of the object at `key`."""
        namespace, name = self.locate(key)
        base = self.collection_path().removesuffix(f"/{self.plural}")
        if namespace is None:
            return f"{base}/{self.plural}/{name}"
        return f"{base}/namespaces/{namespace}/{self.plural}/{name}"

    def locate(self, key: str) -> tuple[str | None, str]:
        """(namespace or None, name) of the object at `key`; DatastoreError when it names none."""
        parts = key.removeprefix(self.prefix).split("/")
        if len(parts) != (2 if self.namespaced else 1) or not all(parts):
            shape = "<namespace>/<name>" if self.namespaced else "<name>"
            raise DatastoreError(f"key {key}: a {self.kind} key is {self.prefix}{shape}")
        return (parts[0], parts[1]) if self.namespaced else (None, parts[0])

    def key(self, obj: dict[str, Any]) -> str:
        meta = obj["metadata"]
        return self.prefix + (f"{meta['namespace']}/{meta['name']}" if self.namespaced else meta["name"])

    def value(self, obj: dict[str, Any]) -> dict[str, Any]:
        """The datastore value of an object the API served (from a get, a list or a watch)."""
        if self.trellis_owned:
            spec: dict[str, Any] = obj.get("spec") or {}
            return spec
        # List items of built-in kinds come without apiVersion and kind; watch events carry them.
        return {**without_managed_fields(obj), "apiVersion": self.api_version, "kind": self.kind}

    def check_writable(self, key: str) -> None:
        """DatastoreError unless Trellis writes the objects of this resource."""
        if not self.trellis_owned:
            raise DatastoreError(
                f"key {key}: {self.kind} objects belong to the cluster; Trellis only reads them"
            )

    def body(self, key: str, value: dict[str, Any], lease: int, resource_version: int = 0) -> dict[str, Any]:
        """The object to send for `value` at `key` (Trellis' own resources only)."""
        self.check_writable(key)
        _, name = self.locate(key)
        meta: dict[str, Any] = {"name": name}
        if lease:
            meta["labels"] = {LEASE_LABEL: str(lease)}
        if resource_version:
            meta["resourceVersion"] = str(resource_version)
        return {"apiVersion": self.api_version, "kind": self.kind, "metadata": meta, "spec": value}


RESOURCES: tuple[Resource, ...] = (
    Resource(KUBE_NODE_PREFIX, "v1", "Node", "nodes"),
    Resource(NAMESPACE_PREFIX, "v1", "Namespace", "namespaces"),
    Resource(POD_PREFIX, "v1", "Pod", "pods", namespaced=True),
    Resource(
        NETWORK_POLICY_PREFIX, "networking.k8s.io/v1", "NetworkPolicy", "networkpolicies", namespaced=True
    ),
    Resource(
        CLUSTER_NETWORK_POLICY_PREFIX,
        "policy.networking.k8s.io/v1beta1",
        "ClusterNetworkPolicy",
        "clusternetworkpolicies",
        optional=True,
    ),
    Resource(NODE_PREFIX, API_VERSION, "TrellisNode", "trellisnodes", trellis_owned=True),
    Resource(BLOCK_PREFIX, API_VERSION, "IPAMBlock", "ipamblocks", trellis_owned=True),
    Resource(CONFIGURATION_PREFIX, API_VERSION, "BGPConfiguration", "bgpconfigurations"),
    Resource(PEER_PREFIX, API_VERSION, "BGPPeer", "bgppeers"),
)
"""Every key the Kubernetes datastore holds. No prefix is a prefix of another's."""
OWNED = tuple(r for r in RESOURCES if r.trellis_owned)


def resource_for(key: str) -> Resource:
    """The resource holding `key`; DatastoreError for a key outside the table."""
    for resource in RESOURCES:
        if key.startswith(resource.prefix):
            return resource
    known = ", ".join(r.prefix for r in RESOURCES)
    raise DatastoreError(f"key {key}: no Kubernetes resource holds it (known prefixes: {known})")


def resources_under(prefix: str) -> list[Resource]:
    """The resources whose objects may have keys starting with `prefix`."""
    found = [r for r in RESOURCES if r.prefix.startswith(prefix) or prefix.startswith(r.prefix)]
    if not found:
        known = ", ".join(r.prefix for r in RESOURCES)
        raise DatastoreError(f"prefix {prefix}: no Kubernetes resource holds keys under it (known: {known})")
    return found


def without_managed_fields(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` without `metadata.managedFields`: server-side apply's bookkeeping, often most of an
    object's size, which Trellis neither reads nor sends back."""
    meta = {k: v for k, v in obj["metadata"].items() if k != "managedFields"}
    return {**obj, "metadata": meta}


def revision(obj: dict[str, Any]) -> int:
    """The object's `metadata.resourceVersion` as the store revision it is.

    The API calls it opaque; every API server backed by etcd (all of them, in practice) serves
    etcd's revision, one counter for every resource, and this datastore relies on that.
    """
    text = obj.get("metadata", {}).get("resourceVersion", "")
    try:
        return int(text)
    except ValueError:
        raise DatastoreError(
            f"resourceVersion {text!r} of {obj.get('kind', 'an object')} is not an etcd revision"
        ) from None
