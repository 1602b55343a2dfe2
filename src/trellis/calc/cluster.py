"""The cluster as the calculation sees it, read from the datastore's objects (pure)."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trellis.model.ipam import BLOCK_PREFIX
from trellis.model.node import NODE_PREFIX, Node

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cluster:
    nodes: Mapping[str, Node]
    blocks: tuple[tuple[ipaddress.IPv4Network, str], ...]
    """Every claimed block and the node it is affine to, in address order."""


def parse_cluster(objects: Mapping[str, Mapping[str, Any]]) -> Cluster:
    """Nodes and blocks from datastore objects by key; an unreadable object is skipped and logged."""
    nodes: dict[str, Node] = {}
    blocks: list[tuple[ipaddress.IPv4Network, str]] = []
    for key, value in objects.items():
        try:
            if key.startswith(NODE_PREFIX):
                node = Node.from_json(value)
                nodes[node.name] = node
            elif key.startswith(BLOCK_PREFIX):
                blocks.append((ipaddress.IPv4Network(value["cidr"]), str(value["node"])))
        except (KeyError, TypeError, ValueError) as err:
            log.warning("skipping unreadable datastore object %s: %s", key, err)
    return Cluster(nodes, tuple(sorted(blocks)))
