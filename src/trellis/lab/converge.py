"""Waiting until the agents have programmed a change, judged by what each node's kernel holds.

Why read the kernels: `apply` promises that a probe right after it sees the new state, and the
agents program routes asynchronously (datastore watch, then reconcile). A node has programmed
a pod of another node once its kernel holds a route of Trellis' protocol (222, not the default
route) whose destination covers the pod's address: the block route over `trl.vxlan` or via
the owner's underlay address. A removed node is gone once no other kernel routes its blocks.
Each node's routes are read by a netlink socket opened inside its namespace.

Which pairs to wait for follows the backend: with host-gw a node routes only to nodes of its
own subnet (the agent logs the others as a problem), and a backend without cross-node routing
yet (bgp) has nothing to wait for.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable
from dataclasses import dataclass

from pyroute2 import IPRoute

from trellis.calc.routes import BACKENDS as ROUTED_BACKENDS
from trellis.dataplane.kernel.netlink import AF_INET
from trellis.dataplane.kernel.netns import call_in_netns
from trellis.lab.errors import LabError
from trellis.lab.process import log_tail, wait_until
from trellis.lab.state import LabPaths, LabState, Node, Pod
from trellis.model.naming import ROUTE_PROTOCOL

ROUTES_TIMEOUT_S = 10.0
"""How long a command waits for every agent to program its change (seconds)."""
POLL_S = 0.05


def _block_routes(netns: str) -> list[ipaddress.IPv4Network]:
    """Destinations of the routes of Trellis' protocol in namespace `netns`, the default route excepted."""

    def read() -> list[ipaddress.IPv4Network]:
        with IPRoute() as ipr:
            routes = ipr.get_routes(family=AF_INET, proto=ROUTE_PROTOCOL)
        return [
            ipaddress.IPv4Network(f"{r.get_attr('RTA_DST')}/{r['dst_len']}")
            for r in routes
            if r["dst_len"] > 0
        ]

    return call_in_netns(netns, read)


def _routes_between(state: LabState, local: Node, remote: Node) -> bool:
    """Whether `local`'s agent routes to `remote`'s blocks with the lab's backend."""
    if state.backend not in ROUTED_BACKENDS or local.name == remote.name:
        return False
    return state.backend != "host-gw" or local.underlay.network == remote.underlay.network


@dataclass(frozen=True)
class _Expectation:
    """Node `node` routes `target` (present) or no longer does (absent)."""

    node: Node
    target: ipaddress.IPv4Network
    what: str
    """The target for people: `pod x/a (10.244.0.65)`, `block 10.244.0.64/26 of node-3`."""


def _unmet(expectations: Iterable[_Expectation], present: bool) -> list[_Expectation]:
    by_node: dict[str, list[_Expectation]] = {}
    for expectation in expectations:
        by_node.setdefault(expectation.node.netns, []).append(expectation)
    unmet = []
    for netns, group in by_node.items():
        routes = _block_routes(netns)
        unmet += [e for e in group if any(e.target.subnet_of(r) for r in routes) != present]
    return unmet


def _wait_routes(
    paths: LabPaths, expectations: list[_Expectation], present: bool, timeout_s: float = ROUTES_TIMEOUT_S
) -> None:
    """Return once every expectation holds; else LabError naming the first node that did not converge."""
    pending = list(expectations)

    def converged() -> bool:
        pending[:] = _unmet(pending, present)
        return not pending

    started = time.monotonic()
    if wait_until(converged, timeout_s, POLL_S):
        return
    late = pending[0]
    holds = "has no route to" if present else "still routes"
    raise LabError(
        f"{late.node.name} did not converge: it {holds} {late.what} after "
        f"{time.monotonic() - started:.0f} s (its agent's log: {log_tail(paths.agent_log(late.node.name))})"
    )


def pods_routed(paths: LabPaths, state: LabState, pods: Iterable[Pod]) -> None:
    """Wait until every node that routes to a pod's node has a route to the pod."""
    expectations = [
        _Expectation(node, ipaddress.IPv4Network(pod.ip), f"pod {pod.key} ({pod.ip})")
        for pod in pods
        if pod.ip is not None
        for node in state.nodes
        if _routes_between(state, node, state.node(pod.node))
    ]
    _wait_routes(paths, expectations, True)


def blocks_unrouted(
    paths: LabPaths, state: LabState, gone: str, blocks: Iterable[ipaddress.IPv4Network]
) -> None:
    """Wait until no node of the lab routes any of `blocks` (of the node `gone`)."""
    expectations = [
        _Expectation(node, block, f"block {block} of {gone}") for block in blocks for node in state.nodes
    ]
    _wait_routes(paths, expectations, False)
