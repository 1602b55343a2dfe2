"""The cluster of the upstream NetworkPolicy e2e suite, and two ways of asking it questions.

Namespaces x, y, z (labelled `ns=<name>`), pods a, b, c in each (labelled `pod=<name>`, every
pod declaring the named ports `serve-80-tcp`, `serve-80-udp`, `serve-81-tcp`, `serve-81-udp`
as upstream's pods do), spread over three nodes so that some pairs share a node and most do not.
Pod x/a has 10.244.1.10, x/b .11, x/c .12; y's pods are in 10.244.2.0/24, z's in 10.244.3.0/24.

`Cluster.allowed` asks the oracle; `Cluster.kernel_allowed` renders each node's table from the
same states and walks it with `nft_eval` along the path a packet takes (sending node, then
receiving node), so tests can demand that both agree.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from tests.unit.nft_eval import Packet, Ruleset
from trellis.calc.policy import PolicyInputs, read_policy_inputs
from trellis.calc.policy_oracle import PolicyOracle
from trellis.dataplane.render.nft import NatState, render_table
from trellis.model.ipam import Attachment
from trellis.model.k8s import (
    CLUSTER_NETWORK_POLICY_PREFIX,
    NAMESPACE_PREFIX,
    NETWORK_POLICY_PREFIX,
    NODE_PREFIX,
    POD_PREFIX,
    Protocol,
)
from trellis.model.naming import host_veth_name

NAMESPACES = ("x", "y", "z")
POD_NAMES = ("a", "b", "c")
PODS = tuple(f"{ns}/{name}" for ns in NAMESPACES for name in POD_NAMES)
NODES = ("node-1", "node-2", "node-3")
PORTS = ((80, Protocol.TCP), (81, Protocol.TCP), (80, Protocol.UDP), (81, Protocol.UDP))
"""What every truth table is checked on, as upstream probes."""
POOL = ipaddress.IPv4Network("10.244.0.0/16")
NAT = NatState(frozenset({POOL}), frozenset({POOL}))
TUNNEL = "trl.vxlan"
"""Where pod traffic between nodes leaves and arrives: a `trl` name that is not a pod's."""
UPLINK = "trl-eth0"
"""Where traffic to and from outside the cluster passes: the lab's uplink name."""
End = str | ipaddress.IPv4Address
"""A pod by key, or an address outside the pods."""
SERVE_PORTS = [
    {"name": f"serve-{port}-{protocol.lower()}", "containerPort": port, "protocol": protocol}
    for port in (80, 81)
    for protocol in ("TCP", "UDP")
]


def pod_ip(key: str) -> ipaddress.IPv4Address:
    namespace, name = key.split("/")
    return ipaddress.IPv4Address(f"10.244.{NAMESPACES.index(namespace) + 1}.{10 + POD_NAMES.index(name)}")


def pod_node(key: str) -> str:
    return NODES[PODS.index(key) % len(NODES)]


def node_ip(node: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(f"172.30.0.{11 + NODES.index(node)}")


def interface(key: str, ifname: str = "eth0") -> str:
    """The host interface of pod `key`'s attachment `ifname` (`net1`: a second network's)."""
    return host_veth_name(Attachment(f"container-{key.replace('/', '-')}", ifname))


def match(**labels: str) -> dict[str, Any]:
    return {"matchLabels": labels}


def expression(key: str, operator: str, *values: str) -> dict[str, Any]:
    return {"matchExpressions": [{"key": key, "operator": operator, "values": list(values)}]}


def namespace(name: str, **labels: str) -> dict[str, Any]:
    return {"kind": "Namespace", "metadata": {"name": name, "labels": {"ns": name, **labels}}}


def pod(
    key: str,
    labels: Mapping[str, str] | None = None,
    ports: list[dict[str, Any]] | None = None,
    ip: str | None = None,
) -> dict[str, Any]:
    """One of the nine pods (`ip` None: its own address), or another one with address `ip`, on node-1."""
    namespace_name, name = key.split("/")
    return {
        "kind": "Pod",
        "metadata": {"namespace": namespace_name, "name": name, "labels": dict(labels or {"pod": name})},
        "spec": {
            "nodeName": pod_node(key) if ip is None else NODES[0],
            "containers": [{"name": "c", "ports": SERVE_PORTS if ports is None else ports}],
        },
        "status": {"podIP": ip or str(pod_ip(key)), "phase": "Running"},
    }


def node(name: str, **labels: str) -> dict[str, Any]:
    return {
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **labels}},
        "status": {"addresses": [{"type": "InternalIP", "address": str(node_ip(name))}]},
    }


def network_policy(
    name: str,
    namespace: str = "x",
    pod_selector: dict[str, Any] | None = None,
    ingress: list[dict[str, Any]] | None = None,
    egress: list[dict[str, Any]] | None = None,
    types: list[str] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"podSelector": pod_selector or {}}
    for field, value in (("ingress", ingress), ("egress", egress), ("policyTypes", types)):
        if value is not None:
            spec[field] = value
    return {"kind": "NetworkPolicy", "metadata": {"namespace": namespace, "name": name}, "spec": spec}


def cluster_policy(
    name: str,
    tier: str,
    priority: int,
    subject: dict[str, Any],
    ingress: list[dict[str, Any]] | None = None,
    egress: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"tier": tier, "priority": priority, "subject": subject}
    for field, value in (("ingress", ingress), ("egress", egress)):
        if value is not None:
            spec[field] = value
    return {"kind": "ClusterNetworkPolicy", "metadata": {"name": name}, "spec": spec}


ALL_NAMESPACES: dict[str, Any] = {"namespaces": {}}
"""A ClusterNetworkPolicy subject or peer: every pod of every namespace."""
NS_X: dict[str, Any] = {"namespaces": match(ns="x")}
FROM_Y: dict[str, Any] = {"namespaces": match(ns="y")}


def admin(name: str, priority: int, subject: dict[str, Any], **rules: list[dict[str, Any]]) -> dict[str, Any]:
    return cluster_policy(name, "Admin", priority, subject, rules.get("ingress"), rules.get("egress"))


def baseline(
    name: str, priority: int, subject: dict[str, Any], **rules: list[dict[str, Any]]
) -> dict[str, Any]:
    return cluster_policy(name, "Baseline", priority, subject, rules.get("ingress"), rules.get("egress"))


def from_(action: str, *peers: dict[str, Any], name: str = "", **extra: Any) -> dict[str, Any]:
    """A ClusterNetworkPolicy ingress rule."""
    return {"action": action, "from": list(peers), **({"name": name} if name else {}), **extra}


def to(action: str, *peers: dict[str, Any], name: str = "", **extra: Any) -> dict[str, Any]:
    """A ClusterNetworkPolicy egress rule."""
    return {"action": action, "to": list(peers), **({"name": name} if name else {}), **extra}


_PREFIXES = {
    "Namespace": NAMESPACE_PREFIX,
    "Pod": POD_PREFIX,
    "Node": NODE_PREFIX,
    "NetworkPolicy": NETWORK_POLICY_PREFIX,
    "ClusterNetworkPolicy": CLUSTER_NETWORK_POLICY_PREFIX,
}


def datastore_key(obj: Mapping[str, Any]) -> str:
    meta = obj["metadata"]
    path = f"{meta['namespace']}/{meta['name']}" if "namespace" in meta else meta["name"]
    return _PREFIXES[obj["kind"]] + path


def base_objects() -> list[dict[str, Any]]:
    return [
        *(namespace(n) for n in NAMESPACES),
        *(pod(key) for key in PODS),
        *(node(n, zone=f"zone-{i % 2}") for i, n in enumerate(NODES)),
    ]


def inputs_of(*objects: Mapping[str, Any]) -> PolicyInputs:
    """The base cluster with `objects` added, or replacing the base object of the same key."""
    store = {datastore_key(obj): obj for obj in (*base_objects(), *objects)}
    inputs, errors = read_policy_inputs(store)
    assert not errors, errors
    return inputs


class Cluster:
    def __init__(self, *objects: Mapping[str, Any]) -> None:
        inputs = inputs_of(*objects)
        self.oracle = PolicyOracle(inputs, {key: interface(key) for key in inputs.pods})
        self.tables = {n: Ruleset.load(render_table(NAT, self.oracle.state(n))) for n in NODES}

    def allowed(self, src: End, dst: End, port: int, protocol: Protocol) -> bool:
        return self.oracle.evaluate(src, dst, port, protocol).allowed

    def _end(self, end: End) -> tuple[ipaddress.IPv4Address, str | None, str]:
        """(address, node, interface) of a pod; (address, None, the uplink) of an outside address."""
        if isinstance(end, ipaddress.IPv4Address):
            return end, None, UPLINK
        found = self.oracle.inputs.pods[end]
        assert found.ip is not None
        return found.ip, found.node, interface(end)

    def kernel_allowed(self, src: End, dst: End, port: int, protocol: Protocol) -> bool:
        """Whether the rendered tables of the nodes on the path forward the first packet."""
        return all(accepted for accepted, _ in self.kernel_hops(src, dst, port, protocol))

    def kernel_hops(self, src: End, dst: End, port: int, protocol: Protocol) -> list[tuple[bool, list[str]]]:
        """For each node whose forward hook the first packet crosses: whether it passes, and the
        comments of the rules whose verdicts it met. None at all to or from a pod's own node."""
        saddr, src_node, src_if = self._end(src)
        daddr, dst_node, dst_if = self._end(dst)
        if (src_node and daddr == node_ip(src_node)) or (dst_node and saddr == node_ip(dst_node)):
            return []  # input and output hooks: not filtered
        if src_node is not None and src_node == dst_node:
            hops = [(src_node, src_if, dst_if)]
        else:
            hops = []
            if src_node is not None:
                hops.append((src_node, src_if, dst_if if dst_node is None else TUNNEL))
            if dst_node is not None:
                hops.append((dst_node, src_if if src_node is None else TUNNEL, dst_if))
        return [
            self.tables[n].forward(Packet(iif, oif, saddr, daddr, protocol.number, port))
            for n, iif, oif in hops
        ]

    def matrix(self, port: int, protocol: Protocol) -> dict[tuple[str, str], bool]:
        return {(s, d): self.allowed(s, d, port, protocol) for s in PODS for d in PODS}

    def kernel_matrix(self, port: int, protocol: Protocol) -> dict[tuple[str, str], bool]:
        """As `matrix`, without a pod to itself (loopback never reaches the node)."""
        return {(s, d): self.kernel_allowed(s, d, port, protocol) for s in PODS for d in PODS if s != d}


def show(matrix: Mapping[tuple[str, str], bool], other: Mapping[tuple[str, str], bool]) -> str:
    """Rows of the first matrix where the second differs, `X` marking the differing cells."""
    lines = ["from \\ to " + " ".join(f"{d:>4}" for d in PODS)]
    for s in PODS:
        cells = []
        for d in PODS:
            if (s, d) not in matrix:
                cells.append("   -")
                continue
            mark = "." if matrix[(s, d)] else "x"
            cells.append(f"{mark if matrix[(s, d)] == other.get((s, d)) else 'X' + mark:>4}")
        lines.append(f"{s:>9} " + " ".join(cells))
    return "\n".join(lines)
