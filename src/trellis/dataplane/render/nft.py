"""Render Trellis' one nftables table, `inet trl`, as a value, and the libnftables JSON that
replaces it whole or changes it into another (pure).

`render_table` gives the table as an `NftTable`: its sets, verdict maps and chains with their
rules. Its `commands()` replace the table whole in one transaction (add, delete, add: the idiom
that works whether or not it exists), so the kernel never holds half a ruleset; `update_commands`
turns one table into another in one transaction touching only what differs, so the counters of
the rules that stay keep counting (`trellis policy explain` reads them). Everything Trellis
filters or rewrites lives in this table and nowhere else.

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
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from trellis.calc.policy import EndpointPolicy, Outcome, PolicyState, PortMatch, Rule, Tier, digest
from trellis.model.k8s import Action, Direction, PortRange, Protocol
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
POSTROUTING = "postrouting"
MAPS = {Direction.EGRESS: "egress", Direction.INGRESS: "ingress"}
"""Verdict map per direction: host interface -> jump to that pod's first tier chain."""
COMMENT_MAX = 128
"""nftables' limit on a comment's length, in bytes (libnftables aborts its process on a comment
of some 250 bytes instead of refusing it)."""

Json = dict[str, Any]
Counters = Mapping[tuple[str, str, int], Mapping[str, int]]
"""Counter values by (chain, rule comment, how many rules of that chain with that comment come
before it): what a replaced table's rules start counting from."""


@dataclass(frozen=True)
class NatState:
    pod_nets: frozenset[ipaddress.IPv4Network]
    """The pools pods take addresses from."""
    cluster_nets: frozenset[ipaddress.IPv4Network]
    """Destinations that keep the pod's source: the pools and every node's address."""
    pod_sources: frozenset[tuple[str, ipaddress.IPv4Address]] = frozenset()
    """(host interface, address) of every local pod: the only sources its interface may send."""


@dataclass(frozen=True)
class NftSet:
    """A named set or verdict map of the table: how it is declared, and its elements."""

    kind: str
    """`set` or `map`."""
    declaration: Mapping[str, Any]
    """Its type and flags (and `map` for a verdict map), as libnftables JSON."""
    elements: tuple[Hashable, ...]
    """In the order they are added; `encode` gives each one's JSON."""
    encode: Callable[[Any], Any]

    def body(self, name: str) -> Json:
        """The JSON that declares it, with its elements (an empty one has no `elem` at all)."""
        elem = [self.encode(e) for e in self.elements]
        return _in_table(name=name, **self.declaration, **({"elem": elem} if elem else {}))

    def some(self, name: str, elements: Iterable[Hashable]) -> Json:
        """The JSON of some of its elements, to add or delete."""
        return _in_table(name=name, elem=[self.encode(e) for e in elements])


@dataclass(frozen=True)
class NftChain:
    """A chain of the table: its hook, if it is a base chain, and its rules."""

    hook: Mapping[str, Any]
    """A base chain's type, hook, priority and policy; empty for a chain that is jumped to."""
    rules: tuple[Json, ...]
    """The rules' JSON, in order; each counts before its verdict (the last expression)."""

    def body(self, name: str) -> Json:
        """The JSON that declares it (without its rules)."""
        return _in_table(name=name, **self.hook)


@dataclass(frozen=True)
class NftTable:
    """What `inet trl` holds: sets and maps in the order they are added, then chains."""

    sets: Mapping[str, NftSet]
    chains: Mapping[str, NftChain]

    @property
    def rule_count(self) -> int:
        return sum(len(chain.rules) for chain in self.chains.values())

    def commands(self, counters: Counters | None = None) -> list[Json]:
        """The commands that replace the table with this one: pass as {"nftables": [...]}.

        Sets first, then chains, then maps (whose elements jump to chains), then rules (which
        name sets and chains). With `counters`, each rule found there starts from its values.
        """
        table = {"family": FAMILY, "name": TABLE}
        return [
            {"add": {"table": table}},
            {"delete": {"table": table}},
            {"add": {"table": table}},
            *({"add": {"set": s.body(name)}} for name, s in self.sets.items() if s.kind == "set"),
            *({"add": {"chain": c.body(name)}} for name, c in self.chains.items()),
            *({"add": {"map": s.body(name)}} for name, s in self.sets.items() if s.kind == "map"),
            *(
                {"add": {"rule": rule}}
                for name, chain in self.chains.items()
                for rule in _counting(name, chain.rules, counters or {})
            ),
        ]


def _counting(chain: str, rules: Iterable[Json], counters: Counters) -> Iterator[Json]:
    """The rules, each whose (chain, comment, occurrence) `counters` holds starting from it."""
    seen: dict[str, int] = {}
    for rule in rules:
        comment = rule["comment"]
        occurrence = seen[comment] = seen.get(comment, -1) + 1
        counter = counters.get((chain, comment, occurrence))
        if counter is None:
            yield rule
        else:
            expr = rule["expr"]
            yield {**rule, "expr": [*expr[:-2], {"counter": dict(counter)}, expr[-1]]}


def update_commands(held: NftTable, desired: NftTable) -> list[Json] | None:
    """The commands that turn table `held` into `desired` in one transaction, touching only what
    differs: a changed set or map gets and loses elements, a changed chain is flushed and filled
    again; the counters of every other rule keep counting. [] when the two are equal; None when
    a set or a base chain of both is declared differently, which only a replace can change.

    Order matters within the transaction: elements are removed before any is added (an address
    interval may give way to an overlapping one), chains exist before map elements and rules
    jump to them, and a chain or set is deleted only once nothing refers to it: a removed chain is
    emptied, then removed sets and maps go (a verdict map's elements jump to chains), then the chain.
    """
    sets = _Delta(held.sets, desired.sets)
    chains = _Delta(held.chains, desired.chains)
    if any((held.sets[n].kind, held.sets[n].declaration) != (s.kind, s.declaration) for n, s in sets.changed):
        return None
    if any(held.chains[n].hook != c.hook for n, c in chains.changed):
        return None
    out: list[Json] = []
    for name, s in sets.changed:
        before = set(s.elements)
        gone = [e for e in held.sets[name].elements if e not in before]
        if gone:
            out.append({"delete": {"element": held.sets[name].some(name, gone)}})
    out += [{"add": {"set": s.body(name)}} for name, s in sets.added if s.kind == "set"]
    out += [{"add": {"chain": c.body(name)}} for name, c in chains.added]
    out += [{"flush": {"chain": _in_table(name=name)}} for name, _ in chains.changed]
    out += [{"add": {"map": s.body(name)}} for name, s in sets.added if s.kind == "map"]
    for name, s in sets.changed:
        had = set(held.sets[name].elements)
        new = [e for e in s.elements if e not in had]
        if new:
            out.append({"add": {"element": s.some(name, new)}})
    out += [{"add": {"rule": rule}} for _, c in (*chains.added, *chains.changed) for rule in c.rules]
    out += [{"flush": {"chain": _in_table(name=name)}} for name in chains.removed]
    out += [{"delete": {held.sets[name].kind: _in_table(name=name)}} for name in sets.removed]
    out += [{"delete": {"chain": _in_table(name=name)}} for name in chains.removed]
    return out


class _Delta:
    """What differs between two mappings by name: added, changed (same name), removed."""

    def __init__(self, held: Mapping[str, Any], desired: Mapping[str, Any]) -> None:
        self.added = [(name, value) for name, value in desired.items() if name not in held]
        self.changed = [
            (name, value)
            for name, value in desired.items()
            if name in held and held[name] is not value and held[name] != value
        ]
        self.removed = [name for name in held if name not in desired]


def _in_table(**body: Any) -> Json:
    return {"family": FAMILY, "table": TABLE, **body}


def _address(net: ipaddress.IPv4Network) -> Any:
    if net.prefixlen == 32:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _same(element: Any) -> Any:
    return element


def _source(element: tuple[str, ipaddress.IPv4Address]) -> Json:
    interface, address = element
    return {"concat": [interface, str(address)]}


def _named_port(element: tuple[ipaddress.IPv4Address, Protocol, int]) -> Json:
    address, protocol, port = element
    return {"concat": [str(address), protocol.number, port]}


def _jump(element: tuple[str, str]) -> list[Any]:
    interface, chain = element
    return [interface, {"jump": {"target": chain}}]


def _dport(r: PortRange) -> int | dict[str, list[int]]:
    return r.first if r.first == r.last else {"range": [r.first, r.last]}


def _port_range(r: PortRange) -> Json:
    return {"concat": [r.protocol.number, _dport(r)]}


_ADDRESSES = {"type": "ipv4_addr", "flags": ["interval"]}


def _addresses(nets: Iterable[ipaddress.IPv4Network]) -> NftSet:
    """An interval set of `nets`, overlapping or adjacent ones as one: nftables refuses overlaps
    (a node address inside a pool, say), and with them the whole table."""
    return NftSet("set", _ADDRESSES, tuple(ipaddress.collapse_addresses(nets)), _address)


_COUNTER = {"counter": {"packets": 0, "bytes": 0}}
_L4PROTO = {"meta": {"key": "l4proto"}}
_DPORT = {"payload": {"protocol": "th", "field": "dport"}}
_SADDR = {"payload": {"protocol": "ip", "field": "saddr"}}
_DADDR = {"payload": {"protocol": "ip", "field": "daddr"}}
_PEER = {Direction.INGRESS: _SADDR, Direction.EGRESS: _DADDR}
_IFNAME = {Direction.EGRESS: {"meta": {"key": "iifname"}}, Direction.INGRESS: {"meta": {"key": "oifname"}}}
"""The interface that names the pod whose policy a direction checks: it sends, or it receives."""
_WORDS = {Direction.EGRESS: ("sends", "from"), Direction.INGRESS: ("receives", "to")}
_RETURN: Json = {"return": None}
_DROP: Json = {"drop": None}


def _match(left: Any, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _rule(chain: str, comment: str, *expr: Json) -> Json:
    """A rule with a counter before its verdict (the last expression)."""
    return _in_table(chain=chain, comment=_clipped(comment), expr=[*expr[:-1], _COUNTER, expr[-1]])


def _clipped(comment: str) -> str:
    """The comment cut to COMMENT_MAX bytes of UTF-8, on a character boundary (a lone surrogate,
    which UTF-8 cannot hold, becomes `?`)."""
    return comment.encode(errors="replace")[:COMMENT_MAX].decode(errors="ignore")


def rule_comment(rule: Rule) -> str:
    """The comment of the nftables rules a policy rule becomes: `admin no-y ingress[0] deny-y: Deny`."""
    return _clipped(f"{rule.origin}: {rule.action}")


def default_comment(tier: Tier) -> str:
    """The comment of a tier chain's last rule, met when no rule matched: `networkpolicy x/a default deny`."""
    return _clipped(tier.default_description)


def fail_closed_comment(direction: Direction) -> str:
    """The comment of the `forward` rule that drops traffic of a pod interface without policy."""
    return f"fail closed: {_WORDS[direction][1]} a pod interface without policy"


def chain_name(direction: Direction, interface: str, tier: Tier) -> str:
    """`egress_trl0123456789a_admin`: one chain per pod, direction and tier."""
    return f"{direction.lower()}_{interface}_{tier.kind}"


def _base(hook: str, kind: str, prio: int) -> Mapping[str, Any]:
    return {"type": kind, "hook": hook, "prio": prio, "policy": "accept"}


_POSTROUTING = NftChain(
    _base(POSTROUTING, "nat", 100),
    (
        _rule(
            POSTROUTING,
            "pod egress leaves with the node's address",
            _match(_SADDR, "@pod_nets"),
            _match(_DADDR, "@cluster_nets", "!="),
            {"masquerade": None},
        ),
    ),
)
_PREROUTING = NftChain(
    _base(PREROUTING, "filter", -300),
    (
        _rule(
            PREROUTING,
            "anti-spoofing: a pod sends only from its own address",
            _match(_IFNAME[Direction.EGRESS], f"@{POD_IFNAMES}"),
            _match({"concat": [_IFNAME[Direction.EGRESS], _SADDR]}, f"@{POD_SOURCES}", "!="),
            _DROP,
        ),
    ),
)
_POD_IFNAMES = NftSet("set", {"type": "ifname", "flags": ["interval"]}, POD_IFNAME_PATTERNS, _same)


def _ports_set_name(ranges: tuple[PortRange, ...]) -> str:
    return f"ports_{digest(','.join(map(str, ranges)))}"


class _Matches:
    """The match expressions of one rendering's rules, each made once and shared by the rules
    that have it.

    Why shared: pods with the same policies have the same rules, and thousands of rules made
    afresh are hundreds of thousands of small dicts for the garbage collector to walk (rendering
    1,000 policies took four times as long). The commands are values: nothing changes them.

    Why named port sets (`ports_<digest>`): an inline `{ ... }` is an anonymous set, one kernel
    object per rule, and the kernel names and finds sets by walking the table's list of them, so
    thousands of rules with inline sets cost seconds per transaction. One set per distinct list
    of two or more port ranges instead; a single range needs no set at all.
    """

    def __init__(self) -> None:
        self._made: dict[tuple[Direction, tuple[str, ...] | None, PortMatch | None], list[list[Json]]] = {}

    def of(self, rule: Rule) -> list[list[Json]]:
        """One list of matches per nft rule the policy rule becomes (an nft rule cannot OR two)."""
        key = (rule.origin.direction, rule.peers, rule.ports)
        found = self._made.get(key)
        if found is None:
            direction = rule.origin.direction
            peers: list[list[Json]] = (
                [[]]
                if rule.peers is None
                else [[_match(_PEER[direction], f"@{name}")] for name in rule.peers]
            )
            ports = [[]] if rule.ports is None else list(_port_alternatives(rule.ports))
            found = self._made[key] = [[*peer, *port] for peer in peers for port in ports]
        return found


def _port_alternatives(ports: PortMatch) -> Iterator[list[Json]]:
    if len(ports.ranges) == 1:
        (only,) = ports.ranges
        yield [_match(_L4PROTO, only.protocol.number), _match(_DPORT, _dport(only))]
    elif ports.ranges:
        yield [_match({"concat": [_L4PROTO, _DPORT]}, f"@{_ports_set_name(ports.ranges)}")]
    for named in ports.named:
        protocol = [] if named.protocol is None else [_match(_L4PROTO, named.protocol.number)]
        yield [*protocol, _match({"concat": [_DADDR, _L4PROTO, _DPORT]}, f"@{named.port_set}")]


def _tier_rules(tier: Tier, next_chain: str | None, chain: str, matches: _Matches) -> Iterator[Json]:
    onward = {"goto": {"target": next_chain}} if next_chain else _RETURN
    verdicts = {Action.ACCEPT: _RETURN, Action.DENY: _DROP, Action.PASS: onward}
    for rule in tier.rules:
        for each in matches.of(rule):
            yield _rule(chain, rule_comment(rule), *each, verdicts[rule.action])
    defaults = {Outcome.NEXT: onward, Outcome.DENY: _DROP, Outcome.ALLOW: _RETURN}
    yield _rule(chain, default_comment(tier), defaults[tier.default])


def _forward_rules() -> Iterator[Json]:
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


_FORWARD = NftChain(_base(FORWARD, "filter", 0), tuple(_forward_rules()))


@dataclass(frozen=True)
class _EndpointChains:
    """What one endpoint's programs render to."""

    chains: tuple[tuple[str, NftChain], ...]
    jumps: tuple[tuple[Direction, str], ...]
    """The first chain of each direction that has a program."""
    port_sets: tuple[tuple[str, tuple[PortRange, ...]], ...]
    """The `ports_<digest>` sets its rules match on, and their ranges."""


def _endpoint_chains(interface: str, endpoint: EndpointPolicy, matches: _Matches) -> _EndpointChains:
    chains: list[tuple[str, NftChain]] = []
    jumps: list[tuple[Direction, str]] = []
    port_sets: dict[str, tuple[PortRange, ...]] = {}
    for direction in MAPS:
        tiers = endpoint.tiers(direction)
        names = [chain_name(direction, interface, tier) for tier in tiers]
        for index, tier in enumerate(tiers):
            onward = names[index + 1] if index + 1 < len(names) else None
            chains.append(
                (names[index], NftChain({}, tuple(_tier_rules(tier, onward, names[index], matches))))
            )
            for rule in tier.rules:
                if rule.ports is not None and len(rule.ports.ranges) > 1:
                    port_sets[_ports_set_name(rule.ports.ranges)] = rule.ports.ranges
        if names:
            jumps.append((direction, names[0]))
    return _EndpointChains(tuple(chains), tuple(jumps), tuple(port_sets.items()))


class TableRenderer:
    """`render_table` with memory, for an agent that renders after every change: an endpoint
    whose policy is the one it had last time (the same, or an equal, `EndpointPolicy`) keeps the
    chains it had, the very same values, so comparing and updating the table skips them cheaply."""

    def __init__(self) -> None:
        self._endpoints: dict[str, tuple[EndpointPolicy, _EndpointChains]] = {}

    def render(self, nat: NatState, policy: PolicyState | None = None) -> NftTable:
        """The table: NAT and anti-spoofing, and the policy unless `policy` is None (not enabled)."""
        sets = {
            "pod_nets": _addresses(nat.pod_nets),
            "cluster_nets": _addresses(nat.cluster_nets),
            POD_IFNAMES: _POD_IFNAMES,
            POD_SOURCES: NftSet(
                "set", {"type": ["ifname", "ipv4_addr"]}, tuple(sorted(nat.pod_sources)), _source
            ),
        }
        chains = {POSTROUTING: _POSTROUTING, PREROUTING: _PREROUTING}
        if policy is not None:
            self._render_policy(policy, sets, chains)
        return NftTable(sets, chains)

    def _render_policy(
        self, policy: PolicyState, sets: dict[str, NftSet], chains: dict[str, NftChain]
    ) -> None:
        rendered = self._endpoint_chains(policy)
        sets[ENDPOINTS] = NftSet("set", {"type": "ifname"}, tuple(rendered), _same)
        sets.update((s.name, _addresses(s.networks)) for s in policy.address_sets.values())
        port_type = {"type": ["ipv4_addr", "inet_proto", "inet_service"]}
        sets.update(
            (s.name, NftSet("set", port_type, s.elements, _named_port)) for s in policy.port_sets.values()
        )
        ranges = {name: r for e in rendered.values() for name, r in e.port_sets}
        range_type = {"type": ["inet_proto", "inet_service"], "flags": ["interval"]}
        sets.update((name, NftSet("set", range_type, ranges[name], _port_range)) for name in sorted(ranges))
        chains[FORWARD] = _FORWARD
        chains.update(chain for e in rendered.values() for chain in e.chains)
        for direction, name in MAPS.items():
            jumps = tuple((i, chain) for i, e in rendered.items() for d, chain in e.jumps if d is direction)
            sets[name] = NftSet("map", {"type": "ifname", "map": "verdict"}, jumps, _jump)

    def _endpoint_chains(self, policy: PolicyState) -> dict[str, _EndpointChains]:
        """Each endpoint's chains by interface, in order: the last rendering's where its policy is
        the same."""
        matches = _Matches()
        kept: dict[str, tuple[EndpointPolicy, _EndpointChains]] = {}
        for interface in sorted(policy.endpoints):
            endpoint = policy.endpoints[interface]
            before = self._endpoints.get(interface)
            if before is not None and (before[0] is endpoint or before[0] == endpoint):
                kept[interface] = before
            else:
                kept[interface] = (endpoint, _endpoint_chains(interface, endpoint, matches))
        self._endpoints = kept
        return {interface: chains for interface, (_, chains) in kept.items()}


def render_table(nat: NatState, policy: PolicyState | None = None) -> list[Json]:
    """The commands that replace the table (see `NftTable.commands`): pass as {"nftables": [...]}.

    `policy` None leaves the policy part out (policy not enabled); anti-spoofing stays.
    """
    return TableRenderer().render(nat, policy).commands()
