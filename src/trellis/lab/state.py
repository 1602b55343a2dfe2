"""A lab's record: what it is made of, as one JSON file under /run/trellis/lab/<name>/.

Why a file and a lock: every `trellis lab` command is a separate process, and the lab must
survive them (and `down` must work on a lab a crashed `up` left half-built). So a command
that changes the lab holds an exclusive `flock` on the lab's lock file for its whole run and
records each object in the state *before* creating it, so that `down` finds everything that
may exist. The state is replaced by rename, so readers (status, probe, exec) never lock.

The naming plan lives here too: every namespace is `trl-<lab>-...`, every lab gets its own
underlay /24 out of 172.31.0.0/16 (apart from the pod pool 10.244.0.0/16), chosen under a
lock shared by all labs.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trellis.lab.errors import LabError, LabNotFound
from trellis.lab.manifest import ContainerPort
from trellis.lab.process import ProcessRef

LAB_ROOT = Path("/run/trellis/lab")
UNDERLAY_POOL = ipaddress.IPv4Network("172.31.0.0/16")
UNDERLAY_PREFIXLEN = 24
FIRST_NODE_HOST = 10
"""Node k's underlay address is host FIRST_NODE_HOST + k of the lab's /24; host 1 is the gateway."""
MAX_NODES = 240
STATE_VERSION = 1

_LAB_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,14}[a-z0-9])?$")


def check_lab_name(name: str) -> str:
    """`name` if it can name a lab: its namespaces are `trl-<name>-...`."""
    if not _LAB_NAME.match(name):
        raise LabError(
            f"lab name {name!r} is invalid: 1 to 16 lower-case letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return name


def fabric_netns(lab: str) -> str:
    return f"trl-{lab}-fabric"


def node_netns(lab: str, node: str) -> str:
    return f"trl-{lab}-{node}"


def pod_netns(lab: str, namespace: str, pod: str) -> str:
    return f"trl-{lab}-pod-{namespace}-{pod}"


def node_names(count: int) -> list[str]:
    return [f"node-{k}" for k in range(1, count + 1)]


def pick_underlay(used: set[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """The first /24 of the underlay pool that no other lab uses."""
    for subnet in UNDERLAY_POOL.subnets(new_prefix=UNDERLAY_PREFIXLEN):
        if subnet not in used:
            return subnet
    raise LabError(f"every underlay subnet of {UNDERLAY_POOL} is in use by another lab")


@dataclass(frozen=True)
class LabPaths:
    """Where a lab keeps its files."""

    name: str
    root: Path = LAB_ROOT

    @property
    def dir(self) -> Path:
        return self.root / self.name

    @property
    def state(self) -> Path:
        return self.dir / "state.json"

    @property
    def lock(self) -> Path:
        return self.dir / "lock"

    @property
    def datastore(self) -> Path:
        return self.dir / "datastore.db"

    @property
    def supervisor_log(self) -> Path:
        return self.dir / "supervisor.log"

    def node_dir(self, node: str) -> Path:
        return self.dir / "nodes" / node

    def agent_socket(self, node: str) -> Path:
        return self.node_dir(node) / "agent.sock"

    def agent_log(self, node: str) -> Path:
        return self.node_dir(node) / "agent.log"

    def agent_record(self, node: str) -> Path:
        """The supervisor's record of the node's current agent process (JSON)."""
        return self.node_dir(node) / "agent.json"

    def cni_bin_dir(self, node: str) -> Path:
        return self.node_dir(node) / "bin"

    def cni_conf_dir(self, node: str) -> Path:
        return self.node_dir(node) / "net.d"

    def cni_cache_dir(self, node: str) -> Path:
        return self.node_dir(node) / "cache"

    def pod_log(self, key: str) -> Path:
        return self.dir / "pods" / (key.replace("/", "_") + ".log")


@dataclass(frozen=True)
class Node:
    name: str
    netns: str
    underlay_ip: ipaddress.IPv4Address

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "netns": self.netns, "underlay_ip": str(self.underlay_ip)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Node:
        return cls(data["name"], data["netns"], ipaddress.IPv4Address(data["underlay_ip"]))


@dataclass(frozen=True)
class Pod:
    """A pod of the lab: what the manifest said, where it runs, and what attaching it gave."""

    namespace: str
    name: str
    node: str
    netns: str
    container_id: str
    uid: str
    labels: dict[str, str] = field(default_factory=dict)
    ports: tuple[ContainerPort, ...] = ()
    """Ports the pod's server listens on (the declared ones, else the defaults)."""
    ip: ipaddress.IPv4Address | None = None
    """From the CNI ADD result; None until the ADD succeeded."""
    server: ProcessRef | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def to_json(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "name": self.name,
            "node": self.node,
            "netns": self.netns,
            "container_id": self.container_id,
            "uid": self.uid,
            "labels": self.labels,
            "ports": [p.to_json() for p in self.ports],
            "ip": None if self.ip is None else str(self.ip),
            "server": None if self.server is None else self.server.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Pod:
        return cls(
            namespace=data["namespace"],
            name=data["name"],
            node=data["node"],
            netns=data["netns"],
            container_id=data["container_id"],
            uid=data["uid"],
            labels=dict(data["labels"]),
            ports=tuple(ContainerPort.from_json(p) for p in data["ports"]),
            ip=None if data["ip"] is None else ipaddress.IPv4Address(data["ip"]),
            server=ProcessRef.from_json(data["server"]),
        )


@dataclass
class LabState:
    """The whole record of one lab; commands change it under the lab's lock and `save` it."""

    name: str
    backend: str
    datastore: str
    underlay: ipaddress.IPv4Network
    nodes: list[Node]
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)
    """Namespace name to its labels."""
    pods: dict[str, Pod] = field(default_factory=dict)
    """`namespace/name` to the pod."""
    supervisor: ProcessRef | None = None
    next_node: int = 0
    """Round-robin cursor: the index into `nodes` of where the next unplaced pod goes."""

    @property
    def fabric_netns(self) -> str:
        return fabric_netns(self.name)

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.underlay.network_address + 1

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(n.name for n in self.nodes)
        raise LabError(f"lab {self.name} has no node {name!r} (nodes: {known})")

    def pod(self, key: str) -> Pod:
        if key not in self.pods:
            raise LabError(f"lab {self.name} has no pod {key!r} (give it as NAMESPACE/NAME)")
        return self.pods[key]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "name": self.name,
            "backend": self.backend,
            "datastore": self.datastore,
            "underlay": str(self.underlay),
            "nodes": [n.to_json() for n in self.nodes],
            "namespaces": self.namespaces,
            "pods": [p.to_json() for p in self.pods.values()],
            "supervisor": None if self.supervisor is None else self.supervisor.to_json(),
            "next_node": self.next_node,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabState:
        if data.get("version") != STATE_VERSION:
            raise LabError(f"lab {data.get('name')}: state version {data.get('version')!r} is not supported")
        pods = [Pod.from_json(p) for p in data["pods"]]
        return cls(
            name=data["name"],
            backend=data["backend"],
            datastore=data["datastore"],
            underlay=ipaddress.IPv4Network(data["underlay"]),
            nodes=[Node.from_json(n) for n in data["nodes"]],
            namespaces={k: dict(v) for k, v in data["namespaces"].items()},
            pods={p.key: p for p in pods},
            supervisor=ProcessRef.from_json(data["supervisor"]),
            next_node=int(data["next_node"]),
        )


def already_exists(lab: str) -> str:
    return f"lab {lab} already exists (`trellis lab down --name {lab}` removes it)"


def not_found(lab: str) -> str:
    return f"lab {lab} does not exist (`trellis lab up --name {lab}` makes it)"


def check_node_count(count: int) -> int:
    if not 1 <= count <= MAX_NODES:
        raise LabError(f"--nodes {count}: a lab has 1 to {MAX_NODES} nodes")
    return count


def plan_nodes(lab: str, underlay: ipaddress.IPv4Network, count: int) -> list[Node]:
    """Nodes node-1..node-COUNT with their namespaces and underlay addresses."""
    return [
        Node(name, node_netns(lab, name), underlay.network_address + FIRST_NODE_HOST + k)
        for k, name in enumerate(node_names(count), start=1)
    ]


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace `path` by rename, so a reader sees the old or the new content, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def save(paths: LabPaths, state: LabState) -> None:
    write_json_atomic(paths.state, state.to_json())


def load(paths: LabPaths) -> LabState:
    """The lab's state, without locking (it is replaced atomically)."""
    try:
        data = json.loads(paths.state.read_text())
    except FileNotFoundError:
        if paths.dir.exists():
            raise LabError(
                f"lab {paths.name} is incomplete (its `up` did not finish); "
                f"`trellis lab down --name {paths.name}` removes it"
            ) from None
        raise LabNotFound(not_found(paths.name)) from None
    return LabState.from_json(data)


def _flock(path: Path, flags: int) -> int:
    """An fd of `path` holding an exclusive lock (the caller closes it to unlock)."""
    fd = os.open(path, flags | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def lab_lock(paths: LabPaths) -> Iterator[None]:
    """Hold the lab's lock; raises LabError if the lab does not exist (or was removed meanwhile)."""
    try:
        fd = _flock(paths.lock, 0)
    except FileNotFoundError:
        raise LabNotFound(not_found(paths.name)) from None
    try:
        # `down` removes the lock file while holding it: a waiter then holds a dead file's lock.
        try:
            same = os.stat(paths.lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            raise LabNotFound(f"lab {paths.name} was removed meanwhile")
        yield
    finally:
        os.close(fd)


@contextmanager
def locked_state(paths: LabPaths) -> Iterator[LabState]:
    """The state under the lab's lock, for a command that changes the lab (it calls `save`)."""
    with lab_lock(paths):
        yield load(paths)


def _used_underlays(root: Path) -> set[ipaddress.IPv4Network]:
    used = set()
    for path in root.glob("*/state.json"):
        try:
            used.add(ipaddress.IPv4Network(json.loads(path.read_text())["underlay"]))
        except (OSError, ValueError, KeyError):
            continue  # a lab being removed
    return used


@contextmanager
def new_lab(paths: LabPaths, build: Callable[[ipaddress.IPv4Network], LabState]) -> Iterator[LabState]:
    """Create the lab's directory and first state (from `build`, given a free underlay) and hold its lock.

    Raises LabError if the lab exists. The underlay is chosen under a lock all labs share, so
    two labs made at once get different subnets.
    """
    paths.root.mkdir(parents=True, exist_ok=True)
    shared = _flock(paths.root / ".lock", os.O_CREAT)
    try:
        try:
            paths.dir.mkdir()
        except FileExistsError:
            raise LabError(already_exists(paths.name)) from None
        fd = _flock(paths.lock, os.O_CREAT)
        try:
            state = build(pick_underlay(_used_underlays(paths.root)))
            save(paths, state)
        except BaseException:
            shutil.rmtree(paths.dir, ignore_errors=True)
            os.close(fd)
            raise
    finally:
        os.close(shared)
    try:
        yield state
    finally:
        os.close(fd)
