"""Remote blocks in the kernel: the `trl.vxlan` device, its FDB and neighbours, block routes.

A reconciler in Felix's manner: `apply(desired)` reads what the kernel holds, compares it
with the desired state and changes only the difference, so it is both the first
programming after a restart (adopting what is already right, never flushing) and every
later update. Ownership: block routes carry Trellis' route protocol and a gateway (pod
routes carry the protocol and none); FDB and neighbour entries live on `trl.vxlan`, which
only Trellis writes to.

VXLAN without learning or multicast, as Flannel does it: per remote node one FDB entry
(VTEP MAC -> underlay IP) and one permanent neighbour (tunnel IP -> VTEP MAC), and an
on-link route per remote block via the remote tunnel IP.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from trellis.calc.routes import VXLAN_DEVICE, DesiredRoutes, Route, VxlanPeer
from trellis.dataplane.kernel.netlink import (
    AF_INET,
    RTNH_F_ONLINK,
    KernelError,
    SocketPool,
    kernel_errors,
    link_index,
)
from trellis.model.naming import ROUTE_PROTOCOL

log = logging.getLogger(__name__)

AF_BRIDGE = 7
NTF_SELF = 0x02
NUD_PERMANENT = 0x80
ZERO_MAC = "00:00:00:00:00:00"


@dataclass(frozen=True)
class VxlanSpec:
    vni: int
    """VXLAN network identifier (default 1)."""
    port: int
    """UDP destination port (default 8472, as Flannel; 4789 is IANA's)."""
    underlay_ip: ipaddress.IPv4Address
    underlay_dev: str
    mtu: int
    vtep_ip: ipaddress.IPv4Address


@dataclass(frozen=True)
class Changes:
    added: int
    removed: int

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


class Overlay:
    def __init__(self, pool: SocketPool) -> None:
        self._pool = pool

    def ensure_vxlan(self, spec: VxlanSpec) -> str:
        """Create or adopt `trl.vxlan` as `spec` says; returns its MAC (kept across restarts)."""
        with self._pool.lease() as ipr, kernel_errors(f"set up {VXLAN_DEVICE}"):
            index = link_index(ipr, VXLAN_DEVICE)
            if index is not None and not self._vxlan_matches(ipr, index, spec):
                log.info("%s differs from the config: re-creating it", VXLAN_DEVICE)
                with kernel_errors(f"delete {VXLAN_DEVICE}"):
                    ipr.link("del", index=index)
                index = None
            if index is None:
                dev = link_index(ipr, spec.underlay_dev)
                if dev is None:
                    raise KernelError(f"underlay device {spec.underlay_dev}", errno.ENODEV)
                with kernel_errors(f"create {VXLAN_DEVICE}"):
                    ipr.link(
                        "add",
                        ifname=VXLAN_DEVICE,
                        kind="vxlan",
                        vxlan_id=spec.vni,
                        vxlan_port=spec.port,
                        vxlan_local=str(spec.underlay_ip),
                        vxlan_link=dev,
                        vxlan_learning=0,
                        mtu=spec.mtu,
                    )
                index = link_index(ipr, VXLAN_DEVICE)
                log.info(
                    "created %s (VNI %d, UDP %d, local %s)",
                    VXLAN_DEVICE,
                    spec.vni,
                    spec.port,
                    spec.underlay_ip,
                )
            with kernel_errors(f"address {spec.vtep_ip}/32 on {VXLAN_DEVICE}"):
                ipr.addr("replace", index=index, address=str(spec.vtep_ip), prefixlen=32)
                ipr.link("set", index=index, state="up", mtu=spec.mtu)
            return str(ipr.link("get", index=index)[0].get_attr("IFLA_ADDRESS"))

    @staticmethod
    def _vxlan_matches(ipr: Any, index: int, spec: VxlanSpec) -> bool:
        link = ipr.link("get", index=index)[0]
        info = link.get_attr("IFLA_LINKINFO")
        data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
        if info is None or info.get_attr("IFLA_INFO_KIND") != "vxlan" or data is None:
            return False
        return bool(
            data.get_attr("IFLA_VXLAN_ID") == spec.vni
            and data.get_attr("IFLA_VXLAN_PORT") == spec.port
            and data.get_attr("IFLA_VXLAN_LOCAL") == str(spec.underlay_ip)
        )

    def remove_vxlan(self) -> bool:
        with self._pool.lease() as ipr:
            index = link_index(ipr, VXLAN_DEVICE)
            if index is None:
                return False
            with kernel_errors(f"delete {VXLAN_DEVICE}"):
                ipr.link("del", index=index)
            return True

    def apply(self, desired: DesiredRoutes, uplink: str) -> Changes:
        """Make the kernel hold exactly `desired`'s block routes and VXLAN peers."""
        with self._pool.lease() as ipr, kernel_errors("reconcile block routes and VXLAN peers"):
            vxlan = link_index(ipr, VXLAN_DEVICE)
            up = link_index(ipr, uplink)
            if up is None:
                raise KernelError(f"uplink {uplink}", errno.ENODEV)
            peers = self._apply_peers(ipr, vxlan, desired.peers) if vxlan is not None else Changes(0, 0)
            routes = self._apply_routes(ipr, desired.routes, vxlan, up)
        return Changes(peers.added + routes.added, peers.removed + routes.removed)

    @staticmethod
    def _apply_peers(ipr: Any, vxlan: int, peers: frozenset[VxlanPeer]) -> Changes:
        fdb_have = {
            (str(e.get_attr("NDA_LLADDR")), str(e.get_attr("NDA_DST")))
            for e in ipr.get_neighbours(family=AF_BRIDGE, ifindex=vxlan)
            if e.get_attr("NDA_DST") is not None and e.get_attr("NDA_LLADDR") != ZERO_MAC
        }
        fdb_want = {(p.vtep_mac, str(p.underlay_ip)) for p in peers}
        neigh_have = {
            (str(e.get_attr("NDA_DST")), str(e.get_attr("NDA_LLADDR")))
            for e in ipr.get_neighbours(family=AF_INET, ifindex=vxlan)
            if e["state"] & NUD_PERMANENT
        }
        neigh_want = {(str(p.vtep_ip), p.vtep_mac) for p in peers}
        for mac, dst in fdb_have - fdb_want:
            with kernel_errors(f"fdb {mac} dst {dst} on {VXLAN_DEVICE}"):
                ipr.fdb("del", ifindex=vxlan, lladdr=mac, dst=dst)
        for ip, mac in neigh_have - neigh_want:
            with kernel_errors(f"neighbour {ip} on {VXLAN_DEVICE}"):
                ipr.neigh("del", ifindex=vxlan, dst=ip, lladdr=mac)
        for mac, dst in fdb_want - fdb_have:
            with kernel_errors(f"fdb {mac} dst {dst} on {VXLAN_DEVICE}"):
                ipr.fdb("append", ifindex=vxlan, lladdr=mac, dst=dst, state=NUD_PERMANENT, flags=NTF_SELF)
        for ip, mac in neigh_want - neigh_have:
            with kernel_errors(f"neighbour {ip} on {VXLAN_DEVICE}"):
                ipr.neigh("replace", ifindex=vxlan, dst=ip, lladdr=mac, state=NUD_PERMANENT)
        return Changes(
            len(fdb_want - fdb_have) + len(neigh_want - neigh_have),
            len(fdb_have - fdb_want) + len(neigh_have - neigh_want),
        )

    @staticmethod
    def _apply_routes(ipr: Any, routes: frozenset[Route], vxlan: int | None, uplink: int) -> Changes:
        have: dict[tuple[str, str, int], Any] = {}
        for r in ipr.get_routes(family=AF_INET, proto=ROUTE_PROTOCOL):
            gateway = r.get_attr("RTA_GATEWAY")
            if gateway is None:  # a pod's /32 route: the CNI side owns those
                continue
            have[(f"{r.get_attr('RTA_DST')}/{r['dst_len']}", str(gateway), int(r.get_attr("RTA_OIF")))] = r
        want: dict[tuple[str, str, int], Route] = {}
        for route in routes:
            oif = vxlan if route.vxlan else uplink
            if oif is None:
                continue
            want[(str(route.dst), str(route.gateway), oif)] = route
        for dst, gateway, oif in have.keys() - want.keys():
            with kernel_errors(f"route {dst} via {gateway}"):
                try:
                    ipr.route("del", dst=dst, gateway=gateway, oif=oif, proto=ROUTE_PROTOCOL)
                except NetlinkError as err:
                    if err.code != errno.ESRCH:
                        raise
        for key in want.keys() - have.keys():
            dst, gateway, oif = key
            flags = RTNH_F_ONLINK if want[key].vxlan else 0
            with kernel_errors(f"route {dst} via {gateway}"):
                ipr.route("replace", dst=dst, gateway=gateway, oif=oif, proto=ROUTE_PROTOCOL, flags=flags)
        return Changes(len(want.keys() - have.keys()), len(have.keys() - want.keys()))
