"""Datastores behind one Protocol, chosen by name (`sqlite` now; `etcd`, `kubernetes` later)."""

from pathlib import Path

from trellis.datastore.base import Datastore, DatastoreError
from trellis.datastore.sqlite import SqliteDatastore

__all__ = ["Datastore", "open_datastore"]


def open_datastore(kind: str, location: str) -> Datastore:
    """The datastore `kind` at `location` (for sqlite, a file path)."""
    if kind == "sqlite":
        return SqliteDatastore(Path(location))
    raise DatastoreError(f"datastore {kind!r} is not available (known: sqlite)")
