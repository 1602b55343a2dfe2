"""Nodes joining and leaving a lab: what `up` does per node, `lab node add` and `lab node remove`.

Why removing a node is the lab's work and not its agent's: an agent that stops does not leave
the cluster (a restart must disturb nothing), so a node leaves the way an operator removes one
from Kubernetes: drain it (the lab deletes its pods through CNI DEL, as kubelet would), delete
its object `/trellis/nodes/NAME` and its Node object from the datastore (as `kubectl delete
node`; every other agent then drops its routes), stop its agent (the DaemonSet's pod goes) and
take the machine away (its namespace and fabric port). The deletion comes before the stop:
an agent that stops and finds its node gone from the datastore leaves for good, which with
backend bgp means BIRD closes its sessions with a notification, so that peers that know
nothing of the datastore (a ToR) drop its routes at once instead of keeping them for a
restart (docs/design/bgp.md). Until all of that is done the node is recorded as retired:
`down` still removes its namespace, and running `node remove` again finishes it.

Joining is the reverse: namespace and uplink, CNI configuration, then the supervisor (woken by
SIGHUP) starts its agent. A node has joined once its agent answers CNI STATUS, the lab has
stored its Node object (as kubelet registers one) and every agent has programmed that (an agent
reports a revision only after registering its node); before a pod lands on it, it has no block
to route.
"""

from __future__ import annotations

import logging
import shutil
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from trellis.cni.install import install
from trellis.lab import bgp, converge, fabric, kube, store
from trellis.lab.errors import LabError
from trellis.lab.pods import delete_pod, node_ready
from trellis.lab.process import log_tail, stop, wait_until
from trellis.lab.report import Report, quiet
from trellis.lab.state import (
    LAB_ROOT,
    LabPaths,
    LabState,
    Node,
    check_node_name,
    free_index,
    locked_state,
    plan_node,
    save,
)
from trellis.lab.supervisor import current_agent, followed
from trellis.model.node import NODE_PREFIX

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 60.0
"""How long a new node's agent may take to answer CNI STATUS and program the node's objects (seconds)."""
RELEASE_TIMEOUT_S = 10.0
"""How long the supervisor may take to stop a removed node's agent (seconds)."""
SOCKET_PATH_MAX = 107
"""Longest path of a unix socket (sun_path less its terminating NUL)."""


def build_node(paths: LabPaths, state: LabState, node: Node) -> None:
    """The node's namespace on the fabric and its CNI configuration (the agent comes from the supervisor)."""
    fabric.add_node(state.fabric_netns, node.index, node.netns, node.underlay)
    install(paths.cni_bin_dir(node.name), paths.cni_conf_dir(node.name), paths.agent_socket(node.name))


def wait_joined(
    paths: LabPaths,
    state: LabState,
    nodes: list[Node],
    objects: Sequence[kube.KubeObject] = (),
    timeout_s: float = JOIN_TIMEOUT_S,
) -> None:
    """Return once every node's agent is ready, then store the nodes' Node objects (and `objects`)
    and return once every agent of the lab has programmed them; LabError naming a node that did not.
    """
    supervisor = state.supervisor
    not_ready = list(nodes)

    def ready() -> bool:
        if supervisor is None or not supervisor.alive():
            raise LabError(f"lab {state.name}: the supervisor exited ({log_tail(paths.supervisor_log)})")
        not_ready[:] = [node for node in not_ready if not node_ready(paths, node)]
        return not not_ready

    if not wait_until(ready, timeout_s, poll_s=0.1):
        late = not_ready[0].name
        raise LabError(f"{late}: agent not ready after {timeout_s:.0f} s ({log_tail(paths.agent_log(late))})")
    store.write(paths, state, dict([*map(kube.node_object, nodes), *objects]))
    converge.programmed(paths, state, timeout_s=timeout_s)


def _wake_supervisor(state: LabState) -> None:
    """Have the supervisor follow the nodes the state now holds."""
    if state.supervisor is not None:
        state.supervisor.signal(signal.SIGHUP)


def _release_agent(paths: LabPaths, state: LabState, node: Node) -> None:
    """Have the supervisor stop the node's agent for good (SIGTERM by its PID); return once it is gone.

    The state no longer holds the node: once the supervisor has followed this revision, it
    has stopped the agent and will not start it again.
    """
    _wake_supervisor(state)
    supervisor = state.supervisor

    def released() -> bool:
        if supervisor is None or not supervisor.alive():
            return True  # nobody restarts the agent now: stopping it below is enough
        return followed(paths) >= state.revision

    wait_until(released, RELEASE_TIMEOUT_S)
    stop([current_agent(paths, node.name)])  # in case the supervisor could not
    if state.backend == "bgp":
        bgp.stop_birds(paths, [node], leaving=True)  # a killed agent leaves its BIRD running


def _retire(paths: LabPaths, state: LabState, node: Node) -> list[str]:
    """Take `node` out of the lab: its agent, its datastore objects, its namespace and files.

    Returns the blocks it held (as strings), which the other nodes stop routing before this
    returns (they have programmed the node's removal).
    """
    if node in state.nodes:
        state.nodes.remove(node)
        state.retired.append(node)
        save(paths, state)
    store.write(paths, state, {NODE_PREFIX + node.name: None, kube.node_key(node.name): None})
    _release_agent(paths, state, node)  # after the deletion: the agent then leaves for good
    blocks = store.node_blocks(paths, state, node.name)
    fabric.remove_port(state.fabric_netns, fabric.fabric_port(node.index))
    fabric.remove_netns(node.netns)
    shutil.rmtree(paths.node_dir(node.name), ignore_errors=True)
    state.retired.remove(node)
    save(paths, state)
    converge.programmed(paths, state)
    return [str(block) for block in blocks]


def add(name: str, node_name: str, root: Path = LAB_ROOT, report: Report = quiet) -> Node:
    """Node `node_name` joins lab `name`; returns once its agent is ready and the node registered."""
    check_node_name(node_name)
    paths = LabPaths(name, root)
    with locked_state(paths) as state:
        if any(n.name == node_name for n in state.nodes):
            raise LabError(f"lab {name} has a node {node_name} already")
        if any(n.name == node_name for n in state.retired):
            raise LabError(
                f"{node_name} is being removed: `trellis lab node remove {node_name}` finishes that"
            )
        if len(str(paths.agent_socket(node_name))) > SOCKET_PATH_MAX:
            raise LabError(f"node name {node_name!r} is too long for its agent's socket path")
        node = plan_node(name, state.subnets, node_name, free_index(state))
        if fabric.netns_exists(node.netns):
            raise LabError(
                f"network namespace {node.netns} already exists, yet lab {name} has no node {node_name}"
            )
        started = time.monotonic()
        state.nodes.append(node)
        save(paths, state)
        try:
            build_node(paths, state, node)
            _wake_supervisor(state)
            wait_joined(paths, state, [node])
        except BaseException:
            try:
                _retire(paths, state, node)
            except LabError as err:
                log.warning("%s: rollback incomplete (`lab node remove` finishes it): %s", node_name, err)
            raise
    report(
        f"{node_name}: joined lab {name} in {time.monotonic() - started:.1f} s "
        f"(namespace {node.netns}, {fabric.NODE_UPLINK} {node.underlay})"
    )
    return node


def remove(name: str, node_name: str, root: Path = LAB_ROOT, report: Report = quiet) -> None:
    """Node `node_name` leaves lab `name`: its pods, agent, datastore object and namespace go.

    Returns once no other node routes to its blocks any more.
    """
    paths = LabPaths(name, root)
    with locked_state(paths) as state:
        retired = [n for n in state.retired if n.name == node_name]
        if retired:
            node = retired[0]  # an earlier removal was interrupted: finish it
        else:
            node = state.node(node_name)
            if len(state.nodes) == 1:
                raise LabError(
                    f"{node_name} is the last node of lab {name} (`trellis lab down` removes the lab)"
                )
            for key in sorted(k for k, pod in state.pods.items() if pod.node == node_name):
                report(delete_pod(paths, state, key))
        blocks = _retire(paths, state, node)
    report(f"{node_name}: removed from lab {name}; no node routes its blocks ({', '.join(blocks) or 'none'})")
