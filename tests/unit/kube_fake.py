"""A fake Kubernetes API server in memory, and the recorded objects and kubeconfig it serves with.

No API server can run on this machine: `FakeApiServer` stands in for one behind
`httpx2.MockTransport`, so a store's requests are real HTTP requests built by lightkube and its
answers are parsed from bytes. It answers as kube-apiserver does for the requests the
`kubernetes` datastore makes, in the shapes of the recordings of `tests/fixtures/kubernetes/`;
it validates no schema, prunes no field, runs no admission or garbage collector, and ignores
`limit`. Shared by the datastore's tests (`test_datastore_kubernetes.py`) and kube-sync's
(`test_kubesync.py`).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx2

from trellis.datastore.kube_resources import RESOURCES

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "kubernetes"
KUBECONFIG = FIXTURES / "kubeconfig.yaml"
"""Server https://trl-apiserver.test:6443 (never reached: a transport stands in), namespace
trellis-system, a bearer token."""


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def fixture(name: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(fixture_bytes(name))
    return value


def no_watch_threads() -> bool:
    """No watch thread of any Kubernetes store is left."""
    return not [t for t in threading.enumerate() if t.name.startswith("watch ")]


ObjectKey = tuple[str, str, str]
"""(plural, namespace or "", name)"""


def _status(code: int, reason: str, message: str) -> httpx2.Response:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure"}
    return httpx2.Response(code, json={**body, "message": message, "reason": reason, "code": code})


def _selects(selector: str, obj: dict[str, Any]) -> bool:
    """labelSelector `k`, `k=v`, comma-separated (the forms the datastore sends)."""
    labels = obj["metadata"].get("labels") or {}
    for term in filter(None, selector.split(",")):
        name, _, value = term.partition("=")
        if name not in labels or (value and labels[name] != value):
            return False
    return True


class FakeApiServer:
    """A fake Kubernetes API server: in memory, behind `httpx2.MockTransport` (see the module's
    docstring for what it leaves out). One revision counter for every kind, as etcd's; history
    kept until `compact`; watches from `resourceVersion` with bookmarks at their end; objects
    with finalizers wait for them on delete; kinds it was not given are not served."""

    def __init__(self, served: tuple[str, ...] | None = None) -> None:
        kinds = {r.plural: (r.api_version, r.kind) for r in RESOURCES}
        kinds["leases"] = ("coordination.k8s.io/v1", "Lease")
        self.kinds = {p: k for p, k in kinds.items() if served is None or p in served}
        self.cond = threading.Condition()
        self.revision = 48000
        self.objects: dict[ObjectKey, dict[str, Any]] = {}
        self.history: list[tuple[int, str, ObjectKey, dict[str, Any]]] = []
        """(revision, event type, key, object) of every change."""
        self.compacted = 0
        self.held: set[str] = set()
        """Kinds whose changes watches do not see yet."""
        self.closed = False
        self.down = False
        """Refuse connections, as a server that is away."""
        self.lists: list[str] = []
        """The kind of every list request, in order."""
        self.after_list: Callable[[str], None] = lambda plural: None
        """Runs after each list is read, before it is answered (unlocked), with the list's kind."""
        self.transport = httpx2.MockTransport(self.handle)

    # -- what tests do ---------------------------------------------------------------------

    def compact(self, revision: int) -> None:
        with self.cond:
            self.compacted = revision

    def hold(self, plural: str) -> None:
        with self.cond:
            self.held.add(plural)

    def release(self, plural: str) -> None:
        with self.cond:
            self.held.discard(plural)
            self.cond.notify_all()

    def apply(self, obj: dict[str, Any]) -> int:
        """Create or replace an object as a controller or kubectl would; its new revision."""
        with self.cond:
            key = self._key_of(obj)
            return self._store(key, obj, "MODIFIED" if key in self.objects else "ADDED")

    def remove(self, obj: dict[str, Any]) -> int:
        """Delete the object `obj` names (its kind, namespace and name) as kubectl would, finalizers
        aside; the revision of the deletion."""
        with self.cond:
            key = self._key_of(obj)
            return self._store(key, self.objects[key], "DELETED")

    def _key_of(self, obj: dict[str, Any]) -> ObjectKey:
        plural = next(p for p, (_, kind) in self.kinds.items() if kind == obj["kind"])
        meta = obj["metadata"]
        return (plural, meta.get("namespace", ""), meta["name"])

    def shutdown(self) -> None:
        """End every watch stream."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    # -- the API ---------------------------------------------------------------------------

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        if self.down:
            raise httpx2.ConnectError("connection refused", request=request)
        path = request.url.path.strip("/").split("/")
        base = 2 if path[0] == "api" else 3
        rest = path[base:]
        namespace = ""
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        plural, name = rest[0], (rest[1] if len(rest) > 1 else "")
        if plural not in self.kinds:
            return httpx2.Response(
                404, headers={"Content-Type": "text/plain"}, content=b"404 page not found\n"
            )
        params = request.url.params
        body = json.loads(request.content) if request.content else {}
        with self.cond:
            if request.method == "GET" and params.get("watch") == "true":
                return self._watch(plural, namespace, params)
            if request.method == "GET" and not name:
                return self._list(plural, namespace, params)
            if request.method == "POST":
                return self._create(plural, namespace, body)
            key = (plural, namespace, name)
            if key not in self.objects:
                return _status(404, "NotFound", f'{plural} "{name}" not found')
            handler = {"GET": self._get, "PUT": self._update, "DELETE": self._delete}[request.method]
            return handler(key, body)

    def _store(self, key: ObjectKey, obj: dict[str, Any], event: str) -> int:
        self.revision += 1
        obj["metadata"]["resourceVersion"] = str(self.revision)
        if event == "DELETED":
            del self.objects[key]
        else:
            self.objects[key] = obj
        self.history.append((self.revision, event, key, json.loads(json.dumps(obj))))
        self.cond.notify_all()
        return self.revision

    def _get(self, key: ObjectKey, _body: dict[str, Any]) -> httpx2.Response:
        return httpx2.Response(200, json=self.objects[key])

    def _state_at(self, revision: int) -> dict[ObjectKey, dict[str, Any]]:
        state: dict[ObjectKey, dict[str, Any]] = {}
        for at, event, key, obj in self.history:
            if at > revision:
                break
            if event == "DELETED":
                state.pop(key, None)
            else:
                state[key] = obj
        return state

    def _list(self, plural: str, namespace: str, params: httpx2.QueryParams) -> httpx2.Response:
        self.lists.append(plural)
        at = self.revision
        if params.get("resourceVersionMatch") == "Exact":
            at = int(params["resourceVersion"])
            if at < self.compacted:
                return _status(410, "Expired", "The resourceVersion for the provided list is too old.")
        selector = params.get("labelSelector", "")
        items = [
            obj
            for (p, ns, _), obj in sorted(self._state_at(at).items())
            if p == plural and (not namespace or ns == namespace) and _selects(selector, obj)
        ]
        api_version, kind = self.kinds[plural]
        self.cond.release()  # let a test write between two lists of one snapshot
        try:
            self.after_list(plural)
        finally:
            self.cond.acquire()
        listing = {"kind": f"{kind}List", "apiVersion": api_version, "metadata": {"resourceVersion": str(at)}}
        return httpx2.Response(200, json={**listing, "items": items})

    def _create(self, plural: str, namespace: str, body: dict[str, Any]) -> httpx2.Response:
        meta = body["metadata"]
        key = (plural, namespace, meta["name"])
        if key in self.objects:
            return _status(409, "AlreadyExists", f'{plural} "{meta["name"]}" already exists')
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        if namespace:
            meta["namespace"] = namespace
        self._store(key, body, "ADDED")
        return httpx2.Response(201, json=body)

    def _update(self, key: ObjectKey, body: dict[str, Any]) -> httpx2.Response:
        current = self.objects[key]["metadata"]
        asked = body["metadata"].get("resourceVersion")
        if asked != current["resourceVersion"]:
            why = "must be specified for an update" if not asked else "the object has been modified"
            return _status(409, "Conflict", f'Operation cannot be fulfilled on {key[0]} "{key[2]}": {why}')
        for field in ("uid", "creationTimestamp", "namespace", "deletionTimestamp"):
            if field in current:
                body["metadata"][field] = current[field]
        gone = "deletionTimestamp" in current and not body["metadata"].get("finalizers")
        self._store(key, body, "DELETED" if gone else "MODIFIED")
        return httpx2.Response(200, json=body)

    def _delete(self, key: ObjectKey, body: dict[str, Any]) -> httpx2.Response:
        obj = self.objects[key]
        asked = body.get("preconditions", {}).get("resourceVersion")
        if asked is not None and asked != obj["metadata"]["resourceVersion"]:
            record = obj["metadata"]["resourceVersion"]
            why = f"the ResourceVersion in the precondition ({asked}) does not match the ResourceVersion"
            message = f'Operation cannot be fulfilled on {key[0]} "{key[2]}": {why} in record ({record}).'
            return _status(409, "Conflict", message + " The object might have been modified")
        if obj["metadata"].get("finalizers"):
            if "deletionTimestamp" not in obj["metadata"]:
                obj["metadata"]["deletionTimestamp"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                self._store(key, obj, "MODIFIED")
            return httpx2.Response(200, json=obj)
        self._store(key, obj, "DELETED")
        return httpx2.Response(
            200, json={"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}
        )

    def _watch(self, plural: str, namespace: str, params: httpx2.QueryParams) -> httpx2.Response:
        start = int(params["resourceVersion"])
        stream = _WatchStream(self, plural, namespace, start, float(params["timeoutSeconds"]))
        # As httpx's own transport, the connection under the response (the socket `shutdown` ends).
        extensions = {"network_stream": _Connection(stream)}
        return httpx2.Response(
            200, headers={"Content-Type": "application/json"}, stream=stream, extensions=extensions
        )


class _Connection:
    """A watch's connection, as httpx's `network_stream`: its socket is itself, and shutting it
    down ends the stream as a real one's would (a read error)."""

    def __init__(self, stream: _WatchStream) -> None:
        self.stream = stream

    def get_extra_info(self, info: str) -> Any:
        return self if info == "socket" else None

    def shutdown(self, _how: int) -> None:
        with self.stream.server.cond:
            self.stream.shut = True
            self.stream.server.cond.notify_all()


class _WatchStream(httpx2.SyncByteStream):
    """One watch: the changes after `start`, then waits for more until its time-out or the end."""

    def __init__(
        self, server: FakeApiServer, plural: str, namespace: str, start: int, timeout_s: float
    ) -> None:
        self.server, self.plural, self.namespace = server, plural, namespace
        self.cursor = start
        self.deadline = time.monotonic() + timeout_s
        self.shut = False
        """The client shut the connection down."""

    def _pending(self) -> list[tuple[int, str, dict[str, Any]]]:
        if self.plural in self.server.held:
            return []
        return [
            (at, event, obj)
            for at, event, (p, ns, _), obj in self.server.history
            if at > self.cursor and p == self.plural and (not self.namespace or ns == self.namespace)
        ]

    def __iter__(self) -> Iterator[bytes]:
        server = self.server
        with server.cond:
            if self.cursor < server.compacted:
                message = f"too old resource version: {self.cursor} ({server.compacted})"
                expired = json.loads(_status(410, "Expired", message).content)
                yield json.dumps({"type": "ERROR", "object": expired}).encode() + b"\n"
                return
        while True:
            with server.cond:
                while not (pending := self._pending()) and not server.closed and not self.shut:
                    remaining = self.deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    server.cond.wait(remaining)
                if self.shut:
                    raise httpx2.ReadError("connection shut down by the client")
                api_version, kind = server.kinds[self.plural]
                bookmark = {
                    "apiVersion": api_version,
                    "kind": kind,
                    "metadata": {"resourceVersion": str(server.revision)},
                }
            if not pending:
                yield json.dumps({"type": "BOOKMARK", "object": bookmark}).encode() + b"\n"
                return
            for at, event, obj in pending:
                yield json.dumps({"type": event, "object": obj}).encode() + b"\n"
                self.cursor = at
