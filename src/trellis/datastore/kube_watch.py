"""One datastore prefix followed across several Kubernetes resources: a watch each, merged.

Why a long-lived watch per resource, each with a cursor of its own: the agent follows
`/trellis/`, which is nine resources. The API watches one resource per request, and reopening
nine watches for every `watch()` call (the syncer makes one a second) would load the API
server for nothing; so each resource keeps one watch open on a thread of its own, resumes it
from the last resourceVersion it saw (an event's or a bookmark's; bookmarks are asked for so
that a quiet resource's cursor stays inside the server's history), and reopens it when the
server ends it (`timeoutSeconds`).

Revisions: a resourceVersion is etcd's revision, one counter across resources (see
`kube_resources.revision`), so the merged events carry comparable revisions and a batch is
handed out oldest first. Across resources, though, events do not arrive in revision order:
the watch of one resource may deliver revision 105 before another's delivers 103. A watch
restarted from 105 would lose 103, so the follower never restarts: it keeps each resource's
cursor, and the `after_revision` the syncer passes back (the last revision it was handed, the
follower's `mark`) only says "continue". Any other `after_revision` (a snapshot's, a write's)
is a point in etcd's single history, and a new follower starts every resource from it. A late
event may thus come with a lower revision than one already handed out; nothing is lost or
repeated, and the consumer applies events per key, where order holds.

A 410 (Gone, Expired) from any watch is `Compacted`, so the syncer lists again; any other
failure ends the follower with `Unavailable` or the API's error, and the syncer lists again
after its back-off. A resource the server does not serve (an optional CRD) is not watched.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from trellis.datastore.base import Compacted, DatastoreError, Event, EventKind, Unavailable
from trellis.datastore.kube_api import ApiClient, ApiFailure, Status, WatchStream
from trellis.datastore.kube_resources import Resource, revision

log = logging.getLogger(__name__)

READ_MARGIN_S = 30.0
"""How much longer than its `timeoutSeconds` a watch may stay silent before its connection is
taken for dead (seconds)."""
QUICK_END_S = 1.0
"""A watch the server ends this soon (seconds) without an event is a failure, not a time-out:
reopening it at once would hammer the server."""


class Follower:
    """Every change under `prefix` after revision `after`, from a watch per resource."""

    def __init__(
        self, api: ApiClient, resources: list[Resource], prefix: str, after: int, server_timeout_s: int
    ) -> None:
        self.mark = after
        """The revision the consumer resumes from: the last one handed out (or the start)."""
        self.prefix = prefix
        self._cond = threading.Condition()
        self._events: list[Event] = []
        self._error: DatastoreError | None = None
        self._stopped = False
        self._streams: set[WatchStream] = set()
        """The watches open now: `stop` ends them."""
        for resource in resources:
            watch = _ResourceWatch(self, api, resource, after, server_timeout_s)
            threading.Thread(target=watch.run, name=f"watch {resource.plural}", daemon=True).start()

    def take(self, timeout_s: float) -> list[Event]:
        """The events that came since the last take, oldest first, waiting up to `timeout_s` for one;
        raises what ended a watch once the events before it are taken."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not self._events and self._error is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._cond.wait(remaining)
            if not self._events:
                assert self._error is not None
                raise self._error
            batch = sorted(self._events, key=lambda event: event.mod_revision)
            self._events.clear()
            self.mark = batch[-1].mod_revision
        return batch

    def push(self, event: Event) -> None:
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()

    def fail(self, error: DatastoreError) -> None:
        """End the follower: every watch stops, and `take` raises `error`."""
        with self._cond:
            if self._error is None:
                self._error = error
            self._cond.notify_all()
            self.stop()

    def stop(self) -> None:
        """Stop every watch now: each open stream is shut down, so its thread ends at once instead
        of holding a connection until the server next speaks (minutes, for a quiet kind)."""
        with self._cond:
            self._stopped = True
            for stream in self._streams:
                stream.abort()

    def opened(self, stream: WatchStream) -> bool:
        """Track a watch's open stream until `closing`; False when the follower has stopped."""
        with self._cond:
            if self._stopped:
                return False
            self._streams.add(stream)
            return True

    def closing(self, stream: WatchStream) -> None:
        """The stream is about to close (its connection may then serve other requests)."""
        with self._cond:
            self._streams.discard(stream)

    @property
    def stopped(self) -> bool:
        return self._stopped


class _ResourceWatch:
    """One resource's watch for a follower, reopened from its own cursor until the follower stops."""

    def __init__(
        self, follower: Follower, api: ApiClient, resource: Resource, after: int, server_timeout_s: int
    ) -> None:
        self.follower = follower
        self.api = api
        self.resource = resource
        self.cursor = after
        self.server_timeout_s = server_timeout_s

    @property
    def where(self) -> str:
        return f"watch of {self.resource.plural} from resourceVersion {self.cursor}"

    def run(self) -> None:
        try:
            while not self.follower.stopped:
                self._one_stream()
        except ApiFailure as err:
            if err.status.expired:
                self.follower.fail(Compacted(f"{self.where}: {err.status.message}"))
            elif self.resource.optional and err.status.code == 404:
                log.info("%s: not served by the API server (%s); not watched", self.where, err.status.message)
            else:
                self.follower.fail(err)
        except DatastoreError as err:
            self.follower.fail(err)
        except (KeyError, TypeError, ValueError) as err:
            # A thread that died here would leave the follower silent: stale, and not saying so.
            self.follower.fail(DatastoreError(f"{self.where}: an answer that is no watch event: {err!r}"))
        except Exception as err:  # anything else, for the same reason
            self.follower.fail(DatastoreError(f"{self.where}: {err!r}"))

    def _one_stream(self) -> None:
        """Read one watch request to its end, moving the cursor."""
        params = {
            "resourceVersion": str(self.cursor),
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self.server_timeout_s),
        }
        began, spoke = time.monotonic(), False
        read_s = self.server_timeout_s + READ_MARGIN_S
        with self.api.watch(self.resource.collection_path(), params, read_s) as stream:
            if not self.follower.opened(stream):
                return
            try:
                for message in stream:
                    if self.follower.stopped:
                        return
                    self._handle(message)
                    spoke = True
            finally:
                self.follower.closing(stream)
        if not spoke and time.monotonic() - began < QUICK_END_S:
            raise Unavailable(f"{self.where}: the server ended it at once")

    def _handle(self, message: dict[str, Any]) -> None:
        kind, obj = message.get("type"), message.get("object") or {}
        if kind == "ERROR":
            raise ApiFailure(self.where, Status.from_json(obj))
        self.cursor = revision(obj)
        if kind == "BOOKMARK":
            return
        key = self.resource.key(obj)
        if not key.startswith(self.follower.prefix):
            return
        if kind == "DELETED":
            self.follower.push(Event(EventKind.DELETE, key, None, self.cursor))
        elif kind in ("ADDED", "MODIFIED"):
            self.follower.push(Event(EventKind.PUT, key, self.resource.value(obj), self.cursor))
        else:
            raise Unavailable(f"{self.where}: unknown event type {kind!r}")
