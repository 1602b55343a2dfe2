"""The lab's BGP: the topology `lab up --backend bgp` sets up, and stopping each node's BIRD.

Why the lab stops BIRD itself: BIRD outlives an agent that was killed (by design, so that
routes stay while the supervisor restarts the agent, `docs/design/bgp.md`); a lab that is
taken down, or a node that leaves, must leave no BIRD behind, so the lab stops each node's
BIRD through its pid file and control socket, as the next agent would have adopted it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from trellis.bgp.bird import Bird
from trellis.lab.kube import KubeObject
from trellis.lab.state import LabPaths, Node
from trellis.model.bgp import API_VERSION, DEFAULT_CONFIGURATION, parse_configuration

TOPOLOGIES = ("mesh", "rr")
"""`mesh`: every node peers with every other (the defaults: AS 64512, mesh on); `rr`: node-1
(and node-2 in a lab of 4 or more nodes) reflect routes to the others, the mesh is off."""
TWO_REFLECTORS_FROM = 4
"""A lab of this many nodes or more gets two route reflectors."""


def topology_objects(topology: str, nodes: list[Node]) -> list[KubeObject]:
    """The BGP objects that make `topology` for `nodes` (none for the mesh: the defaults do)."""
    if topology == "mesh":
        return []
    reflectors = [n.name for n in nodes[: 2 if len(nodes) >= TWO_REFLECTORS_FROM else 1]]
    body: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": "BGPConfiguration",
        "metadata": {"name": DEFAULT_CONFIGURATION},
        "spec": {"nodeToNodeMeshEnabled": False, "routeReflectors": {"nodes": reflectors}},
    }
    return [(parse_configuration(body).key, body)]


def stop_birds(paths: LabPaths, nodes: Iterable[Node]) -> None:
    """Stop each node's BIRD (gracefully: see `Bird.stop`); nothing to do where none runs."""
    for node in nodes:
        if paths.node_dir(node.name).exists():
            Bird(paths.node_dir(node.name)).stop()
