"""The syncer: a datastore prefix, followed, as a stream of callbacks for one consumer.

Why a separate piece: the consumer (the agent's calculation) should see only "here is
everything" and "here is what changed", never revisions, compaction or outages. Calico's
Felix is fed the same way (snapshot, updates, in-sync). The syncer lists the prefix, then
watches from the revision of what it last delivered, so no change is lost or delivered twice.
When that history is gone (Compacted) or the store fails, it lists again and hands the consumer
a fresh snapshot, which replaces everything the consumer held; failures back off exponentially,
to at most 2 s: when the store returns after an outage, the consumer is in sync again within
that (listing a prefix costs the store one read, so retrying that often is cheap).

`step()` does one list or one watch and is what the tests drive, without threads; `start()`
runs steps on a thread of its own until `stop()`.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from trellis.datastore.base import KV, Compacted, Datastore, DatastoreError, Event

log = logging.getLogger(__name__)


class SyncConsumer(Protocol):
    """What a syncer feeds. Calls come from the syncer's thread, one at a time."""

    def on_snapshot(self, items: list[KV], revision: int) -> None:
        """Everything under the prefix at `revision`: replaces all the consumer held.

        The consumer is in sync from here on, and may act on what it holds.
        """

    def on_update(self, events: list[Event]) -> None:
        """Changes since the last snapshot or update, oldest first."""

    def on_out_of_sync(self, reason: str) -> None:
        """The store cannot be followed for now; what the consumer holds may be stale until
        the next on_snapshot. Called once per outage."""


class Syncer:
    """Follows `prefix` of `store` for `consumer`."""

    def __init__(
        self,
        store: Datastore,
        prefix: str,
        consumer: SyncConsumer,
        *,
        watch_timeout_s: float = 1.0,
        retry_initial_s: float = 0.1,
        retry_max_s: float = 2.0,
    ) -> None:
        """`watch_timeout_s` bounds one watch, and so how long stop() can take; after a failure
        the next try waits `retry_initial_s`, doubling up to `retry_max_s` (seconds)."""
        self.store = store
        self.prefix = prefix
        self.consumer = consumer
        self.watch_timeout_s = watch_timeout_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.revision: int | None = None
        """Revision of the last delivered change; None until listed (or after losing track)."""
        self._failures = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def step(self) -> float:
        """One list or one watch, delivered; returns the seconds to wait before the next step."""
        try:
            if self.revision is None:
                snapshot = self.store.snapshot(self.prefix)
                self.consumer.on_snapshot(snapshot.items, snapshot.revision)
                self.revision = snapshot.revision
            else:
                events = self.store.watch(self.prefix, self.revision, self.watch_timeout_s)
                if events:
                    self.consumer.on_update(events)
                    self.revision = events[-1].mod_revision
        except Compacted as err:
            log.info("syncer %s: %s; listing again", self.prefix, err)
            self.revision = None
            return 0.0
        except DatastoreError as err:
            self._failures += 1
            delay = min(self.retry_max_s, self.retry_initial_s * 2.0 ** (self._failures - 1))
            log.warning("syncer %s: %s; listing again in %.1f s", self.prefix, err, delay)
            if self._failures == 1:
                self.consumer.on_out_of_sync(str(err))
            self.revision = None
            return delay
        self._failures = 0
        return 0.0

    def _run(self) -> None:
        while not self._stopping.is_set():
            delay = self.step()
            if delay:
                self._stopping.wait(delay)

    def start(self) -> None:
        """Follow the prefix on a thread of its own."""
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name=f"syncer {self.prefix}", daemon=True)
        self._thread.start()

    @property
    def thread(self) -> threading.Thread | None:
        """The thread `start()` runs steps on; None before it and after `stop()`."""
        return self._thread

    def stop(self) -> None:
        """Stop following; returns once the current step ends (at most a watch time-out away)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
