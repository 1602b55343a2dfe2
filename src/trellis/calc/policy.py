"""What each local pod may send and receive: per-endpoint policy programs for one node (pure).

Input: the cluster's namespaces, pods, nodes, NetworkPolicies and ClusterNetworkPolicies, and the
interfaces attached on this node (host interface -> pod key, from the agent's IPAM; one pod may
have several: a second network, or a stale sandbox's until CNI DEL, each gets the pod's
programs). Output: a frozen
`PolicyState`, the one description both the nftables renderer and the oracle read, so what the
oracle answers is what the kernel is told.

Each endpoint gets two programs, ingress and egress, each an ordered tuple of tiers, as the
network-policy-api defines them (`apis/v1beta1/clusternetworkpolicy_types.go`):
1. Admin: the rules of every Admin ClusterNetworkPolicy whose subject holds the pod, by
   priority (lower first; equal priorities by name, so the order is stable) then as written.
   Accept allows this direction, Deny drops, Pass skips to the next tier; no match: next tier.
2. NetworkPolicy, when at least one NetworkPolicy selects the pod for this direction (the pod
   is isolated): the union of their rules, all allowing; no match: deny.
3. Baseline, only when no NetworkPolicy selects the pod for this direction: the Baseline
   ClusterNetworkPolicies, as the Admin tier; no match: allow.
Falling off the last tier allows (Kubernetes' default). An empty program means unrestricted.
Directions are independent: an egress Accept leaves the destination's ingress to decide.

Peers become named address sets, one per distinct peer (selector pair, networks, node
selector), shared by every rule that names it, so a lookup stays one set match however many
policies there are. Ports are numbers or ranges; a named port resolves on the destination
pod: for ingress that is the endpoint itself (numbers), for egress it is the peer, whose
numbers may differ pod by pod, so it becomes a set of (address, protocol, port) per port name.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from trellis.model.k8s import (
    CLUSTER_NETWORK_POLICY_PREFIX,
    K8S_PREFIX,
    NAMESPACE_NAME_LABEL,
    NAMESPACE_PREFIX,
    NETWORK_POLICY_PREFIX,
    NODE_PREFIX,
    POD_PREFIX,
    Action,
    ClusterNetworkPolicy,
    ClusterTier,
    ContainerPort,
    Direction,
    InvalidObject,
    KubeNode,
    Namespace,
    NetworkPolicy,
    NetworksPeer,
    NodesPeer,
    Pod,
    PodsPeer,
    PolicyRule,
    PortRange,
    PortSpec,
    Protocol,
    UnsupportedPeer,
    parse_cluster_network_policy,
    parse_namespace,
    parse_network_policy,
    parse_node,
    parse_pod,
)
from trellis.model.selector import LabelSelector


def _frozen(value: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return MappingProxyType(dict(value or {}))


@dataclass(frozen=True)
class PolicyInputs:
    """The Kubernetes objects policy depends on, each by its key (`ns/name`, or name)."""

    namespaces: Mapping[str, Namespace] = field(default_factory=_frozen)
    pods: Mapping[str, Pod] = field(default_factory=_frozen)
    nodes: Mapping[str, KubeNode] = field(default_factory=_frozen)
    network_policies: Mapping[str, NetworkPolicy] = field(default_factory=_frozen)
    cluster_network_policies: Mapping[str, ClusterNetworkPolicy] = field(default_factory=_frozen)


_PARSERS: tuple[tuple[str, str, Callable[[Any], Any]], ...] = (
    (NAMESPACE_PREFIX, "namespaces", parse_namespace),
    (POD_PREFIX, "pods", parse_pod),
    (NODE_PREFIX, "nodes", parse_node),
    (NETWORK_POLICY_PREFIX, "network_policies", parse_network_policy),
    (CLUSTER_NETWORK_POLICY_PREFIX, "cluster_network_policies", parse_cluster_network_policy),
)


@dataclass(frozen=True)
class _Read:
    """One datastore object as last read: its stored value, and what it parsed to."""

    value: Any
    attribute: str
    """The `PolicyInputs` field it belongs to."""
    parsed: Any
    """The parsed object, or the `InvalidObject` error."""


def _read(key: str, value: Any) -> _Read | None:
    """Parse one object, or None when policy does not read its kind."""
    for prefix, attribute, parse in _PARSERS:
        if key.startswith(prefix):
            try:
                return _Read(value, attribute, parse(value))
            except InvalidObject as err:
                return _Read(value, attribute, err)
    return None


class PolicyReader:
    """`read_policy_inputs` with memory, for an agent that reads after every change.

    An object whose stored value is the one read last time (the same Python object, or an equal
    one) is not parsed again, and one that parses to what it parsed to before keeps the old
    parsed object: what policy reads of a pod is its labels, address, ports, node and phase, not
    its resourceVersion or annotations. So unchanged objects stay the very same Python objects from
    one read to the next, and when no object changed in what policy reads, the very same
    `PolicyInputs` comes back: `PolicyCalculator` then skips by identity.
    """

    def __init__(self) -> None:
        self._read: dict[str, _Read] = {}
        """Datastore key -> the object as last read."""
        self._result: tuple[PolicyInputs, tuple[str, ...]] = (PolicyInputs(), ())

    def read(self, objects: Mapping[str, Any]) -> tuple[PolicyInputs, tuple[str, ...]]:
        """The inputs from datastore objects by key, and one line per invalid object (skipped)."""
        read: dict[str, _Read] = {}
        changed = False
        for key, value in objects.items():
            if not key.startswith(K8S_PREFIX):
                continue
            before = self._read.get(key)
            if before is not None and (before.value is value or before.value == value):
                read[key] = before
                continue
            now = _read(key, value)
            if now is None:
                continue
            if before is not None and before.parsed == now.parsed:
                now = _Read(value, now.attribute, before.parsed)
            else:
                changed = True
            read[key] = now
        changed = changed or len(read) != len(self._read)  # equal lengths: nothing was removed
        self._read = read
        if changed:
            self._result = _inputs_of(read)
        return self._result


def _inputs_of(read: Mapping[str, _Read]) -> tuple[PolicyInputs, tuple[str, ...]]:
    found: dict[str, dict[str, Any]] = {attribute: {} for _, attribute, _ in _PARSERS}
    errors: list[str] = []
    for key in sorted(read):
        parsed = read[key].parsed
        if isinstance(parsed, InvalidObject):
            errors.append(f"{key}: {parsed}")
        else:
            found[read[key].attribute][parsed.key] = parsed
    inputs = PolicyInputs(**{attribute: _frozen(values) for attribute, values in found.items()})
    return inputs, tuple(errors)


def read_policy_inputs(objects: Mapping[str, Any]) -> tuple[PolicyInputs, tuple[str, ...]]:
    """The inputs from datastore objects by key, and one line per invalid object (skipped)."""
    return PolicyReader().read(objects)


class TierKind(StrEnum):
    ADMIN = "admin"
    NETWORK_POLICY = "networkpolicy"
    BASELINE = "baseline"


class Outcome(StrEnum):
    """Where a tier sends traffic no rule of it matched."""

    NEXT = "next tier"
    DENY = "deny"
    ALLOW = "allow"


_TIER_DEFAULTS = {
    TierKind.ADMIN: Outcome.NEXT,
    TierKind.NETWORK_POLICY: Outcome.DENY,
    TierKind.BASELINE: Outcome.ALLOW,
}


@dataclass(frozen=True)
class RuleOrigin:
    """Where a rule comes from: the words of nftables comments and of `explain`."""

    tier: TierKind
    policy: str
    """ClusterNetworkPolicy name, or NetworkPolicy `namespace/name`."""
    direction: Direction
    index: int
    """Position in the policy's ingress or egress list."""
    name: str = ""

    @property
    def rule(self) -> str:
        label = f"{self.direction.lower()}[{self.index}]"
        return f"{label} {self.name}" if self.name else label

    def __str__(self) -> str:
        return f"{self.tier} {self.policy} {self.rule}"


@dataclass(frozen=True, order=True)
class NamedPortMatch:
    """The destination's (address, protocol, port) is in port set `port_set`, with `protocol` if set."""

    port_set: str
    protocol: Protocol | None


@dataclass(frozen=True)
class PortMatch:
    """Any of `ranges`, or any of `named`: a rule with neither matches nothing and is left out."""

    ranges: tuple[PortRange, ...] = ()
    named: tuple[NamedPortMatch, ...] = ()


@dataclass(frozen=True)
class Rule:
    action: Action
    """Accept allows the direction, Deny drops, Pass goes to the next tier (NetworkPolicy: Accept)."""
    peers: tuple[str, ...] | None
    """Names of address sets, of which the peer's address must be in one; None: any peer."""
    ports: PortMatch | None
    """None: any traffic of any protocol."""
    origin: RuleOrigin


@dataclass(frozen=True)
class Tier:
    kind: TierKind
    rules: tuple[Rule, ...]
    policies: tuple[str, ...]
    """The policies that put rules here; for the NetworkPolicy tier, those isolating the pod."""

    @property
    def default(self) -> Outcome:
        return _TIER_DEFAULTS[self.kind]

    @property
    def default_reason(self) -> tuple[str, str]:
        """(policy, rule) to name when no rule of the tier matched."""
        if self.kind is TierKind.NETWORK_POLICY:
            return ",".join(self.policies), "default deny"
        return "", "no rule matched"

    @property
    def default_description(self) -> str:
        """`networkpolicy x/a,x/b default deny`, `admin no rule matched`."""
        return " ".join(part for part in (self.kind, *self.default_reason) if part)


@dataclass(frozen=True)
class EndpointPolicy:
    pod: str
    ingress: tuple[Tier, ...]
    """Checked at this pod's interface for traffic to it; empty: unrestricted."""
    egress: tuple[Tier, ...]
    """Checked at this pod's interface for traffic from it; empty: unrestricted."""

    def tiers(self, direction: Direction) -> tuple[Tier, ...]:
        return self.ingress if direction is Direction.INGRESS else self.egress


@dataclass(frozen=True)
class AddressSet:
    name: str
    peer: str
    """What it holds, in words (`pods app=db in namespaces team=a`)."""
    networks: tuple[ipaddress.IPv4Network, ...]
    """Sorted, non-overlapping."""

    def __contains__(self, address: object) -> bool:
        return isinstance(address, ipaddress.IPv4Address) and any(address in n for n in self.networks)


@dataclass(frozen=True)
class PortSet:
    name: str
    port: str
    """The container port name."""
    elements: tuple[tuple[ipaddress.IPv4Address, Protocol, int], ...]
    """(pod address, protocol, number) of every pod declaring a port of that name, sorted."""


@dataclass(frozen=True)
class PolicyState:
    endpoints: Mapping[str, EndpointPolicy]
    """By host interface name: every local pod whose policy is known (others are dropped)."""
    address_sets: Mapping[str, AddressSet]
    port_sets: Mapping[str, PortSet]
    problems: tuple[str, ...]
    """Local endpoints that could not be given a policy, each with the reason."""


def digest(words: str) -> str:
    """The suffix of a named set's name: 16 hex digits of the SHA-256 of what it holds, in words."""
    return hashlib.sha256(words.encode()).hexdigest()[:16]


def _subtract(
    include: Iterable[ipaddress.IPv4Network], exclude: Iterable[ipaddress.IPv4Network]
) -> list[ipaddress.IPv4Network]:
    kept = list(ipaddress.collapse_addresses(include))
    for hole in exclude:
        remaining: list[ipaddress.IPv4Network] = []
        for net in kept:
            if net.subnet_of(hole):
                continue
            remaining.extend(net.address_exclude(hole) if hole.subnet_of(net) else [net])
        kept = remaining
    return sorted(ipaddress.collapse_addresses(kept))


def _v4(networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> list[ipaddress.IPv4Network]:
    """The IPv4 ones: pods are IPv4 only, so IPv6 peers can match nothing."""
    return [n for n in networks if isinstance(n, ipaddress.IPv4Network)]


Peer = PodsPeer | NetworksPeer | NodesPeer
"""A peer that becomes an address set."""
_MANY_PODS = 64
"""More changed pods than this at once (a new snapshot): every pod set is made again, instead of
checking each against every changed pod."""


@dataclass(frozen=True)
class _Changes:
    """What differs between two `PolicyInputs`, by key."""

    namespaces: frozenset[str]
    pods: frozenset[str]
    nodes: frozenset[str]
    network_policies: frozenset[str]
    cluster_network_policies: frozenset[str]

    @classmethod
    def between(cls, before: PolicyInputs, after: PolicyInputs) -> _Changes:
        return cls(
            _changed(before.namespaces, after.namespaces),
            _changed(before.pods, after.pods),
            _changed(before.nodes, after.nodes),
            _changed(before.network_policies, after.network_policies),
            _changed(before.cluster_network_policies, after.cluster_network_policies),
        )

    @property
    def policies(self) -> frozenset[str]:
        """Keys of the changed policies of both kinds (a NetworkPolicy's has a `/`, a
        ClusterNetworkPolicy's cannot)."""
        return self.network_policies | self.cluster_network_policies


def _changed(before: Mapping[str, object], after: Mapping[str, object]) -> frozenset[str]:
    """Keys added, removed, or whose object differs (the same object: unchanged, cheaply)."""
    if before is after:
        return frozenset()
    return frozenset(
        [key for key, now in after.items() if (then := before.get(key)) is not now and then != now]
        + [key for key in before if key not in after]
    )


class _Sets:
    """The address and port sets of a node's state: names, and contents made when first needed.

    A set's name is a function of what it holds in words (the peer, the port name), so a rule
    names its sets without making them. Contents are made from the current pods, namespaces and
    nodes, and kept from one state to the next until a change can alter them: a pod set until a
    pod it selects, before or after the change, changes (or any namespace does), a node set until
    a node does, a port set until a pod declaring that port name does; networks never change.

    Pods are indexed by namespace, and which namespaces a selector takes is worked out once per
    selector, so making a set looks only at the pods it can hold (not every pod of the cluster).
    """

    def __init__(self) -> None:
        self._inputs = PolicyInputs()
        self._pods: list[Pod] = []
        """Pods with an address of their own, by key."""
        self._by_namespace: dict[str, list[Pod]] = {}
        self._hosts: dict[ipaddress.IPv4Address, ipaddress.IPv4Network] = {}
        self._scopes: dict[LabelSelector | str, list[str]] = {}
        self._names: dict[Peer, str] = {}
        self._peers: dict[str, Peer] = {}
        self._addresses: dict[str, AddressSet] = {}
        self._ports: dict[str, PortSet] = {}

    def update(self, inputs: PolicyInputs, changes: _Changes) -> None:
        """Take new inputs, forgetting the contents they may alter."""
        before, self._inputs = self._inputs, inputs
        if changes.pods or changes.namespaces:
            self._index()
        if changes.nodes:
            self._forget(lambda peer: isinstance(peer, NodesPeer))
        many = len(changes.pods) > _MANY_PODS
        versions = [
            pod
            for key in ([] if many else changes.pods)
            for pod in (before.pods.get(key), inputs.pods.get(key))
            if pod is not None and pod.networked
        ]
        everywhere = many or bool(changes.namespaces)
        self._forget(
            lambda peer: (
                isinstance(peer, PodsPeer)
                and (everywhere or any(self.selects(peer, pod) for pod in versions))
            )
        )
        stale = {f"port_{port.name}" for pod in versions for port in pod.ports}
        self._ports = {} if many else {name: s for name, s in self._ports.items() if name not in stale}

    def _index(self) -> None:
        self._pods = sorted((p for p in self._inputs.pods.values() if p.networked), key=lambda p: p.key)
        hosts = self._hosts
        self._hosts = {}
        self._by_namespace = {}
        for pod in self._pods:
            assert pod.ip is not None  # networked
            self._hosts[pod.ip] = hosts.get(pod.ip) or ipaddress.IPv4Network(pod.ip)
            self._by_namespace.setdefault(pod.namespace, []).append(pod)
        self._scopes = {}

    def _forget(self, stale: Callable[[Peer], bool]) -> None:
        self._addresses = {name: s for name, s in self._addresses.items() if not stale(self._peers[name])}

    def namespace_labels(self, namespace: str) -> Mapping[str, str]:
        found = self._inputs.namespaces.get(namespace)
        return found.labels if found else {NAMESPACE_NAME_LABEL: namespace}

    def selects(self, peer: PodsPeer, pod: Pod) -> bool:
        return peer.selects(pod, self.namespace_labels(pod.namespace))

    def _selected_hosts(self, peer: PodsPeer) -> list[ipaddress.IPv4Network]:
        """The addresses of the pods `peer` selects: its namespaces' pods (those worked out once per
        namespace selector), then their labels."""
        namespaces = self._scopes.get(peer.namespaces)
        if namespaces is None:
            namespaces = [
                name for name in self._by_namespace if peer.takes_namespace(name, self.namespace_labels(name))
            ]
            self._scopes[peer.namespaces] = namespaces
        return [
            self._hosts[pod.ip]
            for name in namespaces
            for pod in self._by_namespace[name]
            if pod.ip is not None and peer.pods.matches(pod.labels)
        ]

    def address_set(self, peer: Peer) -> str:
        """The name of the set of `peer`'s addresses."""
        name = self._names.get(peer)
        if name is None:
            kind = {PodsPeer: "pods", NetworksPeer: "nets", NodesPeer: "nodes"}[type(peer)]
            name = self._names[peer] = f"{kind}_{digest(str(peer))}"
            self._peers.setdefault(name, peer)
        return name

    def port_set(self, port_name: str) -> str:
        """The name of the set of (address, protocol, number) of the pods declaring `port_name`."""
        return f"port_{port_name}"

    def made(
        self, addresses: Iterable[str], ports: Iterable[str]
    ) -> tuple[Mapping[str, AddressSet], Mapping[str, PortSet]]:
        """The contents of the sets named, by name; the others are forgotten."""
        made = {name: self._addresses.get(name) or self._address_set(name) for name in sorted(addresses)}
        made_ports = {name: self._ports.get(name) or self._port_set(name) for name in sorted(ports)}
        self._addresses, self._ports = dict(made), dict(made_ports)
        self._peers = {name: self._peers[name] for name in made}
        self._names = {peer: name for name, peer in self._peers.items()}
        return _frozen(made), _frozen(made_ports)

    def _address_set(self, name: str) -> AddressSet:
        peer = self._peers[name]
        match peer:
            case PodsPeer():
                hosts = self._selected_hosts(peer)
            case NodesPeer():
                hosts = [
                    ipaddress.IPv4Network(address)
                    for node in self._inputs.nodes.values()
                    if peer.nodes.matches(node.labels)
                    for address in node.addresses
                ]
            case NetworksPeer():
                return AddressSet(name, str(peer), tuple(_subtract(_v4(peer.include), _v4(peer.exclude))))
        return AddressSet(name, str(peer), tuple(sorted(ipaddress.collapse_addresses(hosts))))

    def _port_set(self, name: str) -> PortSet:
        port_name = name.removeprefix("port_")
        elements = sorted(
            (p.ip, c.protocol, c.number) for p in self._pods if p.ip for c in p.ports if c.name == port_name
        )
        return PortSet(name, port_name, tuple(elements))


def _merged(ranges: Iterable[PortRange]) -> tuple[PortRange, ...]:
    """Overlapping or adjacent ranges of a protocol as one: nftables refuses overlapping intervals."""
    out: list[PortRange] = []
    for r in sorted(ranges):
        if out and out[-1].protocol == r.protocol and r.first <= out[-1].last + 1:
            out[-1] = PortRange(r.protocol, out[-1].first, max(out[-1].last, r.last))
        else:
            out.append(r)
    return tuple(out)


def _ports(sets: _Sets, specs: tuple[PortSpec, ...], direction: Direction, pod: Pod) -> PortMatch:
    ranges: set[PortRange] = set()
    named: set[NamedPortMatch] = set()
    for spec in specs:
        if isinstance(spec, PortRange):
            ranges.add(spec)
        elif direction is Direction.INGRESS:  # the destination is this endpoint: its own numbers
            ranges.update(
                PortRange(c.protocol, c.number, c.number)
                for c in pod.ports
                if c.name == spec.name and spec.protocol in (None, c.protocol)
            )
        else:
            named.add(NamedPortMatch(sets.port_set(spec.name), spec.protocol))
    return PortMatch(_merged(ranges), tuple(sorted(named)))


def _rule(sets: _Sets, rule: PolicyRule, origin: RuleOrigin, pod: Pod) -> Rule | None:
    """The rule for this endpoint, or None when it can match nothing."""
    peers: tuple[str, ...] | None = None
    if rule.peers is not None:
        if rule.action is not Action.ACCEPT and any(isinstance(p, UnsupportedPeer) for p in rule.peers):
            return Rule(Action.DENY, None, None, origin)  # the API's fail closed for Deny and Pass
        supported = [p for p in rule.peers if not isinstance(p, UnsupportedPeer)]
        peers = tuple(dict.fromkeys(sets.address_set(p) for p in supported))
        if not peers:
            return None
    ports = None if rule.ports is None else _ports(sets, rule.ports, origin.direction, pod)
    if ports is not None and not ports.ranges and not ports.named:
        return None
    return Rule(rule.action, peers, ports, origin)


def _tier(
    sets: _Sets,
    kind: TierKind,
    policies: Iterable[NetworkPolicy | ClusterNetworkPolicy],
    direction: Direction,
    pod: Pod,
) -> Tier:
    rules: list[Rule] = []
    keys: list[str] = []
    for policy in policies:
        keys.append(policy.key)
        for index, rule in enumerate(policy.rules(direction)):
            made = _rule(sets, rule, RuleOrigin(kind, policy.key, direction, index, rule.name), pod)
            if made is not None:
                rules.append(made)
    return Tier(kind, tuple(rules), tuple(keys))


_TierKey = tuple[TierKind, Direction, tuple[str, ...], tuple[ContainerPort, ...]]
"""What a tier is made of: its kind, direction, policies (by key) and, for ingress, the pod's ports."""


class _Programs:
    """Each local pod's program per direction, every tier made once and shared by the pods it fits.

    A tier depends on the pod only through the policies that select it and, for ingress, the
    pod's own named ports: replicas of one workload get the very same `Tier`. NetworkPolicies are
    indexed by namespace, since one selects pods of its own namespace only.

    Both are kept from one state to the next: a tier until one of its policies changes; a pod's
    programs until the pod changes, or a NetworkPolicy of its namespace, or any
    ClusterNetworkPolicy or namespace does.
    """

    def __init__(self, sets: _Sets) -> None:
        self.sets = sets
        self._cluster: dict[ClusterTier, list[ClusterNetworkPolicy]] = {tier: [] for tier in ClusterTier}
        self._namespaced: dict[str, list[NetworkPolicy]] = {}
        self._tiers: dict[_TierKey, Tier] = {}
        self._programs: dict[str, tuple[Pod, tuple[Tier, ...], tuple[Tier, ...]]] = {}
        """Pod key -> (the pod, its ingress program, its egress program)."""

    def update(self, inputs: PolicyInputs, changes: _Changes) -> None:
        """Take new inputs, forgetting the tiers and programs they may alter."""
        if changes.cluster_network_policies:
            self._cluster = {tier: [] for tier in ClusterTier}
            for cluster_policy in sorted(
                inputs.cluster_network_policies.values(), key=lambda c: (c.priority, c.name)
            ):
                self._cluster[cluster_policy.tier].append(cluster_policy)
        if changes.network_policies:
            self._namespaced = {}
            for _, policy in sorted(inputs.network_policies.items()):
                self._namespaced.setdefault(policy.namespace, []).append(policy)
        if stale := changes.policies:
            self._tiers = {key: tier for key, tier in self._tiers.items() if stale.isdisjoint(key[2])}
        if changes.namespaces or changes.cluster_network_policies:
            self._programs = {}
        elif changes.network_policies:
            namespaces = {key.partition("/")[0] for key in changes.network_policies}
            self._programs = {
                key: kept for key, kept in self._programs.items() if kept[0].namespace not in namespaces
            }

    def programs(self, pod: Pod) -> tuple[tuple[Tier, ...], tuple[Tier, ...]]:
        """The pod's (ingress, egress) programs."""
        kept = self._programs.get(pod.key)
        if kept is not None and (kept[0] is pod or kept[0] == pod):
            return kept[1], kept[2]
        ingress, egress = self._program(pod, Direction.INGRESS), self._program(pod, Direction.EGRESS)
        self._programs[pod.key] = (pod, ingress, egress)
        return ingress, egress

    def keep_only(self, pods: Iterable[str]) -> list[Tier]:
        """Forget every pod's programs but those of `pods`, and every tier they do not use; the tiers
        they use."""
        self._programs = {key: self._programs[key] for key in pods if key in self._programs}
        used = {id(tier): tier for _, *programs in self._programs.values() for p in programs for tier in p}
        self._tiers = {key: tier for key, tier in self._tiers.items() if id(tier) in used}
        return list(used.values())

    def _tier(
        self,
        kind: TierKind,
        policies: list[NetworkPolicy] | list[ClusterNetworkPolicy],
        direction: Direction,
        pod: Pod,
    ) -> Tier:
        ports = pod.ports if direction is Direction.INGRESS else ()
        key = (kind, direction, tuple(policy.key for policy in policies), ports)
        found = self._tiers.get(key)
        if found is None:
            found = self._tiers[key] = _tier(self.sets, kind, policies, direction, pod)
        return found

    def _cluster_tier(self, tier: ClusterTier, kind: TierKind, pod: Pod, direction: Direction) -> Tier:
        chosen = [c for c in self._cluster[tier] if c.rules(direction) and self.sets.selects(c.subject, pod)]
        return self._tier(kind, chosen, direction, pod)

    def _program(self, pod: Pod, direction: Direction) -> tuple[Tier, ...]:
        isolating = [
            policy
            for policy in self._namespaced.get(pod.namespace, ())
            if direction in policy.policy_types and self.sets.selects(policy.subject, pod)
        ]
        tiers = [self._cluster_tier(ClusterTier.ADMIN, TierKind.ADMIN, pod, direction)]
        if isolating:
            tiers.append(self._tier(TierKind.NETWORK_POLICY, isolating, direction, pod))
        else:
            tiers.append(self._cluster_tier(ClusterTier.BASELINE, TierKind.BASELINE, pod, direction))
        # a tier with no rules and nowhere else to send traffic changes nothing
        return tuple(t for t in tiers if t.rules or t.default is Outcome.DENY)


def _set_names(tiers: Iterable[Tier]) -> tuple[set[str], set[str]]:
    """The names of the address sets and of the port sets the rules of `tiers` match on."""
    addresses: set[str] = set()
    ports: set[str] = set()
    for tier in tiers:
        for rule in tier.rules:
            addresses.update(rule.peers or ())
            ports.update(named.port_set for named in (rule.ports.named if rule.ports else ()))
    return addresses, ports


class PolicyCalculator:
    """`compute_policy` with memory, for an agent that computes again after every change.

    It keeps what its last state was made of (each local pod's programs, each tier, each set's
    contents) and makes again only what the change between the last inputs and these can alter
    (`_Sets`, `_Programs` say what that is); the very same inputs and endpoints give the very same
    state, and an unchanged endpoint the very same `EndpointPolicy`, so what follows (rendering)
    can skip by identity. Whatever came before, the state equals what `compute_policy` computes
    afresh (`tests/unit/test_calc_policy.py` holds it to that over random sequences of changes).
    """

    def __init__(self) -> None:
        self._sets = _Sets()
        self._programs = _Programs(self._sets)
        self._inputs = PolicyInputs()
        self._endpoints: dict[str, EndpointPolicy] = {}
        self._last: tuple[str, dict[str, str], PolicyState] | None = None
        """(node, local endpoints, state) of the last call."""

    def compute(self, inputs: PolicyInputs, node: str, local_endpoints: Mapping[str, str]) -> PolicyState:
        """The policy of every interface attached on `node`, given as host interface name -> pod key.

        Every interface of a pod gets the pod's programs. A pod key without a namespace (`ns/name`)
        is a workload attached without Kubernetes: open.
        """
        if self._last is not None and inputs is self._inputs and self._last[:2] == (node, local_endpoints):
            return self._last[2]
        if inputs is not self._inputs:
            changes = _Changes.between(self._inputs, inputs)
            self._sets.update(inputs, changes)
            self._programs.update(inputs, changes)
            self._inputs = inputs
        endpoints: dict[str, EndpointPolicy] = {}
        problems: list[str] = []
        for interface, key in sorted(local_endpoints.items()):
            if "/" not in key:
                # A workload its runtime attached without Kubernetes arguments (podman, say): it has
                # no namespace and no labels, so no policy can select it, and it is not isolated.
                endpoints[interface] = self._endpoint(interface, key, (), ())
                continue
            pod = inputs.pods.get(key)
            if pod is None:
                problems.append(f"pod {key} ({interface}): no pod object yet; its traffic is dropped")
                continue
            if pod.node != node:
                problems.append(
                    f"pod {key} ({interface}) is attached on {node} but its spec.nodeName is {pod.node!r}"
                )
            endpoints[interface] = self._endpoint(interface, key, *self._programs.programs(pod))
        self._endpoints = endpoints
        address_sets, port_sets = self._sets.made(
            *_set_names(self._programs.keep_only(e.pod for e in endpoints.values()))
        )
        state = PolicyState(_frozen(endpoints), address_sets, port_sets, tuple(problems))
        self._last = (node, dict(local_endpoints), state)
        return state

    def _endpoint(
        self, interface: str, pod: str, ingress: tuple[Tier, ...], egress: tuple[Tier, ...]
    ) -> EndpointPolicy:
        """The endpoint's policy: the one of the last state when it is the same."""
        kept = self._endpoints.get(interface)
        if kept is not None and (kept.pod, kept.ingress, kept.egress) == (pod, ingress, egress):
            return kept
        return EndpointPolicy(pod, ingress, egress)


def compute_policy(inputs: PolicyInputs, node: str, local_endpoints: Mapping[str, str]) -> PolicyState:
    """The policy of every interface attached on `node`, given as host interface name -> pod key.

    Every interface of a pod gets the pod's programs. A pod key without a namespace (`ns/name`)
    is a workload attached without Kubernetes: open.
    """
    return PolicyCalculator().compute(inputs, node, local_endpoints)
