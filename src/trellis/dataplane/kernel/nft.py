"""Apply libnftables JSON in one transaction, all or nothing, through libnftables itself; and keep
the node's table `inet trl` equal to the one desired, changing only what differs.

Why ctypes and not `nft -j -f -`: every pod ADD and DEL changes the table (the set of local
endpoints), and forking the agent to exec `nft` costs milliseconds on the pod's creation
path. libnftables (Debian's libnftables1, which `nft` itself links) takes the same JSON in
process; Debian's python3-nftables wrapper only imports under Debian's own interpreter, so
this is the few calls it makes. Calls are serialised: a libnftables context is not shared
between threads. A context talks to the network namespace of the thread that created it.

Why update rather than replace: replacing the table at 1,000 policies is 5,800 rules and 3,200
set elements for the kernel to build (a quarter of a second), and it restarts every rule's
counter; a pod ADD changes a few set and map elements and adds the pod's own chains. And why
the periodic resync checks the ruleset's generation before replacing anything: an unchanged
table is left alone, its counters exact and its listing in the same order (a replace lists
sets and chains in another order than the updates that built the table did).
"""

from __future__ import annotations

import ctypes
import functools
import json
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Any

from trellis.dataplane.render.nft import FAMILY, TABLE, Counters, NftTable, update_commands

LIBRARY = "libnftables.so.1"
NFT_CTX_DEFAULT = 0
NFT_CTX_OUTPUT_JSON = 1 << 4
NETLINK_NETFILTER = 12
GET_GENERATION = (10 << 8) | 16
"""Netlink message type: NFNL_SUBSYS_NFTABLES, NFT_MSG_GETGEN."""
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
NFTA_GEN_ID = 1


class NftError(Exception):
    """libnftables refused the batch; the kernel kept the previous ruleset."""


class Nft:
    """A libnftables context, and a netlink socket to ask the ruleset's generation, in the
    network namespace of the thread that creates it."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(LIBRARY, use_errno=True)
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self._lib = lib
        self._ctx = lib.nft_ctx_new(NFT_CTX_DEFAULT)
        lib.nft_ctx_output_set_flags(self._ctx, NFT_CTX_OUTPUT_JSON)
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)
        self._netlink = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._lock = threading.Lock()

    def run(self, command: str) -> str:
        """Run `command` (JSON or nft syntax); returns the JSON output, raises NftError."""
        with self._lock:
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, command.encode())
            output = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode()
            error = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode()
        if rc != 0:
            raise NftError(f"nftables refused the batch: {error.strip() or f'error {rc}'}")
        return output

    def apply(self, commands: list[dict[str, Any]]) -> None:
        """Run a batch of libnftables JSON commands as one transaction."""
        self.run(json.dumps({"nftables": [{"metainfo": {"json_schema_version": 1}}, *commands]}))

    def generation(self) -> int:
        """The ruleset's generation: the kernel counts one per transaction committed in the
        namespace, by anyone (reading commits nothing)."""
        request = struct.pack("=IHHII", 20, GET_GENERATION, NLM_F_REQUEST, 0, 0) + bytes(4)
        with self._lock:
            self._netlink.send(request)
            reply = self._netlink.recv(4096)
        length, kind = struct.unpack_from("=IH", reply)
        offset = 20  # the netlink header, then nfgenmsg
        while kind != NLMSG_ERROR and offset + 8 <= length:
            size, attribute = struct.unpack_from("=HH", reply, offset)
            if attribute == NFTA_GEN_ID:
                generation: int = struct.unpack_from(">I", reply, offset + 4)[0]
                return generation
            offset += (size + 3) & ~3
        raise NftError(f"nftables did not tell its ruleset generation (netlink message type {kind})")

    def list_table(self) -> list[dict[str, Any]]:
        """The objects of table `inet trl` as `nft -j list table` gives them (counters included)."""
        listing = self.run(json.dumps({"nftables": [{"list": {"table": {"family": FAMILY, "name": TABLE}}}]}))
        objects: list[dict[str, Any]] = json.loads(listing)["nftables"]
        return objects


@functools.cache
def _nft() -> Nft:
    """The process's one context (opened on first use, in the agent's network namespace)."""
    return Nft()


@dataclass(frozen=True)
class Programmed:
    """How `Table.program` made the kernel hold the table."""

    replaced: bool
    """The table was replaced whole (counters carried over); otherwise updated, or left alone."""
    commands: int
    """How many commands the transaction had (0: the kernel already held the table)."""
    refused: str | None = None
    """Why the kernel refused the update that was tried first, if it did."""


class Table:
    """The node's table `inet trl`, kept equal to the `NftTable` last given.

    After the first time, a new table is reached by an update (`update_commands`): only the
    sets, maps and chains that differ change, and the counters of every other rule keep
    counting. The whole table is replaced when there is nothing known to update from (the
    agent's first pass), when the kernel refuses the update (someone changed the table under
    us), and at a resync when anyone else committed an nftables transaction in the namespace
    since our last one (the ruleset's generation tells: the kernel counts every commit). A
    replace starts each rule from the counter it had, found by chain, comment and position among
    the rules of its chain with that comment, so `explain` keeps its counts either way.
    """

    def __init__(self, nft: Nft | None = None) -> None:
        """`nft`: the context of the table's namespace (default: the process's own)."""
        self._nft = nft
        self.held: NftTable | None = None
        """What the kernel holds, as this process last wrote it; None: unknown."""
        self._generation: int | None = None
        """The ruleset's generation our last transaction made; None: unknown (another came between)."""

    def program(self, desired: NftTable, resync: bool = False) -> Programmed:
        """Make the kernel hold `desired`, by update from the table held. With `resync`, first
        make sure the kernel still holds that table: replace it whole if anyone else committed
        anything since. Raises NftError when a replace fails."""
        nft = self._nft or _nft()
        if resync and (self.held is None or nft.generation() != self._generation):
            return self._replace(nft, desired, None)
        commands = None if self.held is None else update_commands(self.held, desired)
        if commands is None:
            return self._replace(nft, desired, None)
        if commands:
            try:
                self._commit(nft, commands, whole=False)
            except NftError as err:
                return self._replace(nft, desired, str(err))
        self.held = desired
        return Programmed(replaced=False, commands=len(commands))

    def _replace(self, nft: Nft, desired: NftTable, refused: str | None) -> Programmed:
        self.held = None
        batch = desired.commands(self.counters(nft))
        self._commit(nft, batch, whole=True)
        self.held = desired
        return Programmed(replaced=True, commands=len(batch), refused=refused)

    def _commit(self, nft: Nft, commands: list[dict[str, Any]], whole: bool) -> None:
        """One transaction, noting the generation it made when no one else's came between, nor,
        for an update (not `whole`, a replace), any since our last: an update leaves alone what
        someone else changed in the table, so the next resync must still see it happened."""
        before = nft.generation()
        unbroken = whole or before == self._generation
        self._generation = None
        nft.apply(commands)
        after = nft.generation()
        self._generation = after if unbroken and after == before + 1 else None

    @staticmethod
    def counters(nft: Nft) -> Counters:
        """The counters of the table's rules in the kernel now, by (chain, comment, position among
        the chain's rules with that comment); none when there is no table."""
        try:
            listing = nft.list_table()
        except NftError:
            return {}
        found: dict[tuple[str, str, int], dict[str, int]] = {}
        seen: dict[tuple[str, str], int] = {}
        for item in listing:
            rule = item.get("rule")
            if rule is None:
                continue
            mark = (rule["chain"], rule.get("comment", ""))
            occurrence = seen[mark] = seen.get(mark, -1) + 1
            counter = next((expr["counter"] for expr in rule["expr"] if "counter" in expr), None)
            if counter is not None and (counter["packets"] or counter["bytes"]):
                found[(*mark, occurrence)] = {"packets": counter["packets"], "bytes": counter["bytes"]}
        return found
