"""Processes the lab starts, named by PID and start time, their logs, and waiting with a deadline.

Why the start time: the lab kills processes it recorded, possibly long after (`lab down`
from another shell). A PID alone may by then belong to some other process; the kernel's
start time of the process (field 22 of /proc/PID/stat) tells them apart. Nothing here ever
looks a process up by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trellis.dataplane.kernel.netns import enter
from trellis.lab.errors import LabError

POLL_S = 0.02
"""Interval of the wait-until-condition loops (seconds)."""


def wait_until(condition: Callable[[], bool], timeout_s: float, poll_s: float = POLL_S) -> bool:
    """Poll `condition` until it holds (True) or `timeout_s` seconds pass (False)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


def log_tail(path: Path, lines: int = 3) -> str:
    """The last lines of a process's log, on one line, for an error message."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return "no log"
    return " | ".join(text[-lines:]) or "empty log"


def _start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks after boot); None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    state, start = fields[0], fields[19]
    return None if state in ("Z", "X") else int(start)


@dataclass(frozen=True)
class ProcessRef:
    """A process as the lab recorded it."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> ProcessRef:
        start = _start_time(pid)
        if start is None:
            raise ProcessLookupError(pid)
        return cls(pid, start)

    @classmethod
    def from_json(cls, data: Any) -> ProcessRef | None:
        return None if data is None else cls(int(data["pid"]), int(data["start"]))

    def to_json(self) -> dict[str, int]:
        return {"pid": self.pid, "start": self.start}

    def alive(self) -> bool:
        self._reap()
        return _start_time(self.pid) == self.start

    def _reap(self) -> None:
        """Collect the exit status if this process is our own child (else it stays a zombie)."""
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, os.WNOHANG)

    def signal(self, signum: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)


def stop(processes: Iterable[ProcessRef | None], grace_s: float = 5.0) -> None:
    """SIGTERM each live process, SIGKILL those still alive after `grace_s`; return once all are gone."""
    live = [p for p in processes if p is not None and p.alive()]
    for proc in live:
        proc.signal(signal.SIGTERM)
    if wait_until(lambda: not any(p.alive() for p in live), grace_s):
        return
    for proc in live:
        proc.signal(signal.SIGKILL)
    if not wait_until(lambda: not any(p.alive() for p in live), grace_s):
        left = ", ".join(str(p.pid) for p in live if p.alive())
        raise LabError(f"processes {left} survived SIGKILL for {grace_s:.0f} s")


def in_netns(netns: str) -> Callable[[], None]:
    """A `preexec_fn` that moves the child into network namespace `netns` (before exec).

    It also clears the signal mask, which a child inherits: the supervisor blocks the
    signals it waits for, and its agents must still stop on SIGTERM.
    """

    def entering() -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        enter(netns)

    return entering
