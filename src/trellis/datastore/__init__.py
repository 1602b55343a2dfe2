"""Datastores behind one Protocol, chosen by name from one registry (`sqlite`, `etcd`, `kubernetes`).

The etcd and kubernetes backends are imported only when chosen: they bring HTTP stacks that
an agent on SQLite never needs.
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


def _open_kubernetes(location: str, tls: ClientTls | None) -> Datastore:
    if tls is not None:
        raise DatastoreError(f"datastore kubernetes {location}: TLS settings come from the kubeconfig")
    from trellis.datastore.kubernetes import KubernetesDatastore

    return KubernetesDatastore(location)


_REGISTRY: dict[str, Callable[[str, ClientTls | None], Datastore]] = {
    "sqlite": _open_sqlite,
    "etcd": _open_etcd,
    "kubernetes": _open_kubernetes,
}


def open_datastore(kind: str, location: str, *, tls: ClientTls | None = None) -> Datastore:
    """The datastore `kind` at `location`: for sqlite a file path, for etcd a URL like http://host:2379,
    for kubernetes a kubeconfig file (empty: the in-cluster service account)."""
    try:
        opener = _REGISTRY[kind]
    except KeyError:
        raise DatastoreError(f"datastore {kind!r} is not known (known: {', '.join(_REGISTRY)})") from None
    return opener(location, tls)
