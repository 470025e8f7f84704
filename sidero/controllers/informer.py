# -*- test-case-name: tests.controllers.test_informer -*-
"""A list-then-watch cache of one kind, read synchronously on the reactor thread.

Protocols (DHCP, TFTP, iPXE) and reconcilers read this cache instead of the API: a read never
waits on the store, and when the store is unreachable the last known state keeps being served
while the informer reconnects with a jittered, capped backoff.

The cache holds one dict per object.  L{Informer.get}, L{Informer.list} and L{Informer.by_index}
return those stored dicts without copying, because protocols read them per packet: they are
B{read-only}.  Handlers receive the same dicts.  A caller that wants to modify an object uses
L{Informer.get_copy} (or C{copy.deepcopy}) and writes it through the store.
"""

from __future__ import annotations

import builtins
import copy
import random as _random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from sidero.api.registry import ResourceType
from sidero.api.selectors import LabelSelector
from sidero.backoff import Backoff
from sidero.store.errors import Gone
from sidero.store.interfaces import (
    ADDED,
    BOOKMARK,
    DELETED,
    MODIFIED,
    IResourceStore,
    IWatch,
    Object,
    ResourceList,
    WatchEvent,
)

CacheKey = tuple[str, str]
IndexFunc = Callable[[Object], Iterable[str]]
AddHandler = Callable[[Object], object]
UpdateHandler = Callable[[Object, Object], object]
DeleteHandler = Callable[[Object], object]


def cache_key(obj: Object) -> CacheKey:
    """(namespace, name) of an object; namespace is C{""} for cluster-scoped kinds."""
    meta = obj.get("metadata") or {}
    return (meta.get("namespace") or "", meta.get("name") or "")


def object_key(obj: Object) -> str:
    """The work-queue key of an object: C{namespace/name}, or C{name} when cluster-scoped."""
    ns, name = cache_key(obj)
    return f"{ns}/{name}" if ns else name


def split_key(key: str) -> tuple[str | None, str]:
    """Inverse of L{object_key}: (namespace or None, name)."""
    if "/" in key:
        ns, name = key.split("/", 1)
        return ns, name
    return None, key


def _resource_version(obj: Object) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


@dataclass
class _Handler:
    on_add: AddHandler | None
    on_update: UpdateHandler | None
    on_delete: DeleteHandler | None


@dataclass
class InformerStats:
    """Plain counters read by the metrics collector (no prometheus import here)."""

    lists: int = 0
    relists: int = 0
    watch_restarts: int = 0
    errors: int = 0


class Informer(Service):
    """List+watch cache of C{kind} (optionally one namespace / label selector).

    Start it with C{startService()} (or as a child of a service tree).  L{synced} fires once
    the first list is in the cache.  Events reach handlers after the cache was updated, on the
    reactor thread, in store order.

    @ivar resource_version: the last resourceVersion seen (list, event or bookmark).
    """

    log = Logger()

    def __init__(
        self,
        store: IResourceStore,
        kind: ResourceType,
        namespace: str | None = None,
        label_selector: str | None = None,
        clock: IReactorTime | None = None,
        resync_period: float | None = None,
        backoff: Backoff | None = None,
        random: Callable[[], float] = _random.random,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        assert clock is not None
        self.store = store
        self.kind = kind
        self.namespace = namespace
        self.label_selector = label_selector
        self.clock = clock
        self.resync_period = resync_period
        self.backoff = backoff or Backoff()
        self._random = random
        self.setName(f"informer-{kind.plural}" + (f"-{namespace}" if namespace else ""))

        self._items: dict[CacheKey, Object] = {}
        self._index_funcs: dict[str, IndexFunc] = {}
        self._indexes: dict[str, dict[str, set[CacheKey]]] = {}
        self._handlers: list[_Handler] = []
        self._synced = False
        self._sync_waiters: list[Deferred[None]] = []
        self.resource_version = ""
        self._watch: IWatch | None = None
        self._timer: IDelayedCall | None = None
        self._resync_timer: IDelayedCall | None = None
        self._attempt = 0
        self._generation = 0  # bumped on stop so late store results are ignored
        self._running = False
        self.stats = InformerStats()
        self._failing_since: float | None = None  # first failure of the current outage

    # -- reads (synchronous, never wait on the store) ----------------------------------

    @property
    def has_synced(self) -> bool:
        return self._synced

    @property
    def synced(self) -> Deferred[None]:
        """A new Deferred that fires once the first list is in the cache (each access gets
        its own, so any number of callers may wait)."""
        if self._synced:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._sync_waiters.append(d)
        return d

    def _key_for(self, name: str, namespace: str | None) -> CacheKey:
        if not self.kind.namespaced:
            return ("", name)
        return (namespace if namespace is not None else (self.namespace or ""), name)

    def get(self, name: str, namespace: str | None = None) -> Object | None:
        """The cached object (B{read-only}) or None.  C{namespace} is ignored for
        cluster-scoped kinds; for namespaced ones None means the informer's namespace."""
        return self._items.get(self._key_for(name, namespace))

    def get_copy(self, name: str, namespace: str | None = None) -> Object | None:
        """A deep copy of the cached object, safe to modify."""
        obj = self.get(name, namespace)
        return copy.deepcopy(obj) if obj is not None else None

    def list(
        self, namespace: str | None = None, label_selector: str | LabelSelector | None = None
    ) -> list[Object]:
        """Cached objects (B{read-only}), ordered by namespace then name."""
        selector = (
            LabelSelector.parse(label_selector) if isinstance(label_selector, str) else label_selector
        )
        out = []
        for key in sorted(self._items):
            if namespace is not None and self.kind.namespaced and key[0] != namespace:
                continue
            obj = self._items[key]
            if selector is not None and not selector.matches(
                (obj.get("metadata") or {}).get("labels") or {}
            ):
                continue
            out.append(obj)
        return out

    def keys(self) -> builtins.list[str]:
        """Work-queue keys of every cached object."""
        return [object_key(self._items[k]) for k in sorted(self._items)]

    def __len__(self) -> int:
        return len(self._items)

    def add_index(self, name: str, fn: IndexFunc) -> None:
        """Maintain an index C{name}: C{fn(obj)} gives the values an object is found under
        (e.g. ServerBinding by C{spec.metalMachineRef.name})."""
        if name in self._index_funcs:
            raise ValueError(f"index {name!r} already exists")
        self._index_funcs[name] = fn
        self._indexes[name] = {}
        for key, obj in self._items.items():
            self._index_one(name, key, obj)

    def by_index(self, name: str, value: str) -> builtins.list[Object]:
        """Cached objects (B{read-only}) whose index C{name} has C{value}, ordered by key."""
        keys = self._indexes[name].get(value, set())
        return [self._items[k] for k in sorted(keys)]

    def add_handler(
        self,
        on_add: AddHandler | None = None,
        on_update: UpdateHandler | None = None,
        on_delete: DeleteHandler | None = None,
    ) -> None:
        """Register event handlers.  If the cache already synced, on_add is called for every
        cached object first, so a late subscriber sees the same state as an early one."""
        handler = _Handler(on_add, on_update, on_delete)
        self._handlers.append(handler)
        if self._synced and on_add is not None:
            for key in sorted(self._items):
                self._call(on_add, self._items[key])

    # -- index and cache maintenance ---------------------------------------------------

    def _index_one(self, name: str, key: CacheKey, obj: Object) -> None:
        try:
            values = list(self._index_funcs[name](obj))
        except Exception:
            self.log.failure("index {index} failed for {key}", index=name, key=key)
            return
        idx = self._indexes[name]
        for v in values:
            idx.setdefault(v, set()).add(key)

    def _unindex_one(self, key: CacheKey, obj: Object) -> None:
        for name, fn in self._index_funcs.items():
            try:
                values = list(fn(obj))
            except Exception:
                values = [v for v, ks in self._indexes[name].items() if key in ks]
            idx = self._indexes[name]
            for v in values:
                keys = idx.get(v)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del idx[v]

    def _store_obj(self, key: CacheKey, obj: Object) -> Object | None:
        old = self._items.get(key)
        if old is not None:
            self._unindex_one(key, old)
        self._items[key] = obj
        for name in self._index_funcs:
            self._index_one(name, key, obj)
        return old

    def _remove_obj(self, key: CacheKey) -> Object | None:
        old = self._items.pop(key, None)
        if old is not None:
            self._unindex_one(key, old)
        return old

    def _call(self, fn: Callable[..., object], *args: Object) -> None:
        try:
            fn(*args)
        except Exception:
            self.log.failure(
                "informer {informer} handler {handler} failed", informer=self.name, handler=fn
            )

    def _emit_add(self, obj: Object) -> None:
        for h in list(self._handlers):
            if h.on_add is not None:
                self._call(h.on_add, obj)

    def _emit_update(self, old: Object, new: Object) -> None:
        for h in list(self._handlers):
            if h.on_update is not None:
                self._call(h.on_update, old, new)

    def _emit_delete(self, obj: Object) -> None:
        for h in list(self._handlers):
            if h.on_delete is not None:
                self._call(h.on_delete, obj)

    def _apply(self, event: WatchEvent) -> None:
        """Fold one watch event into the cache and notify handlers."""
        rv = _resource_version(event.object)
        if rv:
            self.resource_version = rv
        if event.type == BOOKMARK:
            return
        obj = copy.deepcopy(event.object)
        key = cache_key(obj)
        if event.type in (ADDED, MODIFIED):
            old = self._store_obj(key, obj)
            if old is None:
                self._emit_add(obj)
            else:
                self._emit_update(old, obj)
        elif event.type == DELETED:
            self._remove_obj(key)
            self._emit_delete(obj)
        else:
            self.log.warn(
                "informer {informer} ignored unknown watch event type {type}",
                informer=self.name, type=event.type,
            )

    def _replace(self, listing: ResourceList) -> None:
        """Make the cache equal to a (re)list, emitting the difference as events."""
        fresh: dict[CacheKey, Object] = {}
        for item in listing.items:
            obj = copy.deepcopy(item)
            fresh[cache_key(obj)] = obj
        for key in sorted(set(self._items) - set(fresh)):
            old = self._remove_obj(key)
            if old is not None:
                self._emit_delete(old)
        for key in sorted(fresh):
            obj = fresh[key]
            old = self._items.get(key)
            if old is None:
                self._store_obj(key, obj)
                self._emit_add(obj)
            elif _resource_version(old) != _resource_version(obj) or old != obj:
                self._store_obj(key, obj)
                self._emit_update(old, obj)
        self.resource_version = listing.resource_version

    # -- lifecycle: list, watch, relist, reconnect -------------------------------------

    def startService(self) -> None:
        super().startService()
        self._running = True
        self._generation += 1
        self._attempt = 0
        self._list(self._generation)
        if self.resync_period:
            self._schedule_resync()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._running = False
        self._generation += 1
        for timer in (self._timer, self._resync_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._resync_timer = None
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.stop()
        return succeed(None)

    def _list(self, gen: int) -> None:
        d = self.store.list(self.kind, namespace=self.namespace, label_selector=self.label_selector)
        d.addCallbacks(self._listed, self._list_failed, callbackArgs=(gen,), errbackArgs=(gen,))

    def _listed(self, listing: ResourceList, gen: int) -> None:
        if gen != self._generation:
            return
        self._attempt = 0
        self.stats.lists += 1
        self._recovered()
        self._replace(listing)
        if not self._synced:
            self._synced = True
            waiters, self._sync_waiters = self._sync_waiters, []
            for d in waiters:
                d.callback(None)
        self._start_watch(gen)

    def _list_failed(self, failure: Failure, gen: int) -> None:
        if gen != self._generation:
            return
        self.stats.errors += 1
        self._failed("list", failure)
        self._retry_later(gen, self._list)

    def _start_watch(self, gen: int) -> None:
        d = self.store.watch(
            self.kind,
            lambda ev: self._on_event(ev, gen),
            namespace=self.namespace,
            resource_version=self.resource_version,
            label_selector=self.label_selector,
            bookmarks=True,
        )
        d.addCallbacks(self._watching, self._watch_ended, callbackArgs=(gen,), errbackArgs=(gen,))

    def _on_event(self, event: WatchEvent, gen: int) -> None:
        if gen != self._generation:
            return
        self._attempt = 0  # the connection works again
        self._apply(event)

    def _watching(self, watch: IWatch, gen: int) -> None:
        if gen != self._generation:
            watch.stop()
            return
        self._watch = watch
        self._recovered()
        watch.done.addCallbacks(
            self._watch_stopped, self._watch_ended, callbackArgs=(gen,), errbackArgs=(gen,)
        )

    def _watch_stopped(self, _: object, gen: int) -> None:
        # stop() was called by us (stopService) or the store closed the watch cleanly:
        # in the latter case keep watching from where we are.
        if gen != self._generation:
            return
        self._watch = None
        self.stats.watch_restarts += 1
        self._start_watch(gen)

    def _watch_ended(self, failure: Failure, gen: int) -> None:
        if gen != self._generation:
            return
        self._watch = None
        if failure.check(Gone):
            self.log.info(
                "informer {informer} watch expired at {rv}; relisting",
                informer=self.name, rv=self.resource_version,
            )
            self.stats.relists += 1
            self._list(gen)
            return
        self.stats.errors += 1
        self.stats.watch_restarts += 1
        self._failed("watch", failure)
        # Resume from the last resourceVersion; if that is too old the store says Gone.
        self._retry_later(gen, self._start_watch)

    def _failed(self, what: str, failure: Failure) -> None:
        """One error line per outage; the retries after it are debug lines."""
        first = self._failing_since is None
        if first:
            self._failing_since = self.clock.seconds()
        self.log.emit(
            LogLevel.error if first else LogLevel.debug,
            "informer {informer} {what} failed: {error}; serving cached data"
            + ("" if first else " (still failing)"),
            informer=self.name, what=what, error=failure.getErrorMessage(),
        )

    def _recovered(self) -> None:
        if self._failing_since is None:
            return
        self.log.info("informer {informer} reconnected after {seconds:.1f}s", informer=self.name,
                      seconds=self.clock.seconds() - self._failing_since, attempts=self._attempt)
        self._failing_since = None

    def _retry_later(self, gen: int, what: Callable[[int], None]) -> None:
        delay = self.backoff.delay(self._attempt, self._random())
        self._attempt += 1
        self.log.debug(
            "informer {informer} retrying in {delay:.2f}s", informer=self.name, delay=delay
        )

        def fire() -> None:
            self._timer = None
            if gen == self._generation:
                what(gen)

        self._timer = self.clock.callLater(delay, fire)

    def _schedule_resync(self) -> None:
        assert self.resync_period
        self._resync_timer = self.clock.callLater(self.resync_period, self._resync)

    def _resync(self) -> None:
        """Re-deliver every cached object as an update (old is new), so controllers get a
        periodic level-triggered pass even without changes."""
        self._resync_timer = None
        if not self._running:
            return
        if self._synced:
            for key in sorted(self._items):
                obj = self._items[key]
                self._emit_update(obj, obj)
        self._schedule_resync()

    def debug_state(self) -> dict[str, Any]:
        """A small summary for health endpoints and logs."""
        return {
            "kind": self.kind.kind,
            "namespace": self.namespace,
            "synced": self._synced,
            "objects": len(self._items),
            "resourceVersion": self.resource_version,
            "watching": self._watch is not None,
        }
