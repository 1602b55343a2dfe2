"""IPAM values (`trellis.model.ipam`) and kernel object names (`trellis.model.naming`)."""

from __future__ import annotations

import ipaddress
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trellis.model.ipam import Allocation, Attachment, Block, block_key, candidate_blocks
from trellis.model.naming import PREFIX, host_veth_name, is_host_veth_name

CIDR = ipaddress.IPv4Network("10.244.1.0/29")
ADDRESSES = list(CIDR)
NAMES = st.text(min_size=1, max_size=20)
ATTACHMENTS = st.builds(Attachment, NAMES, NAMES)


def _alloc(container_id: str) -> Allocation:
    return Allocation(Attachment(container_id, "eth0"), f"ns/{container_id}")


@given(
    node=NAMES,
    allocations=st.dictionaries(st.sampled_from(ADDRESSES), st.builds(Allocation, ATTACHMENTS, NAMES)),
)
def test_block_json_round_trip(node: str, allocations: dict[ipaddress.IPv4Address, Allocation]) -> None:
    """A block survives to_json, a JSON text and from_json unchanged."""
    block = Block(CIDR, node, allocations)
    again = Block.from_json(json.loads(json.dumps(block.to_json())))
    assert (again.cidr, again.node, dict(again.allocations)) == (CIDR, node, allocations)
    assert again.key == block_key(CIDR) == "/trellis/ipam/blocks/10.244.1.0-29"


@given(taken=st.sets(st.sampled_from(ADDRESSES)))
def test_free_address_is_the_lowest_unallocated(taken: set[ipaddress.IPv4Address]) -> None:
    """free_address gives the lowest address not allocated, None only when all are."""
    block = Block(CIDR, "n", {address: _alloc(str(address)) for address in taken})
    free = [a for a in ADDRESSES if a not in taken]
    assert block.free_address() == (free[0] if free else None)


def test_with_allocation_and_without_are_values() -> None:
    """Allocating returns a new block (the old one unchanged); find and without work on it."""
    empty = Block(CIDR, "n")
    block = empty.with_allocation(ADDRESSES[3], _alloc("a"))
    assert empty.allocations == {} and block.size == 8
    assert block.find(Attachment("a", "eth0")) == ADDRESSES[3]
    assert block.find(Attachment("a", "eth1")) is None
    assert block.without([ADDRESSES[3], ADDRESSES[4]]).allocations == {}


@pytest.mark.parametrize(
    "address", [ADDRESSES[3], ipaddress.IPv4Address("10.244.1.8")], ids=["taken", "outside"]
)
def test_with_allocation_refuses_a_taken_or_foreign_address(address: ipaddress.IPv4Address) -> None:
    """An address already allocated, or outside the block, cannot be allocated."""
    block = Block(CIDR, "n").with_allocation(ADDRESSES[3], _alloc("a"))
    with pytest.raises(ValueError, match="not free"):
        block.with_allocation(address, _alloc("b"))


def test_candidate_blocks_cover_every_pool_in_order() -> None:
    """Blocks are the pools' subnets of the block size, pool by pool; a block larger than a pool fails."""
    pools = [ipaddress.IPv4Network("10.0.0.0/27"), ipaddress.IPv4Network("10.9.0.0/28")]
    assert [str(b) for b in candidate_blocks(pools, 28)] == ["10.0.0.0/28", "10.0.0.16/28", "10.9.0.0/28"]
    with pytest.raises(ValueError, match="larger than pool"):
        list(candidate_blocks(pools, 27))


@given(attachment=ATTACHMENTS)
def test_host_veth_names_are_ours_and_fit_ifnamsiz(attachment: Attachment) -> None:
    """Every host veth name has the trl prefix, fits in 15 characters and is recognised as ours."""
    name = host_veth_name(attachment)
    assert name.startswith(PREFIX) and len(name) <= 15
    assert is_host_veth_name(name)
    assert host_veth_name(attachment) == name


def test_host_veth_names_differ_per_attachment() -> None:
    """Another container or another interface of one container gets another name."""
    names = {host_veth_name(Attachment(c, i)) for c in ("a", "b") for i in ("eth0", "net1")}
    assert len(names) == 4


@pytest.mark.parametrize(
    "name", ["trl", "trl0123456789", "trl0123456789ab", "trl0123456789A", "trlt-up0", "xyz0123456789a", "lo"]
)
def test_other_names_are_not_host_veths(name: str) -> None:
    """Names of other lengths, cases or prefixes (other engineers' trl-*, trlt-*) are never ours."""
    assert not is_host_veth_name(name)
