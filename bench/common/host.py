"""What one benchmark run creates on the machine: namespaces and processes, removed by exactly that.

Every namespace is named `<prefix>-<tag>-<role>` with the benchmark's own prefix and a random
tag per run, so two runs never collide and teardown deletes only what this run made. Every
process is started here and ended by its PID (SIGTERM, then SIGKILL), never looked up by name.
Nothing is created or changed in the machine's own namespace: links are created inside a
benchmark namespace with their peer placed straight into another one.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

STOP_TIMEOUT_S = 10.0
P = TypeVar("P", bound="subprocess.Popen[Any]")


class BenchError(RuntimeError):
    """A step of a benchmark failed; the message names the command and its output."""


def run(argv: Sequence[str], *, stdin: str | None = None, timeout: float = 120.0) -> str:
    """Run `argv`, return its stdout; BenchError with the command and its stderr if it fails."""
    try:
        done = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(argv)}: no answer after {timeout:.0f} s") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip()[-1500:]
        raise BenchError(f"{' '.join(argv)} exited {done.returncode}: {detail}")
    return done.stdout


def ip(*args: str) -> str:
    return run(["ip", *args])


def in_netns(netns: str) -> list[str]:
    """The prefix that runs a command inside namespace `netns` (its PID stays the command's)."""
    return ["ip", "netns", "exec", netns]


@dataclass
class Scratch:
    """Namespaces, processes and a temporary directory of one run; `close()` removes them all."""

    prefix: str
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="trl-bench-")))
    namespaces: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen[Any]] = field(default_factory=list)

    def netns(self, role: str, loopback: bool = True) -> str:
        """Create `<prefix>-<tag>-<role>` (loopback up unless told); recorded before it exists."""
        name = f"{self.prefix}-{self.tag}-{role}"
        self.namespaces.append(name)
        ip("netns", "add", name)
        if loopback:
            ip("-n", name, "link", "set", "lo", "up")
        return name

    def spawn(self, argv: Sequence[str], log: str) -> tuple[subprocess.Popen[bytes], Path]:
        """Start `argv` with stdout and stderr to `tmp/log`; it is ended by PID at `close()`."""
        path = self.tmp / log
        with path.open("wb") as out:
            proc = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        return self.track(proc), path

    def track(self, proc: P) -> P:
        """Record `proc`, started by the caller, to be ended by PID at `close()`."""
        self.processes.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.processes):
            stop(proc)
        self.processes.clear()
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)
        self.namespaces.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


def stop(proc: subprocess.Popen[Any]) -> None:
    """End `proc` by its PID: SIGTERM, SIGKILL if it is still there after a few seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def scratch(prefix: str, tag: str | None = None) -> Iterator[Scratch]:
    made = Scratch(prefix, tag) if tag else Scratch(prefix)
    try:
        yield made
    finally:
        made.close()


def wait_for_text(proc: subprocess.Popen[bytes], log: Path, text: str, timeout: float = 10.0) -> None:
    """Wait until `text` appears in `log`, which `proc` writes; BenchError if it exits or times out."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-1000:]
            state = f"exited {proc.returncode}" if proc.returncode is not None else f"silent {timeout:.0f} s"
            raise BenchError(f"{proc.args!r} {state} before {text!r}: {tail}")
        time.sleep(0.02)
