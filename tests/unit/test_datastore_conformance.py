"""The Datastore protocol, one suite run against every backend (SQLite, and a real etcd)."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import pytest

from trellis.datastore.base import (
    AlreadyExists,
    Compacted,
    Conflict,
    Event,
    EventKind,
    LeaseExpired,
)

if TYPE_CHECKING:
    from tests.unit.datastore_backends import Backend

pytest_plugins = ["tests.unit.datastore_backends"]

PUT, DELETE = EventKind.PUT, EventKind.DELETE


def test_create_is_create_if_absent(backend: Backend) -> None:
    """create stores a new key at a new revision; on a present key it is AlreadyExists and changes nothing."""
    store = backend.store
    rev = store.create("/a", {"n": 1})
    kv = store.get("/a")
    assert kv is not None and (kv.key, kv.value, kv.mod_revision) == ("/a", {"n": 1}, rev)
    with pytest.raises(AlreadyExists):
        store.create("/a", {"n": 2})
    assert store.get("/a") == kv
    assert store.get("/missing") is None


def test_update_and_delete_are_compare_and_swap(backend: Backend) -> None:
    """update and delete need the key at the revision read; stale, missing or deleted is Conflict."""
    store = backend.store
    first = store.create("/a", {"n": 1})
    second = store.update("/a", {"n": 2}, first)
    assert second > first
    for stale in (lambda: store.update("/a", {"n": 3}, first), lambda: store.delete("/a", first)):
        with pytest.raises(Conflict):
            stale()
    with pytest.raises(Conflict):
        store.update("/missing", {}, 0)  # revision 0 never matches a missing key
    kv = store.get("/a")
    assert kv is not None and (kv.value, kv.mod_revision) == ({"n": 2}, second)
    store.delete("/a", second)
    assert store.get("/a") is None
    with pytest.raises(Conflict):
        store.delete("/a", second)


def test_put_writes_unconditionally_at_growing_revisions(backend: Backend) -> None:
    """put creates or replaces; every write takes a new, larger revision."""
    store = backend.store
    revs = [store.put("/a", {"n": 1}), store.put("/a", {"n": 2}), store.create("/b", {})]
    assert revs == sorted(revs) and len(set(revs)) == 3
    kv = store.get("/a")
    assert kv is not None and (kv.value, kv.mod_revision) == ({"n": 2}, revs[1])


def test_snapshot_is_the_prefix_in_key_order_at_one_revision(backend: Backend) -> None:
    """snapshot (and list) hold only the prefix's keys, in key order, SQL wildcards taken literally;
    its revision is the store's, so a watch from it sees exactly the later changes."""
    store = backend.store
    last = max(store.put(key, {"k": key}) for key in ("/p/b", "/p/a", "/p_x", "/q/a", "/p%/c"))
    snapshot = store.snapshot("/p/")
    assert [(kv.key, kv.value) for kv in snapshot.items] == [("/p/a", {"k": "/p/a"}), ("/p/b", {"k": "/p/b"})]
    assert snapshot.revision >= last
    assert store.list("/p/") == snapshot.items
    assert [kv.key for kv in store.list("/p%")] == ["/p%/c"]
    rev = store.put("/p/c", {})
    assert [(e.key, e.mod_revision) for e in backend.watch_until("/p/", snapshot.revision, 1)] == [
        ("/p/c", rev)
    ]


def test_watch_returns_the_prefix_changes_in_order(backend: Backend) -> None:
    """Every change under the prefix after the given revision, oldest first, values on PUT only;
    the next watch resumes after the last one."""
    store = backend.store
    start = store.put("/other", {})
    a1 = store.create("/w/a", {"v": 1})
    a2 = store.update("/w/a", {"v": 2}, a1)
    store.put("/wx", {})  # shares the string prefix "/w", not the prefix "/w/"
    b1 = store.put("/w/b", {"v": 3})
    store.delete("/w/a", a2)
    events = backend.watch_until("/w/", start, 4)
    assert events[:3] == [
        Event(PUT, "/w/a", {"v": 1}, a1),
        Event(PUT, "/w/a", {"v": 2}, a2),
        Event(PUT, "/w/b", {"v": 3}, b1),
    ]
    assert (events[3].kind, events[3].key, events[3].value) == (DELETE, "/w/a", None)
    assert events[3].mod_revision > b1
    assert len(events) == 4
    assert store.watch("/w/", events[-1].mod_revision, 0.2) == []


def test_watch_times_out_empty_within_its_time(backend: Backend) -> None:
    """With nothing new, watch returns [] after about its time-out, neither early nor late."""
    store = backend.store
    rev = store.put("/t/a", {})
    began = time.monotonic()
    assert backend.store.watch("/t/", rev, 0.5) == []
    assert 0.45 <= time.monotonic() - began < 1.5


def test_watch_wakes_for_a_write_from_another_thread(backend: Backend) -> None:
    """A blocked watch returns soon after another thread writes, long before its time-out."""
    store = backend.store
    rev = store.put("/t/a", {})
    writer = threading.Timer(0.2, store.put, args=("/t/b", {"by": "writer"}))
    began = time.monotonic()
    writer.start()
    try:
        events = store.watch("/t/", rev, 10.0)
    finally:
        writer.join()
    assert [(e.key, e.value) for e in events] == [("/t/b", {"by": "writer"})]
    assert time.monotonic() - began < 5


def test_watch_from_before_compaction_raises_compacted(backend: Backend) -> None:
    """Once history is compacted, a watch that needs it raises Compacted; one after it still works."""
    store = backend.store
    before = store.put("/c/a", {"n": 0})
    for n in range(1, 4):
        last = store.put("/c/a", {"n": n})
    store.compact(last)
    with pytest.raises(Compacted):
        store.watch("/c/", before, 0.2)
    assert store.watch("/c/", last, 0.2) == []
    rev = store.put("/c/a", {"n": 4})
    assert [e.mod_revision for e in backend.watch_until("/c/", last, 1)] == [rev]


def expire_a_lease(backend: Backend) -> list[Event]:
    """Binds `/l/a` and `/l/b` to a lease that nobody renews and lets it expire: only `/l/keep`
    is left, the gone lease can neither be renewed nor bound to, and a write under it is not
    kept. The DELETE events of the lease's keys, in watch order."""
    store = backend.store
    lease = store.grant_lease(1)
    assert lease != 0
    start = store.create("/l/a", {}, lease=lease)
    store.put("/l/b", {}, lease=lease)
    store.put("/l/keep", {})
    backend.let_time_pass(3)
    backend.wait_until(lambda: store.get("/l/a") is None, "the lease's keys to be deleted")
    assert [kv.key for kv in store.list("/l/")] == ["/l/keep"]
    deletes = [e for e in backend.watch_until("/l/", start, 4) if e.kind is DELETE]
    with pytest.raises(LeaseExpired):
        store.keepalive(lease)
    with pytest.raises(LeaseExpired):
        store.put("/l/c", {}, lease=lease)
    assert store.get("/l/c") is None
    return deletes


def test_expired_lease_deletes_its_keys_at_one_revision(backend: Backend) -> None:
    """Keys bound to a lease that nobody renews disappear, with DELETE events at one revision;
    the gone lease can neither be renewed nor bound to, and a write under it is not kept."""
    deletes = expire_a_lease(backend)
    assert [e.key for e in deletes] == ["/l/a", "/l/b"]
    assert deletes[0].mod_revision == deletes[1].mod_revision


def test_keepalive_renews_and_revoke_ends_a_lease(backend: Backend) -> None:
    """A renewed lease outlives its first TTL; revoke deletes its keys at once (twice is fine);
    a write without the lease unbinds a key from it."""
    store = backend.store
    lease = store.grant_lease(10)
    store.create("/r/a", {}, lease=lease)
    unbound = store.create("/r/b", {}, lease=lease)
    store.update("/r/b", {"unbound": True}, unbound)
    backend.let_time_pass(6)
    store.keepalive(lease)
    backend.let_time_pass(6)
    assert store.get("/r/a") is not None
    store.revoke_lease(lease)
    assert [kv.key for kv in store.list("/r/")] == ["/r/b"]
    store.revoke_lease(lease)
    with pytest.raises(LeaseExpired):
        store.keepalive(lease)
