"""The lab's record and naming plan: JSON round trip, subnets and node places, locking (no root)."""

from __future__ import annotations

import ipaddress
import threading
from pathlib import Path

import pytest

from trellis.lab.errors import LabError, LabNotFound
from trellis.lab.manifest import ContainerPort
from trellis.lab.process import ProcessRef
from trellis.lab.state import (
    PROBE_SOURCE_PORTS,
    LabPaths,
    LabState,
    Pod,
    check_lab_name,
    check_node_count,
    check_node_name,
    check_subnet_count,
    free_index,
    lab_lock,
    load,
    locked_state,
    new_lab,
    pick_subnets,
    plan_node,
    plan_nodes,
    save,
    take_source_ports,
)

UNDERLAY = [ipaddress.IPv4Network("172.31.0.0/24")]
TWO_SUBNETS = [ipaddress.IPv4Network("172.31.0.0/24"), ipaddress.IPv4Network("172.31.1.0/24")]


def a_state(name: str, subnets: list[ipaddress.IPv4Network] = UNDERLAY) -> LabState:
    return LabState(name, "vxlan", "sqlite", subnets, plan_nodes(name, subnets, 2))


def test_nodes_are_named_and_addressed_by_the_plan() -> None:
    nodes = plan_nodes("l", UNDERLAY, 2)
    assert [(n.name, n.netns, n.index, str(n.underlay)) for n in nodes] == [
        ("node-1", "trl-l-node-1", 1, "172.31.0.11/24"),
        ("node-2", "trl-l-node-2", 2, "172.31.0.12/24"),
    ]
    assert str(a_state("l").gateway) == "172.31.0.1"
    assert a_state("l").fabric_netns == "trl-l-fabric"
    assert (a_state("l").external_netns, str(a_state("l").external)) == ("trl-l-ext", "172.31.0.254/24")


def test_nodes_alternate_over_the_subnets_with_addresses_of_their_own() -> None:
    nodes = plan_nodes("l", TWO_SUBNETS, 3)
    assert [str(n.underlay) for n in nodes] == ["172.31.0.11/24", "172.31.1.12/24", "172.31.0.13/24"]
    state = a_state("l", TWO_SUBNETS)
    assert [str(g) for g in state.gateways] == ["172.31.0.1/24", "172.31.1.1/24"]


def test_a_new_node_takes_the_lowest_free_index_and_its_subnet() -> None:
    state = LabState("l", "vxlan", "sqlite", TWO_SUBNETS, plan_nodes("l", TWO_SUBNETS, 3))
    state.retired.append(state.nodes.pop(0))
    assert free_index(state) == 4, "a node being removed still holds its place"
    state.retired.clear()
    assert free_index(state) == 1
    assert str(plan_node("l", TWO_SUBNETS, "edge", 4).underlay) == "172.31.1.14/24"


def test_each_lab_gets_subnets_of_its_own_apart_from_the_pod_pool() -> None:
    first = pick_subnets(set(), 2)
    second = pick_subnets(set(first), 2)
    assert len(set(first) | set(second)) == 4
    pool = ipaddress.IPv4Network("10.244.0.0/16")
    assert not any(subnet.overlaps(pool) for subnet in first + second)
    with pytest.raises(LabError, match="underlay subnet"):
        pick_subnets(set(), 257)


@pytest.mark.parametrize("name", ["node-4", "edge", "a" * 63])
def test_good_node_names(name: str) -> None:
    assert check_node_name(name) == name


@pytest.mark.parametrize("name", ["", "Node", "-a", "a" * 64, "fabric", "ext", "pod-x-a", "a_b"])
def test_node_names_that_are_no_dns_label_or_would_clash_are_refused(name: str) -> None:
    with pytest.raises(LabError):
        check_node_name(name)


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


@pytest.mark.parametrize("count", [0, 17])
def test_subnet_count_is_bounded(count: int) -> None:
    with pytest.raises(LabError):
        check_subnet_count(count)


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
    state.external_server = ProcessRef(8, 88)
    state.next_node = 3
    state.retired.append(state.nodes.pop())
    state.api_revision = 12
    assert LabState.from_json(state.to_json()) == state


def test_probes_take_udp_source_ports_in_turn_and_wrap_around(tmp_path: Path) -> None:
    paths = LabPaths("l", tmp_path)
    paths.dir.mkdir()
    first = PROBE_SOURCE_PORTS.start
    assert [take_source_ports(paths, 16) for _ in range(3)] == [first, first + 16, first + 32]
    left = PROBE_SOURCE_PORTS.stop - (first + 48)
    assert take_source_ports(paths, left) == first + 48
    assert take_source_ports(paths, 1) == first, "past the range's end it starts again"
    with pytest.raises(LabError, match="more source ports than there are"):
        take_source_ports(paths, len(PROBE_SOURCE_PORTS) + 1)


def test_a_new_lab_is_saved_and_a_second_one_of_that_name_refused(tmp_path: Path) -> None:
    paths = LabPaths("l", tmp_path)
    with new_lab(paths, lambda subnets: a_state("l", subnets), 2) as state:
        assert load(paths) == state
        assert len(state.subnets) == 2
    with pytest.raises(LabError, match="lab l already exists"), new_lab(paths, lambda u: a_state("l", u)):
        pass
    with new_lab(LabPaths("m", tmp_path), lambda subnets: a_state("m", subnets)) as other:
        assert not set(other.subnets) & set(state.subnets)


def test_a_missing_lab_is_named_in_the_error(tmp_path: Path) -> None:
    with pytest.raises(LabNotFound, match="lab nope does not exist"):
        load(LabPaths("nope", tmp_path))
    with pytest.raises(LabNotFound), lab_lock(LabPaths("nope", tmp_path)):
        pass


def test_changes_under_the_lock_are_serialised(tmp_path: Path) -> None:
    """Two writers never lose each other's change: each holds the lock for read-modify-write."""
    paths = LabPaths("l", tmp_path)
    with new_lab(paths, lambda subnets: a_state("l", subnets)):
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
