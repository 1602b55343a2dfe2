"""What only the SQLite store must show (the shared semantics are in test_datastore_conformance):
busy and broken files, persistence, and compare-and-swap across threads and processes."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from trellis.datastore import open_datastore
from trellis.datastore.base import AlreadyExists, Conflict, DatastoreError, Unavailable
from trellis.datastore.sqlite import SqliteDatastore

COUNTER = "/test/counter"


def test_data_survives_reopening_and_the_file_is_private(tmp_path: Path) -> None:
    """A reopened file holds what was written; the file is mode 0600."""
    path = tmp_path / "trellis.db"
    first = SqliteDatastore(path)
    rev = first.create("/a", {"n": 1})
    first.close()
    again = open_datastore("sqlite", str(path))
    try:
        kv = again.get("/a")
        assert kv is not None and kv.mod_revision == rev
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        again.close()


def test_unknown_datastore_kind_is_refused(tmp_path: Path) -> None:
    """Only known kinds open; the message names the kind."""
    with pytest.raises(DatastoreError, match="'etcd2'"):
        open_datastore("etcd2", str(tmp_path))


def test_busy_database_is_unavailable(tmp_path: Path) -> None:
    """A write lock held by another connection past the busy timeout is Unavailable, not a crash."""
    path = tmp_path / "trellis.db"
    store = SqliteDatastore(path, busy_timeout_s=0.05)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(Unavailable, match="locked"):
            store.create("/a", {})
        other.execute("ROLLBACK")
        store.create("/a", {})
    finally:
        other.close()
        store.close()


def test_unopenable_file_is_unavailable(tmp_path: Path) -> None:
    """A path SQLite cannot open (a directory) is Unavailable."""
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(Unavailable):
        SqliteDatastore(tmp_path / "dir.db")


def increment(store: SqliteDatastore, times: int) -> int:
    """Add 1 to the counter `times` times by read and compare-and-swap; returns the Conflicts seen."""
    conflicts = 0
    for _ in range(times):
        while True:
            kv = store.get(COUNTER)
            assert kv is not None
            try:
                store.update(COUNTER, {"n": kv.value["n"] + 1}, kv.mod_revision)
                break
            except Conflict:
                conflicts += 1
    return conflicts


def claim_keys(path: Path, keys: int) -> int:
    """Try to create every key /claim/<i>; returns how many this caller won."""
    store = SqliteDatastore(path)
    won = 0
    try:
        for i in range(keys):
            try:
                store.create(f"/claim/{i}", {})
                won += 1
            except AlreadyExists:
                pass
    finally:
        store.close()
    return won


@pytest.mark.parametrize("shared", [True, False], ids=["one-connection", "connection-per-thread"])
def test_threads_lose_no_update(tmp_path: Path, shared: bool) -> None:
    """Eight threads incrementing by CAS end at exactly 8 x 50, through one connection or several."""
    path = tmp_path / "trellis.db"
    main = SqliteDatastore(path)
    main.create(COUNTER, {"n": 0})
    stores = [main if shared else SqliteDatastore(path) for _ in range(8)]
    threads = [threading.Thread(target=increment, args=(s, 50)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    kv = main.get(COUNTER)
    for s in {id(s): s for s in stores}.values():
        s.close()
    assert kv is not None and kv.value["n"] == 400


def _process_worker(path: Path, results: Any) -> None:
    """One process's share: 150 CAS increments, then a race for 100 keys."""
    store = SqliteDatastore(path)
    try:
        increment(store, 150)
    finally:
        store.close()
    results.put(claim_keys(path, 100))


def test_two_processes_lose_no_update_and_never_both_create(tmp_path: Path) -> None:
    """Two processes on one file: CAS increments all count, and each key is created by exactly one."""
    path = tmp_path / "trellis.db"
    store = SqliteDatastore(path)
    store.create(COUNTER, {"n": 0})
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_process_worker, args=(path, results)) for _ in range(2)]
    for proc in procs:
        proc.start()
    wins = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    try:
        assert [proc.exitcode for proc in procs] == [0, 0]
        kv = store.get(COUNTER)
        assert kv is not None and kv.value["n"] == 300
        assert sum(wins) == 100 and len(store.list("/claim/")) == 100
    finally:
        store.close()
