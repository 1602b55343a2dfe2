"""Routes and VXLAN peers a node must hold, computed from the cluster's nodes and blocks.

Pure: the output is a function of its inputs only (Felix's calculation graph in miniature),
so every join, leave, restart and reordering is a unit test. Backends:
- `host-gw`: each remote block via the remote node's underlay address (one L2 subnet);
- `vxlan`: each remote block via the remote node's tunnel address on-link over `trl.vxlan`,
  with one FDB entry (VTEP MAC -> underlay IP) and one permanent neighbour per remote node,
  as Flannel does, so the kernel never floods or learns;
- `vxlan-cross-subnet`: host-gw within the node's subnet, VXLAN across (Calico's CrossSubnet).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from trellis.model.node import Node

VXLAN_DEVICE = "trl.vxlan"
BACKENDS = ("vxlan", "host-gw", "vxlan-cross-subnet")


@dataclass(frozen=True, order=True)
class Route:
    """A route to a remote block: via `gateway`, on the VXLAN device when `vxlan`."""

    dst: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    vxlan: bool


@dataclass(frozen=True, order=True)
class VxlanPeer:
    """One remote VTEP: FDB entry (mac -> underlay) and neighbour entry (vtep_ip -> mac)."""

    vtep_mac: str
    vtep_ip: ipaddress.IPv4Address
    underlay_ip: ipaddress.IPv4Address


@dataclass(frozen=True)
class DesiredRoutes:
    routes: frozenset[Route]
    peers: frozenset[VxlanPeer]
    problems: tuple[str, ...]
    """Remote nodes that cannot be routed, each with the reason (shown to operators)."""


def _over_vxlan(backend: str, local: Node, remote: Node) -> bool:
    if backend == "vxlan":
        return True
    if backend == "vxlan-cross-subnet":
        return remote.underlay.ip not in local.underlay.network
    return False


def compute_routes(
    backend: str,
    local: str,
    nodes: Mapping[str, Node],
    blocks: Iterable[tuple[ipaddress.IPv4Network, str]],
) -> DesiredRoutes:
    """What node `local` must hold, given every node and every (block, owner node)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    me = nodes.get(local)
    routes: set[Route] = set()
    peers: set[VxlanPeer] = set()
    problems: list[str] = []
    if me is None:
        return DesiredRoutes(frozenset(), frozenset(), (f"node {local} is not registered yet",))
    by_owner: dict[str, list[ipaddress.IPv4Network]] = {}
    for cidr, owner in blocks:
        by_owner.setdefault(owner, []).append(cidr)
    for name, remote in sorted(nodes.items()):
        if name == local:
            continue
        if _over_vxlan(backend, me, remote):
            if not remote.vtep_mac or remote.vtep_ip is None:
                problems.append(f"node {name}: no VXLAN tunnel endpoint registered yet")
                continue
            peers.add(VxlanPeer(remote.vtep_mac, remote.vtep_ip, remote.underlay.ip))
            gateway, vxlan = remote.vtep_ip, True
        else:
            if remote.underlay.ip not in me.underlay.network:
                problems.append(
                    f"node {name} ({remote.underlay.ip}) is not on this node's subnet "
                    f"{me.underlay.network}: host-gw needs one L2 segment (use vxlan or vxlan-cross-subnet)"
                )
                continue
            gateway, vxlan = remote.underlay.ip, False
        routes.update(Route(cidr, gateway, vxlan) for cidr in by_owner.get(name, ()))
    return DesiredRoutes(frozenset(routes), frozenset(peers), tuple(problems))
