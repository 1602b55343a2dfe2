"""What `trellis lab` commands do to a lab: up, apply, delete, status, down (nodes: `nodes.py`).

Why this order of work: each command holds the lab's lock, checks everything it can before
changing anything (a manifest is applied whole or refused), and records each object in the
state before making it, so that `down` can always remove what exists, even after a command
was killed half-way. `up` that fails removes what it made.

The lab is also its cluster's API server: every Namespace, Pod, Node and policy it makes or
changes is written to the datastore as a Kubernetes object (`kube.py`, `store.write`), which
the agents compute policy from. `apply` and `delete` return once every agent has programmed
the lab's last write (`converge.py`), so a probe right after them sees the new state. Output
goes through a `report` callback: the CLI prints plain lines, the demo prints them its own way.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import shutil
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from trellis.calc.routes import BACKENDS as ROUTED_BACKENDS
from trellis.cni.client import encode_request
from trellis.cni.install import CONFLIST_NAME
from trellis.lab import bgp, converge, fabric, frr, kube, store
from trellis.lab.errors import LabError, LabNotFound
from trellis.lab.manifest import (
    DEFAULT_NAMESPACE,
    DEFAULT_PORTS,
    LabObject,
    NamespaceObject,
    PodObject,
    PolicyObject,
    StoredObject,
)
from trellis.lab.nodes import build_node, wait_joined
from trellis.lab.pods import create_pod, delete_pod, new_pod, node_cni_path, start_server
from trellis.lab.probe import Check, Endpoint, Matrix, probe, udp_sockets_per_source
from trellis.lab.process import ProcessRef, stop
from trellis.lab.report import Report, quiet
from trellis.lab.state import (
    LAB_ROOT,
    LabPaths,
    LabState,
    Node,
    Pod,
    already_exists,
    check_node_count,
    check_subnet_count,
    external_netns,
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
    take_source_ports,
    tor_netns,
)
from trellis.lab.supervisor import current_agent, current_process, read_record, start_supervisor
from trellis.model.k8s import NETWORK_POLICY_PREFIX

log = logging.getLogger(__name__)

BACKENDS = (*ROUTED_BACKENDS, "bgp")
DATASTORES = ("sqlite", "etcd")
EXTERNAL_NAME = "external"
"""What the external host's server calls itself in its answers."""
ANSWER_TIMEOUT_S = 2.0
"""How long `status` waits for each step of an agent's answer to CNI STATUS (seconds). A frozen
agent (SIGSTOP, a deadlock) never answers, yet its socket still takes connections (into the
kernel's backlog): the plugin would wait 120 s for it, as long as kubelet allows."""


def warnings(backend: str, subnets: int) -> list[str]:
    """What a lab of this backend and number of subnets will not do, for people to know up front."""
    found = []
    if backend == "host-gw" and subnets > 1:
        found.append("backend host-gw needs one L2 segment: nodes on different subnets get no routes")
    return found


def up(
    name: str,
    nodes: int,
    backend: str = "vxlan",
    datastore: str = "sqlite",
    subnets: int = 1,
    root: Path = LAB_ROOT,
    report: Report = quiet,
    bgp_topology: str = "mesh",
) -> LabState:
    """Build lab `name` and return once every agent is ready; on failure remove what was made.

    `bgp_topology` (one of `bgp.TOPOLOGIES`) applies to backend bgp only.
    """
    if backend not in BACKENDS:
        raise LabError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if bgp_topology not in bgp.TOPOLOGIES:
        raise LabError(f"BGP topology {bgp_topology!r} is not one of {', '.join(bgp.TOPOLOGIES)}")
    if backend == "bgp":
        bgp.check_subnets(bgp_topology, subnets)
    if datastore not in DATASTORES:
        raise LabError(f"datastore {datastore!r} is not one of {', '.join(DATASTORES)}")
    store.check_available(datastore)
    check_node_count(nodes)
    check_subnet_count(subnets)
    paths = LabPaths(name, root)
    if paths.dir.exists():
        raise LabError(already_exists(name))
    wanted = [fabric_netns(name), external_netns(name), *(node_netns(name, n) for n in node_names(nodes))]
    if backend == "bgp" and bgp_topology == "tor":
        wanted.append(tor_netns(name))
    taken = [netns for netns in wanted if fabric.netns_exists(netns)]
    if taken:
        raise LabError(f"network namespace {taken[0]} already exists, yet lab {name} does not")

    def initial(picked: list[ipaddress.IPv4Network]) -> LabState:
        topology = bgp_topology if backend == "bgp" else None
        return LabState(
            name, backend, datastore, picked, plan_nodes(name, picked, nodes), bgp_topology=topology
        )

    for warning in warnings(backend, subnets):
        report(f"warning: {warning}")
    started = time.monotonic()
    with new_lab(paths, initial, subnets) as state:
        try:
            _build(paths, state, report)
        except BaseException:
            _teardown(paths, state)
            raise
    report(f"lab {name}: {nodes} node(s) ready in {time.monotonic() - started:.1f} s")
    return state


def _build(paths: LabPaths, state: LabState, report: Report) -> None:
    fabric.build_fabric(state.fabric_netns, state.gateways)
    report(f"fabric {state.fabric_netns}: bridge {fabric.BRIDGE} {', '.join(map(str, state.gateways))}")
    for node in state.nodes:
        build_node(paths, state, node)
        report(f"{node.name}: namespace {node.netns}, {fabric.NODE_UPLINK} {node.underlay}")
    fabric.add_external(state.fabric_netns, state.external_netns, state.external)
    state.external_server = start_server(
        state.external_netns, EXTERNAL_NAME, DEFAULT_PORTS, paths.external_log
    )
    save(paths, state)
    report(f"external host: namespace {state.external_netns}, {fabric.NODE_UPLINK} {state.external}")
    state.namespaces[DEFAULT_NAMESPACE] = NamespaceObject(DEFAULT_NAMESPACE).effective_labels

    def record(supervisor: ProcessRef) -> None:
        state.supervisor = supervisor
        save(paths, state)

    start_supervisor(paths, record)
    if state.datastore == "etcd":
        report(f"datastore: etcd at {store.location(paths, state)}, in {state.fabric_netns}")
    objects = [kube.namespace_object(DEFAULT_NAMESPACE, {})]
    if state.bgp_topology is not None:
        objects += bgp.set_up(paths, state, report)
        report(f"BGP: topology {state.bgp_topology}")
    wait_joined(paths, state, state.nodes, objects)


def _teardown(paths: LabPaths, state: LabState) -> None:
    """Stop every process of the lab (by recorded PID), remove its namespaces and files."""
    stop([state.supervisor])  # it stops the agents and etcd
    nodes = [*state.nodes, *state.retired]
    stop([current_agent(paths, node.name) for node in nodes])  # in case it could not
    if state.backend == "bgp":
        bgp.tear_down(paths, state, nodes)  # BIRDs (a killed agent leaves its own running), the ToR
    stop([current_process(paths.etcd_record)])
    stop([state.external_server, *(pod.server for pod in state.pods.values())], grace_s=2.0)
    for netns in [
        *(pod.netns for pod in state.pods.values()),
        *(node.netns for node in nodes),
        state.external_netns,
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


def validate_apply(state: LabState, objects: Sequence[LabObject]) -> None:
    """Refuse the whole file if any object cannot be applied to this lab."""
    namespaces = set(state.namespaces) | {o.name for o in objects if isinstance(o, NamespaceObject)}
    for obj in objects:
        if isinstance(obj, PolicyObject) and obj.namespace is not None and obj.namespace not in namespaces:
            raise LabError(f"{obj}: namespace {obj.namespace!r} does not exist (apply it first)")
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
    objects: Sequence[LabObject],
    root: Path = LAB_ROOT,
    report: Report = quiet,
    wait: bool = True,
) -> None:
    """Create or update every object: namespaces, then policies and BGP objects (so new pods
    start under them), then pods.

    With `wait`, return once every agent has programmed the change (LabError naming a node
    that did not within converge.TIMEOUT_S).
    """
    paths = LabPaths(name, root)
    with locked_state(paths) as state:
        validate_apply(state, objects)
        for obj in objects:
            if isinstance(obj, NamespaceObject):
                report(_apply_namespace(paths, state, obj))
        stored = [obj for obj in objects if isinstance(obj, StoredObject)]
        if stored:
            outcomes = store.write(paths, state, {o.datastore_key: o.body for o in stored})
            for obj in stored:
                report(f"{obj} {outcomes[obj.datastore_key]}")
        for obj in objects:
            if isinstance(obj, PodObject):
                report(_apply_pod(paths, state, obj))
        if wait:
            converge.programmed(paths, state)


def _apply_namespace(paths: LabPaths, state: LabState, obj: NamespaceObject) -> str:
    labels = obj.effective_labels
    before = state.namespaces.get(obj.name)
    if before == labels:
        return f"namespace/{obj.name} unchanged"
    state.namespaces[obj.name] = labels
    save(paths, state)
    store.write(paths, state, dict([kube.namespace_object(obj.name, labels)]))
    return f"namespace/{obj.name} {'created' if before is None else 'configured'}"


def _apply_pod(paths: LabPaths, state: LabState, obj: PodObject) -> str:
    """Create the pod, or change its labels; returns what happened, as kubectl prints it."""
    existing = state.pods.get(obj.key)
    if existing is not None:
        if existing.labels == obj.labels:
            return f"pod/{obj.key} unchanged"
        updated = state.pods[obj.key] = replace(existing, labels=obj.labels)
        save(paths, state)
        store.write(paths, state, dict([kube.pod_object(state, updated)]))
        return f"pod/{obj.key} configured"
    if obj.node_name is None:
        node = state.nodes[state.next_node % len(state.nodes)]
        state.next_node += 1
    else:
        node = state.node(obj.node_name)
    pod = create_pod(paths, state, new_pod(state.name, obj, node.name))
    return f"pod/{pod.key} created on {node.name}, ip {pod.ip}"


def delete(
    name: str,
    objects: Sequence[LabObject],
    root: Path = LAB_ROOT,
    report: Report = quiet,
    wait: bool = True,
) -> None:
    """Delete every object: policies and BGP objects, pods, then namespaces with everything in
    them (their pods and NetworkPolicies); objects already gone are reported, not errors.

    With `wait`, return once every agent has programmed the change.
    """
    paths = LabPaths(name, root)
    with locked_state(paths) as state:
        for obj in objects:
            if isinstance(obj, NamespaceObject) and obj.name == DEFAULT_NAMESPACE:
                raise LabError(f"namespace {DEFAULT_NAMESPACE} cannot be deleted")
        stored = [obj for obj in objects if isinstance(obj, StoredObject)]
        if stored:
            outcomes = store.write(paths, state, dict.fromkeys(o.datastore_key for o in stored))
            for obj in stored:
                report(f"{obj} {outcomes[obj.datastore_key]}")
        for obj in objects:
            if isinstance(obj, PodObject):
                report(delete_pod(paths, state, obj.key))
        for obj in objects:
            if isinstance(obj, NamespaceObject):
                _delete_namespace(paths, state, obj.name, report)
        if wait:
            converge.programmed(paths, state)


def _delete_namespace(paths: LabPaths, state: LabState, name: str, report: Report) -> None:
    """Namespace `name` with its pods and NetworkPolicies, as the API server's namespace controller."""
    if name not in state.namespaces:
        report(f"namespace/{name} not found")
        return
    for key in sorted(k for k, pod in state.pods.items() if pod.namespace == name):
        report(delete_pod(paths, state, key))
    policies = store.read(paths, state, f"{NETWORK_POLICY_PREFIX}{name}/")
    store.write(paths, state, dict.fromkeys(policies))
    for key in policies:
        report(f"networkpolicy/{key.removeprefix(NETWORK_POLICY_PREFIX)} deleted")
    del state.namespaces[name]
    save(paths, state)
    store.write(paths, state, {kube.namespace_key(name): None})
    report(f"namespace/{name} deleted")


@dataclass(frozen=True)
class NodeStatus:
    name: str
    netns: str
    underlay: ipaddress.IPv4Interface
    agent: ProcessRef | None
    restarts: int
    ready: bool
    answering: bool
    """Whether the agent answered CNI STATUS (successfully or not) within ANSWER_TIMEOUT_S."""
    bgp: list[dict[str, str]]
    """With backend bgp: the node's BGP sessions as its agent last reported them (`name`,
    `state`, `info`: BIRD's protocol name, state and info)."""


def node_status(paths: LabPaths, state: LabState) -> list[NodeStatus]:
    """Each node's agent as it is now: its PID if running, and whether it answers CNI STATUS
    (within ANSWER_TIMEOUT_S: a frozen agent is reported as not answering)."""
    statuses = []
    for node in state.nodes:
        answer = agent_answer(paths, node)
        statuses.append(
            NodeStatus(
                node.name,
                node.netns,
                node.underlay,
                current_agent(paths, node.name),
                int(read_record(paths.agent_record(node.name)).get("restarts", 0)),
                answer is True,
                answer is not None,
                list((converge.reported(paths, node.name) or {}).get("bgp", [])),
            )
        )
    return statuses


def agent_answer(paths: LabPaths, node: Node, timeout_s: float = ANSWER_TIMEOUT_S) -> bool | None:
    """The node's agent's answer to CNI STATUS: True (ready), False (not ready), None (no answer
    within `timeout_s` for a step: not running, or frozen).

    The request is the one the node's plugin forwards for a runtime's STATUS (`trellis.cni.client`'s
    wire format), sent here with a deadline that the plugin, exec'd by a runtime, does not have.
    """
    env = {"CNI_COMMAND": "STATUS", "CNI_PATH": ":".join(map(str, node_cni_path(paths, node)))}
    try:
        conflist = json.loads((paths.cni_conf_dir(node.name) / CONFLIST_NAME).read_text())
        conf = {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **conflist["plugins"][0]}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(str(paths.agent_socket(node.name)))
            sock.sendall(encode_request(env, json.dumps(conf).encode()))
            sock.shutdown(socket.SHUT_WR)
            with sock.makefile("rb") as reply:
                code = reply.readline()
    except OSError:  # no node files or socket, nobody listening, or no answer in time (TimeoutError)
        return None
    return code.strip() == b"0" if code else None


def status_json(paths: LabPaths, state: LabState, nodes: list[NodeStatus]) -> dict[str, Any]:
    """`lab status --output json`: the keys DESIGN.md §4 names, and a few more."""
    return {
        "name": state.name,
        "backend": state.backend,
        "datastore": state.datastore,
        "datastore_location": store.location(paths, state),
        "etcd_pid": None if (etcd := current_process(paths.etcd_record)) is None else etcd.pid,
        "datastore_stopped": state.datastore_stopped,
        "underlay": str(state.subnets[0]),
        "subnets": [str(s) for s in state.subnets],
        "bgp_topology": state.bgp_topology,
        "tor": (
            frr.status(paths, state, {n.name: n.bgp for n in nodes}) if state.bgp_topology == "tor" else None
        ),
        "fabric_netns": state.fabric_netns,
        "supervisor_pid": None if state.supervisor is None else state.supervisor.pid,
        "external": {
            "netns": state.external_netns,
            "ip": str(state.external.ip),
            "server_pid": None if state.external_server is None else state.external_server.pid,
        },
        "nodes": [
            {
                "name": n.name,
                "netns": n.netns,
                "underlay_ip": str(n.underlay.ip),
                "subnet": str(n.underlay.network),
                "agent_pid": None if n.agent is None else n.agent.pid,
                "agent_restarts": n.restarts,
                "ready": n.ready,
                "answering": n.answering,
                "cni_conf": str(paths.cni_conf_dir(n.name) / CONFLIST_NAME),
                "bgp": n.bgp,
                "bird_pid": bgp.bird_pid(paths, n.name) if state.backend == "bgp" else None,
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


def measure(paths: LabPaths, state: LabState, checks: Sequence[Check]) -> list[Matrix]:
    """The reachability matrices of every attached pod, measured now with real packets (UDP from
    source ports no recent probe used)."""
    pods = endpoints(state)
    first = take_source_ports(paths, udp_sockets_per_source(pods, checks))
    return probe(pods, checks, udp_source_port=first)


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
