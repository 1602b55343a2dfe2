"""The Kubernetes objects policy is computed from, parsed from the JSON the datastore holds.

Namespaces, pods, nodes, NetworkPolicy (`networking.k8s.io/v1`) and ClusterNetworkPolicy
(`policy.networking.k8s.io/v1beta1`, kubernetes-sigs/network-policy-api) become frozen values.
Every field is checked as the API server's validation would, because the datastore may hold
objects no API server has seen (the lab, a hand-written etcd key): a bad object raises
`InvalidObject`, one line naming the kind, the object and the field, and the caller skips it.

Both policy APIs are normalised to one vocabulary, so the calculation handles a single shape:
- a peer is `PodsPeer` (pods matching a selector in namespaces matching a selector, or in one
  namespace by name), `NetworksPeer` (CIDRs minus exceptions: ipBlock, networks), `NodesPeer`
  (node label selector), or `UnsupportedPeer` (domainNames, or a peer kind newer than this
  code: the API asks implementations to fail closed on those);
- a port is `PortRange` (protocol and an inclusive range; a single port is a range of one, a
  protocol without a port is 0-65535) or `NamedPort` (resolved against the destination pod);
- a rule is `PolicyRule`: an action, peers (None: any peer) and ports (None: any traffic).

Empty versus missing, as the API documents them:
- NetworkPolicy `spec.podSelector` missing or `{}`: every pod of the policy's namespace;
- `policyTypes` missing or empty: Ingress, plus Egress when `spec.egress` has at least one rule;
- a rule's `from`/`to` missing or empty: any peer, inside or outside the cluster; `ports`
  missing or empty: any port of any protocol;
- a peer with only `podSelector`: those pods of the policy's own namespace; only
  `namespaceSelector`: every pod of those namespaces; both: those pods of those namespaces;
  `{}` for either selects all; a peer with neither (nor ipBlock) is invalid;
- ClusterNetworkPolicy `namespaceSelector` of a `pods` subject or peer missing: all namespaces.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, NoReturn, TypeVar

from trellis.model.selector import EVERYTHING, LabelSelector

K8S_PREFIX = "/trellis/k8s/"
NAMESPACE_PREFIX = K8S_PREFIX + "namespaces/"
"""`/trellis/k8s/namespaces/<name>`"""
POD_PREFIX = K8S_PREFIX + "pods/"
"""`/trellis/k8s/pods/<namespace>/<name>`"""
NODE_PREFIX = K8S_PREFIX + "nodes/"
"""`/trellis/k8s/nodes/<name>`: the Kubernetes Node (labels, addresses), not Trellis' own registration."""
NETWORK_POLICY_PREFIX = K8S_PREFIX + "networkpolicies/"
"""`/trellis/k8s/networkpolicies/<namespace>/<name>`"""
CLUSTER_NETWORK_POLICY_PREFIX = K8S_PREFIX + "clusternetworkpolicies/"
"""`/trellis/k8s/clusternetworkpolicies/<name>`"""

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
"""The label the API server sets on every Namespace to its name."""
CNP_PRIORITY_MAX = 1000
CNP_MAX_ITEMS = 25
"""The most rules per direction, peers per rule, protocols per rule and networks per peer."""
CNP_RULE_NAME_MAX = 100
ANY_PORT = (0, 65535)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_SVC_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")
"""IANA_SVC_NAME, the syntax of port names: at most 15 of a-z, 0-9 and '-', a letter among them,
no '-' at either end or twice in a row."""
_E = TypeVar("_E", bound=StrEnum)
_T = TypeVar("_T")


class InvalidObject(ValueError):
    """An object the policy calculation cannot use; the message is one line naming it and the field."""


class Protocol(StrEnum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"

    @property
    def number(self) -> int:
        """The IP protocol number (what nftables matches; SCTP is a number even without the module)."""
        return _PROTOCOL_NUMBERS[self]


_PROTOCOL_NUMBERS = {Protocol.TCP: 6, Protocol.UDP: 17, Protocol.SCTP: 132}


class Direction(StrEnum):
    INGRESS = "Ingress"
    EGRESS = "Egress"


class ClusterTier(StrEnum):
    """`spec.tier` of a ClusterNetworkPolicy."""

    ADMIN = "Admin"
    BASELINE = "Baseline"


class Action(StrEnum):
    ACCEPT = "Accept"
    DENY = "Deny"
    PASS = "Pass"


def _labels(value: Mapping[str, str] | None = None) -> Mapping[str, str]:
    return MappingProxyType(dict(value or {}))


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=_labels)

    @property
    def key(self) -> str:
        return self.name


@dataclass(frozen=True, order=True)
class ContainerPort:
    name: str
    """Empty when the port has no name."""
    number: int
    protocol: Protocol = Protocol.TCP


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=_labels)
    node: str = ""
    """`spec.nodeName`; empty while unscheduled."""
    ip: ipaddress.IPv4Address | None = None
    """`status.podIP`; None until the pod has one."""
    ports: tuple[ContainerPort, ...] = ()
    """Every container's declared ports."""
    host_network: bool = False
    phase: str = "Running"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def networked(self) -> bool:
        """Has an address of its own that policy can select (host-network pods are outside policy)."""
        return self.ip is not None and not self.host_network and self.phase not in ("Succeeded", "Failed")


@dataclass(frozen=True)
class KubeNode:
    name: str
    labels: Mapping[str, str] = field(default_factory=_labels)
    addresses: tuple[ipaddress.IPv4Address, ...] = ()
    """The node's IPv4 addresses (`status.addresses`, InternalIP and ExternalIP)."""

    @property
    def key(self) -> str:
        return self.name


@dataclass(frozen=True)
class PodsPeer:
    """Pods matching `pods` in the namespaces `namespaces` selects, or in the one it names."""

    namespaces: LabelSelector | str
    pods: LabelSelector = EVERYTHING

    def selects(self, pod: Pod, namespace_labels: Mapping[str, str]) -> bool:
        return self.takes_namespace(pod.namespace, namespace_labels) and self.pods.matches(pod.labels)

    def takes_namespace(self, namespace: str, labels: Mapping[str, str]) -> bool:
        """Whether pods of namespace `namespace` (labelled `labels`) are in scope."""
        if isinstance(self.namespaces, str):
            return namespace == self.namespaces
        return self.namespaces.matches(labels)

    def __str__(self) -> str:
        if isinstance(self.namespaces, str):
            return f"pods {self.pods} in namespace {self.namespaces}"
        return f"pods {self.pods} in namespaces {self.namespaces}"


@dataclass(frozen=True)
class NetworksPeer:
    """Addresses in any of `include` and in none of `exclude` (ipBlock with except; networks)."""

    include: tuple[IPNetwork, ...]
    exclude: tuple[IPNetwork, ...] = ()

    def __str__(self) -> str:
        text = "networks " + ",".join(map(str, self.include))
        return text + " except " + ",".join(map(str, self.exclude)) if self.exclude else text


@dataclass(frozen=True)
class NodesPeer:
    """The addresses of the nodes whose labels `nodes` matches."""

    nodes: LabelSelector

    def __str__(self) -> str:
        return f"nodes {self.nodes}"


@dataclass(frozen=True)
class UnsupportedPeer:
    """A peer Trellis cannot match: domainNames, or a peer kind newer than this code.

    The API's rule for these is to fail closed: in an Accept rule the peer matches nothing; a
    Deny or Pass rule holding one denies all traffic.
    """

    kind: str

    def __str__(self) -> str:
        return f"unsupported peer {self.kind}"


Peer = PodsPeer | NetworksPeer | NodesPeer | UnsupportedPeer


@dataclass(frozen=True, order=True)
class PortRange:
    """Destination ports `first`..`last` (inclusive) of one protocol."""

    protocol: Protocol
    first: int = ANY_PORT[0]
    last: int = ANY_PORT[1]

    def __str__(self) -> str:
        if (self.first, self.last) == ANY_PORT:
            return str(self.protocol)
        ports = str(self.first) if self.first == self.last else f"{self.first}-{self.last}"
        return f"{self.protocol}/{ports}"


@dataclass(frozen=True, order=True)
class NamedPort:
    """A container port of the destination pod, by name; `protocol` None: any protocol (CNP)."""

    name: str
    protocol: Protocol | None = None

    def __str__(self) -> str:
        return f"{self.protocol}/{self.name}" if self.protocol else self.name


PortSpec = PortRange | NamedPort


@dataclass(frozen=True)
class PolicyRule:
    """One rule of either API: traffic with any of `peers` on any of `ports` gets `action`."""

    action: Action
    peers: tuple[Peer, ...] | None
    """None: any peer, inside or outside the cluster."""
    ports: tuple[PortSpec, ...] | None
    """None: any traffic, whatever the protocol (ICMP included)."""
    name: str = ""


class _Directions:
    """A policy's rules by direction."""

    ingress: tuple[PolicyRule, ...]
    egress: tuple[PolicyRule, ...]

    def rules(self, direction: Direction) -> tuple[PolicyRule, ...]:
        return self.ingress if direction is Direction.INGRESS else self.egress


@dataclass(frozen=True)
class NetworkPolicy(_Directions):
    namespace: str
    name: str
    pod_selector: LabelSelector
    policy_types: frozenset[Direction]
    ingress: tuple[PolicyRule, ...] = ()
    egress: tuple[PolicyRule, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def subject(self) -> PodsPeer:
        return PodsPeer(self.namespace, self.pod_selector)


@dataclass(frozen=True)
class ClusterNetworkPolicy(_Directions):
    name: str
    tier: ClusterTier
    priority: int
    subject: PodsPeer
    ingress: tuple[PolicyRule, ...] = ()
    egress: tuple[PolicyRule, ...] = ()

    @property
    def key(self) -> str:
        return self.name


class _FieldError(ValueError):
    """A field is wrong; `str()` is `path: cause`."""


@dataclass(frozen=True)
class _At:
    """A value in an object and its field path, for messages that name the field."""

    path: str
    value: Any

    def __getitem__(self, key: str) -> _At:
        inner = self.value.get(key) if isinstance(self.value, Mapping) else None
        return _At(f"{self.path}.{key}" if self.path else key, inner)

    @property
    def present(self) -> bool:
        return self.value is not None

    def fail(self, cause: str) -> NoReturn:
        raise _FieldError(f"{self.path}: {cause}")

    def keys(self) -> set[str]:
        """The fields set (not null) in this object."""
        return {k for k, v in self.mapping().items() if v is not None}

    def mapping(self) -> Mapping[str, Any]:
        if self.value is None:
            return {}
        if not isinstance(self.value, Mapping):
            self.fail("must be an object")
        return self.value

    def items(self, low: int = 0, high: int = 1 << 31) -> Iterator[_At]:
        """The elements of a list (missing: none), of which there must be `low`..`high`."""
        value = [] if self.value is None else self.value
        if not isinstance(value, list):
            self.fail("must be a list")
        if not low <= len(value) <= high:
            self.fail(f"must have {low} to {high} items, not {len(value)}")
        return (_At(f"{self.path}[{i}]", item) for i, item in enumerate(value))

    def string(self, default: str | None = None) -> str:
        if self.value is None and default is not None:
            return default
        if not isinstance(self.value, str) or not self.value:
            self.fail("must be a non-empty string")
        return self.value

    def integer(self, low: int, high: int) -> int:
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            self.fail("must be an integer")
        if not low <= self.value <= high:
            self.fail(f"{self.value} is not in {low}..{high}")
        return self.value

    def enum(self, kind: type[_E], default: _E | None = None) -> _E:
        if self.value is None and default is not None:
            return default
        try:
            return kind(self.value)
        except ValueError:
            self.fail(f"{self.value!r} is not one of {', '.join(kind)}")

    def labels(self) -> Mapping[str, str]:
        values = self.mapping()
        if not all(isinstance(k, str) and k and isinstance(v, str) for k, v in values.items()):
            self.fail("labels must map non-empty names to strings")
        return _labels(values)

    def selector(self) -> LabelSelector:
        try:
            return LabelSelector.from_json(self.mapping())
        except ValueError as err:
            raise _FieldError(f"{self.path}{err}") from None

    def network(self, strict: bool) -> IPNetwork:
        try:
            return ipaddress.ip_network(self.string(), strict=strict)
        except ValueError as err:
            self.fail(str(err))

    def port_name(self) -> str:
        name = self.string()
        if "--" in name or not _SVC_NAME.match(name):
            self.fail(f"{name!r} is not a valid port name (IANA_SVC_NAME)")
        return name

    def ipv4(self) -> ipaddress.IPv4Address:
        try:
            return ipaddress.IPv4Address(self.string())
        except ValueError as err:
            self.fail(str(err))


def _parse(kind: str, value: Any, body: Callable[[_At], _T]) -> _T:
    """Run `body(root)`, turning a field error into one `InvalidObject` line naming the object."""
    meta = value.get("metadata") if isinstance(value, Mapping) else None
    meta = meta if isinstance(meta, Mapping) else {}
    name = "/".join(str(meta[k]) for k in ("namespace", "name") if meta.get(k)) or "?"
    try:
        if not isinstance(value, Mapping):
            raise _FieldError("object: must be an object")
        return body(_At("", value))
    except _FieldError as err:
        raise InvalidObject(f"{kind} {name}: {err}") from None


def parse_namespace(value: Any) -> Namespace:
    def body(root: _At) -> Namespace:
        name = root["metadata"]["name"].string()
        return Namespace(name, _labels({NAMESPACE_NAME_LABEL: name, **root["metadata"]["labels"].labels()}))

    return _parse("Namespace", value, body)


def parse_pod(value: Any) -> Pod:
    def body(root: _At) -> Pod:
        spec, status = root["spec"], root["status"]
        host_network = spec["hostNetwork"].value
        if host_network is not None and not isinstance(host_network, bool):
            spec["hostNetwork"].fail("must be true or false")
        return Pod(
            namespace=root["metadata"]["namespace"].string(),
            name=root["metadata"]["name"].string(),
            labels=root["metadata"]["labels"].labels(),
            node=spec["nodeName"].string(default=""),
            ip=status["podIP"].ipv4() if status["podIP"].value else None,
            ports=tuple(
                _container_port(port)
                for container in spec["containers"].items()
                for port in container["ports"].items()
            ),
            host_network=bool(host_network),
            phase=status["phase"].string(default="Running"),
        )

    return _parse("Pod", value, body)


def _container_port(at: _At) -> ContainerPort:
    return ContainerPort(
        at["name"].port_name() if at["name"].value else "",
        at["containerPort"].integer(1, 65535),
        at["protocol"].enum(Protocol, Protocol.TCP),
    )


def parse_node(value: Any) -> KubeNode:
    def body(root: _At) -> KubeNode:
        addresses = []
        for address in root["status"]["addresses"].items():
            if address["type"].string(default="") in ("InternalIP", "ExternalIP"):
                ip = ipaddress.ip_address(address["address"].string())
                if isinstance(ip, ipaddress.IPv4Address):
                    addresses.append(ip)
        return KubeNode(
            root["metadata"]["name"].string(), root["metadata"]["labels"].labels(), tuple(addresses)
        )

    return _parse("Node", value, body)


def parse_network_policy(value: Any) -> NetworkPolicy:
    def body(root: _At) -> NetworkPolicy:
        namespace = root["metadata"]["namespace"].string()
        spec = root["spec"]
        if not spec.present:
            spec.fail("required")
        ingress = tuple(_np_rule(rule, "from", namespace) for rule in spec["ingress"].items())
        egress = tuple(_np_rule(rule, "to", namespace) for rule in spec["egress"].items())
        types = frozenset(t.enum(Direction) for t in spec["policyTypes"].items())
        if not types:
            types = frozenset({Direction.INGRESS, *([Direction.EGRESS] if egress else [])})
        return NetworkPolicy(
            namespace=namespace,
            name=root["metadata"]["name"].string(),
            pod_selector=spec["podSelector"].selector(),
            policy_types=types,
            ingress=ingress,
            egress=egress,
        )

    return _parse("NetworkPolicy", value, body)


def _np_rule(at: _At, peers_field: str, namespace: str) -> PolicyRule:
    peers = tuple(_np_peer(peer, namespace) for peer in at[peers_field].items())
    ports = tuple(_np_port(port) for port in at["ports"].items())
    return PolicyRule(Action.ACCEPT, peers or None, ports or None)


def _np_peer(at: _At, namespace: str) -> Peer:
    fields = at.keys() & {"podSelector", "namespaceSelector", "ipBlock"}
    if not fields:
        at.fail("must specify a peer (podSelector, namespaceSelector or ipBlock)")
    if "ipBlock" in fields:
        if len(fields) > 1:
            at.fail("may not specify both ipBlock and another peer")
        block = at["ipBlock"]
        cidr = block["cidr"].network(strict=False)
        excepts = []
        for where in block["except"].items():
            exception = where.network(strict=False)
            if exception == cidr or not _within(exception, cidr):
                where.fail(f"{exception} must be a strict subset of {cidr}")
            excepts.append(exception)
        return NetworksPeer((cidr,), tuple(excepts))
    pods = at["podSelector"].selector()
    if "namespaceSelector" in fields:
        return PodsPeer(at["namespaceSelector"].selector(), pods)
    return PodsPeer(namespace, pods)


def _within(inner: IPNetwork, outer: IPNetwork) -> bool:
    if isinstance(inner, ipaddress.IPv4Network) and isinstance(outer, ipaddress.IPv4Network):
        return inner.subnet_of(outer)
    if isinstance(inner, ipaddress.IPv6Network) and isinstance(outer, ipaddress.IPv6Network):
        return inner.subnet_of(outer)
    return False


def _np_port(at: _At) -> PortSpec:
    protocol = at["protocol"].enum(Protocol, Protocol.TCP)
    port, end = at["port"], at["endPort"]
    if isinstance(port.value, str):
        if end.present:
            end.fail("may not be used with a named port")
        return NamedPort(port.port_name(), protocol)
    if not port.present:
        if end.present:
            end.fail("may not be used without port")
        return PortRange(protocol)
    first = port.integer(1, 65535)
    return PortRange(protocol, first, end.integer(first, 65535) if end.present else first)


def parse_cluster_network_policy(value: Any) -> ClusterNetworkPolicy:
    def body(root: _At) -> ClusterNetworkPolicy:
        spec = root["spec"]
        return ClusterNetworkPolicy(
            name=root["metadata"]["name"].string(),
            tier=spec["tier"].enum(ClusterTier),
            priority=spec["priority"].integer(0, CNP_PRIORITY_MAX),
            subject=_cnp_pods(spec["subject"], {"namespaces", "pods"}),
            ingress=tuple(
                _cnp_rule(rule, Direction.INGRESS) for rule in spec["ingress"].items(0, CNP_MAX_ITEMS)
            ),
            egress=tuple(
                _cnp_rule(rule, Direction.EGRESS) for rule in spec["egress"].items(0, CNP_MAX_ITEMS)
            ),
        )

    return _parse("ClusterNetworkPolicy", value, body)


def _one_of(at: _At, allowed: set[str]) -> str | None:
    """The one field of `allowed` set in `at` (None: none of them is); more than one is invalid."""
    fields = at.keys() & allowed
    if len(fields) > 1:
        at.fail(f"exactly one of {', '.join(sorted(allowed))} may be set, not {', '.join(sorted(fields))}")
    return fields.pop() if fields else None


def _cnp_pods(at: _At, allowed: set[str]) -> PodsPeer:
    """A subject, or a `namespaces` or `pods` peer."""
    kind = _one_of(at, allowed)
    if kind is None:
        at.fail(f"one of {', '.join(sorted(allowed))} is required")
    if kind == "namespaces":
        return PodsPeer(at["namespaces"].selector())
    pods = at["pods"]
    if not pods["podSelector"].present:
        pods["podSelector"].fail("required")
    return PodsPeer(pods["namespaceSelector"].selector(), pods["podSelector"].selector())


_INGRESS_PEERS = {"namespaces", "pods"}
_DOMAIN_NAMES = UnsupportedPeer("domainNames")
_EGRESS_PEERS = {"namespaces", "pods", "nodes", "networks", "domainNames"}


def _cnp_rule(at: _At, direction: Direction) -> PolicyRule:
    name = at["name"].string(default="")
    if len(name) > CNP_RULE_NAME_MAX:
        at["name"].fail(f"longer than {CNP_RULE_NAME_MAX} characters")
    action = at["action"].enum(Action)
    peers_field = "from" if direction is Direction.INGRESS else "to"
    peers = tuple(_cnp_peer(peer, direction, action) for peer in at[peers_field].items(1, CNP_MAX_ITEMS))
    protocols = at["protocols"]
    ports = tuple(_cnp_port(p) for p in protocols.items(1, CNP_MAX_ITEMS)) if protocols.present else None
    named = ports and any(isinstance(p, NamedPort) for p in ports)
    if named and any(isinstance(p, NetworksPeer | NodesPeer) or p == _DOMAIN_NAMES for p in peers):
        protocols.fail("networks/nodes/domainNames peer cannot be set with destinationNamedPort")
    return PolicyRule(action, peers, ports, name)


def _cnp_peer(at: _At, direction: Direction, action: Action) -> Peer:
    kind = _one_of(at, _INGRESS_PEERS if direction is Direction.INGRESS else _EGRESS_PEERS)
    match kind:
        case "namespaces" | "pods":
            return _cnp_pods(at, {kind})
        case "nodes":
            return NodesPeer(at["nodes"].selector())
        case "networks":
            return NetworksPeer(tuple(n.network(strict=True) for n in at["networks"].items(1, CNP_MAX_ITEMS)))
        case "domainNames":
            if action is not Action.ACCEPT:
                at["domainNames"].fail("domainNames is only supported in Accept rules")
            return _DOMAIN_NAMES
        case _:
            return UnsupportedPeer("/".join(sorted(at.keys())) or "empty")


def _cnp_port(at: _At) -> PortSpec:
    kind = _one_of(at, {"tcp", "udp", "sctp", "destinationNamedPort"})
    if kind is None:
        at.fail("one of tcp, udp, sctp, destinationNamedPort is required")
    if kind == "destinationNamedPort":
        return NamedPort(at[kind].string())
    port = at[kind]["destinationPort"]
    if not port.present:
        port.fail("required")
    protocol = Protocol(kind.upper())
    match _one_of(port, {"number", "range"}):
        case "number":
            number = port["number"].integer(1, 65535)
            return PortRange(protocol, number, number)
        case "range":
            start = port["range"]["start"].integer(1, 65535)
            end = port["range"]["end"].integer(1, 65535)
            if not start < end:
                port["range"].fail(f"start {start} must be less than end {end}")
            return PortRange(protocol, start, end)
        case _:
            port.fail("one of number, range is required")
