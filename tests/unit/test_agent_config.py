"""Agent settings: validation and the pod MTU rule."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from trellis.agent.config import AgentConfig


@pytest.mark.parametrize(
    ("backend", "mtu", "expected"), [("vxlan", 0, 1450), ("host-gw", 0, 1500), ("bgp", 1400, 1400)]
)
def test_pod_mtu_is_uplink_less_overhead_unless_set(backend: str, mtu: int, expected: int) -> None:
    """The pod MTU is the uplink's less the backend's overhead, or the configured one."""
    assert AgentConfig(node="n", backend=backend, mtu=mtu).pod_mtu(1500) == expected


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"backend": "ipip"}, "backend 'ipip'"),
        ({"block_prefixlen": 15}, "does not fit pool 10.244.0.0/16"),
        ({"block_prefixlen": 33}, "does not fit"),
    ],
)
def test_bad_settings_are_refused(changes: dict[str, Any], words: str) -> None:
    """An unknown backend or a block size that does not fit a pool is refused at start."""
    with pytest.raises(ValueError, match=words):
        AgentConfig(node="n", **changes)


def test_datastore_file_defaults_to_the_state_dir() -> None:
    """Without a location, the SQLite file lives in the state directory."""
    config = AgentConfig(node="n", state_dir=Path("/var/lib/x"), pools=(ipaddress.IPv4Network("10.0.0.0/8"),))
    assert config.datastore_path == "/var/lib/x/trellis.db"
    assert AgentConfig(node="n", datastore_location="/tmp/y.db").datastore_path == "/tmp/y.db"
