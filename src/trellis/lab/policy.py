"""What policy does to a lab's pods: `trellis policy explain` and `trellis policy diff`.

Why the oracle over the datastore's objects: the agents compute each node's policy from the
Kubernetes objects the lab stored (`calc/policy.py`), and the oracle runs that very
calculation for every node, so its answer is what the kernels were told, and it names the
tier, policy and rule that decided. `explain` then reads the deciding node's `inet trl` table
(`nft -j list table inet trl` inside the node's namespace) and finds that rule by its comment,
in the renderer's words: its counter shows that real packets met it. `diff` is the what-if: the
matrix the probe would measure (every pod pair, on ports the destination listens on, policy
allowing), computed before and after a file's objects, without writing anything.

A pod without a Pod object (or without an address in it) has no computed policy: the kernel
drops its traffic both ways (fail closed). The oracle cannot place such a pod, so this module
says so itself, and points at the `forward` rule that drops it.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from trellis.calc.policy import read_policy_inputs
from trellis.calc.policy_oracle import Decision, PolicyOracle, Verdict
from trellis.dataplane.render.nft import (
    FAMILY,
    FORWARD,
    TABLE,
    chain_name,
    default_comment,
    fail_closed_comment,
    rule_comment,
)
from trellis.lab import kube, store
from trellis.lab.cluster import validate_apply
from trellis.lab.errors import LabError
from trellis.lab.manifest import LabObject, NamespaceObject, PodObject, PolicyObject
from trellis.lab.pods import POD_IFNAME
from trellis.lab.probe import Check
from trellis.lab.process import in_netns
from trellis.lab.state import LabPaths, LabState, Pod
from trellis.model.ipam import Attachment
from trellis.model.k8s import K8S_PREFIX, Direction, Protocol
from trellis.model.naming import host_veth_name

NFT = "nft"
NO_POD_OBJECT = "fail closed: no Pod object with an address"
"""The rule a decision names for a pod the lab attached but whose Pod object is missing."""

End = str | ipaddress.IPv4Address
"""A pod by key, or an address that is no pod's."""


@dataclass(frozen=True)
class KernelRule:
    """Where a decision is made in its node's table: the chain and the comment of its rules."""

    chain: str
    comment: str


class LabPolicy:
    """The policy of a lab's pods given Kubernetes objects (by datastore key), as the agents compute it."""

    def __init__(self, state: LabState, objects: Mapping[str, Any]) -> None:
        self.state = state
        inputs, _ = read_policy_inputs(objects)  # invalid objects: skipped, as the agents skip them
        self.interfaces = {pod.key: interface(pod) for pod in state.pods.values() if pod.ip is not None}
        self.oracle = PolicyOracle(inputs, self.interfaces)

    def _placed(self, end: End) -> bool:
        """Whether the oracle can place `end`: an address, or a pod with an address in its object."""
        if not isinstance(end, str):
            return True
        found = self.oracle.inputs.pods.get(end)
        return found is not None and found.networked

    def verdict(self, src: End, dst: End, port: int, protocol: Protocol) -> Verdict:
        """The oracle's verdict, fail closed for a pod it cannot place."""
        if src == dst or (self._placed(src) and self._placed(dst)):
            return self.oracle.evaluate(src, dst, port, protocol)
        if isinstance(src, str) and not self._placed(src):
            return Verdict(False, (Decision(False, Direction.EGRESS, src, None, "", NO_POD_OBJECT),))
        assert isinstance(dst, str)
        closed = Decision(False, Direction.INGRESS, dst, None, "", NO_POD_OBJECT)
        if not isinstance(src, str):
            return Verdict(False, (closed,))
        address = self.state.pods[dst].ip
        assert address is not None
        egress = self.oracle.evaluate(src, address, port, protocol)  # src sees an address it cannot place
        return egress if not egress.allowed else Verdict(False, (*egress.decisions, closed))

    def kernel_rule(self, decision: Decision) -> KernelRule | None:
        """The rules of the node's table that made `decision`; None when none did (the direction
        is unrestricted, or nothing is filtered: loopback, a pod and its own node)."""
        if decision.direction is None:
            return None
        pod = self.state.pods[decision.pod]
        iface = interface(pod)
        endpoint = self.oracle.state(pod.node).endpoints.get(iface)
        if endpoint is None:
            return KernelRule(FORWARD, fail_closed_comment(decision.direction))
        tiers = [t for t in endpoint.tiers(decision.direction) if t.kind is decision.tier]
        if not tiers:
            return None
        tier = tiers[0]
        chain = chain_name(decision.direction, iface, tier)
        for rule in tier.rules:
            if (rule.origin.policy, rule.origin.rule) == (decision.policy, decision.rule):
                return KernelRule(chain, rule_comment(rule))
        return KernelRule(chain, default_comment(tier))

    def matrix(self, checks: Sequence[Check]) -> dict[Check, dict[tuple[str, str], bool]]:
        """What the probe would measure: every ordered pair of attached pods, reachable when the
        destination listens on the check's port and policy allows the connection."""
        pods = sorted((p for p in self.state.pods.values() if p.ip is not None), key=lambda p: p.key)
        return {
            check: {
                (src.key, dst.key): listens(dst, check)
                and self.verdict(src.key, dst.key, check.port, Protocol(check.protocol)).allowed
                for src in pods
                for dst in pods
                if src.key != dst.key
            }
            for check in checks
        }


def interface(pod: Pod) -> str:
    """The pod's host-side interface, named from its sandbox as the agent names it."""
    return host_veth_name(Attachment(pod.container_id, POD_IFNAME))


def listens(pod: Pod, check: Check) -> bool:
    return any((p.port, p.protocol) == (check.port, check.protocol) for p in pod.ports)


def resolve(state: LabState, text: str) -> End:
    """`ns/pod` (a pod of the lab) or an IPv4 address (a pod's address names the pod)."""
    if "/" in text:
        return state.pod(text).key
    try:
        address = ipaddress.IPv4Address(text)
    except ValueError:
        raise LabError(f"{text!r} is neither NAMESPACE/POD nor an IPv4 address") from None
    return next((pod.key for pod in state.pods.values() if pod.ip == address), address)


def table_rules(netns: str) -> list[dict[str, Any]]:
    """The rules of table `inet trl` in namespace `netns`, as `nft -j list` gives them (with counters)."""
    proc = subprocess.run(
        [NFT, "-j", "list", "table", FAMILY, TABLE],
        capture_output=True,
        text=True,
        check=False,
        preexec_fn=in_netns(netns),
    )
    if proc.returncode != 0:
        raise LabError(f"{netns}: nft list table {FAMILY} {TABLE}: {proc.stderr.strip()}")
    return [item["rule"] for item in json.loads(proc.stdout)["nftables"] if "rule" in item]


def counter(rules: Sequence[Mapping[str, Any]], rule: KernelRule) -> tuple[int, int] | None:
    """(packets, bytes) over the rules of `rule`'s chain with its comment; None if there are none."""
    found = [
        expr["counter"]
        for r in rules
        if r["chain"] == rule.chain and r.get("comment") == rule.comment
        for expr in r["expr"]
        if "counter" in expr
    ]
    if not found:
        return None
    return sum(c["packets"] for c in found), sum(c["bytes"] for c in found)


@dataclass(frozen=True)
class Step:
    """One decision on the path, where the kernel makes it, and how often its rules matched."""

    decision: Decision
    node: str
    """The node of the decision's pod, whose kernel checks this direction."""
    rule: KernelRule | None
    packets: int | None = None
    bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        d = self.decision
        return {
            "direction": d.direction and str(d.direction),
            "pod": d.pod,
            "allowed": d.allowed,
            "tier": d.tier and str(d.tier),
            "policy": d.policy,
            "rule": d.rule,
            "node": self.node,
            "chain": self.rule and self.rule.chain,
            "comment": self.rule and self.rule.comment,
            "packets": self.packets,
            "bytes": self.bytes,
        }


@dataclass(frozen=True)
class Explanation:
    src: str
    dst: str
    port: int
    protocol: Protocol
    allowed: bool
    steps: tuple[Step, ...]
    """Egress at the source's node, then ingress at the destination's; the last one decided."""

    def to_json(self) -> dict[str, Any]:
        return {
            "src": self.src,
            "dst": self.dst,
            "port": self.port,
            "protocol": str(self.protocol),
            "allowed": self.allowed,
            "decisions": [step.to_json() for step in self.steps],
        }


def current(paths: LabPaths, state: LabState) -> LabPolicy:
    """The lab's policy as the agents see it now: over the objects in its datastore."""
    return LabPolicy(state, store.read(paths, state, K8S_PREFIX))


def explain(
    paths: LabPaths, state: LabState, src: str, dst: str, port: int, protocol: Protocol
) -> Explanation:
    """Which tier, policy and rule decide `src` -> `dst` on `protocol`/`port`, each direction
    where it is checked, with the counters of those rules in the deciding nodes' kernels."""
    policy = current(paths, state)
    source, target = resolve(state, src), resolve(state, dst)
    if not isinstance(source, str) and not isinstance(target, str):
        raise LabError(f"{src} -> {dst}: at least one end must be a pod of lab {state.name}")
    verdict = policy.verdict(source, target, port, protocol)
    tables: dict[str, list[dict[str, Any]]] = {}
    steps = []
    for decision in verdict.decisions:
        node = state.pods[decision.pod].node
        rule = policy.kernel_rule(decision)
        if rule is None:
            steps.append(Step(decision, node, None))
            continue
        if node not in tables:
            tables[node] = table_rules(state.node(node).netns)
        packets, size = counter(tables[node], rule) or (None, None)
        steps.append(Step(decision, node, rule, packets, size))
    return Explanation(str(source), str(target), port, protocol, verdict.allowed, tuple(steps))


def applied(state: LabState, objects: Sequence[LabObject]) -> tuple[dict[str, Any], list[str]]:
    """The Kubernetes objects `lab apply` of `objects` would write (by key), and the pods it would
    create (not in the matrix: their addresses are known only once they are made)."""
    written: dict[str, Any] = {}
    new: list[str] = []
    for obj in objects:
        match obj:
            case NamespaceObject():
                written.update([kube.namespace_object(obj.name, obj.labels)])
            case PolicyObject():
                written[obj.datastore_key] = obj.body
            case PodObject() if obj.key in state.pods:
                written.update([kube.pod_object(state, replace(state.pods[obj.key], labels=obj.labels))])
            case PodObject():
                new.append(obj.key)
    return written, new


@dataclass(frozen=True)
class Change:
    check: Check
    src: str
    dst: str
    after: bool
    """Reachable after the file is applied (before: the opposite)."""
    reason: str
    """The decision after, in words: `ingress of x/b: denied by networkpolicy x/deny default deny`."""

    def to_json(self) -> dict[str, Any]:
        return {
            "port": self.check.port,
            "protocol": self.check.protocol,
            "from": self.src,
            "to": self.dst,
            "before": not self.after,
            "after": self.after,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Diff:
    checks: tuple[Check, ...]
    pairs: int
    """Cells of each matrix."""
    changes: tuple[Change, ...]
    new_pods: tuple[str, ...]
    """Pods the file creates, left out of the matrix."""

    def to_json(self) -> dict[str, Any]:
        return {
            "checks": [{"port": c.port, "protocol": c.protocol} for c in self.checks],
            "pairs": self.pairs,
            "changes": [change.to_json() for change in self.changes],
            "summary": {
                "changed": len(self.changes),
                "allowed": sum(c.after for c in self.changes),
                "denied": sum(not c.after for c in self.changes),
            },
            "new_pods": list(self.new_pods),
        }


def compare(before: LabPolicy, after: LabPolicy, checks: Sequence[Check], new_pods: Sequence[str]) -> Diff:
    """The cells of the probe's matrices that `after` changes from `before`."""
    old, new = before.matrix(checks), after.matrix(checks)
    changes = tuple(
        Change(
            check,
            src,
            dst,
            reachable,
            str(after.verdict(src, dst, check.port, Protocol(check.protocol)).deciding),
        )
        for check in checks
        for (src, dst), reachable in new[check].items()
        if old[check][(src, dst)] != reachable
    )
    pairs = len(next(iter(new.values()))) if new else 0
    return Diff(tuple(checks), pairs, changes, tuple(new_pods))


def diff(paths: LabPaths, state: LabState, objects: Sequence[LabObject], checks: Sequence[Check]) -> Diff:
    """What applying `objects` would change in the probe's matrices; nothing is written."""
    validate_apply(state, objects)
    objects_now = store.read(paths, state, K8S_PREFIX)
    written, new_pods = applied(state, objects)
    return compare(
        LabPolicy(state, objects_now), LabPolicy(state, {**objects_now, **written}), checks, new_pods
    )
