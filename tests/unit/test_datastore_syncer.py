"""The syncer against every backend: snapshot, updates, re-list after compaction and outages."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from trellis.datastore.base import KV, Datastore, Event, EventKind, Snapshot, Unavailable
from trellis.datastore.sqlite import SqliteDatastore
from trellis.datastore.syncer import Syncer

if TYPE_CHECKING:
    from pathlib import Path

    from tests.unit.datastore_backends import Backend

pytest_plugins = ["tests.unit.datastore_backends"]

PREFIX = "/s/"


class Recorder:
    """A SyncConsumer that keeps the calls it got and the state they add up to (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[str] = []
        self.state: dict[str, dict[str, Any]] = {}

    def on_snapshot(self, items: list[KV], revision: int) -> None:
        with self.lock:
            self.calls.append("snapshot")
            self.state = {kv.key: kv.value for kv in items}

    def on_update(self, events: list[Event]) -> None:
        with self.lock:
            self.calls.append("update")
            for event in events:
                if event.kind is EventKind.DELETE:
                    del self.state[event.key]
                else:
                    assert event.value is not None
                    self.state[event.key] = event.value

    def on_out_of_sync(self, reason: str) -> None:
        with self.lock:
            self.calls.append("out of sync")

    def holds(self, store: Datastore) -> bool:
        """Whether the state the calls add up to is what the store holds under the prefix."""
        with self.lock:
            return self.state == {kv.key: kv.value for kv in store.list(PREFIX)}

    def kinds(self) -> list[str]:
        with self.lock:
            return list(self.calls)


def steps_until_in_step(syncer: Syncer, recorder: Recorder, store: Datastore) -> None:
    """Step (no thread) until the recorder holds what the store holds; a few steps at most."""
    for _ in range(5):
        if recorder.holds(store):
            return
        syncer.step()
    assert recorder.holds(store), f"after 5 steps: {recorder.state}"


def test_steps_deliver_a_snapshot_updates_and_a_new_snapshot_after_compaction(backend: Backend) -> None:
    """Stepped by hand: the first step lists, later ones deliver changes; once the history it
    needs is compacted, it lists again, and the consumer is never told it was out of sync."""
    store = backend.store
    store.put("/s/a", {"n": 1})
    store.put("/s/b", {"n": 2})
    store.put("/elsewhere", {})
    recorder = Recorder()
    syncer = Syncer(store, PREFIX, recorder, watch_timeout_s=0.2)
    assert syncer.step() == 0
    assert recorder.kinds() == ["snapshot"] and recorder.holds(store)
    a = store.get("/s/a")
    assert a is not None
    store.delete("/s/a", a.mod_revision)
    store.put("/s/c", {"n": 3})
    steps_until_in_step(syncer, recorder, store)
    assert set(recorder.kinds()[1:]) == {"update"}
    store.put("/s/b", {"n": 4})
    store.compact(store.put("/s/d", {"n": 5}))
    assert syncer.step() == 0 and syncer.revision is None
    assert syncer.step() == 0
    assert recorder.kinds()[-1] == "snapshot" and recorder.holds(store)
    assert "out of sync" not in recorder.kinds()


def test_the_thread_follows_changes_and_stops_promptly(backend: Backend) -> None:
    """start() follows the prefix on its own thread; stop() returns within a watch time-out."""
    store = backend.store
    store.put("/s/a", {"n": 1})
    recorder = Recorder()
    syncer = Syncer(store, PREFIX, recorder, watch_timeout_s=0.5)
    syncer.start()
    try:
        backend.wait_until(lambda: recorder.kinds() == ["snapshot"], "the first snapshot")
        for n in range(5):
            store.put(f"/s/{n}", {"n": n})
        backend.wait_until(lambda: recorder.holds(store), "the syncer to deliver five puts")
    finally:
        began = time.monotonic()
        syncer.stop()
        stopped_in = time.monotonic() - began
    assert stopped_in < 1.5
    assert set(recorder.kinds()[1:]) == {"update"}


class FlakyStore(SqliteDatastore):
    """A SQLite store that a test can take down: listing and watching then fail as Unavailable."""

    down = False

    def snapshot(self, prefix: str) -> Snapshot:
        if self.down:
            raise Unavailable("test: the store is down")
        return super().snapshot(prefix)

    def watch(self, prefix: str, after_revision: int, timeout_s: float) -> list[Event]:
        if self.down:
            raise Unavailable("test: the store is down")
        return super().watch(prefix, after_revision, timeout_s)


def test_an_outage_backs_off_tells_the_consumer_once_and_ends_with_a_new_snapshot(tmp_path: Path) -> None:
    """While the store is down, steps wait twice as long each time, up to the maximum; the consumer
    hears of it once; when the store is back the syncer lists again, and the wait starts over."""
    store = FlakyStore(tmp_path / "trellis.db")
    recorder = Recorder()
    syncer = Syncer(store, PREFIX, recorder, watch_timeout_s=0, retry_initial_s=0.1, retry_max_s=0.5)
    try:
        assert syncer.step() == 0
        store.down = True
        assert [syncer.step() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
        assert recorder.kinds() == ["snapshot", "out of sync"]
        store.down = False
        store.put("/s/new", {})
        assert syncer.step() == 0
        assert recorder.kinds()[-1] == "snapshot" and recorder.holds(store)
        store.down = True
        assert syncer.step() == 0.1
    finally:
        store.close()
