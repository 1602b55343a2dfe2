"""A cluster that changes at random, as an agent on node-1 sees it: its datastore objects, its
attached endpoints, and the NAT state the agent derives from both.

For tests that hold the agent's memoised pipeline (`PolicyReader`, `PolicyCalculator`,
`TableRenderer`, `Table`) to what a fresh computation gives, change after change: pods come,
go, move address (often next to another pod's, so address intervals merge and split), change
labels, declare other named ports (or the same names on other numbers), finish and run again,
and are made again under the same name on another node; NetworkPolicies and
ClusterNetworkPolicies come, go and change; namespaces are relabelled; nodes join, leave and are
relabelled; endpoints attach before their pod object and detach, and a pod attaches a second
interface (a second network, or a stale sandbox's until CNI DEL).
"""

from __future__ import annotations

import ipaddress
import json
import random
from typing import Any

from tests.unit.policy_cluster import (
    NAMESPACES,
    NODES,
    PODS,
    POOL,
    SERVE_PORTS,
    base_objects,
    cluster_policy,
    datastore_key,
    expression,
    interface,
    match,
    namespace,
    network_policy,
    node,
    node_ip,
    pod,
    pod_node,
)
from trellis.dataplane.render.nft import NatState
from trellis.model.k8s import POD_PREFIX

POLICIES = [
    network_policy("deny", ingress=[]),
    network_policy(
        "web",
        pod_selector=match(pod="a"),
        ingress=[
            {
                "from": [{"podSelector": match(color="red")}, {"namespaceSelector": match(ns="y")}],
                "ports": [{"port": "serve-80-tcp"}, {"port": 8000, "endPort": 8080}, {"port": 81}],
            }
        ],
    ),
    network_policy(
        "out",
        namespace="y",
        pod_selector=expression("color", "Exists"),
        egress=[
            {
                "to": [{"namespaceSelector": {}, "podSelector": match(pod="b")}],
                "ports": [{"port": "serve-81-udp"}],
            },
            {"to": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.3.0/24"]}}]},
        ],
        types=["Egress"],
    ),
    network_policy("z-open", namespace="z", ingress=[{"from": [{"podSelector": {}}]}]),
]
CLUSTER_POLICIES = [
    cluster_policy(
        "guard",
        "Admin",
        5,
        {"namespaces": {}},
        ingress=[{"action": "Pass", "from": [{"namespaces": match(ns="x")}]}],
        egress=[
            {"action": "Deny", "to": [{"networks": ["169.254.169.254/32"]}]},
            {"action": "Accept", "to": [{"nodes": match(zone="zone-1")}]},
        ],
    ),
    cluster_policy(
        "floor",
        "Baseline",
        50,
        {"pods": {"namespaceSelector": {}, "podSelector": match(color="red")}},
        ingress=[{"action": "Deny", "from": [{"pods": {"namespaceSelector": {}, "podSelector": {}}}]}],
    ),
]
LABELS = [{"pod": "a"}, {"pod": "b"}, {"pod": "a", "color": "red"}, {"color": "blue"}]
OTHER_NUMBERS = [{**SERVE_PORTS[0], "containerPort": 8080}, {**SERVE_PORTS[3], "containerPort": 9081}]
"""Two of the named ports on other numbers."""
MOVES = [POOL.network_address + ns * 256 + last for ns in (1, 2, 3) for last in (9, 13, 14)]
"""Addresses a pod may move to: next to the nine pods' (.10-.12 of each namespace's /24)."""


class ChangingCluster:
    """The datastore's objects and node-1's attached endpoints, changed at random."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.objects = {datastore_key(obj): obj for obj in base_objects()}
        self.local = {interface(key): key for key in PODS if pod_node(key) == NODES[0]}
        """Host interface -> pod key, as the agent gives them to the calculator."""
        self._made = 0
        self._changes = [
            *(self._add_pod, self._add_pod, self._delete_pod, self._relabel_pod, self._move_pod),
            *(self._declare_ports, self._finish, self._reschedule),
            *(self._policy, self._policy, self._cluster_policy, self._namespace, self._node),
            *(self._attach_early, self._attach_second, self._detach),
        ]
        """Each kind of change as likely as it is listed (pods come more often than they go)."""

    def change(self) -> str:
        """Make one random change; what it was."""
        made = self.rng.choice(self._changes)
        made()
        return made.__name__.strip("_").replace("_", " ")

    def _pod(self) -> dict[str, Any] | None:
        """One of the pods, at random; None when there are none."""
        keys = sorted(key for key in self.objects if key.startswith(POD_PREFIX))
        return self.objects[self.rng.choice(keys)] if keys else None

    def _put(self, obj: dict[str, Any]) -> None:
        self.objects[datastore_key(obj)] = obj

    def _add_pod(self) -> None:
        self._made += 1
        ns = self.rng.choice(NAMESPACES)
        key = f"{ns}/p{self._made}"
        address = f"10.244.{NAMESPACES.index(ns) + 1}.{20 + self._made % 200}"
        ports = self.rng.choice([SERVE_PORTS, SERVE_PORTS[:1], []])
        made = pod(key, labels=self.rng.choice(LABELS), ports=ports, ip=address)
        made["spec"]["nodeName"] = self.rng.choice(NODES)
        self._put(made)
        if made["spec"]["nodeName"] == NODES[0]:
            self.local[interface(key)] = key

    def _delete_pod(self) -> None:
        if (obj := self._pod()) is not None:
            del self.objects[datastore_key(obj)]
            self.local.pop(interface(f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"), None)

    def _relabel_pod(self) -> None:
        if (obj := self._pod()) is not None:
            self._put({**obj, "metadata": {**obj["metadata"], "labels": self.rng.choice(LABELS)}})

    def _move_pod(self) -> None:
        if (obj := self._pod()) is not None:
            self._put({**obj, "status": {**obj["status"], "podIP": str(self.rng.choice(MOVES))}})

    def _declare_ports(self) -> None:
        if (obj := self._pod()) is not None:
            ports = self.rng.choice([SERVE_PORTS, SERVE_PORTS[2:], OTHER_NUMBERS, []])
            containers = [{**obj["spec"]["containers"][0], "ports": ports}]
            self._put({**obj, "spec": {**obj["spec"], "containers": containers}})

    def _finish(self) -> None:
        """A pod finishes (it keeps its address, but no policy selects it any more), or runs again."""
        if (obj := self._pod()) is not None:
            phase = "Running" if obj["status"]["phase"] == "Succeeded" else "Succeeded"
            self._put({**obj, "status": {**obj["status"], "phase": phase}})

    def _reschedule(self) -> None:
        """A pod made again under the same name on another node: it attaches there, not here."""
        if (obj := self._pod()) is not None:
            moved = self.rng.choice([n for n in NODES if n != obj["spec"]["nodeName"]])
            self._put({**obj, "spec": {**obj["spec"], "nodeName": moved}})
            key = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
            if moved == NODES[0]:
                self.local[interface(key)] = key
            else:
                self.local.pop(interface(key), None)

    def _policy(self) -> None:
        self._toggle(self.rng.choice(POLICIES))

    def _cluster_policy(self) -> None:
        self._toggle(self.rng.choice(CLUSTER_POLICIES))

    def _toggle(self, obj: dict[str, Any]) -> None:
        key = datastore_key(obj)
        if key not in self.objects:
            self.objects[key] = obj
        elif self.rng.random() < 0.5:
            del self.objects[key]
        else:  # edited: one more allowed port in each rule that lists ports
            spec = json.loads(json.dumps(obj["spec"]))
            for rule in (*spec.get("ingress", []), *spec.get("egress", [])):
                rule.setdefault("ports", []).append({"port": self.rng.randint(1000, 1010)})
            self.objects[key] = {**obj, "spec": spec}

    def _namespace(self) -> None:
        self._put(namespace(self.rng.choice(NAMESPACES), **self.rng.choice([{}, {"team": "t"}])))

    def _node(self) -> None:
        name = self.rng.choice(NODES[1:])
        key = datastore_key(node(name))
        if key in self.objects and self.rng.random() < 0.5:
            del self.objects[key]
        else:  # joins, or is relabelled
            self._put(node(name, zone=self.rng.choice(["zone-0", "zone-1"])))

    def _attach_early(self) -> None:
        """An endpoint whose pod object has not arrived: fail closed, no policy."""
        self._made += 1
        key = f"x/early{self._made}"
        self.local[interface(key)] = key

    def _attach_second(self) -> None:
        """A second interface of a pod of node-1: it gets the pod's policy as the first does."""
        if self.local:
            key = self.local[self.rng.choice(sorted(self.local))]
            self.local[interface(key, "net1")] = key

    def _detach(self) -> None:
        if self.local:
            del self.local[self.rng.choice(sorted(self.local))]

    def nat(self) -> NatState:
        """What the agent gives besides policy: pools, node addresses, local pods' sources."""
        nodes = {
            ipaddress.IPv4Network(node_ip(name))
            for name in NODES
            if datastore_key(node(name)) in self.objects
        }
        sources = set()
        for name, key in self.local.items():
            obj = self.objects.get(POD_PREFIX + key)
            if obj is not None:
                sources.add((name, ipaddress.IPv4Address(obj["status"]["podIP"])))
        return NatState(frozenset({POOL}), frozenset({POOL, *nodes}), frozenset(sources))
