"""Render Trellis' one nftables table, `inet trl`, as libnftables JSON (pure).

The table is replaced whole in one transaction (add, delete, add again: the idiom that
works whether or not it exists), so the kernel never holds half a ruleset. Everything
Trellis filters or rewrites lives in this table and nowhere else.

Egress: pod traffic leaving for anything outside the cluster (pools and node addresses) is
masqueraded to the node's address; pod-to-pod and pod-to-node traffic keeps its source.

Anti-spoofing: a pod sends only from its own address. A `prerouting` filter chain at raw
priority drops IPv4 from a pod interface whose (interface, source) pair is not in the
`pod_sources` set, before conntrack or routing sees it.

Policy (when a `PolicyState` is given; docs/design/policy.md): a `forward` filter chain lets
replies of allowed connections through by conntrack, then jumps, through verdict maps keyed by
interface name, to the sending pod's egress chain and to the receiving pod's ingress chain, so
adding a pod adds a map element, never a rule every packet walks. A pod's chain per tier
returns when the direction is allowed (the other direction must still be checked), drops when
it is denied, and goes to the next tier on Pass. A pod interface missing from the `endpoints`
set (its policy not computed yet) is dropped: fail closed. Pod-to-own-node traffic takes the
input and output hooks, which carry no filter, so kubelet probes always pass.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from trellis.calc.policy import Outcome, PolicyState, PortMatch, Rule, Tier, digest
from trellis.model.k8s import Action, Direction, PortRange
from trellis.model.naming import PREFIX

TABLE = "trl"
FAMILY = "inet"
FORWARD = "forward"
ENDPOINTS = "endpoints"
"""Set of the host interfaces of local pods whose policy is known."""
POD_IFNAMES = "pod_ifnames"
"""Set of the name patterns of every pod host interface, known or not: `trl` and a hex digit
(`trl` + 11 hex, while the node's own `trl-eth0` and `trl.vxlan` never match)."""
POD_IFNAME_PATTERNS = tuple(f"{PREFIX}{digit}*" for digit in "0123456789abcdef")
POD_SOURCES = "pod_sources"
"""Set of (host interface . address) of the local pods, for anti-spoofing."""
PREROUTING = "prerouting"
MAPS = {Direction.EGRESS: "egress", Direction.INGRESS: "ingress"}
"""Verdict map per direction: host interface -> jump to that pod's first tier chain."""
COMMENT_MAX = 128
"""nftables' limit on a comment's length."""


@dataclass(frozen=True)
class NatState:
    pod_nets: frozenset[ipaddress.IPv4Network]
    """The pools pods take addresses from."""
    cluster_nets: frozenset[ipaddress.IPv4Network]
    """Destinations that keep the pod's source: the pools and every node's address."""
    pod_sources: frozenset[tuple[str, ipaddress.IPv4Address]] = frozenset()
    """(host interface, address) of every local pod: the only sources its interface may send."""


def _in_table(**body: Any) -> dict[str, Any]:
    return {"family": FAMILY, "table": TABLE, **body}


def _set_elements(nets: Iterable[ipaddress.IPv4Network]) -> list[Any]:
    out: list[Any] = []
    for net in sorted(nets):
        if net.prefixlen == 32:
            out.append(str(net.network_address))
        else:
            out.append({"prefix": {"addr": str(net.network_address), "len": net.prefixlen}})
    return out


def _named(kind: str, name: str, elements: list[Any], **body: Any) -> dict[str, Any]:
    """A set or map of the table; an empty one carries no `elem`."""
    return {kind: _in_table(name=name, **body, **({"elem": elements} if elements else {}))}


def _set(name: str, nets: Iterable[ipaddress.IPv4Network]) -> dict[str, Any]:
    return _named("set", name, _set_elements(nets), type="ipv4_addr", flags=["interval"])


def render_table(nat: NatState, policy: PolicyState | None = None) -> list[dict[str, Any]]:
    """The commands that replace the table: pass as {"nftables": [...]}.

    `policy` None leaves the policy part out (policy not enabled); anti-spoofing stays.
    """
    table = {"family": FAMILY, "name": TABLE}
    chain = {
        "family": FAMILY,
        "table": TABLE,
        "name": "postrouting",
        "type": "nat",
        "hook": "postrouting",
        "prio": 100,
        "policy": "accept",
    }
    masquerade = {
        "family": FAMILY,
        "table": TABLE,
        "chain": "postrouting",
        "comment": "pod egress leaves with the node's address",
        "expr": [
            {
                "match": {
                    "op": "==",
                    "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                    "right": "@pod_nets",
                }
            },
            {
                "match": {
                    "op": "!=",
                    "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                    "right": "@cluster_nets",
                }
            },
            {"counter": {"packets": 0, "bytes": 0}},
            {"masquerade": None},
        ],
    }
    return [
        {"add": {"table": table}},
        {"delete": {"table": table}},
        {"add": {"table": table}},
        {"add": _set("pod_nets", nat.pod_nets)},
        {"add": _set("cluster_nets", nat.cluster_nets)},
        {"add": {"chain": chain}},
        {"add": {"rule": masquerade}},
        *_render_antispoofing(nat.pod_sources),
        *(_render_policy(policy) if policy is not None else []),
    ]


def _render_antispoofing(sources: frozenset[tuple[str, ipaddress.IPv4Address]]) -> list[dict[str, Any]]:
    pairs = [{"concat": [interface, str(address)]} for interface, address in sorted(sources)]
    iifname = {"meta": {"key": "iifname"}}
    saddr = {"payload": {"protocol": "ip", "field": "saddr"}}
    return [
        {"add": _named("set", POD_IFNAMES, list(POD_IFNAME_PATTERNS), type="ifname", flags=["interval"])},
        {"add": _named("set", POD_SOURCES, pairs, type=["ifname", "ipv4_addr"])},
        {
            "add": {
                "chain": _in_table(
                    name=PREROUTING, type="filter", hook="prerouting", prio=-300, policy="accept"
                )
            }
        },
        _rule(
            PREROUTING,
            "anti-spoofing: a pod sends only from its own address",
            _match(iifname, f"@{POD_IFNAMES}"),
            _match({"concat": [iifname, saddr]}, f"@{POD_SOURCES}", "!="),
            _DROP,
        ),
    ]


_COUNTER = {"counter": {"packets": 0, "bytes": 0}}
_L4PROTO = {"meta": {"key": "l4proto"}}
_DPORT = {"payload": {"protocol": "th", "field": "dport"}}
_DADDR = {"payload": {"protocol": "ip", "field": "daddr"}}
_PEER = {
    Direction.INGRESS: {"payload": {"protocol": "ip", "field": "saddr"}},
    Direction.EGRESS: _DADDR,
}
_IFNAME = {Direction.EGRESS: {"meta": {"key": "iifname"}}, Direction.INGRESS: {"meta": {"key": "oifname"}}}
"""The interface that names the pod whose policy a direction checks: it sends, or it receives."""
_WORDS = {Direction.EGRESS: ("sends", "from"), Direction.INGRESS: ("receives", "to")}
_RETURN: dict[str, Any] = {"return": None}
_DROP: dict[str, Any] = {"drop": None}


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _rule(chain: str, comment: str, *expr: dict[str, Any]) -> dict[str, Any]:
    """A rule with a counter before its verdict (the last expression)."""
    body = _in_table(chain=chain, comment=comment[:COMMENT_MAX], expr=[*expr[:-1], _COUNTER, expr[-1]])
    return {"add": {"rule": body}}


def rule_comment(rule: Rule) -> str:
    """The comment of the nftables rules a policy rule becomes: `admin no-y ingress[0] deny-y: Deny`."""
    return f"{rule.origin}: {rule.action}"[:COMMENT_MAX]


def default_comment(tier: Tier) -> str:
    """The comment of a tier chain's last rule, met when no rule matched: `networkpolicy x/a default deny`."""
    return tier.default_description[:COMMENT_MAX]


def fail_closed_comment(direction: Direction) -> str:
    """The comment of the `forward` rule that drops traffic of a pod interface without policy."""
    return f"fail closed: {_WORDS[direction][1]} a pod interface without policy"


def chain_name(direction: Direction, interface: str, tier: Tier) -> str:
    """`egress_trl0123456789a_admin`: one chain per pod, direction and tier."""
    return f"{direction.lower()}_{interface}_{tier.kind}"


def _dport(r: PortRange) -> int | dict[str, list[int]]:
    return r.first if r.first == r.last else {"range": [r.first, r.last]}


class _Matches:
    """The match expressions of one table's rules, each made once and shared by the rules that
    have it; and the `ports_<digest>` sets they name.

    Why shared: pods with the same policies have the same rules, and thousands of rules made
    afresh are hundreds of thousands of small dicts for the garbage collector to walk (rendering
    1,000 policies took four times as long). The commands are values: nothing changes them.

    Why named port sets: an inline `{ ... }` is an anonymous set, one kernel object per rule,
    and the kernel names and finds sets by walking the table's list of them, so thousands of
    rules with inline sets cost seconds per transaction. One set per distinct list of two or
    more port ranges instead; a single range needs no set at all.
    """

    def __init__(self) -> None:
        self._made: dict[tuple[Direction, tuple[str, ...] | None, PortMatch | None], list[list[Any]]] = {}
        self._port_sets: dict[str, tuple[PortRange, ...]] = {}

    def of(self, rule: Rule) -> list[list[Any]]:
        """One list of matches per nft rule the policy rule becomes (an nft rule cannot OR two)."""
        key = (rule.origin.direction, rule.peers, rule.ports)
        found = self._made.get(key)
        if found is None:
            direction = rule.origin.direction
            peers: list[list[dict[str, Any]]] = (
                [[]]
                if rule.peers is None
                else [[_match(_PEER[direction], f"@{name}")] for name in rule.peers]
            )
            ports = [[]] if rule.ports is None else list(self._port_alternatives(rule.ports))
            found = self._made[key] = [[*peer, *port] for peer in peers for port in ports]
        return found

    def _port_alternatives(self, ports: PortMatch) -> Iterator[list[dict[str, Any]]]:
        if len(ports.ranges) == 1:
            (only,) = ports.ranges
            yield [_match(_L4PROTO, only.protocol.number), _match(_DPORT, _dport(only))]
        elif ports.ranges:
            name = f"ports_{digest(','.join(map(str, ports.ranges)))}"
            self._port_sets.setdefault(name, ports.ranges)
            yield [_match({"concat": [_L4PROTO, _DPORT]}, f"@{name}")]
        for named in ports.named:
            protocol = [] if named.protocol is None else [_match(_L4PROTO, named.protocol.number)]
            yield [*protocol, _match({"concat": [_DADDR, _L4PROTO, _DPORT]}, f"@{named.port_set}")]

    def port_set_commands(self) -> Iterator[dict[str, Any]]:
        for name, ranges in sorted(self._port_sets.items()):
            elements = [{"concat": [r.protocol.number, _dport(r)]} for r in ranges]
            yield _named("set", name, elements, type=["inet_proto", "inet_service"], flags=["interval"])


def _tier_rules(
    chain: str, tier: Tier, next_chain: str | None, matches: _Matches
) -> Iterator[dict[str, Any]]:
    onward = {"goto": {"target": next_chain}} if next_chain else _RETURN
    verdicts = {Action.ACCEPT: _RETURN, Action.DENY: _DROP, Action.PASS: onward}
    for rule in tier.rules:
        for each in matches.of(rule):
            yield _rule(chain, rule_comment(rule), *each, verdicts[rule.action])
    defaults = {Outcome.NEXT: onward, Outcome.DENY: _DROP, Outcome.ALLOW: _RETURN}
    yield _rule(chain, default_comment(tier), defaults[tier.default])


def _forward_rules() -> Iterator[dict[str, Any]]:
    ct_state = {"ct": {"key": "state"}}
    yield _rule(
        FORWARD,
        "replies and related packets of allowed connections",
        _match(ct_state, ["established", "related"], "in"),
        {"accept": None},
    )
    yield _rule(FORWARD, "invalid packets", _match(ct_state, "invalid", "in"), _DROP)
    for direction, (verb, _) in _WORDS.items():
        yield _rule(
            FORWARD,
            f"{direction.lower()} policy of the pod that {verb}",
            {"vmap": {"key": _IFNAME[direction], "data": f"@{MAPS[direction]}"}},
        )
    for direction in _WORDS:
        yield _rule(
            FORWARD,
            fail_closed_comment(direction),
            _match(_IFNAME[direction], f"@{POD_IFNAMES}"),
            _match(_IFNAME[direction], f"@{ENDPOINTS}", "!="),
            _DROP,
        )


def _render_policy(policy: PolicyState) -> list[dict[str, Any]]:
    chains = [_in_table(name=FORWARD, type="filter", hook="forward", prio=0, policy="accept")]
    rules = list(_forward_rules())
    matches = _Matches()
    entries: dict[Direction, list[Any]] = {direction: [] for direction in MAPS}
    for interface, endpoint in sorted(policy.endpoints.items()):
        for direction in MAPS:
            tiers = endpoint.tiers(direction)
            names = [chain_name(direction, interface, tier) for tier in tiers]
            for index, tier in enumerate(tiers):
                chains.append(_in_table(name=names[index]))
                onward = names[index + 1] if index + 1 < len(names) else None
                rules.extend(_tier_rules(names[index], tier, onward, matches))
            if names:
                entries[direction].append([interface, {"jump": {"target": names[0]}}])
    sets: list[dict[str, Any]] = [
        _named("set", ENDPOINTS, sorted(policy.endpoints), type="ifname"),
        *(_set(s.name, s.networks) for s in policy.address_sets.values()),
        *(
            _named(
                "set",
                s.name,
                [{"concat": [str(ip), protocol.number, port]} for ip, protocol, port in s.elements],
                type=["ipv4_addr", "inet_proto", "inet_service"],
            )
            for s in policy.port_sets.values()
        ),
        *matches.port_set_commands(),
    ]
    maps = [
        _named("map", MAPS[direction], entries[direction], type="ifname", map="verdict") for direction in MAPS
    ]
    return [{"add": item} for item in (*sets, *({"chain": c} for c in chains), *maps)] + rules
