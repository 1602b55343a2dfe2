"""The program a lab pod runs: it answers on the pod's ports so that probes see real traffic.

TCP: accept, send the pod's name, a space, the client's address as this server sees it and a
newline, then close; the address shows whether a connection kept its source or was masqueraded.
UDP: echo every datagram to its sender. One thread, one selector. It imports only the standard
library, because the lab runs this file by path with `python -I -S` inside the pod's namespace
(no site, no Trellis: it starts in a few milliseconds). Once every socket is bound it prints
one line, `ready PORT/PROTO ...` (with the ports really bound, so 0 means "any"), and closes
stdout; the lab waits for that line, so a probe right after `apply` finds the pod listening.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import socket
import sys


def _listen(address: str, spec: str) -> socket.socket:
    port_text, _, protocol = spec.partition("/")
    kind = socket.SOCK_STREAM if protocol.upper() == "TCP" else socket.SOCK_DGRAM
    sock = socket.socket(socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, int(port_text)))
    if kind == socket.SOCK_STREAM:
        sock.listen(128)
    sock.setblocking(False)
    return sock


def _answer(sock: socket.socket, name: str) -> None:
    if sock.type == socket.SOCK_STREAM:
        try:
            conn, peer = sock.accept()
        except OSError:
            return
        with contextlib.suppress(OSError):
            conn.send(f"{name} {peer[0]}\n".encode())
        conn.close()
        return
    try:
        data, peer = sock.recvfrom(65535)
        sock.sendto(data, peer)
    except OSError:
        pass


def serve(name: str, address: str, specs: list[str]) -> None:
    sockets = [_listen(address, spec) for spec in specs]
    bound = [f"{s.getsockname()[1]}/{'TCP' if s.type == socket.SOCK_STREAM else 'UDP'}" for s in sockets]
    sys.stdout.write(f"ready {' '.join(bound)}\n")
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    with selectors.DefaultSelector() as selector:
        for sock in sockets:
            selector.register(sock, selectors.EVENT_READ, sock)
        while True:
            for key, _ in selector.select():
                _answer(key.data, name)


def main() -> None:
    parser = argparse.ArgumentParser(description="a lab pod's TCP and UDP responder")
    parser.add_argument("--name", required=True, help="the pod, as NAMESPACE/NAME")
    parser.add_argument("--address", default="0.0.0.0")
    parser.add_argument("--listen", action="append", required=True, help="PORT/TCP or PORT/UDP (repeatable)")
    args = parser.parse_args()
    serve(args.name, args.address, args.listen)


if __name__ == "__main__":
    main()
