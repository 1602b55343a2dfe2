"""Agent settings: one frozen dataclass, a docstring per field with unit and default."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from trellis.datastore.base import ClientTls

BACKEND_OVERHEAD = {"vxlan": 50, "vxlan-cross-subnet": 50, "host-gw": 0, "bgp": 0}
"""Bytes each backend adds to a packet on the underlay (VXLAN: outer IP, UDP, VXLAN, Ethernet)."""

DEFAULT_SOCKET = Path("/run/trellis/agent.sock")
DEFAULT_HTTP_ADDRESS = "127.0.0.1:9617"
DEFAULT_STATE_DIR = Path("/var/lib/trellis")


@dataclass(frozen=True)
class AgentConfig:
    node: str
    """This node's name, as in Kubernetes (default: the host name)."""
    socket: Path = DEFAULT_SOCKET
    """Unix socket the CNI executable talks to; created mode 0600 in a 0700 directory."""
    state_dir: Path = DEFAULT_STATE_DIR
    """Where the agent keeps its files (the SQLite datastore by default)."""
    datastore: str = "sqlite"
    """Datastore kind: `sqlite` (embedded, one machine), `etcd` (many machines) or `kubernetes`
    (the cluster's API server)."""
    datastore_location: str = ""
    """Datastore address: for sqlite the file (default: state_dir/trellis.db), for etcd a URL,
    for kubernetes a kubeconfig file (default: the in-cluster service account)."""
    etcd_ca: Path | None = None
    """PEM CA bundle that signs etcd's server certificate (https:// URL; default: the system's CAs)."""
    etcd_cert: Path | None = None
    """PEM client certificate, for an etcd started with --client-cert-auth (default: none)."""
    etcd_key: Path | None = None
    """PEM private key of `etcd_cert` (default: none)."""
    pools: tuple[ipaddress.IPv4Network, ...] = field(
        default_factory=lambda: (ipaddress.IPv4Network("10.244.0.0/16"),)
    )
    """IP pools pod addresses come from (default 10.244.0.0/16)."""
    block_prefixlen: int = 26
    """Prefix length of the blocks a node claims from a pool (default 26: 64 addresses)."""
    backend: str = "vxlan"
    """Network backend: vxlan, host-gw, vxlan-cross-subnet or bgp (routes from BIRD; not yet built)."""
    mtu: int = 0
    """Pod interface MTU in bytes; 0 means the uplink's MTU less the backend's overhead."""
    policy: bool = True
    """Enforce NetworkPolicy and ClusterNetworkPolicy (pods without a Pod object are dropped);
    off for runtimes without Kubernetes objects (a plain podman host)."""
    uplink: str = ""
    """Underlay interface; empty means the one holding the default route."""
    vxlan_vni: int = 1
    """VXLAN network identifier of `trl.vxlan` (default 1)."""
    vxlan_port: int = 8472
    """VXLAN UDP port (default 8472, as Flannel; 4789 is IANA's)."""
    node_ttl_s: int = 10
    """Seconds the node's registration outlives a dead agent (its lease TTL; default 10)."""
    dead_node_grace_s: float = 60.0
    """Seconds a node may be gone before its blocks go back to the pool (default 60)."""
    http_address: str = DEFAULT_HTTP_ADDRESS
    """HOST:PORT serving /metrics, /healthz and /readyz (default 127.0.0.1:9617; `[::1]:P` for
    IPv6; port 0 picks a free one); empty disables it."""

    def __post_init__(self) -> None:
        self.http_endpoint  # noqa: B018 - a malformed address fails here, not at start-up
        if self.backend not in BACKEND_OVERHEAD:
            raise ValueError(f"backend {self.backend!r} is not one of {', '.join(BACKEND_OVERHEAD)}")
        for pool in self.pools:
            if not 0 < pool.prefixlen <= self.block_prefixlen <= 32:
                raise ValueError(f"block size /{self.block_prefixlen} does not fit pool {pool}")

    @property
    def datastore_path(self) -> str:
        if self.datastore_location or self.datastore != "sqlite":
            return self.datastore_location
        return str(self.state_dir / "trellis.db")

    @property
    def datastore_tls(self) -> ClientTls | None:
        """The etcd TLS files, None when no file is given."""
        if self.etcd_ca is None and self.etcd_cert is None and self.etcd_key is None:
            return None
        return ClientTls(self.etcd_ca, self.etcd_cert, self.etcd_key)

    @property
    def http_endpoint(self) -> tuple[str, int] | None:
        """(host, port) of `http_address`; None when it is empty (no HTTP endpoint)."""
        if not self.http_address:
            return None
        host, _, port = self.http_address.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"HTTP address {self.http_address!r} is not HOST:PORT")
        return host.removeprefix("[").removesuffix("]"), int(port)

    def pod_mtu(self, uplink_mtu: int) -> int:
        return self.mtu or uplink_mtu - BACKEND_OVERHEAD[self.backend]
