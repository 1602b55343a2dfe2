"""The Kubernetes objects of a lab, shaped as the API server returns them (pure).

Why the lab writes Kubernetes objects: the agents compute policy from the cluster's
Namespaces, Pods, Nodes and policies (`model/k8s.py`), and drop the traffic of a pod that
has no Pod object (fail closed). In a cluster the API server holds those objects; in a lab the
lab is that API server, so it stores them in the lab's datastore under `/trellis/k8s/`, in the
shape `kubectl get -o json` shows (only the fields Trellis reads, and a few that make them
recognisable).

The order follows Kubernetes: a Pod object exists, scheduled (`spec.nodeName`) but without an
address, before its sandbox's CNI ADD; the ADD's result becomes `status.podIP`; on deletion
CNI DEL runs first, then the object goes. A Node carries `kubernetes.io/hostname` and its
underlay address as InternalIP, so ClusterNetworkPolicy `nodes` peers select it.
"""

from __future__ import annotations

from typing import Any

from trellis.lab.manifest import NamespaceObject
from trellis.lab.state import LabState, Node, Pod
from trellis.model.k8s import NAMESPACE_PREFIX, NODE_PREFIX, POD_PREFIX

HOSTNAME_LABEL = "kubernetes.io/hostname"
OS_LABEL = "kubernetes.io/os"
CONTAINER = "main"
"""The one container of a lab pod: its server, listening on every port of the pod."""

KubeObject = tuple[str, dict[str, Any]]
"""An object and its datastore key: `dict(...)` of some is what `store.write` takes."""


def namespace_key(name: str) -> str:
    return NAMESPACE_PREFIX + name


def namespace_object(name: str, labels: dict[str, str]) -> KubeObject:
    """Namespace `name` with `labels` (and the name label the API server sets)."""
    effective = NamespaceObject(name, labels).effective_labels
    return namespace_key(name), {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": effective},
        "status": {"phase": "Active"},
    }


def node_key(name: str) -> str:
    return NODE_PREFIX + name


def node_object(node: Node) -> KubeObject:
    """The Node of a lab node: its hostname label and its underlay address as InternalIP."""
    return node_key(node.name), {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node.name, "labels": {HOSTNAME_LABEL: node.name, OS_LABEL: "linux"}},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": str(node.underlay.ip)},
                {"type": "Hostname", "address": node.name},
            ]
        },
    }


def pod_key(key: str) -> str:
    """`/trellis/k8s/pods/<namespace>/<name>` of pod `namespace/name`."""
    return POD_PREFIX + key


def pod_object(state: LabState, pod: Pod) -> KubeObject:
    """Pod `pod` as scheduled on its node; with `status.podIP` once its CNI ADD gave one."""
    status: dict[str, Any] = {"phase": "Pending"}
    if pod.ip is not None:
        host = str(state.node(pod.node).underlay.ip)
        status = {
            "phase": "Running",
            "hostIP": host,
            "hostIPs": [{"ip": host}],
            "podIP": str(pod.ip),
            "podIPs": [{"ip": str(pod.ip)}],
        }
    ports = [
        {**({"name": port.name} if port.name else {}), "containerPort": port.port, "protocol": port.protocol}
        for port in pod.ports
    ]
    return pod_key(pod.key), {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": pod.namespace, "name": pod.name, "uid": pod.uid, "labels": pod.labels},
        "spec": {"nodeName": pod.node, "containers": [{"name": CONTAINER, "ports": ports}]},
        "status": status,
    }
