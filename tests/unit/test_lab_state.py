"""The lab's record and naming plan: JSON round trip, underlay choice, locking (no root)."""

from __future__ import annotations

import ipaddress
import threading
from pathlib import Path

import pytest

from trellis.lab.errors import LabError, LabNotFound
from trellis.lab.manifest import ContainerPort
from trellis.lab.process import ProcessRef
from trellis.lab.state import (
    LabPaths,
    LabState,
    Pod,
    check_lab_name,
    check_node_count,
    lab_lock,
    load,
    locked_state,
    new_lab,
    pick_underlay,
    plan_nodes,
    save,
)

UNDERLAY = ipaddress.IPv4Network("172.31.0.0/24")


def a_state(name: str, underlay: ipaddress.IPv4Network = UNDERLAY) -> LabState:
    return LabState(name, "vxlan", "sqlite", underlay, plan_nodes(name, underlay, 2))


def test_nodes_are_named_and_addressed_by_the_plan() -> None:
    nodes = plan_nodes("l", UNDERLAY, 2)
    assert [(n.name, n.netns, str(n.underlay_ip)) for n in nodes] == [
        ("node-1", "trl-l-node-1", "172.31.0.11"),
        ("node-2", "trl-l-node-2", "172.31.0.12"),
    ]
    assert str(a_state("l").gateway) == "172.31.0.1"
    assert a_state("l").fabric_netns == "trl-l-fabric"


def test_each_lab_gets_an_underlay_of_its_own_apart_from_the_pod_pool() -> None:
    first = pick_underlay(set())
    second = pick_underlay({first})
    assert first != second
    pool = ipaddress.IPv4Network("10.244.0.0/16")
    assert not first.overlaps(pool) and not second.overlaps(pool)


@pytest.mark.parametrize("name", ["lab", "a", "e2e-1f2e3d", "x" * 16])
def test_good_lab_names(name: str) -> None:
    assert check_lab_name(name) == name


@pytest.mark.parametrize("name", ["", "Lab", "-a", "a-", "a_b", "x" * 17, "a/b"])
def test_bad_lab_names(name: str) -> None:
    with pytest.raises(LabError):
        check_lab_name(name)


@pytest.mark.parametrize("count", [0, -1, 241])
def test_node_count_is_bounded(count: int) -> None:
    with pytest.raises(LabError):
        check_node_count(count)


def test_state_round_trips_through_json() -> None:
    state = a_state("l")
    state.namespaces["x"] = {"kubernetes.io/metadata.name": "x"}
    pod = Pod(
        "x",
        "a",
        "node-1",
        "trl-l-pod-x-a",
        "c0ffee",
        "uid",
        {"app": "web"},
        (ContainerPort(80, "TCP"),),
        ipaddress.IPv4Address("10.244.0.1"),
        ProcessRef(42, 4242),
    )
    state.pods[pod.key] = pod
    state.supervisor = ProcessRef(7, 77)
    state.next_node = 3
    assert LabState.from_json(state.to_json()) == state


def test_a_new_lab_is_saved_and_a_second_one_of_that_name_refused(tmp_path: Path) -> None:
    paths = LabPaths("l", tmp_path)
    with new_lab(paths, lambda underlay: a_state("l", underlay)) as state:
        assert load(paths) == state
    with pytest.raises(LabError, match="lab l already exists"), new_lab(paths, lambda u: a_state("l", u)):
        pass
    with new_lab(LabPaths("m", tmp_path), lambda underlay: a_state("m", underlay)) as other:
        assert other.underlay != state.underlay


def test_a_missing_lab_is_named_in_the_error(tmp_path: Path) -> None:
    with pytest.raises(LabNotFound, match="lab nope does not exist"):
        load(LabPaths("nope", tmp_path))
    with pytest.raises(LabNotFound), lab_lock(LabPaths("nope", tmp_path)):
        pass


def test_changes_under_the_lock_are_serialised(tmp_path: Path) -> None:
    """Two writers never lose each other's change: each holds the lock for read-modify-write."""
    paths = LabPaths("l", tmp_path)
    with new_lab(paths, lambda underlay: a_state("l", underlay)):
        pass

    def bump() -> None:
        for _ in range(20):
            with locked_state(paths) as state:
                state.next_node += 1
                save(paths, state)

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert load(paths).next_node == 80
