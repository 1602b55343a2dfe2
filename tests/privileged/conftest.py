"""Root fixtures: a node (namespace, agent, plugin) per test, removed afterwards even on failure."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.privileged.nodes import Node


@pytest.fixture(autouse=True)
def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates network namespaces")


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """A ready node with no pods; everything it made is removed afterwards, even on failure."""
    made = Node(tmp_path)
    try:
        made.build()
        yield made
    finally:
        made.teardown()
