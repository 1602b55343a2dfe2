"""The few HTTP requests the Kubernetes datastore makes, over lightkube's client.

Why lightkube, and only its lower layer: it brings what is hard to get right (kubeconfig
files, the in-cluster service account with its rotating token, exec credential plugins, client
certificates, TLS, the HTTP transport), while the datastore needs requests its high-level
calls do not offer: lists with `resourceVersionMatch=Exact`, watches with bookmarks whose
stream the caller reads and ends, and deletes with a resourceVersion precondition. Answers
stay plain JSON objects, the shape the rest of Trellis reads.

Errors: a failure the API reports as a `Status` becomes `ApiFailure` (its code and reason
decide what it means to the caller); an unreachable server, a time-out, 429 and 5xx become
`Unavailable`, as for the other stores.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx2
from lightkube.config.client_adapter import ConnectionParams
from lightkube.config.kubeconfig import KubeConfig
from lightkube.core.exceptions import ConfigError
from lightkube.core.generic_client import BasicRequest, GenericSyncClient

from trellis.datastore.base import DatastoreError, Unavailable

CONNECT_TIMEOUT_S = 2.0
"""Seconds to reach the API server: a CNI ADD waits on IPAM's requests, and an unreachable
server should answer "try again later" soon."""

TIMEOUT_S = 3.0
"""Seconds a request for one object may wait on each read of its answer (and on writing it):
as the etcd store's, so that a CNI ADD meets a server that accepted the connection but does
not answer with `Unavailable` within seconds. The wait restarts at each chunk of an answer."""

LIST_TIMEOUT_S = 10.0
"""The same for a page of a list of one of the cluster's kinds: a page of 500 Pods from a busy
API server may well take longer than one object."""


class ApiFailure(DatastoreError):
    """The API server answered with a failure `Status`."""

    def __init__(self, where: str, status: Status) -> None:
        super().__init__(f"{where}: {status.code} {status.reason}: {status.message}")
        self.status = status


@dataclass(frozen=True)
class Status:
    """A `Status` object (meta/v1): what a failed request, or a watch's ERROR event, carries."""

    code: int
    reason: str
    message: str

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Status:
        return cls(int(value.get("code", 0)), str(value.get("reason", "")), str(value.get("message", "")))

    @property
    def expired(self) -> bool:
        """410: the resourceVersion asked for is older than the history the server keeps."""
        return self.code == 410

    @property
    def temporary(self) -> bool:
        return self.code == 429 or self.code >= 500


def _status(response: httpx2.Response) -> Status:
    """The Status a failed response carries; one made from the HTTP answer when it has none
    (an unserved API group answers `404 page not found` in plain text; a proxy, an HTML page:
    its text on one line)."""
    with contextlib.suppress(ValueError):
        body = json.loads(response.read())
        if isinstance(body, dict) and body.get("kind") == "Status":
            return Status.from_json(body)
    return Status(response.status_code, response.reason_phrase, " ".join(response.text.split())[:200])


def delete_options(resource_version: int) -> dict[str, Any]:
    """The body of a delete that succeeds only while the object is at `resource_version`."""
    return {
        "apiVersion": "v1",
        "kind": "DeleteOptions",
        "preconditions": {"resourceVersion": str(resource_version)},
    }


class WatchStream:
    """One open watch: its events as the server sends them, and a way to end it from another thread."""

    def __init__(self, response: httpx2.Response, events: Iterator[dict[str, Any]]) -> None:
        self._response = response
        self._events = events

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._events

    def abort(self) -> None:
        """Shut the connection down, so that a thread waiting on the stream sees it end now
        (closing the socket would not wake it). Only while the stream is open: a connection
        closed by its reader may already serve another request."""
        network = self._response.extensions.get("network_stream")
        sock = network.get_extra_info("socket") if network is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class ApiClient:
    """One API server, reached as a kubeconfig file (or, with none, the service account) says."""

    def __init__(
        self,
        kubeconfig: str = "",
        *,
        transport: httpx2.BaseTransport | None = None,
        timeout_s: float = TIMEOUT_S,
        list_timeout_s: float = LIST_TIMEOUT_S,
    ) -> None:
        """`kubeconfig`: a file; empty: in-cluster (the pod's service account), else KUBECONFIG or
        ~/.kube/config as lightkube's default. `transport` replaces the network (tests).
        `timeout_s`, `list_timeout_s`: seconds, as `TIMEOUT_S` and `LIST_TIMEOUT_S` say."""
        where = kubeconfig or "in-cluster configuration"
        try:
            config = (KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()).get()
            if config is None:
                raise ConfigError("no current context")
            self._client = GenericSyncClient(
                ConnectionParams(timeout=self._timeout(timeout_s, timeout_s), transport=transport), config
            )
        except (ConfigError, OSError, KeyError, ValueError) as err:
            raise DatastoreError(f"kubernetes datastore: {where}: {err}") from err
        self.server = config.cluster.server
        self.namespace = config.namespace
        """The namespace of the configuration: the pod's own in-cluster."""
        self.timeout_s = timeout_s
        self.list_timeout_s = list_timeout_s

    @staticmethod
    def _timeout(timeout_s: float, read_s: float) -> httpx2.Timeout:
        return httpx2.Timeout(timeout_s, connect=min(timeout_s, CONNECT_TIMEOUT_S), read=read_s)

    def _send(
        self,
        method: str,
        path: str,
        params: dict[str, str],
        body: dict[str, Any] | None,
        read_s: float,
        *,
        stream: bool = False,
    ) -> httpx2.Response:
        """The response, its reads waiting up to `read_s` seconds each; streamed when `stream`."""
        timeout = self._timeout(self.timeout_s, read_s)
        request = self._client.build_adapter_request(
            BasicRequest(method, path, params=params, data=body, timeout=timeout)
        )
        try:
            response: httpx2.Response = self._client.send(request, stream=stream)
            return response
        except httpx2.TransportError as err:
            raise Unavailable(f"kubernetes API {self.server}: {method} {path}: {err!r}") from err
        except (ConfigError, OSError) as err:  # credentials fetched per request: a token file, an exec plugin
            raise DatastoreError(
                f"kubernetes API {self.server}: {method} {path}: credentials: {err}"
            ) from err

    def call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
        read_s: float | None = None,
    ) -> dict[str, Any]:
        """One request; the JSON object answered. Its reads wait up to `read_s` seconds each
        (None: `timeout_s`, for one object or a short list)."""
        response = self._send(method, path, params or {}, body, self.timeout_s if read_s is None else read_s)
        self._check(response, f"{method} {path}")
        answer: dict[str, Any] = response.json()
        return answer

    @contextlib.contextmanager
    def watch(self, path: str, params: dict[str, str], read_s: float) -> Iterator[WatchStream]:
        """A watch of `path`: its events, one JSON object a line, until the server ends it.

        A read waits up to `read_s` seconds: longer than the server keeps a quiet watch open, so
        that only a connection gone dead times out (Unavailable)."""
        params = {**params, "watch": "true"}
        response = self._send("GET", path, params, None, read_s, stream=True)
        try:
            try:
                self._check(response, f"watch {path}")
            except httpx2.TransportError as err:  # reading the body of a failure
                raise Unavailable(f"kubernetes API {self.server}: watch {path}: {err!r}") from err
            yield WatchStream(response, (json.loads(line) for line in self._lines(response, path) if line))
        finally:
            response.close()

    def _lines(self, response: httpx2.Response, path: str) -> Iterator[str]:
        try:
            yield from response.iter_lines()
        except httpx2.TransportError as err:
            raise Unavailable(f"kubernetes API {self.server}: watch {path}: {err!r}") from err

    def _check(self, response: httpx2.Response, what: str) -> None:
        if response.is_success:
            return
        status = _status(response)
        where = f"kubernetes API {self.server}: {what}"
        if status.temporary:
            raise Unavailable(f"{where}: {status.code} {status.reason}: {status.message}")
        raise ApiFailure(where, status)

    def close(self) -> None:
        self._client.close()  # type: ignore[no-untyped-call]  # lightkube leaves it unannotated
