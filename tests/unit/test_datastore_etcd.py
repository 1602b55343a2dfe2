"""What only the etcd store has: an endpoint URL, a key prefix, and a server that can be away."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from trellis.datastore import ClientTls, open_datastore
from trellis.datastore.base import DatastoreError, Unavailable
from trellis.datastore.etcd import EtcdDatastore

pytest_plugins = ["tests.unit.datastore_backends"]


def test_an_unreachable_server_is_unavailable() -> None:
    """Reads, writes and watches against a port nobody listens on are Unavailable, not crashes."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        store = EtcdDatastore(f"http://127.0.0.1:{port}", timeout_s=2)
        with pytest.raises(Unavailable):
            store.get("/a")
        with pytest.raises(Unavailable):
            store.put("/a", {})
        with pytest.raises(Unavailable):
            store.watch("/", 0, 1.0)
        store.close()


@pytest.mark.parametrize("endpoint", ["127.0.0.1:2379", "unix:///run/etcd.sock", "http://"])
def test_an_endpoint_that_is_not_a_url_is_refused(endpoint: str) -> None:
    with pytest.raises(DatastoreError, match="expected http"):
        EtcdDatastore(endpoint)


def test_the_registry_opens_etcd_by_url_and_keys_stay_under_their_prefix(etcd_url: str) -> None:
    """open_datastore("etcd", URL) reaches the server; stores with different prefixes do not see
    each other's keys or changes, and the prefix is really in front of the key in etcd."""
    root = open_datastore("etcd", etcd_url)
    first = EtcdDatastore(etcd_url, prefix="/prefix-test-1")
    second = EtcdDatastore(etcd_url, prefix="/prefix-test-2")
    try:
        rev = first.put("/k", {"n": 1})
        assert second.get("/k") is None
        assert second.watch("/", rev - 1, 0.2) == []
        assert [(kv.key, kv.value) for kv in root.list("/prefix-test-1/")] == [("/prefix-test-1/k", {"n": 1})]
    finally:
        for store in (root, first, second):
            store.close()


def test_a_file_store_takes_no_tls(tmp_path: Path) -> None:
    with pytest.raises(DatastoreError, match="TLS"):
        open_datastore("sqlite", str(tmp_path / "trellis.db"), tls=ClientTls(ca_cert=tmp_path / "ca.pem"))
