"""Block IPAM (`trellis.ipam.allocator`) over SQLite: properties under random assign/release/GC."""

from __future__ import annotations

import ipaddress
import itertools
import multiprocessing
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tests.helpers import stored_allocations
from trellis.datastore.base import KV, Conflict, Unavailable
from trellis.datastore.sqlite import SqliteDatastore
from trellis.ipam.allocator import MAX_ATTEMPTS, AddressesExhausted, Ipam
from trellis.model.ipam import BLOCK_PREFIX, Attachment, Block

SMALL_POOL = ipaddress.IPv4Network("10.0.0.0/28")
"""Four /30 blocks of four addresses: small enough that blocks fill, empty and run out."""
NODES = ("node-a", "node-b")
ATTACHMENTS = st.builds(
    Attachment, st.sampled_from([f"c{i}" for i in range(10)]), st.sampled_from(["eth0", "net1"])
)


def blocks_of(store: SqliteDatastore, node: str | None = None) -> list[Block]:
    """Every stored block (of `node`, if given), by CIDR."""
    blocks = (Block.from_json(kv.value) for kv in store.list(BLOCK_PREFIX))
    return sorted((b for b in blocks if node is None or b.node == node), key=lambda b: b.cidr)


class IpamMachine(RuleBasedStateMachine):
    """Two nodes' allocators on one SQLite file (one connection each, as two agents), against a model."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="ipam-"))
        self.stores = {node: SqliteDatastore(self.dir / "trellis.db") for node in NODES}
        self.ipams = {node: Ipam(self.stores[node], node, (SMALL_POOL,), 30) for node in NODES}
        self.model: dict[str, dict[Attachment, ipaddress.IPv4Address]] = {node: {} for node in NODES}
        self.claimed: set[str] = set()

    def teardown(self) -> None:
        for store in self.stores.values():
            store.close()
        shutil.rmtree(self.dir)

    def _blocks(self, node: str) -> list[Block]:
        return blocks_of(self.stores[node], node)

    @rule(node=st.sampled_from(NODES), attachment=ATTACHMENTS)
    def assign(self, node: str, attachment: Attachment) -> None:
        """Assign gives the held address again, else a free one; a new block only when all are full."""
        before = self._blocks(node)
        all_full = all(b.free_address() is None for b in before)
        try:
            address = self.ipams[node].assign(attachment, "ns/pod")
        except AddressesExhausted:
            assert attachment not in self.model[node]
            assert all_full and len(blocks_of(self.stores[node])) == 4
            return
        held = self.model[node].setdefault(attachment, address)
        assert address == held
        after = self._blocks(node)
        if len(after) > len(before):
            assert all_full and len(after) == len(before) + 1
        self.claimed.add(node)

    @rule(node=st.sampled_from(NODES), attachment=ATTACHMENTS)
    def release(self, node: str, attachment: Attachment) -> None:
        """Release returns the address the attachment held (None if none) and frees it."""
        assert self.ipams[node].release(attachment) == self.model[node].pop(attachment, None)
        assert self.ipams[node].lookup(attachment) is None

    @rule(node=st.sampled_from(NODES), valid=st.sets(ATTACHMENTS, max_size=8))
    def gc(self, node: str, valid: set[Attachment]) -> None:
        """GC frees exactly the node's allocations whose attachment is not valid."""
        freed = self.ipams[node].release_except(valid)
        stale = sorted(address for a, address in self.model[node].items() if a not in valid)
        assert sorted(freed) == stale
        self.model[node] = {a: address for a, address in self.model[node].items() if a in valid}

    @invariant()
    def no_address_twice_and_model_holds(self) -> None:
        """No address or block belongs to two owners; each node holds exactly the model's allocations."""
        store = self.stores[NODES[0]]
        allocations = stored_allocations(store)
        addresses = [address for _, address, _ in allocations]
        assert len(addresses) == len(set(addresses))
        cidrs = [b.cidr for b in blocks_of(store)]
        assert not any(a.overlaps(b) for a, b in itertools.combinations(cidrs, 2))
        for node in NODES:
            assert self.ipams[node].attachments() == self.model[node]
            assert sorted(a for n, a, _ in allocations if n == node) == sorted(self.model[node].values())

    @invariant()
    def empty_blocks_go_back_except_the_last(self) -> None:
        """A node keeps an empty block only when it is its last; a node that claimed keeps one."""
        for node in NODES:
            blocks = self._blocks(node)
            if len(blocks) > 1:
                assert all(b.allocations for b in blocks), [str(b.cidr) for b in blocks]
            assert len(blocks) >= (node in self.claimed)


TestIpamProperties = IpamMachine.TestCase
TestIpamProperties.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteDatastore]:
    db = SqliteDatastore(tmp_path / "trellis.db")
    try:
        yield db
    finally:
        db.close()


def test_exhaustion_names_pod_node_and_usage(store: SqliteDatastore) -> None:
    """When every block is taken and full, assign fails naming the pod, the node, its usage and pool."""
    ipam = Ipam(store, "n1", (ipaddress.IPv4Network("10.0.0.0/30"),), 31)
    for i in range(4):
        ipam.assign(Attachment(f"c{i}", "eth0"), f"ns/p{i}")
    with pytest.raises(AddressesExhausted) as info:
        ipam.assign(Attachment("c9", "eth0"), "ns/late")
    for words in ("pod ns/late", "node n1", "4 of 4 in use in 2 blocks", "/31 block in 10.0.0.0/30"):
        assert words in str(info.value)


def test_usage_counts_per_block(store: SqliteDatastore) -> None:
    """usage lists the node's blocks in order with used and total addresses."""
    ipam = Ipam(store, "n1", (ipaddress.IPv4Network("10.0.0.0/29"),), 30)
    for i in range(5):
        ipam.assign(Attachment(f"c{i}", "eth0"), "ns/p")
    assert [(str(u.cidr), u.used, u.size) for u in ipam.usage()] == [
        ("10.0.0.0/30", 4, 4),
        ("10.0.0.4/30", 1, 4),
    ]


def test_gc_emptying_every_block_keeps_the_nodes_last(store: SqliteDatastore) -> None:
    """A GC that empties all of a node's blocks gives back all but one (the case the properties found)."""
    ipam = Ipam(store, "n1", (SMALL_POOL,), 30)
    for i in range(9):
        ipam.assign(Attachment(f"c{i}", "eth0"), "ns/p")
    assert len(ipam.usage()) == 3
    assert len(ipam.release_except([])) == 9
    assert [(u.used, u.size) for u in ipam.usage()] == [(0, 4)]


class AlwaysConflicting(SqliteDatastore):
    """A store where every compare-and-swap loses, as under endless contention."""

    def update(self, *args: Any, **kwargs: Any) -> int:
        raise Conflict(str(args[0]))


def test_endless_contention_is_unavailable(tmp_path: Path) -> None:
    """After MAX_ATTEMPTS lost CAS rounds, assign gives up as Unavailable (CNI: try again later)."""
    store = AlwaysConflicting(tmp_path / "trellis.db")
    ipam = Ipam(store, "n1", (SMALL_POOL,), 30)
    try:
        ipam.assign(Attachment("c0", "eth0"), "ns/p")  # claims the block: a create, not an update
        with pytest.raises(Unavailable, match=f"{MAX_ATTEMPTS} attempts"):
            ipam.assign(Attachment("c1", "eth0"), "ns/p")
    finally:
        store.close()


def _agent_worker(path: Path, node: str, results: Any) -> None:
    """One node agent's share of the race: 40 assigns from its own process."""
    store = SqliteDatastore(path)
    ipam = Ipam(store, node, (ipaddress.IPv4Network("10.1.0.0/24"),), 28)
    results.put({node: [str(ipam.assign(Attachment(f"{node}-{i}", "eth0"), "ns/p")) for i in range(40)]})
    store.close()


def test_two_agent_processes_on_one_file_never_overlap(tmp_path: Path) -> None:
    """Two processes claiming blocks and assigning at once get disjoint blocks and addresses."""
    path = tmp_path / "trellis.db"
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_agent_worker, args=(path, node, results)) for node in NODES]
    for proc in procs:
        proc.start()
    got: dict[str, list[str]] = {}
    for _ in procs:
        got.update(results.get(timeout=120))
    for proc in procs:
        proc.join(timeout=30)
    assert [proc.exitcode for proc in procs] == [0, 0]
    store = SqliteDatastore(path)
    try:
        owner: dict[ipaddress.IPv4Network, str] = {b.cidr: b.node for b in blocks_of(store)}
        for node, addresses in got.items():
            assert len(set(addresses)) == 40
            assert all(owner[ipaddress.IPv4Network(f"{a}/28", strict=False)] == node for a in addresses)
        assert not set(got[NODES[0]]) & set(got[NODES[1]])
        assert sorted(str(a) for _, a, _ in stored_allocations(store)) == sorted(
            got[NODES[0]] + got[NODES[1]]
        )
    finally:
        store.close()


def test_a_block_is_one_stored_object_per_cidr(store: SqliteDatastore) -> None:
    """A block and its allocations are one JSON object keyed by CIDR (what stored_allocations reads)."""
    Ipam(store, "n1", (SMALL_POOL,), 30).assign(Attachment("c0", "eth0"), "ns/p")
    (kv,) = store.list(BLOCK_PREFIX)
    assert isinstance(kv, KV) and kv.key == f"{BLOCK_PREFIX}10.0.0.0-30"


def test_gc_keeps_the_agents_own_addresses(store: SqliteDatastore) -> None:
    """A VXLAN tunnel address is no runtime's attachment: GC with any valid list leaves it."""
    ipam = Ipam(store, "node-a", (SMALL_POOL,), 30)
    tunnel = ipam.assign(Attachment("trellis:vtep", "trl.vxlan"), "node node-a tunnel")
    pod = ipam.assign(Attachment("c1", "eth0"), "x/a")
    assert ipam.release_except([]) == [pod]
    assert ipam.attachments() == {Attachment("trellis:vtep", "trl.vxlan"): tunnel}


def test_a_block_is_read_again_when_a_restored_store_reuses_its_revision(tmp_path: Path) -> None:
    """Revisions repeat after a datastore is restored from a backup (etcd's snapshot restore):
    a block at a revision the allocator saw before may hold something else. The allocator must
    work from what the store holds, or its compare-and-swap, which the revision passes, would
    write back a stale block and lose another writer's allocation."""
    before = SqliteDatastore(tmp_path / "before.db")
    restored = SqliteDatastore(tmp_path / "restored.db")
    try:
        ipam = Ipam(before, "n1", (SMALL_POOL,), 30)
        ipam.assign(Attachment("c1", "eth0"), "ns/p1")
        ipam.assign(Attachment("c2", "eth0"), "ns/p2")
        assert ipam.lookup(Attachment("c2", "eth0")) is not None  # read at revision 2: c1, c2
        other = Ipam(restored, "n1", (SMALL_POOL,), 30)
        other.assign(Attachment("c1", "eth0"), "ns/p1")
        other.assign(Attachment("c3", "eth0"), "ns/p3")  # revision 2 again: c1, c3
        ipam.store = restored  # the agent's next request reaches the restored datastore

        ipam.assign(Attachment("c4", "eth0"), "ns/p4")

        held = {
            alloc.attachment.container_id for b in blocks_of(restored) for alloc in b.allocations.values()
        }
        assert held == {"c1", "c3", "c4"}
    finally:
        before.close()
        restored.close()
