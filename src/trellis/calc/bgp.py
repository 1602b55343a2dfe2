"""The BGP state a node wants (pure): its router ID and AS, the blocks it originates, its sessions.

Why the topology is decided here and not in the BIRD template: the rules (mesh, route
reflectors, external peers, AS overrides) are the part that can be wrong, and as a pure
function of the cluster every join, leave, reordering and override is a unit test. The
renderer (`bgp/render.py`) then only spells the result in BIRD's syntax.

Topologies (docs/design/bgp.md):
- full mesh (default): every node peers with every other node; iBGP, or eBGP between nodes
  whose AS numbers differ (`nodeASNumbers`);
- route reflectors: as soon as one node is selected, they replace the mesh. A reflector peers
  with every node: with other reflectors plainly, with the rest as its reflector clients; a
  client peers only with the reflectors. Reflection is iBGP only, so a node whose AS differs
  from a reflector's gets no session with it and a problem saying so;
- external peers (BGPPeer): each node peers with the ones that apply to it.

One session per neighbour address. Between two nodes the one with the lower address waits
for the other to connect (`passive`), on both ends alike, as Calico does: with connections
from both sides, a restarting node's graceful restart can be cut short by its peer's own
connection attempt. Sessions are direct, so nodes share one L2 segment (as host-gw needs);
a node elsewhere is named in `problems`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from trellis.model.bgp import (
    CONFIGURATION_PREFIX,
    DEFAULT_CONFIGURATION,
    DEFAULT_GRACEFUL_RESTART_S,
    PEER_PREFIX,
    BGPConfiguration,
    BGPPeer,
    parse_configuration,
    parse_peer,
)
from trellis.model.k8s import InvalidObject
from trellis.model.node import Node

Labels = Mapping[str, Mapping[str, str]]
"""Node labels by node name (a node absent has none)."""


class Role(StrEnum):
    """What the neighbour of a session is to this node; also the prefix of the session's name."""

    MESH = "mesh"
    """Another node of the full mesh."""
    REFLECTOR = "rr"
    """A route reflector: this node is its client, or another reflector."""
    CLIENT = "client"
    """A node this route reflector reflects routes to."""
    PEER = "peer"
    """A router outside the cluster (a BGPPeer)."""


@dataclass(frozen=True, order=True)
class Session:
    role: Role
    neighbor: ipaddress.IPv4Address
    neighbor_asn: int
    peer: str
    """The neighbour's node name, or the BGPPeer's name for role PEER."""
    passive: bool = False
    """Wait for the neighbour to connect."""
    password: str = ""
    """TCP MD5 password; empty: none."""
    accept: tuple[ipaddress.IPv4Network, ...] = ()
    """Prefixes taken from this neighbour besides pool blocks, matched exactly."""

    @property
    def name(self) -> str:
        """BIRD's protocol name: stable while the session is the same, so `configure` keeps it up."""
        return f"{self.role}_{str(self.neighbor).replace('.', '_')}"


@dataclass(frozen=True)
class DesiredBGP:
    node: str
    address: ipaddress.IPv4Address
    """The node's underlay address: its router ID and every session's source address."""
    asn: int
    blocks: tuple[ipaddress.IPv4Network, ...]
    """The node's own blocks, which it originates."""
    pools: tuple[ipaddress.IPv4Network, ...]
    """Pool prefixes (and anything inside) are taken from every session."""
    sessions: tuple[Session, ...]
    cluster_id: ipaddress.IPv4Address | None = None
    """Set when this node is a route reflector."""
    graceful_restart_s: int = DEFAULT_GRACEFUL_RESTART_S
    problems: tuple[str, ...] = ()
    """What could not be configured, and why (shown to operators)."""


@dataclass(frozen=True)
class BGPObjects:
    """The BGP objects of the datastore, parsed."""

    configuration: BGPConfiguration = field(default_factory=BGPConfiguration)
    """The `default` BGPConfiguration, or the defaults when there is none."""
    peers: tuple[BGPPeer, ...] = ()
    problems: tuple[str, ...] = ()
    """Objects that were ignored, and why."""


def parse_bgp_objects(objects: Mapping[str, Mapping[str, Any]]) -> BGPObjects:
    """The BGP objects among the datastore's objects by key; other keys are not looked at."""
    configuration = BGPConfiguration()
    peers: list[BGPPeer] = []
    problems: list[str] = []
    for key, value in sorted(objects.items()):
        try:
            if key.startswith(CONFIGURATION_PREFIX):
                parsed = parse_configuration(value)
                if parsed.name == DEFAULT_CONFIGURATION:
                    configuration = parsed
                else:
                    problems.append(
                        f"BGPConfiguration {parsed.name}: ignored, only {DEFAULT_CONFIGURATION!r} applies"
                    )
            elif key.startswith(PEER_PREFIX):
                peers.append(parse_peer(value))
        except InvalidObject as err:
            problems.append(f"{err} (ignored)")
    return BGPObjects(configuration, tuple(peers), tuple(problems))


def compute_bgp(
    local: Node,
    nodes: Mapping[str, Node],
    blocks: Iterable[tuple[ipaddress.IPv4Network, str]],
    pools: Iterable[ipaddress.IPv4Network],
    bgp: BGPObjects,
    labels: Labels | None = None,
) -> DesiredBGP:
    """What node `local` wants, given every node, every (block, owner) and the BGP objects."""
    labels = labels or {}
    config = bgp.configuration
    asn = config.node_asn(local.name)
    others = sorted((n for n in nodes.values() if n.name != local.name), key=lambda n: n.underlay.ip)
    rr = config.route_reflectors
    reflectors = (
        {n.name for n in (local, *others) if rr.selects(n.name, labels.get(n.name, {}))}
        if rr is not None
        else set()
    )
    sessions: dict[ipaddress.IPv4Address, Session] = {}
    problems = list(bgp.problems)

    for other in others:
        role = _cluster_role(local.name, other.name, reflectors, config.mesh)
        if role is None:
            continue
        other_asn = config.node_asn(other.name)
        if role is not Role.MESH and other_asn != asn:
            problems.append(
                f"node {other.name} is in AS {other_asn} and node {local.name} in AS {asn}: "
                "route reflection needs one AS, so they do not peer"
            )
        elif other.underlay.ip not in local.underlay.network:
            problems.append(_not_on_segment(f"node {other.name}", other.underlay.ip, local))
        else:
            ip = other.underlay.ip
            sessions[ip] = Session(role, ip, other_asn, other.name, passive=ip > local.underlay.ip)

    applied = [p for p in bgp.peers if p.applies_to(local.name, labels.get(local.name, {}))]
    for peer in sorted(applied, key=lambda p: p.name):
        taken = sessions.get(peer.peer_ip)
        if peer.peer_ip == local.underlay.ip:
            problems.append(f"BGPPeer {peer.name}: {peer.peer_ip} is this node's own address")
        elif taken is not None:
            problems.append(f"BGPPeer {peer.name}: {peer.peer_ip} already has a session ({taken.peer})")
        elif peer.peer_ip not in local.underlay.network:
            problems.append(_not_on_segment(f"BGPPeer {peer.name}", peer.peer_ip, local))
        else:
            sessions[peer.peer_ip] = Session(
                Role.PEER, peer.peer_ip, peer.asn, peer.name, password=peer.password, accept=peer.accept
            )

    if others and not sessions:
        problems.append(f"node {local.name} has no BGP session: it exchanges no routes")
    return DesiredBGP(
        node=local.name,
        address=local.underlay.ip,
        asn=asn,
        blocks=tuple(sorted(cidr for cidr, owner in blocks if owner == local.name)),
        pools=tuple(sorted(set(pools))),
        sessions=tuple(sorted(sessions.values())),
        cluster_id=rr.cluster_id if rr is not None and local.name in reflectors else None,
        graceful_restart_s=config.graceful_restart_s,
        problems=tuple(problems),
    )


def _cluster_role(local: str, other: str, reflectors: set[str], mesh: bool) -> Role | None:
    """The role of node `other` for node `local`; None: they do not peer."""
    if not reflectors:
        return Role.MESH if mesh else None
    if other in reflectors:
        return Role.REFLECTOR
    return Role.CLIENT if local in reflectors else None


def _not_on_segment(what: str, address: ipaddress.IPv4Address, local: Node) -> str:
    return (
        f"{what} ({address}) is not on node {local.name}'s subnet {local.underlay.network}: "
        "BGP sessions are direct, on one L2 segment (peer both with a router there instead)"
    )
