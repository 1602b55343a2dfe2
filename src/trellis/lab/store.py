"""The lab's datastore: a SQLite file in the lab's directory, or a real etcd server in the fabric.

Why etcd runs inside the fabric namespace: it is the multi-host store, so the agents must reach
it over the underlay as they would across machines, at the fabric's address on the first subnet
(`http://172.31.L.1:2379`); it also listens on 127.0.0.1 of the fabric, where the lab checks its
health. Its data stays in the lab's directory; compaction keeps one hour of history. The
supervisor starts it (before the agents) and restarts it like an agent.

Why every access runs in the fabric namespace: the lab is the cluster's API server and
operator. It writes the Kubernetes objects of its cluster (`kube.py`), deletes a node's
registration to remove it (as `kubectl delete node` does), and a connection to etcd only
exists from a namespace on the fabric. The same code serves SQLite, for which the namespace
makes no difference.

Every write records the store revision it reached in the lab's state (`api_revision`): a
command then waits until every agent reports having programmed at least that revision
(`converge.py`).
"""

from __future__ import annotations

import ipaddress
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from trellis.dataplane.kernel.netns import call_in_netns
from trellis.datastore import Datastore, open_datastore
from trellis.datastore.base import Conflict, DatastoreError
from trellis.lab.errors import LabError
from trellis.lab.state import LabPaths, LabState, save
from trellis.model.ipam import BLOCK_PREFIX, Block

T = TypeVar("T")

ETCD = Path("/usr/bin/etcd")
"""Debian's etcd-server."""
CLIENT_PORT = 2379
PEER_PORT = 2380
HEALTH_TIMEOUT_S = 1.0
DELETE_ATTEMPTS = 5


def check_available(datastore: str) -> None:
    """LabError if the lab cannot provide datastore `datastore` on this machine."""
    if datastore == "etcd" and not ETCD.exists():
        raise LabError(f"datastore etcd needs {ETCD} (Debian package etcd-server; `make setup` installs it)")


def location(paths: LabPaths, state: LabState) -> str:
    """What the agents get as `--datastore-location`."""
    if state.datastore == "etcd":
        return f"http://{state.gateway}:{CLIENT_PORT}"
    return str(paths.datastore)


def etcd_command(paths: LabPaths, state: LabState) -> list[str]:
    """The etcd server of the lab, a one-member cluster, to be run in the fabric namespace."""
    peer = f"http://127.0.0.1:{PEER_PORT}"
    member = f"trl-{state.name}"
    return [
        str(ETCD),
        f"--name={member}",
        f"--data-dir={paths.etcd_dir}",
        f"--listen-client-urls={location(paths, state)},http://127.0.0.1:{CLIENT_PORT}",
        f"--advertise-client-urls={location(paths, state)}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster={member}={peer}",
        "--auto-compaction-retention=1h",
    ]


def etcd_healthy(state: LabState) -> bool:
    """Whether the lab's etcd answers its health check (asked from inside the fabric)."""

    def ask() -> bool:
        url = f"http://127.0.0.1:{CLIENT_PORT}/health"
        try:
            with urllib.request.urlopen(url, timeout=HEALTH_TIMEOUT_S) as answer:
                return b'"true"' in answer.read()
        except (urllib.error.URLError, OSError):
            return False

    return call_in_netns(state.fabric_netns, ask)


def using(paths: LabPaths, state: LabState, action: Callable[[Datastore], T]) -> T:
    """`action` on the lab's datastore, opened (and closed) inside the fabric namespace."""

    def run() -> T:
        store = open_datastore(state.datastore, location(paths, state))
        try:
            return action(store)
        finally:
            store.close()

    try:
        return call_in_netns(state.fabric_netns, run)
    except DatastoreError as err:
        raise LabError(f"lab {state.name}: datastore {state.datastore}: {err}") from None


def read(paths: LabPaths, state: LabState, prefix: str) -> dict[str, dict[str, Any]]:
    """Every object under `prefix`, by key."""
    return using(paths, state, lambda store: {kv.key: kv.value for kv in store.list(prefix)})


def _delete(store: Datastore, key: str) -> bool:
    """Delete `key` whatever its revision; False if it was absent."""
    for _ in range(DELETE_ATTEMPTS):
        kv = store.get(key)
        if kv is None:
            return False
        try:
            store.delete(kv.key, kv.mod_revision)
        except Conflict:
            continue  # re-written meanwhile (an agent re-registering its node): read it again
        return True
    raise LabError(f"{key} kept changing while being deleted; is an agent still writing it?")


def write(paths: LabPaths, state: LabState, changes: Mapping[str, dict[str, Any] | None]) -> dict[str, str]:
    """Store each value (None: delete the key); returns per key what happened, in kubectl's words.

    A value equal to the stored one is not written ("unchanged"). The store revision reached
    is recorded in the state (`api_revision`, saved) for commands to wait on.
    """

    def apply(store: Datastore) -> tuple[dict[str, str], int]:
        outcomes: dict[str, str] = {}
        revision = 0
        for key, value in changes.items():
            if value is None:
                outcomes[key] = "deleted" if _delete(store, key) else "not found"
                continue
            current = store.get(key)
            if current is not None and current.value == value:
                outcomes[key] = "unchanged"
                continue
            revision = max(revision, store.put(key, value))
            outcomes[key] = "created" if current is None else "configured"
        if "deleted" in outcomes.values():  # a delete tells no revision: the store's is at least it
            revision = max(revision, store.snapshot(next(iter(changes))).revision)
        return outcomes, revision

    if not changes:
        return {}
    outcomes, revision = using(paths, state, apply)
    if revision > state.api_revision:
        state.api_revision = revision
        save(paths, state)
    return outcomes


def node_blocks(paths: LabPaths, state: LabState, name: str) -> list[ipaddress.IPv4Network]:
    """The blocks node `name` holds (the agents give them back to the pool after their grace period)."""

    def blocks(store: Datastore) -> list[ipaddress.IPv4Network]:
        held = (Block.from_json(kv.value) for kv in store.list(BLOCK_PREFIX))
        return [block.cidr for block in held if block.node == name]

    return using(paths, state, blocks)
