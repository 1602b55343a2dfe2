"""Waiting until every agent has programmed the lab's last change, in the agents' own words.

Why the agents' word and not the kernels': `apply` promises that a probe right after it sees
the new state, and a change now touches more than routes (a pod's address in the address
sets of every node's policy, a policy's rules, a removed node's routes). Every agent, after
each reconcile pass, writes `status.json` in its state directory with the datastore revision
its kernel now reflects (routes, VXLAN entries and the `inet trl` table alike: the pass
programs them all before it publishes). The lab records the revision of its own last write
(`LabState.api_revision`); once every node reports at least that, every kernel holds what
the change implies, whatever the backend or the kind of object. One check for every change,
read from files: no netlink, no knowledge of how a backend routes.

An agent that is stopped, wedged or failing to program reports no newer revision: the wait
ends with an error naming the node, what it reports and the tail of its log.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from trellis.lab.errors import LabError
from trellis.lab.process import log_tail, wait_until
from trellis.lab.state import LabPaths, LabState, Node
from trellis.model.node import STATUS_FILE

TIMEOUT_S = 10.0
"""How long a command waits for every agent to program its change (seconds)."""
POLL_S = 0.02


def reported(paths: LabPaths, node: str) -> dict[str, Any] | None:
    """Node `node`'s `status.json`, as its agent last wrote it (None: not yet)."""
    try:
        status: dict[str, Any] = json.loads((paths.node_dir(node) / STATUS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet (it is replaced by rename)
        return None
    return status


def programmed_revision(paths: LabPaths, node: str) -> int | None:
    """The datastore revision node `node`'s kernel reflects, as its agent last reported (None: not yet)."""
    status = reported(paths, node)
    return None if status is None else int(status["revision"])


def programmed(
    paths: LabPaths, state: LabState, nodes: Sequence[Node] | None = None, timeout_s: float = TIMEOUT_S
) -> None:
    """Return once every node (default: all of the lab's) has programmed `state.api_revision`.

    Raises LabError naming the first node that did not within `timeout_s`.
    """
    wanted = state.api_revision
    pending = list(state.nodes if nodes is None else nodes)

    def converged() -> bool:
        pending[:] = [n for n in pending if (programmed_revision(paths, n.name) or 0) < wanted]
        return not pending

    started = time.monotonic()
    if wait_until(converged, timeout_s, POLL_S):
        return
    late = pending[0].name
    revision = programmed_revision(paths, late)
    has = "reports nothing" if revision is None else f"reports revision {revision}"
    raise LabError(
        f"{late} did not converge: its agent {has}, not {wanted} or later, after "
        f"{time.monotonic() - started:.0f} s (its agent's log: {log_tail(paths.agent_log(late))})"
    )
