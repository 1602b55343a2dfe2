"""A small evaluator of libnftables JSON: what the kernel would do with one forwarded packet.

Tests compare its answer with the policy oracle's, so it knows nothing of Trellis: it reads the
commands `render_table` emits as nft would (tables, sets, maps, chains, rules) and walks the
`forward` hook's base chain for a packet, following verdict maps, jumps, gotos and returns. It
implements the expressions the renderer uses and fails loudly on any other, so a new construct
in the renderer cannot slip past it unevaluated.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Packet:
    """The first packet of a connection (conntrack state new) as the forward hook sees it."""

    iifname: str
    oifname: str
    saddr: ipaddress.IPv4Address
    daddr: ipaddress.IPv4Address
    l4proto: int
    """6 TCP, 17 UDP, 132 SCTP, 1 ICMP."""
    dport: int | None
    """None for protocols without ports."""
    ct_state: str = "new"


@dataclass
class Ruleset:
    sets: dict[str, list[Any]] = field(default_factory=dict)
    maps: dict[str, list[Any]] = field(default_factory=dict)
    chains: dict[str, dict[str, Any]] = field(default_factory=dict)
    rules: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @classmethod
    def load(cls, commands: Sequence[Mapping[str, Any]]) -> Ruleset:
        """The state after running `commands` on an empty kernel (one table is all we render)."""
        ruleset = cls()
        for command in commands:
            ((verb, objects),) = command.items()
            ((kind, body),) = objects.items()
            if kind == "table":
                if verb == "delete":
                    ruleset = cls()
                continue
            assert verb == "add", f"unexpected {verb} {kind}"
            if kind == "set":
                ruleset.sets[body["name"]] = list(body.get("elem", []))
            elif kind == "map":
                ruleset.maps[body["name"]] = list(body.get("elem", []))
            elif kind == "chain":
                ruleset.chains[body["name"]] = body
                ruleset.rules.setdefault(body["name"], [])
            elif kind == "rule":
                assert body["chain"] in ruleset.chains, f"rule in unknown chain {body['chain']}"
                ruleset.rules[body["chain"]].append(body)
            else:
                raise AssertionError(f"unknown object {kind}")
        return ruleset

    def forward(self, packet: Packet) -> tuple[bool, list[str]]:
        """(accepted, comments of the rules whose verdicts the packet met)."""
        (base,) = [name for name, chain in self.chains.items() if chain.get("hook") == "forward"]
        trace: list[str] = []
        verdict = self._chain(base, packet, trace)
        if verdict in ("accept", "drop"):
            return verdict == "accept", trace
        return self.chains[base]["policy"] == "accept", trace

    def _chain(self, name: str, packet: Packet, trace: list[str]) -> str | None:
        """'accept' or 'drop' (final), 'return' or None (back to the caller)."""
        for rule in self.rules[name]:
            verdict = self._rule(rule, packet)
            if verdict is None:
                continue
            trace.append(rule.get("comment", ""))
            kind, target = verdict
            if kind in ("accept", "drop", "return"):
                return kind
            inner = self._chain(target, packet, trace)
            if inner in ("accept", "drop"):
                return inner
            if kind == "goto":
                return "return"
        return None

    def _rule(self, rule: Mapping[str, Any], packet: Packet) -> tuple[str, str] | None:
        """The verdict the rule reaches, or None when it does not match."""
        for expr in rule["expr"]:
            ((kind, body),) = expr.items()
            if kind == "counter":
                continue
            if kind == "match":
                if not self._match(body, packet):
                    return None
            elif kind == "vmap":
                key = _value(body["key"], packet)
                found = [
                    data
                    for element, data in self.maps[body["data"].removeprefix("@")]
                    if _element(element, key)
                ]
                if not found:
                    return None
                return _verdict(found[0])
            else:
                return _verdict(expr)
        raise AssertionError(f"rule without verdict: {rule}")

    def _match(self, body: Mapping[str, Any], packet: Packet) -> bool:
        value = _value(body["left"], packet)
        right = body["right"]
        if body["op"] == "in":  # flags: ct state
            return value in (right if isinstance(right, list) else [right])
        if value is None:  # e.g. a port of a packet without ports: no match either way
            return False
        if isinstance(right, str) and right.startswith("@"):
            hit = any(_element(e, value) for e in self.sets[right[1:]])
        elif isinstance(right, Mapping) and "set" in right:
            hit = any(_element(e, value) for e in right["set"])
        else:
            hit = _element(right, value)
        return hit if body["op"] == "==" else not hit if body["op"] == "!=" else _fail(body)


def _fail(body: Any) -> bool:
    raise AssertionError(f"unsupported expression {body}")


def _verdict(expr: Mapping[str, Any]) -> tuple[str, str]:
    ((kind, body),) = expr.items()
    if kind in ("jump", "goto"):
        return kind, body["target"]
    if kind in ("accept", "drop", "return"):
        return kind, ""
    raise AssertionError(f"unsupported statement {expr}")


def _value(expr: Mapping[str, Any], packet: Packet) -> Any:
    ((kind, body),) = expr.items()
    if kind == "concat":
        parts = tuple(_value(part, packet) for part in body)
        return None if None in parts else parts
    if kind == "meta":
        return {"iifname": packet.iifname, "oifname": packet.oifname, "l4proto": packet.l4proto}[body["key"]]
    if kind == "ct" and body["key"] == "state":
        return packet.ct_state
    if kind == "payload":
        field_ = (body["protocol"], body["field"])
        if field_ == ("ip", "saddr"):
            return packet.saddr
        if field_ == ("ip", "daddr"):
            return packet.daddr
        if field_ == ("th", "dport"):
            return packet.dport
    raise AssertionError(f"unsupported value {expr}")


def _element(element: Any, value: Any) -> bool:
    """Whether a set element (or a literal) holds `value`."""
    if isinstance(value, tuple):
        parts = element["concat"]
        return len(parts) == len(value) and all(_element(e, v) for e, v in zip(parts, value, strict=True))
    if isinstance(element, Mapping) and "prefix" in element:
        prefix = element["prefix"]
        return value in ipaddress.IPv4Network(f"{prefix['addr']}/{prefix['len']}")
    if isinstance(element, Mapping) and "range" in element:
        low, high = element["range"]
        if isinstance(value, ipaddress.IPv4Address):
            return ipaddress.IPv4Address(low) <= value <= ipaddress.IPv4Address(high)
        return bool(low <= value <= high)
    if isinstance(value, ipaddress.IPv4Address):
        return ipaddress.IPv4Address(element) == value
    if isinstance(element, str) and element.endswith("*"):
        return str(value).startswith(element[:-1])
    return bool(element == value)
