"""The Datastore protocol: a revisioned key-value store, the shape etcd v3 has.

Why key-value with revisions: every backend (SQLite here; etcd and the Kubernetes API in
later work) can give the same few guarantees, and IPAM needs nothing more than
create-if-absent and compare-and-swap on one key to be safe across processes and crashes
(Calico's block IPAM is built the same way). Values are JSON objects.
"""

from __future__ import annotations

from dataclasses import dataclass
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


class Datastore(Protocol):
    """Everything Trellis stores, behind one small interface."""

    def get(self, key: str) -> KV | None:
        """The object at `key`, or None."""

    def list(self, prefix: str) -> list[KV]:
        """Every object whose key starts with `prefix`, ordered by key."""

    def create(self, key: str, value: dict[str, Any]) -> int:
        """Store `value` at `key` if absent; returns the new revision, raises AlreadyExists."""

    def update(self, key: str, value: dict[str, Any], mod_revision: int) -> int:
        """Replace `key` if it is still at `mod_revision`; returns the new revision, raises Conflict."""

    def delete(self, key: str, mod_revision: int) -> None:
        """Remove `key` if it is still at `mod_revision`; raises Conflict."""

    def close(self) -> None:
        """Release connections."""
