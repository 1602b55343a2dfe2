"""The policy oracle: is this connection allowed, and which tier, policy and rule decide it (pure).

The semantic reference for policy (faucet's `fakeoftable` plays this part for OpenFlow): tests
ask it what the lab must show on real packets, and `trellis policy explain` will print its
answer. It reads the very `PolicyState` the nftables renderer turns into rules, never the
Kubernetes objects themselves, so a disagreement between oracle and kernel is a renderer bug,
and a disagreement between oracle and the Kubernetes semantics is a calculation bug.

A connection is checked where the data plane checks it: egress at the source pod's node,
then ingress at the destination pod's node, each for the first packet (replies of allowed
connections pass by conntrack). A pod reaching its own node, or its node reaching it, is not
filtered; a pod reaching itself never leaves its namespace. A pod whose interface has no
computed policy is dropped (fail closed).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from trellis.calc.policy import (
    EndpointPolicy,
    Outcome,
    PolicyInputs,
    PolicyState,
    Rule,
    TierKind,
    compute_policy,
)
from trellis.model.k8s import Action, Direction, Pod, Protocol


@dataclass(frozen=True)
class Packet:
    """The first packet of a connection; `protocol` None is anything else (ICMP), without ports."""

    saddr: ipaddress.IPv4Address
    daddr: ipaddress.IPv4Address
    protocol: Protocol | None
    dport: int | None


@dataclass(frozen=True)
class Decision:
    """One direction's answer, and who gave it."""

    allowed: bool
    direction: Direction | None
    """None when no policy was consulted (loopback, a pod and its own node)."""
    pod: str
    tier: TierKind | None
    """None when no tier decided: the pod is unrestricted, or fail closed."""
    policy: str
    rule: str

    def __str__(self) -> str:
        """`ingress of y/a: denied by networkpolicy y/deny default deny` (rule comments say the same)."""
        verdict = "allowed" if self.allowed else "denied"
        where = f"{self.direction.lower()} of {self.pod}: " if self.direction else ""
        if self.tier is None:
            return f"{where}{verdict}, {self.rule}"
        return f"{where}{verdict} by {' '.join(part for part in (self.tier, self.policy, self.rule) if part)}"


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    decisions: tuple[Decision, ...]
    """In the order the data plane makes them: egress at the source, then ingress at the
    destination; the last is the deciding one (the first denial ends the walk)."""

    @property
    def deciding(self) -> Decision:
        return self.decisions[-1]

    def __str__(self) -> str:
        return "; ".join(map(str, self.decisions))


def _rule_matches(state: PolicyState, rule: Rule, direction: Direction, packet: Packet) -> bool:
    peer = packet.saddr if direction is Direction.INGRESS else packet.daddr
    if rule.peers is not None and not any(peer in state.address_sets[name] for name in rule.peers):
        return False
    if rule.ports is None:
        return True
    if packet.protocol is None or packet.dport is None:
        return False
    if any(r.protocol == packet.protocol and r.first <= packet.dport <= r.last for r in rule.ports.ranges):
        return True
    destination = (packet.daddr, packet.protocol, packet.dport)
    return any(
        named.protocol in (None, packet.protocol) and destination in state.port_sets[named.port_set].elements
        for named in rule.ports.named
    )


def decide(state: PolicyState, endpoint: EndpointPolicy, direction: Direction, packet: Packet) -> Decision:
    """Walk the endpoint's program for `direction` as the rendered chains do."""
    tiers = endpoint.tiers(direction)
    if not tiers:
        return Decision(True, direction, endpoint.pod, None, "", "no policy applies to the pod")
    for tier in tiers:
        matched = next((r for r in tier.rules if _rule_matches(state, r, direction, packet)), None)
        if matched is not None:
            if matched.action is not Action.PASS:
                allowed = matched.action is Action.ACCEPT
                return Decision(
                    allowed, direction, endpoint.pod, tier.kind, matched.origin.policy, matched.origin.rule
                )
            last = Decision(
                True, direction, endpoint.pod, tier.kind, matched.origin.policy, matched.origin.rule
            )
        elif tier.default is Outcome.NEXT:
            last = Decision(True, direction, endpoint.pod, tier.kind, *tier.default_reason)
        else:
            allowed = tier.default is Outcome.ALLOW
            return Decision(allowed, direction, endpoint.pod, tier.kind, *tier.default_reason)
    return last  # passed or fell through the last tier: Kubernetes' default allows


class PolicyOracle:
    """Answers for a whole cluster, computing each node's `PolicyState` once, when first asked."""

    def __init__(self, inputs: PolicyInputs, endpoints: Mapping[str, str]) -> None:
        """`endpoints`: pod key -> host interface name, of every attached pod on every node."""
        self.inputs = inputs
        self.endpoints = endpoints
        self._states: dict[str, PolicyState] = {}

    def state(self, node: str) -> PolicyState:
        """What node `node` is given to render: the same call the agent makes."""
        if node not in self._states:
            local = {
                interface: key
                for key, interface in self.endpoints.items()
                if key in self.inputs.pods and self.inputs.pods[key].node == node
            }
            self._states[node] = compute_policy(self.inputs, node, local)
        return self._states[node]

    def _pod(self, key: str) -> tuple[Pod, ipaddress.IPv4Address]:
        pod = self.inputs.pods.get(key)
        if pod is None or pod.ip is None or not pod.networked:
            raise ValueError(f"pod {key}: not a pod with an address of its own")
        return pod, pod.ip

    def _node_addresses(self, pod: Pod) -> tuple[ipaddress.IPv4Address, ...]:
        node = self.inputs.nodes.get(pod.node)
        return node.addresses if node else ()

    def _check(self, pod: Pod, direction: Direction, packet: Packet) -> Decision:
        state = self.state(pod.node)
        interface = self.endpoints.get(pod.key)
        endpoint = state.endpoints.get(interface) if interface else None
        if endpoint is None:
            return Decision(False, direction, pod.key, None, "", "fail closed: no policy for its interface")
        return decide(state, endpoint, direction, packet)

    def evaluate(
        self,
        src: str | ipaddress.IPv4Address,
        dst: str | ipaddress.IPv4Address,
        port: int | None,
        protocol: Protocol | None,
    ) -> Verdict:
        """May `src` open a connection to `dst` on `protocol`/`port`? Pods by key, others by address."""
        if isinstance(src, str) and src == dst:
            return Verdict(True, (Decision(True, None, src, None, "", "loopback: never leaves the pod"),))
        source, saddr = self._pod(src) if isinstance(src, str) else (None, src)
        target, daddr = self._pod(dst) if isinstance(dst, str) else (None, dst)
        if source is None and target is None:
            raise ValueError(f"{src} -> {dst}: at least one end must be a pod")
        packet = Packet(saddr, daddr, protocol, port if protocol else None)
        if source is not None and target is None and daddr in self._node_addresses(source):
            return Verdict(
                True, (Decision(True, None, source.key, None, "", "to its own node: not filtered"),)
            )
        if target is not None and source is None and saddr in self._node_addresses(target):
            return Verdict(
                True, (Decision(True, None, target.key, None, "", "from its own node: not filtered"),)
            )
        decisions: list[Decision] = []
        for pod, direction in ((source, Direction.EGRESS), (target, Direction.INGRESS)):
            if pod is not None:
                decisions.append(self._check(pod, direction, packet))
                if not decisions[-1].allowed:
                    return Verdict(False, tuple(decisions))
        return Verdict(True, tuple(decisions))
