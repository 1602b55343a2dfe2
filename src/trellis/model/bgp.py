"""BGP settings as the cluster stores them: one BGPConfiguration, any number of BGPPeers.

Why two kinds shaped like Calico's (`projectcalico.org/v3` BGPConfiguration and BGPPeer):
people who run BGP clusters know them, and they split cleanly into what the whole cluster
shares (AS numbers, mesh or route reflectors, graceful restart) and what a router outside the
cluster needs (its address, AS, password, and which nodes peer with it).

They are Kubernetes-style objects (`apiVersion: trellis.dev/v1`), applied by the lab and kept
by the datastore as written, under `/trellis/bgp/configurations/<name>` and
`/trellis/bgp/peers/<name>`. Every field is checked, unknown fields included (a misspelt
`asnumber` would otherwise silently mean the default AS), and a bad object raises
`InvalidObject` with one line naming the kind, the object and the field, as the policy kinds
do (`model/k8s.py`, whose field-path parser this module shares).

Only the configuration named `default` applies, as in Calico; the calculation reports others.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from trellis.model.k8s import _At, _parse
from trellis.model.selector import LabelSelector

API_VERSION = "trellis.dev/v1"
CONFIGURATION_PREFIX = "/trellis/bgp/configurations/"
PEER_PREFIX = "/trellis/bgp/peers/"
DEFAULT_CONFIGURATION = "default"
"""The name of the one BGPConfiguration that applies."""
DEFAULT_ASN = 64512
"""The cluster's AS when no configuration says otherwise (the first private 16-bit AS, as Calico)."""
MAX_ASN = 4_294_967_295
DEFAULT_CLUSTER_ID = ipaddress.IPv4Address("244.0.0.1")
"""Route-reflector cluster ID shared by every reflector (Calico's documented example value)."""
DEFAULT_GRACEFUL_RESTART_S = 120
MAX_GRACEFUL_RESTART_S = 4095
"""The restart time is a 12-bit field of the graceful restart capability (RFC 4724)."""
MAX_PASSWORD = 80
"""TCP MD5 keys are at most 80 bytes (TCP_MD5SIG_MAXKEYLEN)."""

_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_CONFIGURATION_FIELDS = frozenset(
    {"asNumber", "nodeToNodeMeshEnabled", "nodeASNumbers", "routeReflectors", "gracefulRestartTimeSeconds"}
)
_PEER_FIELDS = frozenset({"peerIP", "asNumber", "password", "node", "nodeSelector", "acceptPrefixes"})
_REFLECTOR_FIELDS = frozenset({"nodes", "nodeSelector", "clusterID"})
_PASSWORD = re.compile(r"[ !#-\[\]-~]+")
"""Printable ASCII but `"` and `\\`: BIRD strings have no escapes."""


@dataclass(frozen=True)
class RouteReflectors:
    """Which nodes reflect routes; every other node then peers only with them."""

    nodes: frozenset[str] = frozenset()
    """Route reflectors by node name."""
    selector: LabelSelector | None = None
    """Route reflectors by node label; None selects none (an empty selector selects all)."""
    cluster_id: ipaddress.IPv4Address = DEFAULT_CLUSTER_ID
    """The cluster ID all reflectors share, so that redundant reflectors drop each other's copies."""

    def selects(self, node: str, labels: Mapping[str, str]) -> bool:
        return node in self.nodes or (self.selector is not None and self.selector.matches(labels))


@dataclass(frozen=True)
class BGPConfiguration:
    name: str = DEFAULT_CONFIGURATION
    asn: int = DEFAULT_ASN
    """`spec.asNumber`: the AS of every node without an override (default 64512)."""
    mesh: bool = True
    """`spec.nodeToNodeMeshEnabled`: every node peers with every other node, unless route
    reflectors are selected, which replace the mesh (default on)."""
    node_asns: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    """`spec.nodeASNumbers`: per-node AS overrides by node name (sessions between ASes are eBGP)."""
    route_reflectors: RouteReflectors | None = None
    """`spec.routeReflectors`; None: no route reflectors."""
    graceful_restart_s: int = DEFAULT_GRACEFUL_RESTART_S
    """`spec.gracefulRestartTimeSeconds`: how long peers keep a restarting node's routes (default 120)."""

    @property
    def key(self) -> str:
        return CONFIGURATION_PREFIX + self.name

    def node_asn(self, node: str) -> int:
        return self.node_asns.get(node, self.asn)


@dataclass(frozen=True)
class BGPPeer:
    """A router outside the cluster (a top-of-rack switch, a route server) and who peers with it."""

    name: str
    peer_ip: ipaddress.IPv4Address
    asn: int
    password: str = ""
    """TCP MD5 password; empty: none."""
    node: str = ""
    """Only this node peers; empty: see `node_selector`."""
    node_selector: LabelSelector | None = None
    """Only nodes with these labels peer; None with no `node`: every node (a global peer)."""
    accept: tuple[ipaddress.IPv4Network, ...] = ()
    """Prefixes taken from this peer besides pool blocks (say the default route or an external
    network), matched exactly."""

    @property
    def key(self) -> str:
        return PEER_PREFIX + self.name

    def applies_to(self, node: str, labels: Mapping[str, str]) -> bool:
        if self.node:
            return node == self.node
        return self.node_selector is None or self.node_selector.matches(labels)


def parse_configuration(value: Any) -> BGPConfiguration:
    def body(root: _At) -> BGPConfiguration:
        name = _header(root, "BGPConfiguration")
        spec = root["spec"]
        _known(spec, _CONFIGURATION_FIELDS)
        mesh = spec["nodeToNodeMeshEnabled"]
        if mesh.present and not isinstance(mesh.value, bool):
            mesh.fail("must be true or false")
        node_asns = spec["nodeASNumbers"]
        return BGPConfiguration(
            name=name,
            asn=_asn(spec["asNumber"], DEFAULT_ASN),
            mesh=mesh.value is not False,
            node_asns=MappingProxyType({node: _asn(node_asns[node]) for node in sorted(node_asns.keys())}),
            route_reflectors=_route_reflectors(spec["routeReflectors"]),
            graceful_restart_s=(
                spec["gracefulRestartTimeSeconds"].integer(1, MAX_GRACEFUL_RESTART_S)
                if spec["gracefulRestartTimeSeconds"].present
                else DEFAULT_GRACEFUL_RESTART_S
            ),
        )

    return _parse("BGPConfiguration", value, body)


def parse_peer(value: Any) -> BGPPeer:
    def body(root: _At) -> BGPPeer:
        name = _header(root, "BGPPeer")
        spec = root["spec"]
        _known(spec, _PEER_FIELDS)
        if spec["node"].present and spec["nodeSelector"].present:
            spec.fail("node and nodeSelector are mutually exclusive")
        return BGPPeer(
            name=name,
            peer_ip=_required(spec["peerIP"]).ipv4(),
            asn=_asn(spec["asNumber"]),
            password=_password(spec["password"]),
            node=spec["node"].string(default=""),
            node_selector=spec["nodeSelector"].selector() if spec["nodeSelector"].present else None,
            accept=tuple(sorted({_ipv4_network(prefix) for prefix in spec["acceptPrefixes"].items()})),
        )

    return _parse("BGPPeer", value, body)


def _header(root: _At, kind: str) -> str:
    """Check apiVersion and kind; the object's name, which becomes part of its datastore key."""
    if root["apiVersion"].value != API_VERSION:
        root["apiVersion"].fail(f"must be {API_VERSION}, not {root['apiVersion'].value!r}")
    if root["kind"].value != kind:
        root["kind"].fail(f"must be {kind}, not {root['kind'].value!r}")
    name = root["metadata"]["name"].string()
    if len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
        root["metadata"]["name"].fail(f"{name!r} is not a DNS subdomain (lower-case a-z, 0-9, '-' and '.')")
    if not root["spec"].present:
        root["spec"].fail("required")
    return name


def _known(at: _At, fields: frozenset[str]) -> None:
    unknown = at.keys() - fields
    if unknown:
        at[sorted(unknown)[0]].fail(f"unknown field (known: {', '.join(sorted(fields))})")


def _required(at: _At) -> _At:
    if not at.present:
        at.fail("required")
    return at


def _asn(at: _At, default: int | None = None) -> int:
    if not at.present and default is not None:
        return default
    return _required(at).integer(1, MAX_ASN)


def _password(at: _At) -> str:
    if not at.present:
        return ""
    password = at.string()
    if len(password) > MAX_PASSWORD or not _PASSWORD.fullmatch(password):
        at.fail(f'must be 1 to {MAX_PASSWORD} printable ASCII characters without " or \\')
    return password


def _ipv4_network(at: _At) -> ipaddress.IPv4Network:
    network = at.network(strict=True)
    if not isinstance(network, ipaddress.IPv4Network):
        at.fail(f"{network} is not an IPv4 network")
    return network


def _route_reflectors(at: _At) -> RouteReflectors | None:
    if not at.present:
        return None
    _known(at, _REFLECTOR_FIELDS)
    if not at.keys() & {"nodes", "nodeSelector"}:
        at.fail("nodes or nodeSelector is required")
    return RouteReflectors(
        nodes=frozenset(node.string() for node in at["nodes"].items()),
        selector=at["nodeSelector"].selector() if at["nodeSelector"].present else None,
        cluster_id=at["clusterID"].ipv4() if at["clusterID"].present else DEFAULT_CLUSTER_ID,
    )
