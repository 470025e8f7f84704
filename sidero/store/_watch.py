# -*- test-case-name: tests.store.test_embedded -*-
"""Watch fan-out for the embedded store, on the reactor thread only.

The hub receives every committed change in resourceVersion order (the store publishes them
as its single database thread hands results back) and offers each to the watchers of that
kind: a dict lookup, never a scan of the event log.  A starting watcher buffers live changes
while its replay (the persisted log, or the current list) is read, then drops what the replay
already covered, so it sees every change exactly once.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sidero.api.registry import ResourceType
from sidero.api.selectors import FieldSelector, LabelSelector
from sidero.store import errors
from sidero.store._sqlite import StoredEvent
from sidero.store.interfaces import ADDED, BOOKMARK, DELETED, MODIFIED, IWatch, WatchEvent

Object = dict[str, Any]

INITIAL_EVENTS_END = "k8s.io/initial-events-end"


class Change:
    """A committed change, decoded once and shared by every watcher for matching only."""

    __slots__ = ("event", "_obj", "_prev")

    def __init__(self, event: StoredEvent) -> None:
        self.event = event
        self._obj: Object | None = None
        self._prev: Object | None = None

    @property
    def rv(self) -> int:
        return self.event.rv

    @property
    def obj(self) -> Object:
        if self._obj is None:
            self._obj = json.loads(self.event.data)
        return self._obj

    @property
    def prev(self) -> Object | None:
        if self._prev is None and self.event.prev is not None:
            self._prev = json.loads(self.event.prev)
        return self._prev


class Hub:
    """Every running watcher, by kind; the resourceVersion of the last published change."""

    log = Logger()

    def __init__(self) -> None:
        self.rv = 0
        # Per kind, in registration order (a dict used as an ordered set).
        self._watchers: dict[str, dict[Watcher, None]] = {}
        self._pending: deque[StoredEvent] = deque()
        self._publishing = False

    def add(self, watcher: Watcher) -> None:
        self._watchers.setdefault(watcher.kind.resource, {})[watcher] = None

    def remove(self, watcher: Watcher) -> None:
        watchers = self._watchers.get(watcher.kind.resource)
        if watchers is not None:
            watchers.pop(watcher, None)
            if not watchers:
                del self._watchers[watcher.kind.resource]

    def watcher_count(self) -> int:
        return sum(len(w) for w in self._watchers.values())

    def publish(self, event: StoredEvent) -> None:
        """Offer a committed change to the watchers of its kind.

        Not re-entrant: a callback whose write completes synchronously queues its change
        behind the current one, so every watcher still sees resourceVersion order.
        """
        self._pending.append(event)
        if self._publishing:
            return
        self._publishing = True
        try:
            while self._pending:
                self._dispatch(self._pending.popleft())
        finally:
            self._publishing = False

    def _dispatch(self, event: StoredEvent) -> None:
        if event.rv <= self.rv:
            self.log.error("store change {rv} published twice or late (at {current})",
                           rv=event.rv, current=self.rv)
            return
        if event.rv != self.rv + 1:
            self.log.error("store changes {first}..{last} were never published",
                           first=self.rv + 1, last=event.rv - 1)
        self.rv = event.rv
        watchers = self._watchers.get(event.kind)
        if not watchers:
            return
        change = Change(event)
        for watcher in list(watchers):
            watcher.offer(change)

    def fail_all(self, error: errors.StoreError) -> None:
        for watchers in list(self._watchers.values()):
            for watcher in list(watchers):
                watcher.fail(error)


@implementer(IWatch)
class Watcher:
    """One watch: filters, translates and delivers changes to its callback.

    States: C{starting} (live changes buffered until the replay is delivered), C{live},
    C{stopped}.  C{_last_rv} is the newest resourceVersion accounted for (delivered or
    filtered out); anything at or below it is never delivered again.
    """

    log = Logger()

    def __init__(
        self,
        hub: Hub,
        clock: IReactorTime,
        kind: ResourceType,
        callback: Callable[[WatchEvent], object],
        namespace: str | None,
        labels: LabelSelector,
        fields: FieldSelector,
        bookmarks: bool,
        bookmark_interval: float,
    ) -> None:
        self.hub = hub
        self.clock = clock
        self.kind = kind
        self.callback = callback
        self.namespace = namespace if kind.namespaced else None
        self.labels = labels
        self.fields = fields
        self.bookmarks = bookmarks
        self.bookmark_interval = bookmark_interval
        self.done: Deferred[None] = Deferred()
        self._state = "starting"
        self._buffer: list[Change] = []
        self._last_rv = 0
        self._timer: IDelayedCall | None = None

    # -- IWatch ---------------------------------------------------------------------------

    def stop(self) -> None:
        if self._finish():
            self.done.callback(None)

    def fail(self, error: errors.StoreError | Failure) -> None:
        """End the watch by itself (Gone, Unavailable): C{done} errbacks with C{error}."""
        if self._finish():
            self.done.errback(error)

    def _finish(self) -> bool:
        if self._state == "stopped":
            return False
        self._state = "stopped"
        self._buffer = []
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.hub.remove(self)
        return True

    @property
    def running(self) -> bool:
        return self._state != "stopped"

    # -- feeding --------------------------------------------------------------------------

    def offer(self, change: Change) -> None:
        if self._state == "starting":
            self._buffer.append(change)
        elif self._state == "live":
            self._deliver(change)

    def start_from_list(self, items: list[Object], rv: int) -> None:
        """Replay for C{resource_version} None/"": ADDED for each current match, then live."""
        if self._state != "starting":
            return
        for obj in items:
            if self._state != "starting":
                return
            if self._matches(obj):
                self._emit(ADDED, obj)
        self._last_rv = max(self._last_rv, rv)
        self._go_live(initial=True)

    def start_from_events(self, events: list[StoredEvent], rv: int) -> None:
        """Replay of the persisted log after the requested resourceVersion, then live."""
        if self._state != "starting":
            return
        for event in events:
            if self._state != "starting":
                return
            self._deliver(Change(event))
        self._last_rv = max(self._last_rv, rv)
        self._go_live(initial=False)

    def _go_live(self, initial: bool) -> None:
        buffered, self._buffer = self._buffer, []
        self._state = "live"
        for change in buffered:
            self._deliver(change)
        if self.bookmarks and self._state == "live":
            self._bookmark(initial_end=initial)
            self._schedule_bookmark()

    def _deliver(self, change: Change) -> None:
        if self._state == "stopped" or change.rv <= self._last_rv:
            return
        self._last_rv = change.rv
        kind = change.event.type
        obj = change.obj
        if kind == MODIFIED:
            now = self._matches(obj)
            prev = change.prev
            before = prev is not None and self._matches(prev)
            if now and before:
                self._emit(MODIFIED, json.loads(change.event.data))
            elif now:
                self._emit(ADDED, json.loads(change.event.data))
            elif before and change.event.prev is not None:
                # No longer selected: the watcher sees it leave, as the watch cache reports it.
                gone = json.loads(change.event.prev)
                gone["metadata"]["resourceVersion"] = str(change.rv)
                self._emit(DELETED, gone)
        elif self._matches(obj):
            self._emit(kind, json.loads(change.event.data))

    def _matches(self, obj: Object) -> bool:
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        return self.labels.matches(meta.get("labels")) and self.fields.matches(obj)

    def _emit(self, kind: str, obj: Object) -> None:
        try:
            result = self.callback(WatchEvent(kind, obj))
        except Exception:
            self.log.failure("watch callback for {kind} failed on a {event} event; the watch goes on",
                             kind=self.kind.resource, event=kind)
            return
        if isinstance(result, Deferred):
            result.addErrback(lambda f: self.log.failure(
                "watch callback for {kind} failed later; the watch goes on", f, kind=self.kind.resource))

    # -- bookmarks ------------------------------------------------------------------------

    def _bookmark(self, initial_end: bool = False) -> None:
        self._last_rv = max(self._last_rv, self.hub.rv)
        meta: Object = {"resourceVersion": str(self._last_rv)}
        if initial_end:
            meta["annotations"] = {INITIAL_EVENTS_END: "true"}
        self._emit(BOOKMARK, {"apiVersion": self.kind.api_version, "kind": self.kind.kind, "metadata": meta})

    def _schedule_bookmark(self) -> None:
        if self.bookmark_interval > 0:
            self._timer = self.clock.callLater(self.bookmark_interval, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self._state == "live":
            self._bookmark()
            self._schedule_bookmark()
