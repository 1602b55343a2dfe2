"""The reachability matrix: every pod connects to every other pod, with real packets, all at once.

Why one selector over every pair: 9 pods make 72 pairs per port and protocol, and once policy
drops packets each blocked pair costs the whole timeout; tried one after another that would
take minutes. So each source pod's sockets are created inside its namespace by a throwaway
thread (a socket stays in the namespace it was made in), and then every connect runs
non-blocking under one selector with one deadline: a matrix takes about the timeout.

TCP: reachable when the handshake completes. UDP: reachable when the destination's pod
server echoes the datagram (re-sent every 200 ms in case one is lost); an ICMP error or
silence until the deadline is unreachable. UDP sockets can be given source ports never used
lately (`udp_source_port`): a datagram whose flow conntrack still remembers from an earlier
probe would pass as established, so the matrix would show an old policy's answer.

`ask` reads what one server answers instead: a pod server names itself and the source address
it saw, which shows masquerading at work.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import resource
import secrets
import selectors
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trellis.dataplane.kernel.netns import call_in_netns
from trellis.lab.errors import LabError
from trellis.lab.manifest import PROTOCOLS

DEFAULT_PORTS = (80, 81)
TIMEOUT_S = 1.0
UDP_RESEND_S = 0.2


@dataclass(frozen=True)
class Endpoint:
    name: str
    """`namespace/pod`."""
    netns: str
    ip: ipaddress.IPv4Address


@dataclass(frozen=True)
class Check:
    port: int
    protocol: str

    def __str__(self) -> str:
        return f"{self.protocol} {self.port}"


@dataclass(frozen=True)
class Matrix:
    check: Check
    results: dict[str, dict[str, bool]]
    """Source `ns/pod` to destination `ns/pod` to reachable."""

    def to_json(self) -> dict[str, Any]:
        return {"port": self.check.port, "protocol": self.check.protocol, "matrix": self.results}

    @property
    def reachable(self) -> int:
        return sum(ok for row in self.results.values() for ok in row.values())

    @property
    def pairs(self) -> int:
        return sum(len(row) for row in self.results.values())


def checks_for(port: int | None, protocol: str | None) -> list[Check]:
    """The matrices to measure: the given port and protocol, each defaulting to all of them."""
    ports = [port] if port is not None else list(DEFAULT_PORTS)
    protocols = [protocol] if protocol is not None else list(PROTOCOLS)
    return [Check(p, proto) for proto in protocols for p in ports]


class Attempt:
    """One connection from one socket to one address; `ok` is the outcome once `done`."""

    def __init__(self, sock: socket.socket, address: tuple[str, int]) -> None:
        self.sock = sock
        self.address = address
        self.udp = sock.type == socket.SOCK_DGRAM
        self.token = secrets.token_bytes(12)
        self.done = False
        self.ok = False

    def start(self) -> bool:
        """Begin connecting; True if an answer must now be awaited."""
        self.sock.setblocking(False)
        try:
            if self.udp:
                self.sock.connect(self.address)
                self.sock.send(self.token)
                return True
            code = self.sock.connect_ex(self.address)
        except OSError:
            return self.finish(False)
        if code == errno.EINPROGRESS:
            return True
        return self.finish(code == 0)

    def resend(self) -> None:
        try:
            self.sock.send(self.token)
        except OSError:
            self.finish(False)

    def answer(self) -> None:
        """The socket is ready: read the outcome."""
        if not self.udp:
            self.finish(self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0)
            return
        try:
            data = self.sock.recv(64)
        except BlockingIOError:
            return
        except OSError:  # ICMP unreachable, reported on the connected socket
            self.finish(False)
            return
        if data == self.token:
            self.finish(True)

    def finish(self, ok: bool) -> bool:
        self.done, self.ok = True, ok
        return False


def run_attempts(attempts: Sequence[Attempt], timeout_s: float = TIMEOUT_S) -> None:
    """Run every attempt at once until each has an outcome or `timeout_s` passes; closes the sockets."""
    deadline = time.monotonic() + timeout_s
    next_resend = time.monotonic() + UDP_RESEND_S
    with selectors.DefaultSelector() as selector:
        for attempt in attempts:
            if attempt.start():
                selector.register(
                    attempt.sock, selectors.EVENT_READ if attempt.udp else selectors.EVENT_WRITE, attempt
                )
        try:
            while selector.get_map() and (now := time.monotonic()) < deadline:
                for key, _ in selector.select(min(deadline, next_resend) - now):
                    key.data.answer()
                    if key.data.done:
                        selector.unregister(key.fileobj)
                if time.monotonic() >= next_resend:
                    next_resend += UDP_RESEND_S
                    for key in list(selector.get_map().values()):
                        if key.data.udp:
                            key.data.resend()
                            if key.data.done:
                                selector.unregister(key.fileobj)
        finally:
            for attempt in attempts:
                attempt.sock.close()


def _allow_open_files(count: int) -> None:
    """Raise the soft limit on open files to fit `count` sockets (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count + 64
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            raise LabError(f"probe needs {wanted} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _sockets_in(netns: str, kinds: list[socket.SocketKind]) -> list[socket.socket]:
    """New sockets of the given types, made inside network namespace `netns`."""

    def make() -> list[socket.socket]:
        return [socket.socket(socket.AF_INET, kind) for kind in kinds]

    return call_in_netns(netns, make)


def udp_sockets_per_source(endpoints: Sequence[Endpoint], checks: Sequence[Check]) -> int:
    """How many UDP source ports each endpoint uses in a probe of `checks`."""
    return (len(endpoints) - 1) * sum(check.protocol == "UDP" for check in checks)


def _bind_next(sock: socket.socket, port: int) -> None:
    """Bind `sock` to `port` if it is free there; else the kernel picks one at connect."""
    with contextlib.suppress(OSError):
        sock.bind(("0.0.0.0", port))


def probe(
    endpoints: Sequence[Endpoint],
    checks: Sequence[Check],
    timeout_s: float = TIMEOUT_S,
    udp_source_port: int | None = None,
) -> list[Matrix]:
    """One matrix per check: from every endpoint to every other one.

    With `udp_source_port`, each endpoint's UDP sockets take the ports from it on, in turn
    (`udp_sockets_per_source` of them).
    """
    _allow_open_files(len(endpoints) * (len(endpoints) - 1) * len(checks))
    matrices = {check: Matrix(check, {src.name: {} for src in endpoints}) for check in checks}
    attempts: list[tuple[dict[str, bool], str, Attempt]] = []
    for src in endpoints:
        pairs = [(dst, check) for check in checks for dst in endpoints if dst.name != src.name]
        kinds = [socket.SOCK_STREAM if check.protocol == "TCP" else socket.SOCK_DGRAM for _, check in pairs]
        udp = 0
        for sock, (dst, check) in zip(_sockets_in(src.netns, kinds), pairs, strict=True):
            if udp_source_port is not None and sock.type == socket.SOCK_DGRAM:
                _bind_next(sock, udp_source_port + udp)
                udp += 1
            row = matrices[check].results[src.name]
            attempts.append((row, dst.name, Attempt(sock, (str(dst.ip), check.port))))
    run_attempts([attempt for _, _, attempt in attempts], timeout_s)
    for row, dst_name, attempt in attempts:
        row[dst_name] = attempt.ok
    return list(matrices.values())


def ask(netns: str, ip: ipaddress.IPv4Address, port: int, timeout_s: float = TIMEOUT_S) -> str:
    """The answer of the TCP server at `ip`:`port` to a connection from namespace `netns`."""
    (sock,) = _sockets_in(netns, [socket.SOCK_STREAM])
    with sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect((str(ip), port))
            return sock.recv(256).decode(errors="replace").strip()
        except OSError as err:
            raise LabError(f"{ip}:{port} from {netns}: {err.strerror or err}") from None
