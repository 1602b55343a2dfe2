"""A lab's record: what it is made of, as one JSON file under /run/trellis/lab/<name>/.

Why a file and a lock: every `trellis lab` command is a separate process, and the lab must
survive them (and `down` must work on a lab a crashed `up` left half-built). So a command
that changes the lab holds an exclusive `flock` on the lab's lock file for its whole run and
records each object in the state *before* creating it, so that `down` finds everything that
may exist. The state is replaced by rename, so readers (status, probe, exec) never lock.

The naming plan lives here too: every namespace is `trl-<lab>-...`, every lab gets its own
underlay subnets (one /24 each, `--subnets` of them) out of 172.31.0.0/16 (apart from the pod
pool 10.244.0.0/16), chosen under a lock shared by all labs. A node's index k gives it its
fabric port `trl-p<k>` and host 10+k of subnet (k-1) mod K, so nodes alternate over the
subnets and no two nodes of a lab share an address or a port name.
"""

from __future__ import annotations

import fcntl
import ipaddress
import itertools
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
"""Node k's underlay address is host FIRST_NODE_HOST + k of its subnet; host 1 is the gateway."""
EXTERNAL_HOST = 254
"""The external host's address is this host of the first subnet: above every node's."""
MAX_NODES = 240
MAX_SUBNETS = 16
STATE_VERSION = 2
PROBE_SOURCE_PORTS = range(32768, 61000)
"""The UDP source ports probes take in turn (Linux's default ephemeral range)."""

_LAB_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,14}[a-z0-9])?$")
_NODE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_RESERVED_NODE_NAMES = ("fabric", "ext", "tor")


def check_lab_name(name: str) -> str:
    """`name` if it can name a lab: its namespaces are `trl-<name>-...`."""
    if not _LAB_NAME.match(name):
        raise LabError(
            f"lab name {name!r} is invalid: 1 to 16 lower-case letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return name


def check_node_name(name: str) -> str:
    """`name` if it can name a node: a DNS label that no other namespace of the lab is named after."""
    if not _NODE_NAME.match(name):
        raise LabError(
            f"node name {name!r} is invalid: a DNS label (1 to 63 lower-case letters, digits, '-')"
        )
    if name in _RESERVED_NODE_NAMES or name.startswith("pod-"):
        raise LabError(f"node name {name!r} is reserved: the lab names its own namespaces so")
    return name


def fabric_netns(lab: str) -> str:
    return f"trl-{lab}-fabric"


def external_netns(lab: str) -> str:
    return f"trl-{lab}-ext"


def tor_netns(lab: str) -> str:
    """The top-of-rack router of BGP topology `tor` (`lab/frr.py`)."""
    return f"trl-{lab}-tor"


def node_netns(lab: str, node: str) -> str:
    return f"trl-{lab}-{node}"


def pod_netns(lab: str, namespace: str, pod: str) -> str:
    return f"trl-{lab}-pod-{namespace}-{pod}"


def node_names(count: int) -> list[str]:
    return [f"node-{k}" for k in range(1, count + 1)]


def pick_subnets(used: set[ipaddress.IPv4Network], count: int) -> list[ipaddress.IPv4Network]:
    """The first `count` /24s of the underlay pool that no other lab uses."""
    free = (s for s in UNDERLAY_POOL.subnets(new_prefix=UNDERLAY_PREFIXLEN) if s not in used)
    picked = list(itertools.islice(free, count))
    if len(picked) < count:
        raise LabError(f"{UNDERLAY_POOL} has {len(picked)} underlay subnet(s) left, not {count}")
    return picked


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

    @property
    def supervisor_record(self) -> Path:
        """The revision of the state the supervisor last followed (JSON)."""
        return self.dir / "supervisor.json"

    @property
    def etcd_dir(self) -> Path:
        return self.dir / "etcd"

    @property
    def etcd_log(self) -> Path:
        return self.dir / "etcd.log"

    @property
    def etcd_record(self) -> Path:
        """The supervisor's record of the etcd server process (JSON), as agent.json for agents."""
        return self.dir / "etcd.json"

    @property
    def external_log(self) -> Path:
        return self.dir / "external.log"

    @property
    def probe_ports(self) -> Path:
        """The next UDP source port a probe takes (JSON; see `take_source_ports`)."""
        return self.dir / "probe.json"

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
    index: int
    """Its place on the fabric: bridge port `trl-p<index>`, host FIRST_NODE_HOST + index."""
    underlay: ipaddress.IPv4Interface

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "netns": self.netns, "index": self.index, "underlay": str(self.underlay)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Node:
        return cls(data["name"], data["netns"], int(data["index"]), ipaddress.IPv4Interface(data["underlay"]))


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
    subnets: list[ipaddress.IPv4Network]
    """The underlay subnets, all on the fabric's bridge; the first holds etcd and the external host."""
    nodes: list[Node]
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)
    """Namespace name to its labels."""
    pods: dict[str, Pod] = field(default_factory=dict)
    """`namespace/name` to the pod."""
    supervisor: ProcessRef | None = None
    next_node: int = 0
    """Round-robin cursor: the index into `nodes` of where the next unplaced pod goes."""
    retired: list[Node] = field(default_factory=list)
    """Nodes left the cluster whose namespace may still exist (`node remove` was interrupted)."""
    external_server: ProcessRef | None = None
    revision: int = 0
    """Counts saves; the supervisor reports the revision it last followed (see `supervisor_record`)."""
    api_revision: int = 0
    """The datastore revision of the lab's last write (a Kubernetes object, a node's removal):
    every agent must report at least this one before a command that waits returns."""
    bgp_topology: str | None = None
    """With backend bgp: the topology `up` set up (`lab/bgp.py`); None with other backends."""
    tor_daemons: dict[str, ProcessRef] = field(default_factory=dict)
    """With BGP topology tor: the ToR's FRR daemons by name (`zebra`, `bgpd`; `lab/frr.py`)."""
    datastore_stopped: bool = False
    """With etcd: the server is held stopped on purpose (`lab datastore stop`, `outage.py`) until
    `lab datastore start`; the supervisor does not restart it meanwhile."""

    @property
    def fabric_netns(self) -> str:
        return fabric_netns(self.name)

    @property
    def external_netns(self) -> str:
        return external_netns(self.name)

    @property
    def gateways(self) -> list[ipaddress.IPv4Interface]:
        """The fabric's address on each subnet (host 1)."""
        return [ipaddress.IPv4Interface(f"{s.network_address + 1}/{s.prefixlen}") for s in self.subnets]

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        """The fabric's address on the first subnet, where its etcd server listens."""
        return self.gateways[0].ip

    @property
    def external(self) -> ipaddress.IPv4Interface:
        """The external host's address: on the fabric, neither a node nor in a pool."""
        first = self.subnets[0]
        return ipaddress.IPv4Interface(f"{first.network_address + EXTERNAL_HOST}/{first.prefixlen}")

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
            "subnets": [str(s) for s in self.subnets],
            "nodes": [n.to_json() for n in self.nodes],
            "namespaces": self.namespaces,
            "pods": [p.to_json() for p in self.pods.values()],
            "supervisor": None if self.supervisor is None else self.supervisor.to_json(),
            "next_node": self.next_node,
            "retired": [n.to_json() for n in self.retired],
            "external_server": None if self.external_server is None else self.external_server.to_json(),
            "revision": self.revision,
            "api_revision": self.api_revision,
            "bgp_topology": self.bgp_topology,
            "tor_daemons": {name: ref.to_json() for name, ref in self.tor_daemons.items()},
            "datastore_stopped": self.datastore_stopped,
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
            subnets=[ipaddress.IPv4Network(s) for s in data["subnets"]],
            nodes=[Node.from_json(n) for n in data["nodes"]],
            namespaces={k: dict(v) for k, v in data["namespaces"].items()},
            pods={p.key: p for p in pods},
            supervisor=ProcessRef.from_json(data["supervisor"]),
            next_node=int(data["next_node"]),
            retired=[Node.from_json(n) for n in data["retired"]],
            external_server=ProcessRef.from_json(data["external_server"]),
            revision=int(data["revision"]),
            api_revision=int(data.get("api_revision", 0)),  # labs made before the lab wrote objects
            bgp_topology=data.get("bgp_topology"),
            tor_daemons={
                name: ref
                for name, raw in data.get("tor_daemons", {}).items()
                if (ref := ProcessRef.from_json(raw)) is not None
            },
            datastore_stopped=bool(data.get("datastore_stopped", False)),
        )


def already_exists(lab: str) -> str:
    return f"lab {lab} already exists (`trellis lab down --name {lab}` removes it)"


def not_found(lab: str) -> str:
    return f"lab {lab} does not exist (`trellis lab up --name {lab}` makes it)"


def check_node_count(count: int) -> int:
    if not 1 <= count <= MAX_NODES:
        raise LabError(f"--nodes {count}: a lab has 1 to {MAX_NODES} nodes")
    return count


def check_subnet_count(count: int) -> int:
    if not 1 <= count <= MAX_SUBNETS:
        raise LabError(f"--subnets {count}: a lab has 1 to {MAX_SUBNETS} underlay subnets")
    return count


def plan_node(lab: str, subnets: list[ipaddress.IPv4Network], name: str, index: int) -> Node:
    """Node `name` at `index`: on subnet (index-1) mod K, host FIRST_NODE_HOST + index."""
    subnet = subnets[(index - 1) % len(subnets)]
    address = ipaddress.IPv4Interface(
        f"{subnet.network_address + FIRST_NODE_HOST + index}/{subnet.prefixlen}"
    )
    return Node(name, node_netns(lab, name), index, address)


def plan_nodes(lab: str, subnets: list[ipaddress.IPv4Network], count: int) -> list[Node]:
    """Nodes node-1..node-COUNT with their namespaces and underlay addresses."""
    return [plan_node(lab, subnets, name, k) for k, name in enumerate(node_names(count), start=1)]


def free_index(state: LabState) -> int:
    """The lowest node index no node of the lab holds (nor one being removed)."""
    taken = {n.index for n in [*state.nodes, *state.retired]}
    for index in range(1, MAX_NODES + 1):
        if index not in taken:
            return index
    raise LabError(f"lab {state.name} has {MAX_NODES} nodes already")


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace `path` by rename, so a reader sees the old or the new content, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def save(paths: LabPaths, state: LabState) -> None:
    state.revision += 1
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


def take_source_ports(paths: LabPaths, count: int) -> int:
    """The first of `count` consecutive ports of PROBE_SOURCE_PORTS, after those the last probe took.

    Why: conntrack remembers a UDP flow for 30 s after its last datagram. A probe datagram that
    happened to reuse the source port of an earlier probe's (allowed then) would match that
    entry and pass as part of an established flow, whatever the policy is now. Taken in turn,
    under a lock of their own (probes do not take the lab's lock), a port comes back only after
    28 000 others.
    """
    if count > len(PROBE_SOURCE_PORTS):
        raise LabError(f"a probe of {count} UDP sockets per pod needs more source ports than there are")
    fd = _flock(paths.probe_ports, os.O_CREAT)
    try:
        with os.fdopen(os.dup(fd), "r+") as cursor:
            text = cursor.read()
            first = int(json.loads(text)["next"]) if text else PROBE_SOURCE_PORTS.start
            if first + count > PROBE_SOURCE_PORTS.stop:
                first = PROBE_SOURCE_PORTS.start
            cursor.seek(0)
            cursor.truncate()
            cursor.write(json.dumps({"next": first + count}) + "\n")
    finally:
        os.close(fd)
    return first


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


def _used_subnets(root: Path) -> set[ipaddress.IPv4Network]:
    used: set[ipaddress.IPv4Network] = set()
    for path in root.glob("*/state.json"):
        try:
            used.update(ipaddress.IPv4Network(s) for s in json.loads(path.read_text())["subnets"])
        except (OSError, ValueError, KeyError):
            continue  # a lab being removed
    return used


@contextmanager
def new_lab(
    paths: LabPaths, build: Callable[[list[ipaddress.IPv4Network]], LabState], subnets: int = 1
) -> Iterator[LabState]:
    """Create the lab's directory and first state (from `build`, given free subnets) and hold its lock.

    Raises LabError if the lab exists. The subnets are chosen under a lock all labs share, so
    two labs made at once get different ones.
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
            state = build(pick_subnets(_used_subnets(paths.root), subnets))
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
