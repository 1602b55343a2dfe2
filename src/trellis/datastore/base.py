"""The Datastore protocol: a revisioned key-value store, the shape etcd v3 has.

Why key-value with revisions: every backend (SQLite, etcd; the Kubernetes API in later work)
can give the same few guarantees. IPAM needs nothing more than create-if-absent and
compare-and-swap on one key to be safe across processes and crashes (Calico's block IPAM is
built the same way). The agents of a cluster need one more thing: to follow every change
without polling whole prefixes, which is what a snapshot at a revision plus a watch from that
revision gives (the list-then-watch of etcd and of the Kubernetes API). Leases let a node's
liveness records disappear by themselves when the node stops renewing them.

Values are JSON objects. Revisions are store-wide and grow with every change; one change may
produce several events (a lease that expires deletes all its keys at one revision).
"""

from __future__ import annotations

import builtins
import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class KV:
    """One stored object and the revision that last changed it."""

    key: str
    value: dict[str, Any]
    mod_revision: int


class DatastoreError(Exception):
    """Base of datastore errors."""


class Unavailable(DatastoreError):
    """The datastore cannot be reached or is busy; the operation may be retried later."""


class AlreadyExists(DatastoreError):
    """create() found the key present."""


class Conflict(DatastoreError):
    """A compare-and-swap found a newer revision (or the key gone): re-read and retry."""


class Compacted(DatastoreError):
    """watch() asked for history the store no longer keeps: list again and resume from there."""


class LeaseExpired(DatastoreError):
    """The lease is gone (expired or revoked); the keys it held are deleted."""


def decode_value(key: str, raw: str | bytes) -> dict[str, Any]:
    """A stored value as the object it holds; a DatastoreError naming the key when it is not
    a JSON object (someone wrote it by hand), so a reader reports it instead of dying on it."""
    try:
        value = json.loads(raw)
    except ValueError as err:
        raise DatastoreError(f"key {key}: value is not JSON ({err})") from None
    if not isinstance(value, dict):
        raise DatastoreError(f"key {key}: value is a JSON {type(value).__name__}, not an object")
    return value


class EventKind(Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True)
class Event:
    """One change: a PUT carries the new value, a DELETE the key alone."""

    kind: EventKind
    key: str
    value: dict[str, Any] | None
    mod_revision: int


@dataclass(frozen=True)
class Snapshot:
    """Every object under a prefix at one revision of the store."""

    items: list[KV]
    revision: int


@dataclass(frozen=True)
class ClientTls:
    """TLS files (PEM) for a datastore reached over the network."""

    ca_cert: Path | None = None
    """CA bundle that signs the server's certificate (default: the system's CAs)."""
    cert: Path | None = None
    """Client certificate, for servers that require one (default: none)."""
    key: Path | None = None
    """Private key of `cert` (default: none)."""


class Datastore(Protocol):
    """Everything Trellis stores, behind one small interface.

    Writes that take a `lease` bind the key to it (0: no lease; a write without a lease
    unbinds the key) and raise LeaseExpired when that lease is gone.
    """

    def get(self, key: str) -> KV | None:
        """The object at `key`, or None."""

    def list(self, prefix: str) -> list[KV]:
        """Every object whose key starts with `prefix`, ordered by key."""

    def snapshot(self, prefix: str) -> Snapshot:
        """Every object under `prefix`, ordered by key, and the store revision they were read at."""

    # `builtins.list` here and in the backends: in a class body after `def list`, `list` is that method.
    def watch(self, prefix: str, after_revision: int, timeout_s: float) -> builtins.list[Event]:
        """Changes under `prefix` with revision > `after_revision`, oldest first.

        Blocks up to `timeout_s` for the first one and returns [] on time-out. Every event of
        a revision comes in the same answer, so the last event's revision is where the next
        call resumes. Raises Compacted when that history is gone, Unavailable when the store
        cannot be reached.
        """

    def create(self, key: str, value: dict[str, Any], lease: int = 0) -> int:
        """Store `value` at `key` if absent; returns the new revision, raises AlreadyExists."""

    def update(self, key: str, value: dict[str, Any], mod_revision: int, lease: int = 0) -> int:
        """Replace `key` if it is still at `mod_revision`; returns the new revision, raises Conflict."""

    def put(self, key: str, value: dict[str, Any], lease: int = 0) -> int:
        """Store `value` at `key` unconditionally; returns the new revision."""

    def delete(self, key: str, mod_revision: int) -> None:
        """Remove `key` if it is still at `mod_revision`; raises Conflict."""

    def grant_lease(self, ttl_s: int) -> int:
        """A new lease of at least `ttl_s` seconds; returns its ID (never 0, never reused)."""

    def keepalive(self, lease: int) -> None:
        """Renew the lease for its full TTL; raises LeaseExpired when it is gone."""

    def revoke_lease(self, lease: int) -> None:
        """End the lease now, deleting its keys; a lease already gone is fine."""

    def close(self) -> None:
        """Release connections."""
