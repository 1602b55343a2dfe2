"""The lab's underlay: a fabric namespace with a bridge, and a namespace per node wired to it.

Why everything is made from inside the namespaces: the lab must never touch the machine's
own network. A node's uplink is a veth created by a netlink socket opened in the fabric
namespace, with its peer placed in the node's namespace in the same request, so no link ever
appears, even briefly, in the root namespace. A namespace is made the way iproute2 and
container runtimes make one: a throwaway thread unshares its network namespace and
bind-mounts it at /run/netns/NAME, then ends (`dataplane/kernel/netns.py` explains why a
thread that switched namespace must not live on).

Layout of a lab with underlay subnets 172.31.L.0/24, 172.31.M.0/24, ...:
  fabric `trl-<lab>-fabric`:  bridge `trl-br0` with 172.31.L.1/24, 172.31.M.1/24, ...;
                              ports `trl-p<k>` (node k) and `trl-ext`; routes between the
                              subnets (ip_forward on, no ICMP redirects) and nowhere else
  node k `trl-<lab>-node-k`:  `trl-eth0` 172.31.S.(10+k)/24 on its subnet S, default route via
                              172.31.S.1, ip_forward on (a Kubernetes node routes between its pods)
  external `trl-<lab>-ext`:   `trl-eth0` 172.31.L.254/24, default route via 172.31.L.1
  ToR `trl-<lab>-tor`:        (BGP topology tor only) port `trl-tor`, `trl-eth0` 172.31.L.253/24
One bridge carries every subnet, yet a node reaches another subnet only through the fabric's
router: with redirects off, nothing tells it of the shortcut, as on separate L2 segments.
The default route is also what lets each pod's host veth answer ARP for 169.254.1.1 by proxy.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from trellis.dataplane.kernel.netns import CLONE_NEWNET, NETNS_RUN_DIR, call_in_netns, netns_path
from trellis.lab.errors import LabError

BRIDGE = "trl-br0"
NODE_UPLINK = "trl-eth0"
EXTERNAL_PORT = "trl-ext"
ROUTER_PORT = "trl-tor"

MS_BIND = 0x1000
MS_REC = 0x4000
MS_SHARED = 0x100000
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)


def fabric_port(index: int) -> str:
    """The fabric side of node `index`'s uplink."""
    return f"trl-p{index}"


def _libc_call(what: str, result: int) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _in_new_thread(func: Callable[[], None]) -> None:
    """Run `func` in a thread of its own, which then ends; re-raise its error here."""
    failure: list[BaseException] = []

    def body() -> None:
        try:
            func()
        except BaseException as err:  # handed to the caller below
            failure.append(err)

    thread = threading.Thread(target=body, name="trl-netns", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def _shared_run_dir() -> None:
    """Make /run/netns a shared mount, as `ip netns add` does.

    Then a namespace mounted there later propagates to mount namespaces copied from this one
    (a container's, say), and so does its removal; otherwise a copy would pin it forever.
    """
    NETNS_RUN_DIR.mkdir(parents=True, exist_ok=True)
    run_dir = bytes(NETNS_RUN_DIR)
    if _libc.mount(b"", run_dir, b"none", MS_SHARED | MS_REC, None) == 0:
        return
    if ctypes.get_errno() != errno.EINVAL:
        _libc_call(f"make {NETNS_RUN_DIR} shared", -1)
    # Not a mount point yet: bind-mount the directory onto itself, then share it.
    _libc_call(f"bind {NETNS_RUN_DIR}", _libc.mount(run_dir, run_dir, b"none", MS_BIND | MS_REC, None))
    _libc_call(f"make {NETNS_RUN_DIR} shared", _libc.mount(b"", run_dir, b"none", MS_SHARED | MS_REC, None))


def netns_exists(name: str) -> bool:
    return Path(netns_path(name)).exists()


def create_netns(name: str) -> None:
    """Create network namespace `name` (as `ip netns add`); LabError if it exists."""
    _shared_run_dir()
    path = Path(netns_path(name))
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    except FileExistsError:
        raise LabError(f"network namespace {name} already exists (not made by this lab?)") from None

    def unshare_and_mount() -> None:
        _libc_call(f"unshare for {name}", _libc.unshare(CLONE_NEWNET))
        source = b"/proc/thread-self/ns/net"
        _libc_call(f"mount {path}", _libc.mount(source, bytes(path), b"none", MS_BIND, None))

    try:
        _in_new_thread(unshare_and_mount)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def remove_netns(name: str) -> bool:
    """Remove network namespace `name` (as `ip netns del`); False if it did not exist.

    The kernel frees the namespace, and every link in it, once no process is inside.
    """
    path = Path(netns_path(name))
    if _libc.umount2(bytes(path), MNT_DETACH) != 0 and ctypes.get_errno() not in (errno.EINVAL, errno.ENOENT):
        _libc_call(f"unmount {path}", -1)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


@contextmanager
def _netlink(netns: str, what: str) -> Iterator[Any]:
    """An IPRoute socket of namespace `netns`; a refused request becomes a LabError naming `what`."""
    ipr = call_in_netns(netns, IPRoute)
    try:
        yield ipr
    except NetlinkError as err:
        raise LabError(f"{what} in {netns}: {os.strerror(err.code)}") from None
    finally:
        ipr.close()


def _index(ipr: Any, name: str) -> int:
    return int(ipr.link_lookup(ifname=name)[0])


def _up(ipr: Any, name: str) -> int:
    index = _index(ipr, name)
    ipr.link("set", index=index, state="up")
    return index


def _write_sysctls(netns: str, values: dict[str, str]) -> None:
    """Set /proc/sys/net/PATH for each PATH of `values`, in namespace `netns` only."""

    def write() -> None:
        for path, value in values.items():
            Path("/proc/sys/net", path).write_text(value)

    # /proc/sys/net shows the namespace of the thread that opens it.
    call_in_netns(netns, write)


def build_fabric(netns: str, gateways: list[ipaddress.IPv4Interface]) -> None:
    """The fabric namespace: its bridge holds each subnet's gateway address and routes between them."""
    create_netns(netns)
    # `default` before the bridge exists, so that it inherits it; `all` and `default` must both be off.
    _write_sysctls(
        netns,
        {
            "ipv4/conf/default/send_redirects": "0",
            "ipv4/conf/all/send_redirects": "0",
            "ipv4/ip_forward": "1",
        },
    )
    with _netlink(netns, f"bridge {BRIDGE}") as ipr:
        _up(ipr, "lo")
        ipr.link("add", ifname=BRIDGE, kind="bridge")
        index = _index(ipr, BRIDGE)
        for gateway in gateways:
            ipr.addr("add", index=index, address=str(gateway.ip), prefixlen=gateway.network.prefixlen)
        ipr.link("set", index=index, state="up")


def _attach(fabric: str, port: str, netns: str, address: ipaddress.IPv4Interface) -> None:
    """Namespace `netns` on the fabric bridge: uplink, address, default route via its subnet's gateway."""
    create_netns(netns)
    fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        with _netlink(fabric, f"veth {port} to {NODE_UPLINK} of {netns}") as ipr:
            ipr.link("add", ifname=port, kind="veth", peer={"ifname": NODE_UPLINK, "net_ns_fd": fd})
            ipr.link("set", index=_index(ipr, port), master=_index(ipr, BRIDGE), state="up")
    finally:
        os.close(fd)
    with _netlink(netns, f"{NODE_UPLINK} {address}") as ipr:
        _up(ipr, "lo")
        uplink = _index(ipr, NODE_UPLINK)
        ipr.addr("add", index=uplink, address=str(address.ip), prefixlen=address.network.prefixlen)
        ipr.link("set", index=uplink, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway=str(address.network.network_address + 1), oif=uplink)


def add_node(fabric: str, index: int, netns: str, address: ipaddress.IPv4Interface) -> None:
    """Node namespace `netns` on the fabric at port `trl-p<index>`; it forwards, as a node routes its pods."""
    _attach(fabric, fabric_port(index), netns, address)
    _write_sysctls(netns, {"ipv4/ip_forward": "1"})


def add_external(fabric: str, netns: str, address: ipaddress.IPv4Interface) -> None:
    """The external host: a namespace on the fabric that is no node, for egress to reach."""
    _attach(fabric, EXTERNAL_PORT, netns, address)


def add_router(fabric: str, netns: str, address: ipaddress.IPv4Interface) -> None:
    """A router on the fabric beside the nodes (the ToR of BGP topology tor, `lab/frr.py`)."""
    _attach(fabric, ROUTER_PORT, netns, address)


def remove_port(fabric: str, port: str) -> None:
    """Delete the fabric's veth `port` (its peer goes with it); nothing to do if it is gone."""
    with _netlink(fabric, f"remove {port}") as ipr:
        found = ipr.link_lookup(ifname=port)
        if found:
            ipr.link("del", index=found[0])
