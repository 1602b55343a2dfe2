"""Both datastore backends as one pytest fixture, so every behaviour is tested once, on each.

A test module opts in with `pytest_plugins = ["tests.unit.datastore_backends"]` and takes the
`backend` fixture; it imports this module for type checking only, so that pytest, loading it as
a plugin, rewrites its assertions. SQLite runs on a temporary file with a fake clock; etcd is a real `etcd`
process (Debian's etcd-server) on free loopback ports, one per test session, each test under a
key prefix of its own. Without the binary the etcd cases are skipped, except in CI (CI=true),
which installs it and where a skip would hide a missing install step. `etcd_server` and `stop`
serve tests/privileged/test_etcd_tls.py too (its etcd requires client certificates).
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from tests.helpers import wait_until
from trellis.dataplane.kernel.netns import enter
from trellis.datastore.base import Datastore, Event
from trellis.datastore.etcd import EtcdDatastore
from trellis.datastore.sqlite import SqliteDatastore

ETCD = Path("/usr/bin/etcd")
ETCD_START_TIMEOUT_S = 30.0
WAIT_TIMEOUT_S = 15.0
"""Longest a test waits for something the store does by itself (an etcd lease expiring)."""


class CompactableStore(Datastore, Protocol):
    """A Datastore whose history a test can cut, as an operator (or etcd's auto-compaction) does."""

    def compact(self, revision: int) -> None: ...


class FakeClock:
    """Seconds that pass only when a test says so."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Backend:
    """A store under test, and what a test needs to drive time and wait for it."""

    name: str
    store: CompactableStore
    clock: FakeClock | None
    """The store's clock when the test controls it; None when real time runs (etcd)."""

    def let_time_pass(self, seconds: float) -> None:
        """Move a fake clock on; a real server's time passes by itself (wait for its effect)."""
        if self.clock is not None:
            self.clock.advance(seconds)

    def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        """Wait for something the store does by itself (an etcd lease expiring)."""
        wait_until(condition, WAIT_TIMEOUT_S, what)

    def watch_until(self, prefix: str, after_revision: int, count: int) -> list[Event]:
        """At least `count` events after `after_revision`, over as many watch calls as they take."""
        events: list[Event] = []
        deadline = time.monotonic() + WAIT_TIMEOUT_S
        while len(events) < count:
            assert time.monotonic() < deadline, f"only {len(events)} of {count} events: {events}"
            resume = events[-1].mod_revision if events else after_revision
            events += self.store.watch(prefix, resume, 1.0)
        return events


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as answer:
            return b'"true"' in answer.read()
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def etcd_server(
    work: Path, url: str, peer: str, *flags: str, ready: Callable[[], bool], netns: str | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A one-member etcd on `work/data` (log `work/etcd.log`) serving clients at `url` and its
    peer at `peer`, with `flags` added, started inside namespace `netns` if given. Yielded once
    `ready()` holds; ended by its PID afterwards, whatever happened.

    Without the binary the test is skipped, except in CI (CI=true), where it fails.
    """
    if not ETCD.exists():
        message = f"{ETCD} is missing (Debian package etcd-server; `make setup` installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    log = work / "etcd.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [
                str(ETCD),
                "--name=trlt",
                f"--data-dir={work / 'data'}",
                f"--listen-client-urls={url}",
                f"--advertise-client-urls={url}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=trlt={peer}",
                *flags,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=None if netns is None else functools.partial(enter, netns),  # noqa: PLW1509 (setns only)
        )
    try:
        deadline = time.monotonic() + ETCD_START_TIMEOUT_S
        while not ready():
            if server.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:]
                pytest.fail(f"etcd at {url} not ready (exit status {server.poll()}):\n{tail}")
            time.sleep(0.1)
        yield server
    finally:
        stop(server)


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """End `proc` by its PID: SIGTERM, then SIGKILL if it is still there after `timeout_s`."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def etcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real etcd server for the session; killed (by its PID) at the end, whatever happened."""
    url, peer = f"http://127.0.0.1:{_free_port()}", f"http://127.0.0.1:{_free_port()}"
    with etcd_server(tmp_path_factory.mktemp("etcd"), url, peer, ready=lambda: _healthy(url)):
        yield url


@pytest.fixture(params=["sqlite", "etcd"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each backend in turn, empty (etcd: a fresh key prefix)."""
    if request.param == "sqlite":
        clock = FakeClock()
        sqlite = SqliteDatastore(tmp_path / "trellis.db", poll_interval_s=0.01, clock=clock)
        chosen = Backend("sqlite", sqlite, clock)
    else:
        url = request.getfixturevalue("etcd_url")
        chosen = Backend("etcd", EtcdDatastore(url, prefix=f"/test-{uuid.uuid4().hex}"), None)
    try:
        yield chosen
    finally:
        chosen.store.close()
