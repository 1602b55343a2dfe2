"""IPAM vocabulary: attachments, allocations and address blocks, as values.

A pool (default 10.244.0.0/16) is split into blocks (default /26). A node claims a block
and is its affinity; every address of the block is then allocated by that node only, so
nodes never contend for addresses, and the cluster routes one prefix per block (Calico's
block IPAM). A block and the allocations inside it are one datastore object, so claiming a
block and the first allocation in it, or any allocation, is one atomic write.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

BLOCK_PREFIX = "/trellis/ipam/blocks/"
INTERNAL_PREFIX = "trellis:"
"""Container IDs of the agent's own addresses (a VXLAN tunnel endpoint); ':' never occurs in a
runtime's container ID, and CNI GC leaves these alone."""


@dataclass(frozen=True, order=True)
class Attachment:
    """One (container, interface) pair: the key of everything an ADD creates."""

    container_id: str
    ifname: str

    @property
    def internal(self) -> bool:
        return self.container_id.startswith(INTERNAL_PREFIX)


@dataclass(frozen=True)
class Allocation:
    attachment: Attachment
    pod: str
    """`namespace/name` of the pod, for people reading the datastore."""


@dataclass(frozen=True)
class Block:
    cidr: ipaddress.IPv4Network
    node: str
    allocations: Mapping[ipaddress.IPv4Address, Allocation] = field(
        default_factory=lambda: MappingProxyType({})
    )

    @property
    def key(self) -> str:
        return block_key(self.cidr)

    @property
    def size(self) -> int:
        return self.cidr.num_addresses

    @property
    def workload_free(self) -> bool:
        """No pod holds an address here (the agent's own, such as its VTEP's, don't count)."""
        return all(alloc.attachment.internal for alloc in self.allocations.values())

    def free_address(self) -> ipaddress.IPv4Address | None:
        """The lowest address not allocated, or None when the block is full."""
        for address in self.cidr:
            if address not in self.allocations:
                return address
        return None

    def find(self, attachment: Attachment) -> ipaddress.IPv4Address | None:
        for address, allocation in self.allocations.items():
            if allocation.attachment == attachment:
                return address
        return None

    def with_allocation(self, address: ipaddress.IPv4Address, allocation: Allocation) -> Block:
        if address not in self.cidr or address in self.allocations:
            raise ValueError(f"{address} is not free in block {self.cidr}")
        return replace(self, allocations=MappingProxyType({**self.allocations, address: allocation}))

    def without(self, addresses: Iterable[ipaddress.IPv4Address]) -> Block:
        gone = set(addresses)
        kept = {a: alloc for a, alloc in self.allocations.items() if a not in gone}
        return replace(self, allocations=MappingProxyType(kept))

    def to_json(self) -> dict[str, Any]:
        return {
            "cidr": str(self.cidr),
            "node": self.node,
            "allocations": {
                str(address): {
                    "containerID": alloc.attachment.container_id,
                    "ifname": alloc.attachment.ifname,
                    "pod": alloc.pod,
                }
                for address, alloc in sorted(self.allocations.items())
            },
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Block:
        return cls(
            cidr=ipaddress.IPv4Network(value["cidr"]),
            node=str(value["node"]),
            allocations=MappingProxyType(
                {
                    ipaddress.IPv4Address(address): Allocation(
                        Attachment(str(item["containerID"]), str(item["ifname"])), str(item["pod"])
                    )
                    for address, item in value["allocations"].items()
                }
            ),
        )


def block_key(cidr: ipaddress.IPv4Network) -> str:
    return BLOCK_PREFIX + str(cidr).replace("/", "-")


def candidate_blocks(
    pools: Iterable[ipaddress.IPv4Network], prefixlen: int
) -> Iterator[ipaddress.IPv4Network]:
    """Every block of every pool, in order."""
    for pool in pools:
        if prefixlen < pool.prefixlen:
            raise ValueError(f"block size /{prefixlen} is larger than pool {pool}")
        yield from pool.subnets(new_prefix=prefixlen)
