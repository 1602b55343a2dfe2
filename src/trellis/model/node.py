"""Nodes as the cluster sees them: where a node is on the underlay and which blocks it routes."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

NODE_PREFIX = "/trellis/nodes/"
STATUS_FILE = "status.json"
"""The file in an agent's state directory that says which datastore revision its kernel reflects
(written after every reconcile; the lab waits on it)."""


@dataclass(frozen=True)
class Node:
    name: str
    underlay: ipaddress.IPv4Interface
    """The node's address on the underlay and the subnet it sits on (host-gw needs one L2 subnet)."""
    vtep_mac: str = ""
    """MAC of the node's `trl.vxlan` device; empty when the backend has no VXLAN."""
    vtep_ip: ipaddress.IPv4Address | None = None
    """The node's tunnel address (from the pool), the on-link next hop of its blocks over VXLAN."""

    @property
    def key(self) -> str:
        return NODE_PREFIX + self.name

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "underlay": str(self.underlay),
            "vtepMAC": self.vtep_mac,
            "vtepIP": str(self.vtep_ip) if self.vtep_ip else "",
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Node:
        vtep_ip = value.get("vtepIP") or None
        return cls(
            name=str(value["name"]),
            underlay=ipaddress.IPv4Interface(value["underlay"]),
            vtep_mac=str(value.get("vtepMAC", "")),
            vtep_ip=ipaddress.IPv4Address(vtep_ip) if vtep_ip else None,
        )
