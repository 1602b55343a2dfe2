"""Embedded datastore: one SQLite file, shared safely by every agent on one machine.

WAL mode lets readers run beside a writer; every write is one `BEGIN IMMEDIATE` transaction
that bumps a global revision, so compare-and-swap means "the row still has the revision I
read". A busy database (another process holds the write lock past the busy timeout) is
`Unavailable`, which the CNI layer reports as "try again later".
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from trellis.datastore.base import KV, AlreadyExists, Conflict, Unavailable

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, "
    " mod_revision INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0)",
)


class SqliteDatastore:
    """The `sqlite` Datastore: thread-safe within a process, safe across processes."""

    def __init__(self, path: Path, busy_timeout_s: float = 5.0) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            with self._write():
                for statement in _SCHEMA:
                    self._db.execute(statement)
        except sqlite3.OperationalError as err:
            raise Unavailable(f"sqlite datastore {path}: {err}") from err
        path.chmod(0o600)

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction; the caller's statements run inside it."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as err:
                raise Unavailable(f"sqlite datastore {self.path}: {err}") from err
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _next_revision(self) -> int:
        self._db.execute("UPDATE meta SET value = value + 1 WHERE name = 'revision'")
        row = self._db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
        return int(row[0])

    def _row(self, key: str) -> KV | None:
        row = self._db.execute("SELECT value, mod_revision FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else KV(key, json.loads(row[0]), int(row[1]))

    def get(self, key: str) -> KV | None:
        with self._lock:
            return self._row(key)

    def list(self, prefix: str) -> list[KV]:
        with self._lock:
            rows = self._db.execute(
                "SELECT key, value, mod_revision FROM kv WHERE substr(key, 1, ?) = ? ORDER BY key",
                (len(prefix), prefix),
            ).fetchall()
        return [KV(key, json.loads(value), int(rev)) for key, value, rev in rows]

    def create(self, key: str, value: dict[str, Any]) -> int:
        with self._write():
            if self._row(key) is not None:
                raise AlreadyExists(key)
            revision = self._next_revision()
            self._db.execute(
                "INSERT INTO kv (key, value, mod_revision) VALUES (?, ?, ?)",
                (key, json.dumps(value, sort_keys=True), revision),
            )
            return revision

    def update(self, key: str, value: dict[str, Any], mod_revision: int) -> int:
        with self._write():
            current = self._row(key)
            if current is None or current.mod_revision != mod_revision:
                raise Conflict(key)
            revision = self._next_revision()
            self._db.execute(
                "UPDATE kv SET value = ?, mod_revision = ? WHERE key = ?",
                (json.dumps(value, sort_keys=True), revision, key),
            )
            return revision

    def delete(self, key: str, mod_revision: int) -> None:
        with self._write():
            current = self._row(key)
            if current is None or current.mod_revision != mod_revision:
                raise Conflict(key)
            self._next_revision()
            self._db.execute("DELETE FROM kv WHERE key = ?", (key,))

    def close(self) -> None:
        with self._lock:
            self._db.close()
