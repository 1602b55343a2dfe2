"""Netlink plumbing shared by the kernel drivers: a socket pool, error naming, link lookup."""

from __future__ import annotations

import errno
import ipaddress
import os
import queue
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

AF_INET = 2
RTNH_F_ONLINK = 4
RT_SCOPE_LINK = 253


class KernelError(Exception):
    """The kernel refused a change; names the object and carries the errno."""

    def __init__(self, what: str, err: int) -> None:
        super().__init__(f"{what}: {errno.errorcode.get(err, str(err))} ({os.strerror(err)})")
        self.errno = err


class SocketPool:
    """Netlink sockets of the agent's own namespace, kept open and lent one per operation."""

    def __init__(self) -> None:
        self._free: queue.SimpleQueue[Any] = queue.SimpleQueue()

    @contextmanager
    def lease(self) -> Iterator[Any]:
        try:
            ipr = self._free.get_nowait()
        except queue.Empty:
            ipr = IPRoute()
        try:
            yield ipr
        except BaseException:
            ipr.close()  # a socket that saw an error may hold unread replies
            raise
        self._free.put(ipr)


@contextmanager
def kernel_errors(what: str) -> Iterator[None]:
    """Turn a NetlinkError into a KernelError naming `what`."""
    try:
        yield
    except NetlinkError as err:
        raise KernelError(what, err.code) from None


def link_index(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


@dataclass(frozen=True)
class Uplink:
    """The node's underlay interface: its name, MTU and first IPv4 address with its subnet."""

    name: str
    mtu: int
    address: ipaddress.IPv4Interface | None


def find_uplink(pool: SocketPool, name: str = "") -> Uplink | None:
    """Interface `name`, or the one holding the default route; None when there is neither."""
    with pool.lease() as ipr:
        index = link_index(ipr, name) if name else None
        if index is None and not name:
            for route in ipr.get_routes(family=AF_INET, dst_len=0, table=254):
                if route.get_attr("RTA_OIF") is not None:
                    index = int(route.get_attr("RTA_OIF"))
                    break
        if index is None:
            return None
        link = ipr.link("get", index=index)[0]
        addrs = ipr.get_addr(family=AF_INET, index=index)
        address = (
            ipaddress.IPv4Interface(f"{addrs[0].get_attr('IFA_ADDRESS')}/{addrs[0]['prefixlen']}")
            if addrs
            else None
        )
        return Uplink(str(link.get_attr("IFLA_IFNAME")), int(link.get_attr("IFLA_MTU")), address)


def enable_forwarding() -> None:
    """The node routes pod traffic: IPv4 forwarding on, in the agent's network namespace (as
    every CNI does on its node)."""
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
