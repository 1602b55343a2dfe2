"""Datastores behind one Protocol, chosen by name from one registry (`sqlite`, `etcd`).

The etcd backend is imported only when chosen: it brings an HTTP stack that an agent on
SQLite never needs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from trellis.datastore.base import ClientTls, Datastore, DatastoreError
from trellis.datastore.sqlite import SqliteDatastore

__all__ = ["ClientTls", "Datastore", "open_datastore"]


def _open_sqlite(location: str, tls: ClientTls | None) -> Datastore:
    if tls is not None:
        raise DatastoreError(f"datastore sqlite {location}: a local file takes no TLS settings")
    return SqliteDatastore(Path(location))


def _open_etcd(location: str, tls: ClientTls | None) -> Datastore:
    from trellis.datastore.etcd import EtcdDatastore

    return EtcdDatastore(location, tls=tls)


_REGISTRY: dict[str, Callable[[str, ClientTls | None], Datastore]] = {
    "sqlite": _open_sqlite,
    "etcd": _open_etcd,
}


def open_datastore(kind: str, location: str, *, tls: ClientTls | None = None) -> Datastore:
    """The datastore `kind` at `location`: for sqlite a file path, for etcd a URL like http://host:2379."""
    try:
        opener = _REGISTRY[kind]
    except KeyError:
        raise DatastoreError(f"datastore {kind!r} is not known (known: {', '.join(_REGISTRY)})") from None
    return opener(location, tls)
