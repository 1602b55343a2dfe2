"""Helpers shared by the unit and the privileged tests: CNI requests, error replies, IPAM reads."""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Callable
from typing import Any

from trellis.datastore.base import Datastore
from trellis.model.ipam import BLOCK_PREFIX, Attachment, Block

OMIT: Any = object()
"""Pass as a value to `cni_env` or `net_conf` to leave that variable or key out."""

POOL = ipaddress.IPv4Network("10.244.0.0/16")
"""The agent's default pool."""


def cni_env(command: str, **changes: str) -> dict[str, str]:
    """A complete CNI environment for `command`, with `changes` applied (OMIT removes a variable)."""
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c0ffee",
        "CNI_NETNS": "/run/netns/pod",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt/cni/bin",
        **changes,
    }
    return {name: value for name, value in env.items() if value is not OMIT}


def net_conf(**changes: Any) -> bytes:
    """A Trellis network config as a runtime writes it on stdin (OMIT removes a key)."""
    conf = {"cniVersion": "1.1.0", "name": "trellis", "type": "trellis", **changes}
    return json.dumps({key: value for key, value in conf.items() if value is not OMIT}).encode()


def cni_error(stdout: bytes) -> tuple[int, str]:
    """(code, msg) of a CNI error object printed by the plugin."""
    err = json.loads(stdout)
    return int(err["code"]), str(err["msg"])


def stored_allocations(store: Datastore) -> list[tuple[str, ipaddress.IPv4Address, Attachment]]:
    """Every (node, address, attachment) of a pod in every stored block, duplicates kept.

    The agents' own addresses (VXLAN tunnel endpoints) are left out: no runtime asked for them.
    """
    return [
        (block.node, address, allocation.attachment)
        for block in (Block.from_json(kv.value) for kv in store.list(BLOCK_PREFIX))
        for address, allocation in block.allocations.items()
        if not allocation.attachment.internal
    ]


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout_s` seconds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)
