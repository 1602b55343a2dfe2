"""Embedded datastore: one SQLite file, shared safely by every agent on one machine.

WAL mode lets readers run beside a writer; every write is one `BEGIN IMMEDIATE` transaction
that bumps a global revision, so compare-and-swap means "the row still has the revision I
read". A busy database (another process holds the write lock past the busy timeout) is
`Unavailable`, which the CNI layer reports as "try again later".

Watch is etcd's, rebuilt from a change log: each change appends (revision, key, kind, value)
in the transaction that makes it, so a watcher can never see a change the store lost, nor
miss one. The log keeps the last `history` revisions (etcd compacts the same way); a watcher
that falls further behind gets `Compacted` and lists again. Watchers poll the log: writers in
this process wake them at once, other processes' writes are seen within `poll_interval_s`.

Leases are rows with an expiry time from the injected clock (wall time by default, so that
processes agree). Nothing runs in the background: every operation first sweeps the leases
that have expired, deleting their keys with DELETE events, one revision per lease, as etcd's
lessor does. A store nobody touches therefore expires nothing, and nobody can tell.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from trellis.datastore.base import (
    KV,
    AlreadyExists,
    Compacted,
    Conflict,
    Event,
    EventKind,
    LeaseExpired,
    Snapshot,
    Unavailable,
    decode_value,
)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, "
    " mod_revision INTEGER NOT NULL, lease INTEGER NOT NULL)",
    "CREATE INDEX IF NOT EXISTS kv_by_lease ON kv (lease) WHERE lease != 0",
    "CREATE TABLE IF NOT EXISTS log (revision INTEGER NOT NULL, key TEXT NOT NULL, "
    " kind TEXT NOT NULL, value TEXT, PRIMARY KEY (revision, key)) WITHOUT ROWID",
    # AUTOINCREMENT: a lease ID is never handed out twice, so a stale ID never renews a new lease.
    "CREATE TABLE IF NOT EXISTS leases (id INTEGER PRIMARY KEY AUTOINCREMENT, "
    " ttl_s INTEGER NOT NULL, expires_at REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS leases_by_expiry ON leases (expires_at)",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0), ('compact_revision', 0)",
)

_UNDER_PREFIX = "substr(key, 1, ?) = ?"


class SqliteDatastore:
    """The `sqlite` Datastore: thread-safe within a process, safe across processes."""

    def __init__(
        self,
        path: Path,
        busy_timeout_s: float = 5.0,
        *,
        history: int = 1_000,
        poll_interval_s: float = 0.05,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`history`: revisions a watcher can resume from; `clock`: seconds, for lease expiry."""
        self.path = path
        self.history = history
        self.poll_interval_s = poll_interval_s
        self.clock = clock
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Bumped after every commit of this process; watchers here wait on it.
        self._generation = 0
        self._changed = threading.Condition()
        try:
            self._db = sqlite3.connect(
                path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            self._enter_wal(busy_timeout_s)
            self._db.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.OperationalError as err:
            raise Unavailable(f"sqlite datastore {path}: {err}") from err
        with self._transaction("BEGIN IMMEDIATE"):
            for statement in _SCHEMA:
                self._db.execute(statement)
        path.chmod(0o600)

    def _enter_wal(self, timeout_s: float) -> None:
        """Switch a new file to WAL mode, waiting out another process doing the same.

        SQLite's busy handler does not cover this switch: two agents opening a fresh file at
        once (a lab's nodes do) see "database is locked" at once, so retry until the timeout.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as err:
                busy = err.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
                if not busy or time.monotonic() >= deadline:
                    raise
            time.sleep(0.01)

    # -- transactions ------------------------------------------------------------------------

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[None]:
        """One transaction under the connection lock; OperationalError (busy) is Unavailable."""
        with self._lock:
            try:
                self._db.execute(begin)
                try:
                    yield
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as err:
                raise Unavailable(f"sqlite datastore {self.path}: {err}") from err

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction, expired leases swept first; wakes this process's watchers."""
        with self._transaction("BEGIN IMMEDIATE"):
            self._sweep()
            yield
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    @contextmanager
    def _read(self) -> Iterator[None]:
        """One consistent read; when a lease has expired, a write that sweeps it comes first."""
        with self._transaction("BEGIN"):
            expired = self._db.execute(
                "SELECT 1 FROM leases WHERE expires_at <= ? LIMIT 1", (self.clock(),)
            ).fetchone()
        if expired is not None:
            with self._write():
                pass  # the write sweeps them
        with self._transaction("BEGIN"):
            yield

    # -- pieces run inside a transaction -----------------------------------------------------

    def _meta(self, name: str) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()[0])

    def _next_revision(self) -> int:
        """Bump the store revision, dropping the log that falls out of the kept history."""
        self._db.execute("UPDATE meta SET value = value + 1 WHERE name = 'revision'")
        revision = self._meta("revision")
        if revision - self.history + 1 > self._meta("compact_revision"):
            self._compact(revision - self.history + 1)
        return revision

    def _compact(self, revision: int) -> None:
        self._db.execute("DELETE FROM log WHERE revision < ?", (revision,))
        self._db.execute("UPDATE meta SET value = ? WHERE name = 'compact_revision'", (revision,))

    def _set(self, revision: int, key: str, value: dict[str, Any] | None, lease: int = 0) -> None:
        """Write (value) or delete (None) one key at `revision`, and log the change."""
        if value is None:
            self._db.execute("DELETE FROM kv WHERE key = ?", (key,))
            self._db.execute(
                "INSERT INTO log (revision, key, kind, value) VALUES (?, ?, ?, NULL)",
                (revision, key, EventKind.DELETE.value),
            )
            return
        text = json.dumps(value, sort_keys=True)
        self._db.execute(
            "INSERT INTO kv (key, value, mod_revision, lease) VALUES (?, ?, ?, ?) ON CONFLICT (key) "
            "DO UPDATE SET value = excluded.value, mod_revision = excluded.mod_revision, "
            "lease = excluded.lease",
            (key, text, revision, lease),
        )
        self._db.execute(
            "INSERT INTO log (revision, key, kind, value) VALUES (?, ?, ?, ?)",
            (revision, key, EventKind.PUT.value, text),
        )

    def _put(self, key: str, value: dict[str, Any], lease: int) -> int:
        if lease and self._db.execute("SELECT 1 FROM leases WHERE id = ?", (lease,)).fetchone() is None:
            raise LeaseExpired(f"sqlite datastore {self.path}: lease {lease} for {key} is gone")
        revision = self._next_revision()
        self._set(revision, key, value, lease)
        return revision

    def _end_lease(self, lease: int) -> None:
        """Delete the lease and its keys, the keys at one new revision (none if it held none)."""
        self._db.execute("DELETE FROM leases WHERE id = ?", (lease,))
        keys = [k for (k,) in self._db.execute("SELECT key FROM kv WHERE lease = ? ORDER BY key", (lease,))]
        if keys:
            revision = self._next_revision()
            for key in keys:
                self._set(revision, key, None)

    def _sweep(self) -> None:
        expired = self._db.execute(
            "SELECT id FROM leases WHERE expires_at <= ? ORDER BY expires_at, id", (self.clock(),)
        ).fetchall()
        for (lease,) in expired:
            self._end_lease(lease)

    def _row(self, key: str) -> KV | None:
        row = self._db.execute("SELECT value, mod_revision FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else KV(key, decode_value(key, row[0]), int(row[1]))

    def _current(self, key: str, mod_revision: int) -> None:
        """Raise Conflict unless `key` exists at `mod_revision`."""
        current = self._row(key)
        if current is None or current.mod_revision != mod_revision:
            found = "gone" if current is None else f"at revision {current.mod_revision}"
            raise Conflict(f"{key}: expected revision {mod_revision}, {found}")

    def _wait_for_change(self, seen: int, timeout_s: float) -> None:
        """Until this process commits a write after generation `seen`, or `timeout_s` passes."""
        with self._changed:
            self._changed.wait_for(lambda: self._generation != seen, timeout=timeout_s)

    def _events(self, prefix: str, after_revision: int) -> list[Event]:
        compacted = self._meta("compact_revision")
        if after_revision + 1 < compacted:
            raise Compacted(
                f"sqlite datastore {self.path}: watch of {prefix} from revision {after_revision + 1}: "
                f"history before {compacted} is compacted"
            )
        rows = self._db.execute(
            f"SELECT revision, key, kind, value FROM log WHERE revision > ? AND {_UNDER_PREFIX} "
            "ORDER BY revision, key",
            (after_revision, len(prefix), prefix),
        ).fetchall()
        return [
            Event(EventKind(kind), key, None if value is None else decode_value(key, value), int(revision))
            for revision, key, kind, value in rows
        ]

    # -- the Datastore protocol --------------------------------------------------------------

    def get(self, key: str) -> KV | None:
        with self._read():
            return self._row(key)

    def list(self, prefix: str) -> list[KV]:
        return self.snapshot(prefix).items

    def snapshot(self, prefix: str) -> Snapshot:
        with self._read():
            rows = self._db.execute(
                f"SELECT key, value, mod_revision FROM kv WHERE {_UNDER_PREFIX} ORDER BY key",
                (len(prefix), prefix),
            ).fetchall()
            revision = self._meta("revision")
        return Snapshot([KV(key, decode_value(key, value), int(rev)) for key, value, rev in rows], revision)

    def watch(self, prefix: str, after_revision: int, timeout_s: float) -> builtins.list[Event]:
        deadline = time.monotonic() + timeout_s
        while True:
            seen = self._generation
            with self._read():
                events = self._events(prefix, after_revision)
            remaining = deadline - time.monotonic()
            if events or remaining <= 0:
                return events
            self._wait_for_change(seen, min(self.poll_interval_s, remaining))

    def create(self, key: str, value: dict[str, Any], lease: int = 0) -> int:
        with self._write():
            if self._row(key) is not None:
                raise AlreadyExists(key)
            return self._put(key, value, lease)

    def update(self, key: str, value: dict[str, Any], mod_revision: int, lease: int = 0) -> int:
        with self._write():
            self._current(key, mod_revision)
            return self._put(key, value, lease)

    def put(self, key: str, value: dict[str, Any], lease: int = 0) -> int:
        with self._write():
            return self._put(key, value, lease)

    def delete(self, key: str, mod_revision: int) -> None:
        with self._write():
            self._current(key, mod_revision)
            self._set(self._next_revision(), key, None)

    def grant_lease(self, ttl_s: int) -> int:
        with self._write():
            cursor = self._db.execute(
                "INSERT INTO leases (ttl_s, expires_at) VALUES (?, ?)", (ttl_s, self.clock() + ttl_s)
            )
            assert cursor.lastrowid is not None
            return cursor.lastrowid

    def keepalive(self, lease: int) -> None:
        with self._write():
            renewed = self._db.execute(
                "UPDATE leases SET expires_at = ? + ttl_s WHERE id = ?", (self.clock(), lease)
            ).rowcount
        if not renewed:
            raise LeaseExpired(f"sqlite datastore {self.path}: lease {lease} is gone")

    def revoke_lease(self, lease: int) -> None:
        with self._write():
            self._end_lease(lease)

    def compact(self, revision: int) -> None:
        """Forget the history before `revision` (at most the current one); watch from there raises."""
        with self._write():
            if revision > self._meta("compact_revision"):
                self._compact(revision)

    def close(self) -> None:
        with self._lock:
            self._db.close()
