"""The lab's BGP: the topology `lab up --backend bgp` sets up (with `tor`, the ToR router of
`frr.py`), and stopping each node's BIRD.

Why the lab stops BIRD itself: BIRD outlives an agent that was killed (by design, so that
routes stay while the supervisor restarts the agent, `docs/design/bgp.md`); a lab that is
taken down, or a node that leaves, must leave no BIRD behind, so the lab stops each node's
BIRD through its pid file and control socket, as the next agent would have adopted it. A node
that leaves has its BIRD close its sessions (`leaving`), as its agent would have done.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from trellis.bgp.bird import Bird
from trellis.lab import frr
from trellis.lab.errors import LabError
from trellis.lab.kube import KubeObject
from trellis.lab.report import Report
from trellis.lab.state import LabPaths, LabState, Node
from trellis.model.bgp import API_VERSION, DEFAULT_CONFIGURATION, parse_configuration

TOPOLOGIES = ("mesh", "rr", "tor")
"""`mesh`: every node peers with every other (the defaults: AS 64512, mesh on); `rr`: node-1
(and node-2 in a lab of 4 or more nodes) reflect routes to the others, the mesh is off; `tor`:
the mesh, and every node peers with a top-of-rack router running FRR (`frr.py`)."""
TWO_REFLECTORS_FROM = 4
"""A lab of this many nodes or more gets two route reflectors."""


def check_subnets(topology: str, subnets: int) -> None:
    """LabError unless `topology` can be built on `subnets` underlay subnets."""
    if topology == "tor" and subnets > 1:
        raise LabError(
            f"BGP topology tor needs one underlay subnet, not {subnets}: "
            "BGP sessions are direct, and the ToR is on one subnet"
        )


def topology_objects(topology: str, nodes: list[Node]) -> list[KubeObject]:
    """The BGP objects that make `topology` for `nodes` (none for the mesh: the defaults do;
    the ToR's BGPPeer comes with the ToR, from `set_up`)."""
    if topology in ("mesh", "tor"):
        return []
    reflectors = [n.name for n in nodes[: 2 if len(nodes) >= TWO_REFLECTORS_FROM else 1]]
    body: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": "BGPConfiguration",
        "metadata": {"name": DEFAULT_CONFIGURATION},
        "spec": {"nodeToNodeMeshEnabled": False, "routeReflectors": {"nodes": reflectors}},
    }
    return [(parse_configuration(body).key, body)]


def set_up(paths: LabPaths, state: LabState, report: Report) -> list[KubeObject]:
    """The objects to store for the lab's topology; with `tor`, first the ToR itself."""
    assert state.bgp_topology is not None
    objects = topology_objects(state.bgp_topology, state.nodes)
    if state.bgp_topology == "tor":
        objects.append(frr.start_tor(paths, state))
        report(frr.summary(paths, state))
    return objects


def tear_down(paths: LabPaths, state: LabState, nodes: Iterable[Node]) -> None:
    """Stop every node's BIRD and, with topology tor, remove the ToR."""
    stop_birds(paths, nodes)
    if state.bgp_topology == "tor":
        frr.remove_tor(state)


def bird_pid(paths: LabPaths, node: str) -> int | None:
    """The PID of the node's BIRD, from its pid file (None when none runs)."""
    try:
        pid = int(Bird(paths.node_dir(node)).pidfile.read_text())
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def stop_birds(paths: LabPaths, nodes: Iterable[Node], leaving: bool = False) -> None:
    """Stop each node's BIRD (see `Bird.stop`: gracefully, or closing its sessions when the
    nodes are `leaving` the cluster); nothing to do where none runs."""
    for node in nodes:
        if paths.node_dir(node.name).exists():
            Bird(paths.node_dir(node.name)).stop(leaving=leaving)
