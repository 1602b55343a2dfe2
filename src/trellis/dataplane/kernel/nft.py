"""Apply a libnftables JSON batch in one transaction, all or nothing, through libnftables itself.

Why ctypes and not `nft -j -f -`: every pod ADD and DEL changes the table (the set of local
endpoints), and forking the agent to exec `nft` costs milliseconds on the pod's creation
path. libnftables (Debian's libnftables1, which `nft` itself links) takes the same JSON in
process; Debian's python3-nftables wrapper only imports under Debian's own interpreter, so
this is the few calls it makes. Calls are serialised: a libnftables context is not shared
between threads.
"""

from __future__ import annotations

import ctypes
import functools
import json
import threading
from typing import Any

LIBRARY = "libnftables.so.1"
NFT_CTX_DEFAULT = 0
NFT_CTX_OUTPUT_JSON = 1 << 4


class NftError(Exception):
    """libnftables refused the batch; the kernel kept the previous ruleset."""


class _Nft:
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


@functools.cache
def _nft() -> _Nft:
    """The process's one context (opened on first use, in the agent's network namespace)."""
    return _Nft()


def apply(commands: list[dict[str, Any]]) -> None:
    """Run a batch of libnftables JSON commands as one transaction."""
    _nft().run(json.dumps({"nftables": [{"metainfo": {"json_schema_version": 1}}, *commands]}))
