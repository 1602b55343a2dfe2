"""The agent's unix socket: one thread per CNI request, the wire format of `trellis.cni.client`."""

from __future__ import annotations

import logging
import os
import socket
import socketserver
from collections.abc import Callable
from pathlib import Path

from trellis.cni.client import decode_request
from trellis.cni.spec import CniError, Code

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, str], bytes], tuple[int, bytes]]


class _Connection(socketserver.StreamRequestHandler):
    server: CniServer

    def handle(self) -> None:
        data = self.rfile.read()
        try:
            env, stdin = decode_request(data)
        except ValueError as err:
            code, out = 1, CniError(Code.DECODE_FAILURE, str(err)).to_json("1.1.0").encode()
        else:
            code, out = self.server.handler(env, stdin)
        try:
            self.wfile.write(b"%d\n" % code + out)
        except BrokenPipeError:
            log.warning("CNI client went away before the reply (exit code %d)", code)


class CniServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Serves many CNI requests at once; root-only socket (0600 in a 0700 directory)."""

    daemon_threads = True
    request_queue_size = 256

    def __init__(self, path: Path, handler: Handler) -> None:
        self.handler = handler
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.parent.chmod(0o700)
        _remove_stale_socket(path)
        old_umask = os.umask(0o177)
        try:
            super().__init__(str(path), _Connection)
        finally:
            os.umask(old_umask)

    def server_close(self) -> None:
        super().server_close()
        self.path.unlink(missing_ok=True)


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket left by a dead agent; refuse to start beside a live one."""
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
        return
    finally:
        probe.close()
    raise RuntimeError(f"another agent is serving {path}")
