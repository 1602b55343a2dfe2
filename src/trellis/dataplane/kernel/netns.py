"""Running a little code inside another network namespace, safely.

Why a throwaway thread: `setns(CLONE_NEWNET)` changes only the calling thread, and a thread
that switched must never go back to serving other work (the trap the reference plugins'
`pkg/ns` README describes). So a fresh thread enters the namespace, creates what it needs
there (a netlink or TCP socket stays bound to the namespace it was created in), and ends.
This costs well under a millisecond; pyroute2's NetNS forks a helper process instead.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = Path("/run/netns")

_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(name_or_path: str) -> str:
    """A namespace given by name (`ip netns` style) or by path, as a path."""
    return name_or_path if "/" in name_or_path else str(NETNS_RUN_DIR / name_or_path)


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace `fd` refers to."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def enter(netns: str) -> None:
    """Move the calling thread into `netns` (by name or path) for good.

    For a thread that does nothing else afterwards, a thread pool's initializer, or a forked
    child's `preexec_fn` (bind it with `functools.partial`).
    """
    fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(fd)
    finally:
        os.close(fd)


def call_in_netns(netns: str, func: Callable[[], T]) -> T:
    """Run `func` in a thread that has entered `netns`; returns its result or raises its error."""
    box: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            enter(netns)
            box.append(func())
        except BaseException as err:  # handed to the caller's thread below
            failure.append(err)

    thread = threading.Thread(target=body, name=f"netns:{netns}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return box[0]
