"""What `trellis lab` commands do to a lab: up, apply, delete, status, down.

Why this order of work: each command holds the lab's lock, checks everything it can before
changing anything (a manifest is applied whole or refused), and records each object in the
state before making it, so that `down` can always remove what exists, even after a command
was killed half-way. `up` that fails removes what it made. Output goes through a `report`
callback: the CLI prints plain lines, the demo prints them its own way.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from trellis.cni.install import CONFLIST_NAME, install
from trellis.lab import fabric
from trellis.lab.errors import LabError, LabNotFound
from trellis.lab.manifest import DEFAULT_NAMESPACE, NamespaceObject, PodObject
from trellis.lab.pods import attach, detach, new_pod, node_cni_path, node_ready
from trellis.lab.probe import Endpoint
from trellis.lab.process import ProcessRef, stop, wait_until
from trellis.lab.state import (
    LAB_ROOT,
    LabPaths,
    LabState,
    Pod,
    already_exists,
    check_node_count,
    fabric_netns,
    lab_lock,
    load,
    locked_state,
    new_lab,
    node_names,
    node_netns,
    plan_nodes,
    pod_netns,
    save,
)
from trellis.lab.supervisor import current_agent, read_agent_record, start_supervisor

log = logging.getLogger(__name__)

BACKENDS = ("vxlan", "host-gw", "bgp")
DATASTORES = ("sqlite", "etcd")
READY_TIMEOUT_S = 60.0
"""How long `up` waits for every agent to answer CNI STATUS (seconds)."""

Report = Callable[[str], None]


def _quiet(_line: str) -> None:
    """The default report: say nothing."""


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return "no log"
    return " | ".join(text[-lines:]) or "empty log"


def up(
    name: str,
    nodes: int,
    backend: str = "vxlan",
    datastore: str = "sqlite",
    root: Path = LAB_ROOT,
    report: Report = _quiet,
) -> LabState:
    """Build lab `name` and return once every agent is ready; on failure remove what was made."""
    if backend not in BACKENDS:
        raise LabError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if datastore != "sqlite":
        raise LabError(f"datastore {datastore!r} is not available in the lab yet (use sqlite)")
    check_node_count(nodes)
    paths = LabPaths(name, root)
    if paths.dir.exists():
        raise LabError(already_exists(name))
    taken = [
        netns
        for netns in [fabric_netns(name), *(node_netns(name, node) for node in node_names(nodes))]
        if fabric.netns_exists(netns)
    ]
    if taken:
        raise LabError(f"network namespace {taken[0]} already exists, yet lab {name} does not")

    def initial(underlay: ipaddress.IPv4Network) -> LabState:
        return LabState(name, backend, datastore, underlay, plan_nodes(name, underlay, nodes))

    started = time.monotonic()
    with new_lab(paths, initial) as state:
        try:
            _build(paths, state, report)
        except BaseException:
            _teardown(paths, state)
            raise
    report(f"lab {name}: {nodes} node(s) ready in {time.monotonic() - started:.1f} s")
    return state


def _build(paths: LabPaths, state: LabState, report: Report) -> None:
    prefixlen = state.underlay.prefixlen
    fabric.build_fabric(state.fabric_netns, ipaddress.IPv4Interface(f"{state.gateway}/{prefixlen}"))
    report(f"fabric {state.fabric_netns}: bridge {fabric.BRIDGE} {state.gateway}/{prefixlen}")
    for index, node in enumerate(state.nodes, start=1):
        address = ipaddress.IPv4Interface(f"{node.underlay_ip}/{prefixlen}")
        fabric.add_node(state.fabric_netns, index, node.netns, address, state.gateway)
        install(paths.cni_bin_dir(node.name), paths.cni_conf_dir(node.name), paths.agent_socket(node.name))
        report(f"{node.name}: namespace {node.netns}, {fabric.NODE_UPLINK} {address}")
    state.namespaces[DEFAULT_NAMESPACE] = NamespaceObject(DEFAULT_NAMESPACE).effective_labels
    supervisor = state.supervisor = start_supervisor(paths)
    save(paths, state)
    waiting = list(state.nodes)

    def all_ready() -> bool:
        waiting[:] = [node for node in waiting if not node_ready(paths, node)]
        if not supervisor.alive():
            raise LabError(f"lab {state.name}: the supervisor exited ({_tail(paths.supervisor_log)})")
        return not waiting

    if not wait_until(all_ready, READY_TIMEOUT_S, poll_s=0.1):
        late = waiting[0].name
        raise LabError(
            f"{late}: agent not ready after {READY_TIMEOUT_S:.0f} s ({_tail(paths.agent_log(late))})"
        )


def _teardown(paths: LabPaths, state: LabState) -> None:
    """Stop every process of the lab (by recorded PID), remove its namespaces and files."""
    stop([state.supervisor])  # it stops the agents
    stop([current_agent(paths, node.name) for node in state.nodes])  # in case it could not
    stop([pod.server for pod in state.pods.values()], grace_s=2.0)
    for netns in [
        *(pod.netns for pod in state.pods.values()),
        *(node.netns for node in state.nodes),
        state.fabric_netns,
    ]:
        fabric.remove_netns(netns)
    shutil.rmtree(paths.dir, ignore_errors=True)


def down(name: str, root: Path = LAB_ROOT) -> bool:
    """Remove lab `name` entirely; False if there was no such lab."""
    paths = LabPaths(name, root)
    if not paths.dir.exists():
        return False
    try:
        with lab_lock(paths):
            if paths.state.exists():
                _teardown(paths, load(paths))
            else:  # an `up` killed before it wrote any state: only files exist
                shutil.rmtree(paths.dir, ignore_errors=True)
    except LabNotFound:  # removed by another `down` meanwhile, or no lock file yet
        if not paths.dir.exists():
            return False
        shutil.rmtree(paths.dir, ignore_errors=True)
    return True


def _check_pod_update(existing: Pod, obj: PodObject) -> None:
    """Only labels of a pod can change, as the API server allows."""
    if existing.ip is None:
        raise LabError(f"pod {obj.key} was not made completely; delete it, then apply it again")
    if obj.node_name is not None and obj.node_name != existing.node:
        raise LabError(
            f"pod {obj.key} runs on {existing.node}; spec.nodeName cannot change (delete the pod first)"
        )
    if sorted(obj.listen_ports) != sorted(existing.ports):
        raise LabError(f"pod {obj.key}: its ports cannot change (delete the pod first)")


def _validate_apply(state: LabState, objects: Sequence[NamespaceObject | PodObject]) -> None:
    """Refuse the whole file if any object cannot be applied to this lab."""
    namespaces = set(state.namespaces) | {o.name for o in objects if isinstance(o, NamespaceObject)}
    for obj in objects:
        if not isinstance(obj, PodObject):
            continue
        if obj.namespace not in namespaces:
            raise LabError(f"pod {obj.key}: namespace {obj.namespace!r} does not exist (apply it first)")
        if obj.node_name is not None:
            state.node(obj.node_name)
        if obj.key in state.pods:
            _check_pod_update(state.pods[obj.key], obj)
        elif fabric.netns_exists(netns := pod_netns(state.name, obj.namespace, obj.name)):
            raise LabError(f"pod {obj.key}: network namespace {netns} already exists")


def apply(
    name: str,
    objects: list[NamespaceObject | PodObject],
    root: Path = LAB_ROOT,
    report: Report = _quiet,
) -> None:
    """Create or update every object; namespaces first, as kubectl orders them."""
    paths = LabPaths(name, root)
    with locked_state(paths) as state:
        _validate_apply(state, objects)
        for obj in objects:
            if isinstance(obj, NamespaceObject):
                report(_apply_namespace(paths, state, obj))
        for obj in objects:
            if isinstance(obj, PodObject):
                report(_apply_pod(paths, state, obj))


def _apply_namespace(paths: LabPaths, state: LabState, obj: NamespaceObject) -> str:
    labels = obj.effective_labels
    before = state.namespaces.get(obj.name)
    if before == labels:
        return f"namespace/{obj.name} unchanged"
    state.namespaces[obj.name] = labels
    save(paths, state)
    return f"namespace/{obj.name} {'created' if before is None else 'configured'}"


def _apply_pod(paths: LabPaths, state: LabState, obj: PodObject) -> str:
    existing = state.pods.get(obj.key)
    if existing is not None:
        if existing.labels == obj.labels:
            return f"pod/{obj.key} unchanged"
        state.pods[obj.key] = replace(existing, labels=obj.labels)
        save(paths, state)
        return f"pod/{obj.key} configured"
    if obj.node_name is None:
        node = state.nodes[state.next_node % len(state.nodes)]
        state.next_node += 1
    else:
        node = state.node(obj.node_name)
    pod = new_pod(state.name, obj, node.name)
    state.pods[pod.key] = pod
    save(paths, state)
    try:
        pod = attach(paths, node, pod)
    except BaseException:
        if not fabric.netns_exists(pod.netns):  # else its rollback failed: `delete` or `down` retries
            del state.pods[pod.key]
            save(paths, state)
        raise
    state.pods[pod.key] = pod
    save(paths, state)
    return f"pod/{pod.key} created on {node.name}, ip {pod.ip}"


def delete(
    name: str,
    objects: list[NamespaceObject | PodObject],
    root: Path = LAB_ROOT,
    report: Report = _quiet,
) -> None:
    """Delete every object (a namespace with its pods); objects already gone are reported, not errors."""
    paths = LabPaths(name, root)
    with locked_state(paths) as state:
        for obj in objects:
            if isinstance(obj, NamespaceObject) and obj.name == DEFAULT_NAMESPACE:
                raise LabError(f"namespace {DEFAULT_NAMESPACE} cannot be deleted")
        for obj in objects:
            if isinstance(obj, PodObject):
                report(_delete_pod(paths, state, obj.key))
        for obj in objects:
            if not isinstance(obj, NamespaceObject):
                continue
            if obj.name not in state.namespaces:
                report(f"namespace/{obj.name} not found")
                continue
            for key in [k for k, pod in state.pods.items() if pod.namespace == obj.name]:
                report(_delete_pod(paths, state, key))
            del state.namespaces[obj.name]
            save(paths, state)
            report(f"namespace/{obj.name} deleted")


def _delete_pod(paths: LabPaths, state: LabState, key: str) -> str:
    pod = state.pods.get(key)
    if pod is None:
        return f"pod/{key} not found"
    detach(paths, state.node(pod.node), pod)
    del state.pods[key]
    save(paths, state)
    return f"pod/{key} deleted"


@dataclass(frozen=True)
class NodeStatus:
    name: str
    netns: str
    underlay_ip: ipaddress.IPv4Address
    agent: ProcessRef | None
    restarts: int
    ready: bool


def node_status(paths: LabPaths, state: LabState) -> list[NodeStatus]:
    """Each node's agent as it is now: its PID if running, and whether it answers CNI STATUS."""
    return [
        NodeStatus(
            node.name,
            node.netns,
            node.underlay_ip,
            current_agent(paths, node.name),
            int(read_agent_record(paths, node.name).get("restarts", 0)),
            node_ready(paths, node),
        )
        for node in state.nodes
    ]


def status_json(paths: LabPaths, state: LabState, nodes: list[NodeStatus]) -> dict[str, Any]:
    """`lab status --output json`: the keys DESIGN.md §4 names, and a few more."""
    return {
        "name": state.name,
        "backend": state.backend,
        "datastore": state.datastore,
        "underlay": str(state.underlay),
        "fabric_netns": state.fabric_netns,
        "supervisor_pid": None if state.supervisor is None else state.supervisor.pid,
        "nodes": [
            {
                "name": n.name,
                "netns": n.netns,
                "underlay_ip": str(n.underlay_ip),
                "agent_pid": None if n.agent is None else n.agent.pid,
                "agent_restarts": n.restarts,
                "ready": n.ready,
                "cni_conf": str(paths.cni_conf_dir(n.name) / CONFLIST_NAME),
            }
            for n in nodes
        ],
        "namespaces": [{"name": k, "labels": v} for k, v in sorted(state.namespaces.items())],
        "pods": [
            {
                "name": pod.key,
                "node": pod.node,
                "netns": pod.netns,
                "ip": None if pod.ip is None else str(pod.ip),
                "container_id": pod.container_id,
                "labels": pod.labels,
                "ports": [p.to_json() for p in pod.ports],
                "server_pid": None if pod.server is None else pod.server.pid,
            }
            for pod in sorted(state.pods.values(), key=lambda p: p.key)
        ],
    }


def endpoints(state: LabState) -> list[Endpoint]:
    """Every attached pod, by name, as probe endpoints."""
    return [
        Endpoint(pod.key, pod.netns, pod.ip)
        for pod in sorted(state.pods.values(), key=lambda p: p.key)
        if pod.ip is not None
    ]


def env_exports(paths: LabPaths, state: LabState, node_name: str) -> dict[str, str]:
    """What a person needs to run the node's plugin by hand, as a runtime on that node would."""
    node = state.node(node_name)
    conf_dir = paths.cni_conf_dir(node.name)
    return {
        "CNI_PATH": ":".join(map(str, node_cni_path(paths, node))),
        "NETCONFPATH": str(conf_dir),
        "CNI_CONF": str(conf_dir / CONFLIST_NAME),
        "TRELLIS_NETNS": node.netns,
    }
