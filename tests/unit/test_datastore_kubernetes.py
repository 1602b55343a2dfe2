"""The Kubernetes datastore, through lightkube's own HTTP client, against answers shaped as
kube-apiserver gives them.

No API server can run on this machine. Two stand-ins replace the network, both through the
client's transport (`httpx2.MockTransport`), so the datastore's requests are real HTTP
requests built by lightkube, and its answers are parsed from bytes:
- `Replay` serves the responses and watch streams of `tests/fixtures/kubernetes/` (shapes
  the server emits; its README says where each comes from: a paged list, lists at one
  revision, a watch with ADDED/MODIFIED/DELETED/BOOKMARK, a 410 in the stream, the Status
  objects of 409, 404, 403, 410 and 429) and records every request;
- `FakeApiServer` (`kube_fake.py`, shared with kube-sync's tests) is a fake API server, in
  memory, for what needs a stateful server: the Datastore conformance suite, leases and their
  expiry, the merged watch of several kinds, the agent's syncer. It answers as kube-apiserver
  does for the requests the datastore makes and in the shapes of the recordings; it validates
  no schema, prunes no field, runs no admission or garbage collector, and ignores `limit` (the
  replayed lists page).
End-to-end runs of the agent on this datastore need a real cluster.
"""

from __future__ import annotations

import builtins
import copy
import ipaddress
import json
import math
import re
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx2
import jsonschema  # type: ignore[import-untyped]  # kubernetes-validate's, which checks deploy/ too
import pytest
import yaml

import tests.unit.test_datastore_conformance as conformance
from tests.helpers import wait_until
from tests.unit.kube_fake import KUBECONFIG, FakeApiServer, fixture, fixture_bytes, no_watch_threads
from trellis.calc.cluster import parse_cluster
from trellis.calc.policy import read_policy_inputs
from trellis.datastore import ClientTls, open_datastore
from trellis.datastore.base import (
    KV,
    AlreadyExists,
    Compacted,
    Conflict,
    DatastoreError,
    Event,
    EventKind,
    LeaseExpired,
    Snapshot,
    Unavailable,
)
from trellis.datastore.kube_api import CONNECT_TIMEOUT_S, TIMEOUT_S
from trellis.datastore.kube_leases import FINALIZER, NAME_PREFIX
from trellis.datastore.kube_resources import LEASE_LABEL, RESOURCES
from trellis.datastore.kubernetes import KubernetesDatastore
from trellis.datastore.syncer import Syncer
from trellis.model.bgp import parse_configuration, parse_peer
from trellis.model.ipam import BLOCK_PREFIX, Allocation, Attachment, Block
from trellis.model.node import NODE_PREFIX, Node

if TYPE_CHECKING:
    from tests.unit.datastore_backends import Backend, FakeClock

pytest_plugins = ["tests.unit.datastore_backends"]

CRDS = Path(__file__).resolve().parents[2] / "deploy" / "crds.yaml"
NAMESPACE = "trellis-system"
LEASES_PATH = f"apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases"
WAIT_S = 15.0
PUT, DELETE = EventKind.PUT, EventKind.DELETE


def watch_until(store: KubernetesDatastore, prefix: str, after: int, count: int) -> list[Event]:
    """At least `count` events after `after`, over as many watch calls as they take."""
    events: list[Event] = []
    deadline = time.monotonic() + WAIT_S
    while len(events) < count:
        assert time.monotonic() < deadline, f"only {len(events)} of {count} events: {events}"
        events += store.watch(prefix, events[-1].mod_revision if events else after, 1.0)
    return events


# -- replayed responses --------------------------------------------------------------------


class Replay:
    """Fixture responses, served in order per (method, path, watch or not); every request kept."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str, bool], list[httpx2.Response]] = defaultdict(list)
        self.requests: list[httpx2.Request] = []
        self.lock = threading.Lock()

    def add(self, method: str, path: str, status: int, name: str, *, watch: bool = False) -> None:
        """Answer the next such request with fixture `name` (a .txt one as plain text)."""
        content_type = "text/plain; charset=utf-8" if name.endswith(".txt") else "application/json"
        response = httpx2.Response(
            status, headers={"Content-Type": content_type}, content=fixture_bytes(name)
        )
        self.answers[method, path, watch].append(response)

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        key = (request.method, request.url.path.lstrip("/"), request.url.params.get("watch") == "true")
        with self.lock:
            self.requests.append(request)
            if not self.answers[key]:
                raise AssertionError(f"no answer queued for {request.method} {request.url}")
            return self.answers[key].pop(0)

    def sent(self, method: str, path: str) -> list[httpx2.Request]:
        with self.lock:
            return [r for r in self.requests if r.method == method and r.url.path.lstrip("/") == path]


@pytest.fixture
def replay() -> Iterator[Replay]:
    yield Replay()
    wait_until(no_watch_threads, WAIT_S, "the watch threads to end")


def replay_store(replay: Replay, **options: Any) -> KubernetesDatastore:
    """A store on `replay`; its first operation looks for expired leases, and finds none."""
    replay.add("GET", LEASES_PATH, 200, "leases-empty.json")
    return KubernetesDatastore(
        str(KUBECONFIG), transport=httpx2.MockTransport(replay.handle), sweep_interval_s=3600, **options
    )


def test_a_snapshot_lists_every_kind_at_the_first_lists_revision(replay: Replay) -> None:
    """Nodes (two pages), then Namespaces, Pods and NetworkPolicies at exactly its revision; the
    ClusterNetworkPolicy API, not served, is empty. Values are the objects as the agent reads them."""
    replay.add("GET", "api/v1/nodes", 200, "nodes-page-1.json")
    replay.add("GET", "api/v1/nodes", 200, "nodes-page-2.json")
    replay.add("GET", "api/v1/namespaces", 200, "namespaces.json")
    replay.add("GET", "api/v1/pods", 200, "pods.json")
    replay.add("GET", "apis/networking.k8s.io/v1/networkpolicies", 200, "networkpolicies.json")
    replay.add("GET", "apis/policy.networking.k8s.io/v1beta1/clusternetworkpolicies", 404, "not-served.txt")
    store = replay_store(replay, page_size=2)
    try:
        snapshot = store.snapshot("/trellis/k8s/")
    finally:
        store.close()
    assert snapshot.revision == 48302
    assert [kv.key for kv in snapshot.items] == [
        "/trellis/k8s/namespaces/default",
        "/trellis/k8s/namespaces/demo",
        "/trellis/k8s/networkpolicies/demo/web-from-frontend",
        "/trellis/k8s/nodes/trl-control-plane",
        "/trellis/k8s/nodes/trl-worker",
        "/trellis/k8s/nodes/trl-worker2",
        "/trellis/k8s/pods/demo/web-5d8f7c9b6-k7w2c",
        "/trellis/k8s/pods/demo/web-5d8f7c9b6-x2l4q",
    ]
    pages = [dict(r.url.params) for r in replay.sent("GET", "api/v1/nodes")]
    assert pages[0] == {"limit": "2"}
    assert pages[1] == {"limit": "2", "continue": fixture("nodes-page-1.json")["metadata"]["continue"]}
    for path in ("api/v1/namespaces", "api/v1/pods", "apis/networking.k8s.io/v1/networkpolicies"):
        (request,) = replay.sent("GET", path)
        assert dict(request.url.params) == {
            "limit": "2",
            "resourceVersion": "48302",
            "resourceVersionMatch": "Exact",
        }
    assert all(r.headers["Authorization"] == "Bearer trl-test-token" for r in replay.requests)
    pod = next(kv for kv in snapshot.items if kv.key.endswith("x2l4q"))
    assert (pod.value["kind"], pod.value["apiVersion"], pod.mod_revision) == ("Pod", "v1", 48290)
    assert "managedFields" not in pod.value["metadata"]
    inputs, errors = read_policy_inputs({kv.key: kv.value for kv in snapshot.items})
    assert errors == ()
    assert str(inputs.pods["demo/web-5d8f7c9b6-x2l4q"].ip) == "10.244.1.7"
    assert [str(a) for a in inputs.nodes["trl-worker"].addresses] == ["172.18.0.3"]
    assert inputs.namespaces["demo"].labels["team"] == "shop"
    assert list(inputs.network_policies) == ["demo/web-from-frontend"]


def test_a_watch_resumes_from_the_list_maps_every_event_and_a_bookmark_moves_its_cursor(
    replay: Replay,
) -> None:
    """List, then watch from the list's revision with bookmarks: ADDED and MODIFIED are PUTs with
    the object, DELETED a DELETE, at the objects' revisions; when the server ends the stream
    the watch reopens from the bookmark's revision, and a 410 there is Compacted."""
    replay.add("GET", "api/v1/pods", 200, "pods.json")
    replay.add("GET", "api/v1/pods", 200, "pods-watch.jsonl", watch=True)
    replay.add("GET", "api/v1/pods", 200, "watch-expired.jsonl", watch=True)
    store = replay_store(replay)
    prefix = "/trellis/k8s/pods/"
    try:
        snapshot = store.snapshot(prefix)
        events = watch_until(store, prefix, snapshot.revision, 3)
        with pytest.raises(Compacted, match="too old resource version"):
            watch_until(store, prefix, events[-1].mod_revision, 1)
    finally:
        store.close()
    added, modified, deleted = events
    key = f"{prefix}demo/web-5d8f7c9b6-q8m3n"
    assert (added.kind, added.key, added.mod_revision) == (PUT, key, 48310)
    assert added.value is not None and "podIP" not in added.value["status"]
    assert (modified.kind, modified.key, modified.mod_revision) == (PUT, key, 48317)
    assert modified.value is not None and modified.value["status"]["podIP"] == "10.244.1.8"
    assert deleted == Event(DELETE, f"{prefix}demo/web-5d8f7c9b6-x2l4q", None, 48360)
    first, second = (dict(r.url.params) for r in replay.sent("GET", "api/v1/pods")[1:])
    assert first["resourceVersion"] == "48302" and first["allowWatchBookmarks"] == "true"
    assert first["watch"] == "true"
    assert second["resourceVersion"] == "48400"  # the bookmark's


def test_the_syncer_lists_again_after_a_410_in_the_watch_stream(replay: Replay) -> None:
    """The syncer's own loop: snapshot, a watch that answers 410 Gone, and at once a new list."""
    replay.add("GET", "apis/trellis.dev/v1/ipamblocks", 200, "ipamblocks.json")
    replay.add("GET", "apis/trellis.dev/v1/ipamblocks", 200, "watch-expired.jsonl", watch=True)
    replay.add("GET", "apis/trellis.dev/v1/ipamblocks", 200, "ipamblocks.json")
    store = replay_store(replay)
    snapshots: list[tuple[list[str], int]] = []

    class Consumer:
        def on_snapshot(self, items: list[KV], revision: int) -> None:
            snapshots.append(([kv.key for kv in items], revision))

        def on_update(self, events: list[Event]) -> None:
            raise AssertionError(f"the fixtures hold no update: {events}")

        def on_out_of_sync(self, reason: str) -> None:
            raise AssertionError(f"410 is not an outage: {reason}")

    syncer = Syncer(store, BLOCK_PREFIX, Consumer(), watch_timeout_s=5.0)
    try:
        assert [syncer.step() for _ in range(3)] == [0.0, 0.0, 0.0]
    finally:
        store.close()
    blocks = [BLOCK_PREFIX + "10.244.1.0-26", BLOCK_PREFIX + "10.244.2.0-26"]
    assert snapshots == [(blocks, 48302), (blocks, 48302)]
    assert syncer.revision == 48302


def test_custom_resources_are_their_spec_and_their_watch_maps_like_the_built_in_kinds(
    replay: Replay,
) -> None:
    """An IPAMBlock's value is its spec (what `Block.to_json` writes); its watch (sorted keys, a
    bookmark with no spec) maps to the same events as a Pod's."""
    replay.add("GET", "apis/trellis.dev/v1/ipamblocks/10.244.1.0-26", 200, "ipamblock.json")
    replay.add("GET", "apis/trellis.dev/v1/ipamblocks", 200, "ipamblocks-watch.jsonl", watch=True)
    replay.add("GET", "apis/trellis.dev/v1/ipamblocks", 200, "watch-expired.jsonl", watch=True)
    store = replay_store(replay)
    try:
        kv = store.get(BLOCK_PREFIX + "10.244.1.0-26")
        events = watch_until(store, BLOCK_PREFIX, 48302, 3)
        with pytest.raises(Compacted):
            watch_until(store, BLOCK_PREFIX, events[-1].mod_revision, 1)
    finally:
        store.close()
    assert kv is not None and kv.mod_revision == 48290
    block = Block.from_json(kv.value)
    assert (str(block.cidr), block.node, len(block.allocations)) == ("10.244.1.0/26", "trl-worker", 2)
    assert [(e.kind, e.key.removeprefix(BLOCK_PREFIX), e.mod_revision) for e in events] == [
        (PUT, "10.244.1.0-26", 48431),
        (PUT, "10.244.1.64-26", 48433),
        (DELETE, "10.244.2.0-26", 48470),
    ]
    assert events[0].value is not None and len(Block.from_json(events[0].value).allocations) == 3
    reopened = replay.sent("GET", "apis/trellis.dev/v1/ipamblocks")[-1]
    assert reopened.url.params["resourceVersion"] == "48502"


BLOCK = BLOCK_PREFIX + "10.244.1.0-26"
BLOCK_PATH = "apis/trellis.dev/v1/ipamblocks/10.244.1.0-26"


@pytest.mark.parametrize(
    ("method", "status", "name", "call", "error"),
    [
        ("POST", 409, "status-already-exists.json", lambda s: s.create(BLOCK, {}), AlreadyExists),
        ("PUT", 409, "status-conflict.json", lambda s: s.update(BLOCK, {}, 48290), Conflict),
        ("PUT", 404, "status-not-found.json", lambda s: s.update(BLOCK, {}, 48290), Conflict),
        ("DELETE", 409, "status-precondition.json", lambda s: s.delete(BLOCK, 48290), Conflict),
        ("DELETE", 404, "status-not-found.json", lambda s: s.delete(BLOCK, 48290), Conflict),
        ("GET", 429, "status-too-many-requests.json", lambda s: s.get(BLOCK), Unavailable),
    ],
    ids=["create-exists", "update-stale", "update-gone", "delete-stale", "delete-gone", "throttled"],
)
def test_the_apis_failures_are_the_protocols(
    replay: Replay,
    method: str,
    status: int,
    name: str,
    call: Callable[[KubernetesDatastore], object],
    error: type[DatastoreError],
) -> None:
    collection = method == "POST"
    replay.add(method, BLOCK_PATH.rsplit("/", 1)[0] if collection else BLOCK_PATH, status, name)
    store = replay_store(replay)
    try:
        with pytest.raises(error):
            call(store)
    finally:
        store.close()
    if method == "PUT":
        sent = json.loads(replay.sent("PUT", BLOCK_PATH)[0].content)
        assert sent["metadata"] == {"name": "10.244.1.0-26", "resourceVersion": "48290"}
    if method == "DELETE":
        sent = json.loads(replay.sent("DELETE", BLOCK_PATH)[0].content)
        assert sent["preconditions"] == {"resourceVersion": "48290"}


def test_a_missing_object_is_none_and_a_refusal_is_a_permanent_error(replay: Replay) -> None:
    """404 on get is None; a CRD not installed and 403 are neither missing nor temporary, and their
    messages name the cause;
    a 410 on a list at the snapshot's revision is Compacted; an unreachable server is Unavailable."""
    replay.add("GET", BLOCK_PATH, 404, "status-not-found.json")
    replay.add("GET", "api/v1/nodes", 403, "status-forbidden.json")
    replay.add("GET", "api/v1/nodes", 200, "nodes-page-1.json")
    replay.add("GET", "api/v1/nodes", 200, "nodes-page-2.json")
    replay.add("GET", "api/v1/namespaces", 410, "status-list-expired.json")
    replay.add("GET", "apis/trellis.dev/v1/ipamblocks", 404, "not-served.txt")
    store = replay_store(replay, page_size=2)
    try:
        assert store.get(BLOCK) is None
        with pytest.raises(
            DatastoreError, match=r"404 Not Found: 404 page not found \(is deploy/crds.yaml applied"
        ):
            store.list(BLOCK_PREFIX)
        with pytest.raises(DatastoreError, match="403 Forbidden: nodes is forbidden") as refused:
            store.list("/trellis/k8s/nodes/")
        assert not isinstance(refused.value, Unavailable)
        with pytest.raises(Compacted, match="namespaces at revision 48302: The resourceVersion"):
            store.snapshot("/trellis/k8s/")
    finally:
        store.close()

    def refuse(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("connection refused", request=request)

    away = KubernetesDatastore(str(KUBECONFIG), transport=httpx2.MockTransport(refuse), sweep_interval_s=3600)
    try:
        with pytest.raises(Unavailable, match=r"trl-apiserver\.test"):
            away.get(BLOCK)
    finally:
        away.close()


@pytest.fixture
def silent_kubeconfig(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A kubeconfig naming a real server on 127.0.0.1 that takes connections (the kernel
    completes them into its backlog) and never answers; and that server's address."""
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        server = f"http://127.0.0.1:{listener.getsockname()[1]}"
        config = yaml.safe_load(KUBECONFIG.read_text())
        config["clusters"][0]["cluster"]["server"] = server
        kubeconfig = tmp_path / "kubeconfig.yaml"
        kubeconfig.write_text(yaml.safe_dump(config))
        yield kubeconfig, server
    finally:
        listener.close()


class RecordingTransport(httpx2.HTTPTransport):
    """The network, keeping each request's method, path and time-outs (seconds)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, str, dict[str, float]]] = []

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        self.sent.append((request.method, request.url.path.lstrip("/"), request.extensions["timeout"]))
        return super().handle_request(request)


def test_a_server_that_never_answers_fails_an_ipam_request_on_the_short_time_out(
    silent_kubeconfig: tuple[Path, str],
) -> None:
    """A CNI ADD waits on IPAM's reads, writes and lists of blocks: against an API server that accepted the
    connection and hangs, each is one request on the short time-out (`TIMEOUT_S`, not the
    cluster lists' `LIST_TIMEOUT_S`) and fails as Unavailable naming the server, the request and
    the time-out. The first one also looks for expired leases, with the same time-out, and fails
    with that request rather than waiting twice."""
    kubeconfig, server = silent_kubeconfig
    network = RecordingTransport()
    store = KubernetesDatastore(str(kubeconfig), transport=network, sweep_interval_s=3600)
    where = re.escape(server)
    try:
        with pytest.raises(Unavailable, match=rf"{where}: GET {LEASES_PATH}: ReadTimeout"):
            store.get(BLOCK)
        with pytest.raises(Unavailable, match=rf"{where}: POST apis/trellis\.dev/v1/ipamblocks: ReadTimeout"):
            store.create(BLOCK, BLOCK_VALUE)
        with pytest.raises(Unavailable, match=rf"{where}: GET apis/trellis\.dev/v1/ipamblocks: ReadTimeout"):
            store.list(BLOCK_PREFIX)
    finally:
        store.close()
    short = {"connect": CONNECT_TIMEOUT_S, "read": TIMEOUT_S, "write": TIMEOUT_S, "pool": TIMEOUT_S}
    assert network.sent == [
        ("GET", LEASES_PATH, short),
        ("POST", "apis/trellis.dev/v1/ipamblocks", short),
        ("GET", "apis/trellis.dev/v1/ipamblocks", short),
    ]


# -- a fake API server ---------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    fake = FakeApiServer()
    try:
        yield fake
    finally:
        fake.shutdown()
        wait_until(no_watch_threads, WAIT_S, "the watch threads to end")


def fake_store(server: FakeApiServer, clock: Callable[[], float] = time.monotonic) -> KubernetesDatastore:
    """A store on `server` that looks for expired leases before every operation."""
    return KubernetesDatastore(str(KUBECONFIG), transport=server.transport, clock=clock, sweep_interval_s=0)


# -- the conformance suite -----------------------------------------------------------------


class HexKeys:
    """The conformance suite's keys (`/a`, `/p%/c`) as IPAMBlock names: hex digits keep their
    prefixes and order, and make valid object names."""

    def __init__(self, store: KubernetesDatastore, server: FakeApiServer) -> None:
        self.store, self.server = store, server

    def _key(self, key: str) -> str:
        return BLOCK_PREFIX + key.encode().hex()

    def _unkey(self, key: str) -> str:
        return bytes.fromhex(key.removeprefix(BLOCK_PREFIX)).decode()

    def _kv(self, kv: KV) -> KV:
        return replace(kv, key=self._unkey(kv.key))

    def get(self, key: str) -> KV | None:
        kv = self.store.get(self._key(key))
        return None if kv is None else self._kv(kv)

    def list(self, prefix: str) -> builtins.list[KV]:
        return self.snapshot(prefix).items

    def snapshot(self, prefix: str) -> Snapshot:
        snapshot = self.store.snapshot(self._key(prefix))
        return Snapshot([self._kv(kv) for kv in snapshot.items], snapshot.revision)

    def watch(self, prefix: str, after_revision: int, timeout_s: float) -> builtins.list[Event]:
        events = self.store.watch(self._key(prefix), after_revision, timeout_s)
        return [replace(e, key=self._unkey(e.key)) for e in events]

    def create(self, key: str, value: dict[str, Any], lease: int = 0) -> int:
        return self.store.create(self._key(key), value, lease)

    def update(self, key: str, value: dict[str, Any], mod_revision: int, lease: int = 0) -> int:
        return self.store.update(self._key(key), value, mod_revision, lease)

    def put(self, key: str, value: dict[str, Any], lease: int = 0) -> int:
        return self.store.put(self._key(key), value, lease)

    def delete(self, key: str, mod_revision: int) -> None:
        self.store.delete(self._key(key), mod_revision)

    def grant_lease(self, ttl_s: int) -> int:
        return self.store.grant_lease(ttl_s)

    def keepalive(self, lease: int) -> None:
        self.store.keepalive(lease)

    def revoke_lease(self, lease: int) -> None:
        self.store.revoke_lease(lease)

    def compact(self, revision: int) -> None:
        self.server.compact(revision)

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def clock() -> FakeClock:
    from tests.unit.datastore_backends import FakeClock

    return FakeClock()


@pytest.fixture
def backend(server: FakeApiServer, clock: FakeClock) -> Iterator[Backend]:
    """The conformance suite's backend, on the fake API server (overrides the sqlite/etcd one)."""
    from tests.unit.datastore_backends import Backend

    store = HexKeys(fake_store(server, clock), server)
    try:
        yield Backend("kubernetes", store, clock)
    finally:
        store.close()


CONFORMANCE = [
    conformance.test_create_is_create_if_absent,
    conformance.test_update_and_delete_are_compare_and_swap,
    conformance.test_put_writes_unconditionally_at_growing_revisions,
    conformance.test_snapshot_is_the_prefix_in_key_order_at_one_revision,
    conformance.test_watch_returns_the_prefix_changes_in_order,
    conformance.test_watch_times_out_empty_within_its_time,
    conformance.test_watch_wakes_for_a_write_from_another_thread,
    conformance.test_watch_from_before_compaction_raises_compacted,
    conformance.test_keepalive_renews_and_revoke_ends_a_lease,
]
"""All of the suite but the expiry at one revision: the API deletes a lease's objects one by
one (`test_an_expired_lease_deletes_its_objects_one_by_one` instead)."""


@pytest.mark.parametrize(
    "case", CONFORMANCE, ids=[case.__name__.removeprefix("test_") for case in CONFORMANCE]
)
def test_conformance(case: Callable[[Backend], None], backend: Backend) -> None:
    case(backend)


def test_an_expired_lease_deletes_its_objects_one_by_one(backend: Backend) -> None:
    """Objects bound to a lease nobody renews are deleted, each at a revision of its own; the gone
    lease can neither be renewed nor bound to, and a write under it is not kept."""
    deletes = conformance.expire_a_lease(backend)
    assert sorted(e.key for e in deletes) == ["/l/a", "/l/b"]
    assert deletes[0].mod_revision != deletes[1].mod_revision


# -- several kinds as one prefix -----------------------------------------------------------

REGISTRATION = NODE_PREFIX + "trl-worker"
WORKER = {
    "name": "trl-worker",
    "underlay": "172.18.0.3/16",
    "vtepMAC": "6a:1f:3c:9e:52:b7",
    "vtepIP": "10.244.1.0",
}
BLOCK_VALUE = {"cidr": "10.244.1.0/26", "node": "trl-worker", "allocations": {}}


def test_a_late_event_of_another_kind_is_neither_lost_nor_repeated(server: FakeApiServer) -> None:
    """Kinds are watched apart, so a change may arrive after a later one of another kind; the
    follower hands it out next, though its revision is lower than the last one handed out."""
    store = fake_store(server)
    try:
        start = store.snapshot("/trellis/").revision
        server.hold("ipamblocks")
        early = store.create(BLOCK, BLOCK_VALUE)
        late = store.create(REGISTRATION, WORKER)
        first = watch_until(store, "/trellis/", start, 1)
        server.release("ipamblocks")
        second = watch_until(store, "/trellis/", first[-1].mod_revision, 1)
        assert store.watch("/trellis/", second[-1].mod_revision, 0.3) == []
    finally:
        store.close()
    assert early < late
    assert [(e.key, e.mod_revision) for e in first] == [(REGISTRATION, late)]
    assert [(e.key, e.mod_revision, e.value) for e in second] == [(BLOCK, early, BLOCK_VALUE)]


def test_a_snapshot_of_several_kinds_is_at_one_revision_and_the_watch_sees_the_rest(
    server: FakeApiServer,
) -> None:
    """A write landing between the lists of one snapshot is not in it (every list is at the first
    one's revision), and the watch from the snapshot's revision delivers it."""
    store = fake_store(server)
    writes: list[int] = []

    def write_after_the_first(plural: str) -> None:
        if plural == "nodes" and not writes:
            writes.append(store.create(BLOCK, BLOCK_VALUE))

    server.after_list = write_after_the_first
    try:
        snapshot = store.snapshot("/trellis/")
        events = watch_until(store, "/trellis/", snapshot.revision, 1)
    finally:
        store.close()
    kinds = [plural for plural in server.lists if plural != "leases"]
    assert kinds == [r.plural for r in RESOURCES]
    assert writes[0] > snapshot.revision
    assert snapshot.items == []
    assert [(e.kind, e.key, e.mod_revision) for e in events] == [(PUT, BLOCK, writes[0])]


def test_the_cluster_objects_are_read_only_and_keys_outside_the_table_are_refused(
    server: FakeApiServer,
) -> None:
    store = fake_store(server)
    try:
        with pytest.raises(DatastoreError, match="Pod objects belong to the cluster"):
            store.put("/trellis/k8s/pods/demo/web", {})
        with pytest.raises(DatastoreError, match="Node objects belong to the cluster"):
            store.delete("/trellis/k8s/nodes/trl-worker", 1)
        with pytest.raises(DatastoreError, match="key /elsewhere/a: no Kubernetes resource holds it"):
            store.get("/elsewhere/a")
        with pytest.raises(DatastoreError, match="a Pod key is /trellis/k8s/pods/<namespace>/<name>"):
            store.get("/trellis/k8s/pods/web")
        with pytest.raises(DatastoreError, match="prefix /elsewhere/: no Kubernetes resource"):
            store.snapshot("/elsewhere/")
    finally:
        store.close()


class View:
    """What the agent's ClusterView does with the syncer's calls: every object by key."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}

    def on_snapshot(self, items: list[KV], revision: int) -> None:
        self.objects = {kv.key: kv.value for kv in items}

    def on_update(self, events: list[Event]) -> None:
        for event in events:
            if event.value is None:
                self.objects.pop(event.key, None)
            else:
                self.objects[event.key] = event.value

    def on_out_of_sync(self, reason: str) -> None:
        raise AssertionError(f"the fake API server never fails: {reason}")


def test_the_agent_follows_the_cluster_and_its_own_state_through_the_api() -> None:
    """The agent's syncer on `/trellis/`, on a server without the ClusterNetworkPolicy API: the
    fixtures' Node, Namespaces and Pods, a node registration under a lease and a block become the
    cluster the calculation reads, and changes follow."""
    server = FakeApiServer(served=(*(r.plural for r in RESOURCES if not r.optional), "leases"))
    server.apply(fixture("node.json"))
    for listing in ("namespaces.json", "pods.json"):
        kind = fixture(listing)["kind"].removesuffix("List")
        for item in fixture(listing)["items"]:
            server.apply({"kind": kind, "apiVersion": "v1", **item})
    store = fake_store(server)
    view = View()
    syncer = Syncer(store, "/trellis/", view, watch_timeout_s=1.0)
    pod_key = "/trellis/k8s/pods/demo/web-5d8f7c9b6-k7w2c"
    try:
        lease = store.grant_lease(10)
        store.put(REGISTRATION, WORKER, lease=lease)
        store.create(BLOCK, BLOCK_VALUE)
        syncer.step()
        cluster = parse_cluster(view.objects)
        assert cluster.nodes["trl-worker"].vtep_mac == WORKER["vtepMAC"]
        assert [(str(cidr), node) for cidr, node in cluster.blocks] == [("10.244.1.0/26", "trl-worker")]
        inputs, errors = read_policy_inputs(view.objects)
        assert errors == ()
        assert sorted(inputs.pods) == ["demo/web-5d8f7c9b6-k7w2c", "demo/web-5d8f7c9b6-x2l4q"]
        store.revoke_lease(lease)
        pod = {"kind": "Pod", "apiVersion": "v1", **fixture("pods.json")["items"][1]}
        pod["metadata"]["labels"]["role"] = "frontend"
        server.apply(pod)
        deadline = time.monotonic() + WAIT_S
        while REGISTRATION in view.objects or "role" not in view.objects[pod_key]["metadata"]["labels"]:
            assert time.monotonic() < deadline, "the revoked registration and the relabelled pod to arrive"
            syncer.step()
    finally:
        store.close()
        server.shutdown()
        wait_until(no_watch_threads, WAIT_S, "the watch threads to end")
    assert read_policy_inputs(view.objects)[0].pods["demo/web-5d8f7c9b6-k7w2c"].labels["role"] == "frontend"


# -- leases --------------------------------------------------------------------------------


def lease_object(server: FakeApiServer, lease: int) -> dict[str, Any] | None:
    with server.cond:
        return server.objects.get(("leases", NAMESPACE, f"{NAME_PREFIX}{lease}"))


def test_another_agent_expires_a_lease_by_how_long_it_has_not_changed(server: FakeApiServer) -> None:
    """A Lease in the kubeconfig's namespace, labelled and with a finalizer, holds the agent's
    registration. Another agent, on its own clock, expires it only after a full TTL without a
    change: renewals keep it, whatever its renewTime says."""
    from tests.unit.datastore_backends import FakeClock

    mine, theirs = FakeClock(), FakeClock()
    agent, other = fake_store(server, mine), fake_store(server, theirs)
    try:
        lease = agent.grant_lease(10)
        agent.put(REGISTRATION, WORKER, lease=lease)
        obj = lease_object(server, lease)
        assert obj is not None
        assert obj["metadata"]["labels"] == {LEASE_LABEL: str(lease)} and obj["metadata"]["finalizers"] == [
            FINALIZER
        ]
        assert obj["spec"]["leaseDurationSeconds"] == 10
        with server.cond:
            registration = server.objects["trellisnodes", "", "trl-worker"]
        assert registration["metadata"]["labels"] == {LEASE_LABEL: str(lease)}
        other.get(REGISTRATION)  # first sight of the lease
        for _ in range(3):
            theirs.advance(6)
            agent.keepalive(lease)
            assert other.get(REGISTRATION) is not None
        theirs.advance(9)
        assert other.get(REGISTRATION) is not None
        theirs.advance(2)
        assert other.get(REGISTRATION) is None
        assert lease_object(server, lease) is None
        with pytest.raises(LeaseExpired):
            agent.keepalive(lease)
    finally:
        agent.close()
        other.close()


def test_an_api_outage_longer_than_a_ttl_expires_no_lease(server: FakeApiServer, clock: FakeClock) -> None:
    """While the API server is away nobody can renew; once it is back, a lease gets a full TTL
    from then (as etcd gives its leases when it elects a leader), and only then expires."""
    agent, other = fake_store(server), fake_store(server, clock)
    try:
        lease = agent.grant_lease(10)
        agent.put(REGISTRATION, WORKER, lease=lease)
        assert other.get(REGISTRATION) is not None
        server.down = True
        clock.advance(30)
        with pytest.raises(Unavailable, match="connection refused"):
            other.get(REGISTRATION)
        server.down = False
        assert other.get(REGISTRATION) is not None
        clock.advance(11)
        assert other.get(REGISTRATION) is None
    finally:
        agent.close()
        other.close()


def test_a_lease_deleted_by_hand_is_finished_by_any_agent_and_a_write_under_it_is_undone(
    server: FakeApiServer, clock: FakeClock
) -> None:
    """`kubectl delete lease` only marks it (the finalizer); the next store to look deletes what
    it held and lets it go. A write under a marked lease is undone: LeaseExpired."""
    agent = fake_store(server, clock)
    try:
        lease = agent.grant_lease(10)
        agent.put(REGISTRATION, WORKER, lease=lease)
        delete = httpx2.Client(transport=server.transport, base_url="https://trl-apiserver.test:6443")
        delete.delete(f"/{LEASES_PATH}/{NAME_PREFIX}{lease}")
        marked = lease_object(server, lease)
        assert marked is not None and "deletionTimestamp" in marked["metadata"]
        with pytest.raises(LeaseExpired, match="gone or being deleted"):
            agent.create(BLOCK, BLOCK_VALUE, lease=lease)
        with server.cond:
            assert ("ipamblocks", "", "10.244.1.0-26") not in server.objects
        clock.advance(1)
        assert agent.get(REGISTRATION) is None
        assert lease_object(server, lease) is None
    finally:
        agent.close()


def test_a_store_opens_from_a_kubeconfig_or_in_cluster(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`kubernetes` is in the registry; the location is a kubeconfig (its server and namespace
    are used), empty means lightkube's default (in-cluster, else KUBECONFIG); TLS comes from it."""
    store = open_datastore("kubernetes", str(KUBECONFIG))
    try:
        assert isinstance(store, KubernetesDatastore)
        assert (store.api.server, store.api.namespace) == ("https://trl-apiserver.test:6443", NAMESPACE)
    finally:
        store.close()
    with pytest.raises(DatastoreError, match="TLS settings come from the kubeconfig"):
        open_datastore("kubernetes", str(KUBECONFIG), tls=ClientTls(ca_cert=tmp_path / "ca.pem"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(DatastoreError, match=r"in-cluster configuration: .*missing not found"):
        open_datastore("kubernetes", "")
    monkeypatch.setenv("KUBECONFIG", str(KUBECONFIG))
    open_datastore("kubernetes", "").close()


# -- the CRDs ------------------------------------------------------------------------------


def spec_schemas() -> dict[str, dict[str, Any]]:
    """Kind -> the schema of `spec` in deploy/crds.yaml, as the API server applies it: a field
    that no `properties` names is pruned, so here it fails validation instead."""

    def unpruned(schema: dict[str, Any]) -> dict[str, Any]:
        schema = copy.deepcopy(schema)
        if "properties" in schema:
            schema.setdefault("additionalProperties", False)
            schema["properties"] = {k: unpruned(v) for k, v in schema["properties"].items()}
        if isinstance(schema.get("additionalProperties"), dict):
            schema["additionalProperties"] = unpruned(schema["additionalProperties"])
        if "items" in schema:
            schema["items"] = unpruned(schema["items"])
        return schema

    schemas = {}
    for crd in yaml.safe_load_all(CRDS.read_text()):
        (version,) = crd["spec"]["versions"]
        spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
        schemas[crd["spec"]["names"]["kind"]] = unpruned(spec)
    return schemas


BGP_CONFIGURATION = {
    "apiVersion": "trellis.dev/v1",
    "kind": "BGPConfiguration",
    "metadata": {"name": "default"},
    "spec": {
        "asNumber": 64512,
        "nodeToNodeMeshEnabled": True,
        "nodeASNumbers": {"node-3": 65003},
        "routeReflectors": {
            "nodes": ["node-1"],
            "nodeSelector": {"matchLabels": {"route-reflector": "true"}},
            "clusterID": "244.0.0.1",
        },
        "gracefulRestartTimeSeconds": 120,
    },
}
BGP_PEER = {
    "apiVersion": "trellis.dev/v1",
    "kind": "BGPPeer",
    "metadata": {"name": "tor"},
    "spec": {
        "peerIP": "192.0.2.1",
        "asNumber": 65000,
        "password": "s3cret",
        "nodeSelector": {"matchExpressions": [{"key": "rack", "operator": "In", "values": ["a"]}]},
        "acceptPrefixes": ["0.0.0.0/0", "198.51.100.0/24"],
    },
}
ALLOCATION = Allocation(Attachment("4f1c9e2a7b3d", "eth0"), "demo/web")


def test_the_crds_hold_every_field_trellis_writes_and_reads() -> None:
    """deploy/crds.yaml defines exactly the table's trellis.dev kinds, and every spec Trellis
    writes (node registrations, blocks), reads (BGP settings its parsers accept) or the fixtures hold
    validates against its schema with nothing pruned."""
    schemas = spec_schemas()
    table = {r.kind: r.plural for r in RESOURCES if r.api_version == "trellis.dev/v1"}
    assert {
        c["spec"]["names"]["kind"]: c["spec"]["names"]["plural"] for c in yaml.safe_load_all(CRDS.read_text())
    } == table
    block = Block(ipaddress.IPv4Network("10.244.1.0/26"), "trl-worker")
    parse_configuration(BGP_CONFIGURATION)
    parse_peer(BGP_PEER)
    specs = [
        ("TrellisNode", Node("trl-worker", ipaddress.IPv4Interface("172.18.0.3/16")).to_json()),
        ("TrellisNode", Node.from_json(WORKER).to_json()),
        ("TrellisNode", fixture("trellisnode.json")["spec"]),
        ("IPAMBlock", block.to_json()),
        ("IPAMBlock", block.with_allocation(ipaddress.IPv4Address("10.244.1.7"), ALLOCATION).to_json()),
        ("IPAMBlock", fixture("ipamblock.json")["spec"]),
        ("BGPConfiguration", BGP_CONFIGURATION["spec"]),
        ("BGPPeer", BGP_PEER["spec"]),
    ]
    for kind, spec in specs:
        jsonschema.validate(spec, schemas[kind])
    with pytest.raises(jsonschema.ValidationError, match="'vtepIPv6' was unexpected"):
        jsonschema.validate({**WORKER, "vtepIPv6": "fd00::1"}, schemas["TrellisNode"])


# -- failures that must end a watch, and watches that must end -----------------------------


def watch_threads() -> int:
    return len([t for t in threading.enumerate() if t.name.startswith("watch ")])


def test_a_replaced_or_closed_follower_ends_its_watches_at_once(server: FakeApiServer) -> None:
    """A follower replaced (the syncer listed again) or closed shuts its streams down then, not
    when the server next speaks: each holds one of the client's pooled connections, and streams
    left open by followers replaced every back-off would soon starve every other request."""
    store = KubernetesDatastore(
        str(KUBECONFIG), transport=server.transport, watch_timeout_s=3600, sweep_interval_s=math.inf
    )
    try:
        at = store.snapshot("/trellis/").revision
        assert store.watch("/trellis/", at, 0.1) == []
        assert watch_threads() == len(RESOURCES)
        store.watch("/trellis/", at - 1, 0.1)  # another starting point: a new follower
        wait_until(lambda: watch_threads() == len(RESOURCES), WAIT_S, "the replaced watches to end")
    finally:
        store.close()
    wait_until(no_watch_threads, WAIT_S, "the closed store's watches to end")


class _UnreadableBody(httpx2.SyncByteStream):
    def __iter__(self) -> Iterator[bytes]:
        raise httpx2.ReadError("connection reset by peer")


def test_a_watch_failure_whose_answer_cannot_be_read_is_unavailable() -> None:
    """A 503 whose body breaks off ends the watch with Unavailable, as any unreachable server:
    its thread must not die with the error and leave the follower silent (watch returning [])."""

    def answer(request: httpx2.Request) -> httpx2.Response:
        assert request.url.params.get("watch") == "true", request.url
        return httpx2.Response(503, stream=_UnreadableBody())

    store = KubernetesDatastore(
        str(KUBECONFIG), transport=httpx2.MockTransport(answer), sweep_interval_s=math.inf
    )
    try:
        deadline = time.monotonic() + WAIT_S
        with pytest.raises(Unavailable, match=r"watch apis/trellis\.dev/v1/ipamblocks: ReadError"):
            while time.monotonic() < deadline:
                store.watch(BLOCK_PREFIX, 48000, 1.0)
    finally:
        store.close()
    wait_until(no_watch_threads, WAIT_S, "the watch threads to end")


def test_credentials_that_fail_at_a_request_are_a_datastore_error(tmp_path: Path) -> None:
    """An exec credential plugin (or a service account token file) is run at each request; its
    failure is a DatastoreError naming the server and the request, not lightkube's ConfigError."""
    config = yaml.safe_load(KUBECONFIG.read_text())
    plugin = {"apiVersion": "client.authentication.k8s.io/v1beta1", "command": "false"}
    config["users"][0]["user"] = {"exec": plugin}
    kubeconfig = tmp_path / "kubeconfig.yaml"
    kubeconfig.write_text(yaml.safe_dump(config))

    def unreached(request: httpx2.Request) -> httpx2.Response:
        raise AssertionError(f"sent without credentials: {request.url}")

    store = KubernetesDatastore(
        str(kubeconfig), transport=httpx2.MockTransport(unreached), sweep_interval_s=math.inf
    )
    try:
        with pytest.raises(
            DatastoreError,
            match=rf"trl-apiserver\.test:6443: GET {BLOCK_PATH}: credentials: Exec false returned 1",
        ):
            store.get(BLOCK)
    finally:
        store.close()


def test_a_labelled_lease_of_another_shape_stops_no_expiry(server: FakeApiServer, clock: FakeClock) -> None:
    """A Lease that carries the label but no TTL (not one Trellis made) is skipped: it neither
    escapes from the operation that swept nor keeps the other leases from expiring."""
    agent, other = fake_store(server), fake_store(server, clock)
    try:
        server.apply(
            {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": "trl-foreign", "namespace": NAMESPACE, "labels": {LEASE_LABEL: "7"}},
                "spec": {"holderIdentity": "someone"},
            }
        )
        lease = agent.grant_lease(10)
        agent.put(REGISTRATION, WORKER, lease=lease)
        assert other.get(REGISTRATION) is not None
        clock.advance(11)
        assert other.get(REGISTRATION) is None
    finally:
        agent.close()
        other.close()


def test_a_failure_answered_as_a_page_is_one_line() -> None:
    """A proxy in front of the API server answers 502 with an HTML page: Unavailable, in one line."""
    page = (
        "<html>\n<head><title>502 Bad Gateway</title></head>\n"
        "<body>\n<h1>Bad Gateway</h1>\n</body>\n</html>\n"
    )

    def answer(_request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(502, headers={"Content-Type": "text/html"}, text=page)

    store = KubernetesDatastore(
        str(KUBECONFIG), transport=httpx2.MockTransport(answer), sweep_interval_s=math.inf
    )
    try:
        with pytest.raises(Unavailable) as failed:
            store.get(BLOCK)
    finally:
        store.close()
    assert "\n" not in str(failed.value)
    assert f"GET {BLOCK_PATH}: 502 Bad Gateway: <html> <head><title>502 Bad Gateway</title>" in str(
        failed.value
    )
