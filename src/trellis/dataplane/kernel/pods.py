"""Pod plumbing: a routed veth per attachment, no bridge (as Calico and Cilium do it).

The pod's interface gets a /32 and a default route via 169.254.1.1 on-link; the host end
`trl<hash>` answers ARP for it by proxy (with no delay) and carries a /32 route to the pod
marked with Trellis' route protocol. Nothing here is shared between pods, so there is no
bridge to tune and policy attaches per host interface.

Every operation is idempotent: adding what exists replaces it, deleting what is gone is
done. A failed attach removes the veth it made before raising.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from trellis.dataplane.kernel.netlink import (
    AF_INET,
    RT_SCOPE_LINK,
    RTNH_F_ONLINK,
    KernelError,
    SocketPool,
    kernel_errors,
    link_index,
)
from trellis.dataplane.kernel.netns import call_in_netns
from trellis.model.ipam import Attachment
from trellis.model.naming import POD_GATEWAY, ROUTE_PROTOCOL, host_veth_name, is_host_veth_name

log = logging.getLogger(__name__)

LOOPBACK_INDEX = 1
"""`lo` has this index in every network namespace (the kernel's LOOPBACK_IFINDEX)."""
PROC_SYS = Path("/proc/sys/net")


class NetnsMissing(Exception):
    """The pod's network namespace does not exist (any more)."""


@dataclass(frozen=True)
class PodLink:
    """What an attach made, as the CNI result reports it."""

    host_name: str
    host_mac: str
    pod_ifname: str
    pod_mac: str
    mtu: int


def _open_netns(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsMissing(path) from None


@contextmanager
def _pod_socket(netns: str) -> Iterator[Any]:
    try:
        ipr = call_in_netns(netns, IPRoute)
    except FileNotFoundError:
        raise NetnsMissing(netns) from None
    try:
        yield ipr
    finally:
        ipr.close()


def _write_sysctl(path: str, value: str) -> None:
    (PROC_SYS / path).write_text(value)


def _link_index_mac(ipr: Any, name: str) -> tuple[int, str] | None:
    """Index and MAC address of link `name` in one request (as `link_lookup`, None on any error)."""
    try:
        link = ipr.link("get", ifname=name)[0]
    except NetlinkError:
        return None
    return int(link["index"]), str(link.get_attr("IFLA_ADDRESS"))


class PodNetwork:
    """Creates, checks and removes pod attachments in the namespace the agent runs in."""

    def __init__(self, pool: SocketPool) -> None:
        self._pool = pool

    def attach(self, attachment: Attachment, netns: str, address: ipaddress.IPv4Address, mtu: int) -> PodLink:
        host = host_veth_name(attachment)
        fd = _open_netns(netns)
        try:
            with self._pool.lease() as ipr:
                with kernel_errors(f"veth {host} to {attachment.ifname} in {netns}"):
                    try:
                        self._add_veth(ipr, host, attachment.ifname, fd, mtu)
                    except NetlinkError as err:
                        if err.code != errno.EEXIST:
                            raise
                        # A repeated ADD: replace what an earlier one left (same address, from IPAM).
                        self._remove_link(ipr, host)
                        self._add_veth(ipr, host, attachment.ifname, fd, mtu)
                try:
                    return self._configure(ipr, host, attachment, netns, address, mtu)
                except BaseException:
                    self._remove_link(ipr, host)
                    raise
        except NetlinkError as err:
            raise KernelError(f"veth {host}", err.code) from None
        finally:
            os.close(fd)

    @staticmethod
    def _add_veth(ipr: Any, host: str, ifname: str, netns_fd: int, mtu: int) -> None:
        ipr.link(
            "add",
            ifname=host,
            kind="veth",
            state="up",  # the host end only: a peer's flags are not taken at creation
            mtu=mtu,
            peer={"ifname": ifname, "net_ns_fd": netns_fd, "mtu": mtu},
        )

    def _configure(
        self,
        ipr: Any,
        host: str,
        attachment: Attachment,
        netns: str,
        address: ipaddress.IPv4Address,
        mtu: int,
    ) -> PodLink:
        # Each netlink request costs about 0.25 ms here: one `get` per end gives both index and
        # MAC (a veth's MAC is fixed at creation), and `lo` needs no lookup.
        host_link = _link_index_mac(ipr, host)
        if host_link is None:
            raise KernelError(f"veth {host}", errno.ENODEV)
        host_index, host_mac = host_link
        _write_sysctl(f"ipv4/conf/{host}/proxy_arp", "1")
        _write_sysctl(f"ipv4/neigh/{host}/proxy_delay", "0")
        with _pod_socket(netns) as pod:
            pod_link = _link_index_mac(pod, attachment.ifname)
            if pod_link is None:
                raise KernelError(f"{attachment.ifname} in {netns}", errno.ENODEV)
            pod_index, pod_mac = pod_link
            pod.link("set", index=LOOPBACK_INDEX, state="up")
            with kernel_errors(f"address {address}/32 on {attachment.ifname} in {netns}"):
                pod.addr("replace", index=pod_index, address=str(address), prefixlen=32)
            pod.link("set", index=pod_index, state="up")
            with kernel_errors(f"default route via {POD_GATEWAY} in {netns}"):
                pod.route("replace", dst="0.0.0.0/0", gateway=POD_GATEWAY, oif=pod_index, flags=RTNH_F_ONLINK)
        with kernel_errors(f"route {address}/32 dev {host}"):
            ipr.route(
                "replace",
                dst=f"{address}/32",
                oif=host_index,
                scope=RT_SCOPE_LINK,
                proto=ROUTE_PROTOCOL,
            )
        return PodLink(host, host_mac, attachment.ifname, pod_mac, mtu)

    @staticmethod
    def _remove_link(ipr: Any, name: str) -> bool:
        """Delete link `name`; False when it was already gone."""
        try:
            ipr.link("del", ifname=name)
        except NetlinkError as err:
            if err.code in (errno.ENODEV, errno.ENOENT):
                return False
            raise KernelError(f"delete link {name}", err.code) from None
        return True

    def detach(self, attachment: Attachment) -> bool:
        """Remove the attachment's veth (its peer and routes go with it); False if already gone."""
        with self._pool.lease() as ipr:
            return self._remove_link(ipr, host_veth_name(attachment))

    def remove_links(self, names: list[str]) -> None:
        with self._pool.lease() as ipr:
            for name in names:
                self._remove_link(ipr, name)

    def host_links(self) -> list[str]:
        """Names of every host veth Trellis made on this node."""
        with self._pool.lease() as ipr:
            return sorted(
                name
                for link in ipr.get_links()
                if is_host_veth_name(name := str(link.get_attr("IFLA_IFNAME")))
                and link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") == "veth"
            )

    def check(self, attachment: Attachment, netns: str, address: ipaddress.IPv4Address) -> list[str]:
        """What differs from what attach makes; empty when the attachment is intact."""
        host = host_veth_name(attachment)
        problems: list[str] = []
        with self._pool.lease() as ipr:
            host_index = link_index(ipr, host)
            if host_index is None:
                return [f"host interface {host} is missing"]
            routes = ipr.get_routes(family=AF_INET, dst=str(address), dst_len=32, proto=ROUTE_PROTOCOL)
            if not any(r.get_attr("RTA_OIF") == host_index for r in routes):
                problems.append(f"route {address}/32 dev {host} is missing")
        try:
            with _pod_socket(netns) as pod:
                pod_index = link_index(pod, attachment.ifname)
                if pod_index is None:
                    return [*problems, f"{attachment.ifname} is missing in {netns}"]
                addrs = {
                    str(a.get_attr("IFA_ADDRESS")) for a in pod.get_addr(family=AF_INET, index=pod_index)
                }
                if str(address) not in addrs:
                    problems.append(f"{attachment.ifname} in {netns} lacks address {address}")
                defaults = [
                    r
                    for r in pod.get_routes(family=AF_INET, dst_len=0)
                    if r.get_attr("RTA_GATEWAY") == POD_GATEWAY and r.get_attr("RTA_OIF") == pod_index
                ]
                if not defaults:
                    problems.append(f"default route via {POD_GATEWAY} is missing in {netns}")
        except NetnsMissing:
            problems.append(f"network namespace {netns} does not exist")
        return problems
