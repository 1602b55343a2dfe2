"""What only the SQLite store has: a bounded change log, and several instances on one file."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trellis.datastore.base import AlreadyExists, Compacted, DatastoreError, EventKind, LeaseExpired
from trellis.datastore.sqlite import SqliteDatastore


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "trellis.db"


@pytest.fixture
def now() -> list[float]:
    """A clock the test moves by hand: now[0] is the time."""
    return [1_000_000.0]


@pytest.fixture
def pair(path: Path, now: list[float]) -> Iterator[tuple[SqliteDatastore, SqliteDatastore]]:
    """Two instances on one file, as two agents on one machine."""
    first = SqliteDatastore(path, clock=lambda: now[0])
    second = SqliteDatastore(path, clock=lambda: now[0])
    try:
        yield first, second
    finally:
        first.close()
        second.close()


def test_instances_on_one_file_see_each_others_writes_and_watches(
    pair: tuple[SqliteDatastore, SqliteDatastore],
) -> None:
    """A write through one instance is read, listed at its revision and watched through the other;
    the watch wakes by polling the file, soon after the write."""
    first, second = pair
    rev = first.put("/x/a", {"n": 1})
    assert second.get("/x/a") is not None
    assert second.snapshot("/x/").revision == rev
    writer = threading.Timer(0.2, first.put, args=("/x/b", {"n": 2}))
    began = time.monotonic()
    writer.start()
    try:
        events = second.watch("/x/", rev, 10.0)
    finally:
        writer.join()
    assert [(e.key, e.value) for e in events] == [("/x/b", {"n": 2})]
    assert time.monotonic() - began < 2


def test_an_expired_lease_is_swept_once_by_whichever_instance_comes_first(
    pair: tuple[SqliteDatastore, SqliteDatastore], now: list[float]
) -> None:
    """The instance that reads first deletes the expired lease's keys; the other sees the same
    single DELETE revision, not a second sweep."""
    first, second = pair
    lease = first.grant_lease(5)
    rev = first.create("/x/a", {}, lease=lease)
    now[0] += 6
    assert second.get("/x/a") is None
    events = first.watch("/x/", rev, 0)
    assert [(e.kind, e.key) for e in events] == [(EventKind.DELETE, "/x/a")]
    assert first.snapshot("/x/").revision == events[0].mod_revision
    with pytest.raises(LeaseExpired):
        first.keepalive(lease)


def test_the_change_log_keeps_the_last_history_revisions(path: Path) -> None:
    """With history=5, the log holds five revisions: a watch needing older ones raises Compacted,
    also after reopening the file."""
    store = SqliteDatastore(path, history=5)
    revs = [store.put("/h/a", {"n": n}) for n in range(10)]
    assert [e.value for e in store.watch("/h/", revs[4], 0)] == [{"n": n} for n in range(5, 10)]
    with pytest.raises(Compacted):
        store.watch("/h/", revs[3], 0)
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM log").fetchone() == (5,)
    reopened = SqliteDatastore(path)
    try:
        with pytest.raises(Compacted):
            reopened.watch("/h/", revs[3], 0)
    finally:
        reopened.close()


def test_a_refused_write_changes_nothing(path: Path) -> None:
    """A create on a present key or a write bound to a gone lease takes no revision and logs nothing."""
    store = SqliteDatastore(path)
    try:
        rev = store.create("/f/a", {})
        with pytest.raises(AlreadyExists):
            store.create("/f/a", {"again": True})
        with pytest.raises(LeaseExpired):
            store.put("/f/b", {}, lease=12345)
        assert store.snapshot("/f/").revision == rev
        assert [e.mod_revision for e in store.watch("/f/", rev - 1, 0)] == [rev]
    finally:
        store.close()


@pytest.mark.parametrize("raw", ["notjson", "[1, 2]"])
def test_a_value_written_by_hand_that_is_no_json_object_is_an_error_naming_its_key(
    path: Path, raw: str
) -> None:
    """Readers (the agent's syncer) get a DatastoreError they report and retry on, not a
    ValueError that would end their thread."""
    store = SqliteDatastore(path)
    try:
        store.put("/trellis/x", {"a": 1})
        with sqlite3.connect(path) as db:
            db.execute("UPDATE kv SET value = ? WHERE key = ?", (raw, "/trellis/x"))
        with pytest.raises(DatastoreError, match=r"^key /trellis/x: value is "):
            store.get("/trellis/x")
        with pytest.raises(DatastoreError, match=r"^key /trellis/x: value is "):
            store.snapshot("/trellis/")
    finally:
        store.close()
