"""Block IPAM over any Datastore: assign, release and garbage-collect pod addresses.

Safety rests on the datastore alone: a block is claimed with create-if-absent and changed
with compare-and-swap, each carrying the allocation it adds, so two writers (two threads,
two agents, an agent and its restarted self) can never hand out one address twice, and an
agent killed at any moment leaves either the whole allocation or none. What a crash can
leave is an allocation whose pod never came up; the runtime's DEL or GC releases it.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

from trellis.datastore.base import AlreadyExists, Conflict, Datastore, Unavailable
from trellis.model.ipam import BLOCK_PREFIX, Allocation, Attachment, Block, candidate_blocks

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 32
"""Compare-and-swap retries before giving up as `Unavailable` (contention, not a fault)."""


class AddressesExhausted(Exception):
    """No free address in this node's blocks and no free block left in any pool."""


@dataclass(frozen=True)
class BlockUsage:
    cidr: ipaddress.IPv4Network
    used: int
    size: int


class Ipam:
    """The address allocator of one node."""

    def __init__(
        self,
        store: Datastore,
        node: str,
        pools: tuple[ipaddress.IPv4Network, ...],
        block_prefixlen: int,
    ) -> None:
        self.store = store
        self.node = node
        self.pools = pools
        self.block_prefixlen = block_prefixlen
        # Within one process, one writer at a time: threads would only race on CAS.
        self._lock = threading.Lock()
        self._parsed: dict[str, tuple[int, dict[str, Any], Block]] = {}
        """Block key -> (mod revision, stored value, block) as last listed: a block is parsed
        again only when it changed. The value is compared too, not the revision alone: after a
        datastore is restored from a backup, revisions repeat with other contents, and a stale
        block would pass the compare-and-swap (comparing is 40 times cheaper than parsing)."""

    def _blocks(self) -> tuple[list[tuple[Block, int]], set[ipaddress.IPv4Network]]:
        """This node's blocks with their revisions, and every claimed CIDR in the cluster.

        Every assign and release lists the blocks under the lock; parsing the unchanged ones
        again each time was a third of its CPU time (0.54 -> 0.36 ms per assign, 200 pods).
        """
        mine: list[tuple[Block, int]] = []
        taken: set[ipaddress.IPv4Network] = set()
        parsed: dict[str, tuple[int, dict[str, Any], Block]] = {}
        for kv in self.store.list(BLOCK_PREFIX):
            cached = self._parsed.get(kv.key)
            if cached and cached[0] == kv.mod_revision and cached[1] == kv.value:
                block = cached[2]
            else:
                block = Block.from_json(kv.value)
            parsed[kv.key] = (kv.mod_revision, kv.value, block)
            taken.add(block.cidr)
            if block.node == self.node:
                mine.append((block, kv.mod_revision))
        self._parsed = parsed  # one assignment: a thread listing beside this one sees either dict
        return mine, taken

    def _retrying(
        self, what: str, attempt: Callable[[], ipaddress.IPv4Address | None]
    ) -> ipaddress.IPv4Address | None:
        with self._lock:
            for _ in range(MAX_ATTEMPTS):
                try:
                    return attempt()
                except (Conflict, AlreadyExists):
                    continue
        raise Unavailable(f"{what}: datastore kept changing under {MAX_ATTEMPTS} attempts")

    def lookup(self, attachment: Attachment) -> ipaddress.IPv4Address | None:
        mine, _ = self._blocks()
        for block, _rev in mine:
            address = block.find(attachment)
            if address is not None:
                return address
        return None

    def assign(self, attachment: Attachment, pod: str) -> ipaddress.IPv4Address:
        """The attachment's address: the one it already holds, else a new one."""
        allocation = Allocation(attachment, pod)

        def attempt() -> ipaddress.IPv4Address:
            mine, taken = self._blocks()
            for block, _rev in mine:
                held = block.find(attachment)
                if held is not None:
                    return held
            for block, rev in sorted(mine, key=lambda item: item[0].cidr):
                address = block.free_address()
                if address is not None:
                    self.store.update(block.key, block.with_allocation(address, allocation).to_json(), rev)
                    return address
            for cidr in candidate_blocks(self.pools, self.block_prefixlen):
                if cidr in taken:
                    continue
                first = next(iter(cidr))
                block = Block(cidr, self.node).with_allocation(first, allocation)
                self.store.create(block.key, block.to_json())
                log.info("node %s claimed block %s", self.node, cidr)
                return first
            used = sum(len(b.allocations) for b, _ in mine)
            size = sum(b.size for b, _ in mine)
            raise AddressesExhausted(
                f"pod {pod}: no free address on node {self.node} ({used} of {size} in use in "
                f"{len(mine)} blocks) and no free /{self.block_prefixlen} block in "
                f"{', '.join(map(str, self.pools))}"
            )

        address = self._retrying(f"assign {pod}", attempt)
        assert address is not None
        return address

    def release(self, attachment: Attachment) -> ipaddress.IPv4Address | None:
        """Free the attachment's address; None when it held none (DEL is idempotent)."""

        def attempt() -> ipaddress.IPv4Address | None:
            mine, _ = self._blocks()
            for block, rev in mine:
                address = block.find(attachment)
                if address is not None:
                    self._store_block(block.without([address]), rev, len(mine))
                    return address
            return None

        return self._retrying(f"release {attachment.container_id}", attempt)

    def release_except(self, valid: Collection[Attachment]) -> list[ipaddress.IPv4Address]:
        """GC: free every allocation of this node whose attachment is not in `valid` (but the agent's own)."""
        keep = set(valid)
        freed: list[ipaddress.IPv4Address] = []

        def attempt() -> None:
            mine, _ = self._blocks()
            held = len(mine)  # counts down as empty blocks go back, so the node keeps its last
            for block, rev in mine:
                stale = [
                    a
                    for a, alloc in block.allocations.items()
                    if alloc.attachment not in keep and not alloc.attachment.internal
                ]
                if stale:
                    held -= self._store_block(block.without(stale), rev, held)
                    freed.extend(stale)
                    log.info("GC released %s from block %s", ", ".join(map(str, stale)), block.cidr)

        self._retrying("garbage collection", attempt)
        return freed

    def _store_block(self, block: Block, rev: int, held: int) -> bool:
        """Write a block back; an empty block goes back to the pool (True) unless it is the node's last."""
        if not block.allocations and held > 1:
            self.store.delete(block.key, rev)
            log.info("node %s gave back empty block %s", self.node, block.cidr)
            return True
        self.store.update(block.key, block.to_json(), rev)
        return False

    def attachments(self) -> dict[Attachment, ipaddress.IPv4Address]:
        mine, _ = self._blocks()
        return {alloc.attachment: a for block, _ in mine for a, alloc in block.allocations.items()}

    def usage(self) -> list[BlockUsage]:
        mine, _ = self._blocks()
        return block_usage(block for block, _ in mine)


def block_usage(blocks: Iterable[Block]) -> list[BlockUsage]:
    """Addresses in use (pods and the node's own) and in all, per block, by CIDR."""
    return [BlockUsage(b.cidr, len(b.allocations), b.size) for b in sorted(blocks, key=lambda b: b.cidr)]
