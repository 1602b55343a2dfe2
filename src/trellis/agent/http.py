"""The agent's HTTP endpoint: `/metrics` for Prometheus, `/healthz` and `/readyz` for the kubelet.

Why the standard library's server and not prometheus_client's `start_http_server`: the probes
need two more paths on the same port, and the server must serve the agent's own registry. It
runs on a daemon thread, one short-lived thread per request, so a slow scraper never delays a
CNI request or a reconcile pass. Bind it to loopback (the default) unless a Prometheus outside
the node scrapes it: it has no authentication.

Liveness and readiness are one-line verdicts from the network controller (`None`: fine), so
the reason a probe failed is in the probe's own output.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

from trellis.agent.metrics import AgentMetrics

log = logging.getLogger(__name__)

NOT_FOLLOWING = "no uplink with an IPv4 address: the agent does not follow the datastore"
"""Why an agent without a network controller is never ready."""
TEXT = "text/plain; charset=utf-8"
POLL_S = 0.1
"""How often the server checks for shutdown (seconds): the most it delays the agent's exit."""


class EndpointError(RuntimeError):
    """The endpoint cannot serve: its address is taken, or not this machine's."""


class Health(Protocol):
    def liveness(self) -> str | None:
        """Why the agent should be restarted (one line), None while it works."""

    def readiness(self) -> str | None:
        """Why the node's networking is not ready (one line), None when it is."""


class _Request(BaseHTTPRequestHandler):
    server: AgentHttpServer

    def do_GET(self) -> None:
        path = self.path.partition("?")[0]
        if path == "/metrics":
            body, content_type = self.server.metrics.render(self.headers.get("Accept", ""))
            self._reply(HTTPStatus.OK, body, content_type)
        elif path in ("/healthz", "/readyz"):
            self._verdict(self.server.check(path))
        else:
            self._reply(HTTPStatus.NOT_FOUND, b"not found: try /metrics, /healthz or /readyz\n")

    def _verdict(self, problem: str | None) -> None:
        if problem is None:
            self._reply(HTTPStatus.OK, b"ok\n")
        else:
            self._reply(HTTPStatus.SERVICE_UNAVAILABLE, problem.encode() + b"\n")

    def _reply(self, status: HTTPStatus, body: bytes, content_type: str = TEXT) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("http %s: " + format, self.address_string(), *args)


class AgentHttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], metrics: AgentMetrics, health: Health | None) -> None:
        """Bind `address` (host, port; port 0 picks a free one); `health` None means no network controller."""
        self.metrics = metrics
        self.health = health
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        try:
            super().__init__(address, _Request)
        except OSError as err:
            raise EndpointError(f"HTTP endpoint {address[0]}:{address[1]}: {err.strerror}") from err

    def check(self, path: str) -> str | None:
        """The verdict of `/healthz` or `/readyz`."""
        if self.health is None:
            return None if path == "/healthz" else NOT_FOLLOWING
        return self.health.liveness() if path == "/healthz" else self.health.readiness()


@contextmanager
def serving(
    address: tuple[str, int] | None, metrics: AgentMetrics, health: Health | None
) -> Iterator[AgentHttpServer | None]:
    """Serve `/metrics`, `/healthz` and `/readyz` on `address` (None: not at all) while in the block."""
    if address is None:
        yield None
        return
    server = AgentHttpServer(address, metrics, health)
    thread = threading.Thread(target=server.serve_forever, args=(POLL_S,), name="http", daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    log.info("serving /metrics, /healthz and /readyz on %s:%s", host, port)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
