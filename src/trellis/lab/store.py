"""The lab's datastore: a SQLite file in the lab's directory, or a real etcd server in the fabric.

Why etcd runs inside the fabric namespace: it is the multi-host store, so the agents must reach
it over the underlay as they would across machines, at the fabric's address on the first subnet
(`http://172.31.L.1:2379`); it also listens on 127.0.0.1 of the fabric, where the lab checks its
health. Its data stays in the lab's directory; compaction keeps one hour of history. The
supervisor starts it (before the agents) and restarts it like an agent.

Why every access runs in the fabric namespace: the lab is the cluster's operator. It reads node
registrations to know a node joined, and deletes a node's object to remove it (as
`kubectl delete node` does), and a connection to etcd only exists from a namespace on the
fabric. The same code serves SQLite, for which the namespace makes no difference.
"""

from __future__ import annotations

import ipaddress
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from trellis.dataplane.kernel.netns import call_in_netns
from trellis.datastore import Datastore, open_datastore
from trellis.datastore.base import Conflict, DatastoreError
from trellis.lab.errors import LabError
from trellis.lab.state import LabPaths, LabState
from trellis.model.ipam import BLOCK_PREFIX, Block
from trellis.model.node import NODE_PREFIX

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


def registered(paths: LabPaths, state: LabState, names: Iterable[str]) -> set[str]:
    """Those of the nodes `names` whose agent has registered the node in the datastore."""
    wanted = list(names)
    return using(paths, state, lambda store: {n for n in wanted if store.get(NODE_PREFIX + n) is not None})


def forget_node(paths: LabPaths, state: LabState, name: str) -> list[ipaddress.IPv4Network]:
    """Delete node `name`'s object (every agent then drops its routes); returns the blocks it held.

    Its blocks stay claimed: the agents give them back to the pool after their grace period.
    """

    def forget(store: Datastore) -> list[ipaddress.IPv4Network]:
        for _ in range(DELETE_ATTEMPTS):
            kv = store.get(NODE_PREFIX + name)
            if kv is None:
                break
            try:
                store.delete(kv.key, kv.mod_revision)
            except Conflict:
                continue  # re-written meanwhile: read it again
        else:
            raise LabError(f"node {name}: its datastore object kept changing; is its agent still running?")
        blocks = (Block.from_json(kv.value) for kv in store.list(BLOCK_PREFIX))
        return [block.cidr for block in blocks if block.node == name]

    return using(paths, state, forget)
