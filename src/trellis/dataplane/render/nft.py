"""Render Trellis' one nftables table, `inet trl`, as libnftables JSON (pure).

The table is replaced whole in one transaction (add, delete, add again: the idiom that
works whether or not it exists), so the kernel never holds half a ruleset. Everything
Trellis filters or rewrites lives in this table and nowhere else.

Egress: pod traffic leaving for anything outside the cluster (pools and node addresses) is
masqueraded to the node's address; pod-to-pod and pod-to-node traffic keeps its source.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

TABLE = "trl"
FAMILY = "inet"


@dataclass(frozen=True)
class NatState:
    pod_nets: frozenset[ipaddress.IPv4Network]
    """The pools pods take addresses from."""
    cluster_nets: frozenset[ipaddress.IPv4Network]
    """Destinations that keep the pod's source: the pools and every node's address."""


def _set_elements(nets: Iterable[ipaddress.IPv4Network]) -> list[Any]:
    out: list[Any] = []
    for net in sorted(nets):
        if net.prefixlen == 32:
            out.append(str(net.network_address))
        else:
            out.append({"prefix": {"addr": str(net.network_address), "len": net.prefixlen}})
    return out


def _set(name: str, nets: Iterable[ipaddress.IPv4Network]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "family": FAMILY,
        "table": TABLE,
        "name": name,
        "type": "ipv4_addr",
        "flags": ["interval"],
    }
    elements = _set_elements(nets)
    if elements:
        body["elem"] = elements
    return {"set": body}


def render_table(nat: NatState) -> list[dict[str, Any]]:
    """The commands that replace the table: pass as {"nftables": [...]}."""
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
    ]
