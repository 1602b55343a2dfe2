"""Both datastore backends as one pytest fixture, so every behaviour is tested once, on each.

A test module opts in with `pytest_plugins = ["tests.unit.datastore_backends"]` and takes the
`backend` fixture; it imports this module for type checking only, so that pytest, loading it as
a plugin, rewrites its assertions. SQLite runs on a temporary file with a fake clock; etcd is a real `etcd`
process (Debian's etcd-server) on free loopback ports, one per test session, each test under a
key prefix of its own. Without the binary the etcd cases are skipped, except in CI (CI=true),
which installs it and where a skip would hide a missing install step.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from tests.helpers import wait_until
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


@pytest.fixture(scope="session")
def etcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real etcd server for the session; killed (by its PID) at the end, whatever happened."""
    if not ETCD.exists():
        message = f"{ETCD} is missing (Debian package etcd-server; `make setup` installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    data = tmp_path_factory.mktemp("etcd")
    url, peer = f"http://127.0.0.1:{_free_port()}", f"http://127.0.0.1:{_free_port()}"
    with (data / "etcd.log").open("wb") as out:
        server = subprocess.Popen(
            [
                str(ETCD),
                "--name=test",
                f"--data-dir={data / 'data'}",
                f"--listen-client-urls={url}",
                f"--advertise-client-urls={url}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=test={peer}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + ETCD_START_TIMEOUT_S
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                log = (data / "etcd.log").read_text(errors="replace")[-3000:]
                pytest.fail(f"etcd at {url} not healthy (exit status {server.poll()}):\n{log}")
            time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


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
