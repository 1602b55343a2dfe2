"""What each local pod may send and receive: per-endpoint policy programs for one node (pure).

Input: the cluster's namespaces, pods, nodes, NetworkPolicies and ClusterNetworkPolicies, and the
pods attached on this node (pod key -> host interface, from the agent's IPAM). Output: a frozen
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


def read_policy_inputs(objects: Mapping[str, Any]) -> tuple[PolicyInputs, tuple[str, ...]]:
    """The inputs from datastore objects by key, and one line per invalid object (skipped)."""
    found: dict[str, dict[str, Any]] = {attribute: {} for _, attribute, _ in _PARSERS}
    errors: list[str] = []
    for key, value in sorted(objects.items()):
        for prefix, attribute, parse in _PARSERS:
            if key.startswith(prefix):
                try:
                    parsed = parse(value)
                except InvalidObject as err:
                    errors.append(f"{key}: {err}")
                else:
                    found[attribute][parsed.key] = parsed
    inputs = PolicyInputs(**{attribute: _frozen(values) for attribute, values in found.items()})
    return inputs, tuple(errors)


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


class _Sets:
    """The address and port sets of a state, each made once, when a rule first names it.

    Pods are indexed by namespace, and which namespaces a selector takes is worked out once per
    selector, so making a set looks only at the pods it can hold (not every pod of the cluster).
    """

    def __init__(self, inputs: PolicyInputs) -> None:
        self._inputs = inputs
        self._pods = sorted((p for p in inputs.pods.values() if p.networked), key=lambda p: p.key)
        self._hosts = {p.key: ipaddress.IPv4Network(p.ip) for p in self._pods if p.ip}
        self._by_namespace: dict[str, list[Pod]] = {}
        for pod in self._pods:
            self._by_namespace.setdefault(pod.namespace, []).append(pod)
        self._scopes: dict[LabelSelector | str, list[str]] = {}
        self._names: dict[PodsPeer | NetworksPeer | NodesPeer, str] = {}
        self.addresses: dict[str, AddressSet] = {}
        self.ports: dict[str, PortSet] = {}

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
            self._hosts[pod.key]
            for name in namespaces
            for pod in self._by_namespace[name]
            if peer.pods.matches(pod.labels)
        ]

    def address_set(self, peer: PodsPeer | NetworksPeer | NodesPeer) -> str:
        name = self._names.get(peer)
        if name is None:
            words = str(peer)
            kind = {PodsPeer: "pods", NetworksPeer: "nets", NodesPeer: "nodes"}[type(peer)]
            name = self._names[peer] = f"{kind}_{digest(words)}"
            if name not in self.addresses:
                self.addresses[name] = AddressSet(name, words, tuple(self._networks(peer)))
        return name

    def _networks(self, peer: PodsPeer | NetworksPeer | NodesPeer) -> list[ipaddress.IPv4Network]:
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
                return _subtract(_v4(peer.include), _v4(peer.exclude))
        return sorted(ipaddress.collapse_addresses(hosts))

    def port_set(self, port_name: str) -> str:
        name = f"port_{port_name}"
        if name not in self.ports:
            elements = sorted(
                (p.ip, c.protocol, c.number)
                for p in self._pods
                if p.ip
                for c in p.ports
                if c.name == port_name
            )
            self.ports[name] = PortSet(name, port_name, tuple(elements))
        return name


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


class _Programs:
    """Each local pod's program per direction, every tier made once and shared by the pods it fits.

    A tier depends on the pod only through the policies that select it and, for ingress, the
    pod's own named ports: replicas of one workload get the very same `Tier`. NetworkPolicies are
    indexed by namespace, since one selects pods of its own namespace only.
    """

    def __init__(self, inputs: PolicyInputs) -> None:
        self.sets = _Sets(inputs)
        self._cluster: dict[ClusterTier, list[ClusterNetworkPolicy]] = {tier: [] for tier in ClusterTier}
        for cluster_policy in sorted(
            inputs.cluster_network_policies.values(), key=lambda c: (c.priority, c.name)
        ):
            self._cluster[cluster_policy.tier].append(cluster_policy)
        self._namespaced: dict[str, list[NetworkPolicy]] = {}
        for _, policy in sorted(inputs.network_policies.items()):
            self._namespaced.setdefault(policy.namespace, []).append(policy)
        self._tiers: dict[tuple[TierKind, Direction, tuple[str, ...], tuple[ContainerPort, ...]], Tier] = {}

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

    def program(self, pod: Pod, direction: Direction) -> tuple[Tier, ...]:
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


def compute_policy(inputs: PolicyInputs, node: str, local_endpoints: Mapping[str, str]) -> PolicyState:
    """The policy of every pod attached on `node`, given as pod key -> host interface name.

    A key without a namespace (`ns/name`) is a workload attached without Kubernetes: open.
    """
    programs = _Programs(inputs)
    endpoints: dict[str, EndpointPolicy] = {}
    problems: list[str] = []
    for key, interface in sorted(local_endpoints.items()):
        if "/" not in key:
            # A workload its runtime attached without Kubernetes arguments (podman, say): it has
            # no namespace and no labels, so no policy can select it, and it is not isolated.
            endpoints[interface] = EndpointPolicy(key, ingress=(), egress=())
            continue
        pod = inputs.pods.get(key)
        if pod is None:
            problems.append(f"pod {key} ({interface}): no pod object yet; its traffic is dropped")
            continue
        if pod.node != node:
            problems.append(
                f"pod {key} ({interface}) is attached on {node} but its spec.nodeName is {pod.node!r}"
            )
        endpoints[interface] = EndpointPolicy(
            key,
            ingress=programs.program(pod, Direction.INGRESS),
            egress=programs.program(pod, Direction.EGRESS),
        )
    return PolicyState(
        endpoints=_frozen(endpoints),
        address_sets=_frozen(dict(sorted(programs.sets.addresses.items()))),
        port_sets=_frozen(dict(sorted(programs.sets.ports.items()))),
        problems=tuple(problems),
    )
