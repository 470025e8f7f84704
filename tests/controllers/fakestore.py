"""A small synchronous in-memory IResourceStore for controller-runtime unit tests.

Every call returns an already-fired Deferred (unless a test arms a failure or holds a call),
and watches deliver events synchronously, so tests run under L{SynchronousTestCase} with a
L{task.Clock}.  It keeps a short event history so a watch can resume from a resourceVersion,
and L{compact} forgets it so that resuming fails with L{Gone}, as the real stores do.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from sidero.api.registry import ResourceType, by_api_version_kind
from sidero.api.selectors import LabelSelector
from sidero.store import errors
from sidero.store.interfaces import (
    ADDED,
    DELETED,
    MODIFIED,
    IResourceStore,
    IWatch,
    Object,
    ResourceList,
    WatchEvent,
)


@implementer(IWatch)
class FakeWatch:
    def __init__(
        self, store: FakeStore, kind: ResourceType, callback: Callable[[WatchEvent], object],
        namespace: str | None, selector: LabelSelector,
    ) -> None:
        self.store = store
        self.kind = kind
        self.callback = callback
        self.namespace = namespace
        self.selector = selector
        self.done: Deferred[None] = Deferred()
        self.active = True

    def matches(self, obj: Object) -> bool:
        meta = obj["metadata"]
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        return self.selector.matches(meta.get("labels") or {})

    def deliver(self, event: WatchEvent) -> None:
        if self.active and self.matches(event.object):
            self.callback(WatchEvent(event.type, copy.deepcopy(event.object)))

    def stop(self) -> None:
        if self.active:
            self.active = False
            self.store.watches.remove(self)
            self.done.callback(None)

    def end(self, error: Exception) -> None:
        if self.active:
            self.active = False
            self.store.watches.remove(self)
            self.done.errback(error)


@implementer(IResourceStore)
class FakeStore:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], Object] = {}
        self.rv = 0
        self.history: list[tuple[int, str, WatchEvent]] = []  # (rv, kind name, event)
        self.compacted = 0
        self.watches: list[FakeWatch] = []
        self.list_calls = 0
        self.watch_calls: list[str | None] = []
        self.fail_lists: list[Exception] = []
        self.fail_watches: list[Exception] = []

    # -- test controls --------------------------------------------------------------

    def compact(self) -> None:
        """Forget the event history: resuming a watch from an older resourceVersion is Gone."""
        self.compacted = self.rv
        self.history.clear()

    def end_watches(self, error: Exception) -> None:
        for w in list(self.watches):
            w.end(error)

    # -- helpers --------------------------------------------------------------------

    def _kind(self, obj: Object) -> ResourceType:
        return by_api_version_kind(obj["apiVersion"], obj["kind"])

    def _key(self, kind: ResourceType, name: str, namespace: str | None) -> tuple[str, str, str]:
        return (kind.kind, (namespace or "") if kind.namespaced else "", name)

    def _emit(self, kind: ResourceType, type_: str, obj: Object) -> None:
        ev = WatchEvent(type_, copy.deepcopy(obj))
        self.history.append((self.rv, kind.kind, ev))
        for w in list(self.watches):
            if w.kind == kind:
                w.deliver(ev)

    def _bump(self, obj: Object) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)

    # -- IResourceStore -------------------------------------------------------------

    def get(self, kind: ResourceType, name: str, namespace: str | None = None) -> Deferred[Object]:
        obj = self.objects.get(self._key(kind, name, namespace))
        if obj is None:
            return fail(errors.not_found(kind.resource, name))
        return succeed(copy.deepcopy(obj))

    def list(
        self, kind: ResourceType, namespace: str | None = None,
        label_selector: str | None = None, field_selector: str | None = None,
    ) -> Deferred[ResourceList]:
        self.list_calls += 1
        if self.fail_lists:
            return fail(self.fail_lists.pop(0))
        sel = LabelSelector.parse(label_selector)
        items = [
            copy.deepcopy(o) for (k, ns, _), o in sorted(self.objects.items())
            if k == kind.kind and (namespace is None or ns == namespace)
            and sel.matches(o["metadata"].get("labels") or {})
        ]
        return succeed(ResourceList(items, str(self.rv), kind))

    def create(self, obj: Object) -> Deferred[Object]:
        kind = self._kind(obj)
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        key = self._key(kind, meta["name"], meta.get("namespace"))
        if key in self.objects:
            return fail(errors.already_exists(kind.resource, meta["name"]))
        meta.setdefault("uid", f"uid-{meta['name']}")
        meta["generation"] = 1
        self._bump(obj)
        self.objects[key] = obj
        self._emit(kind, ADDED, obj)
        return succeed(copy.deepcopy(obj))

    def update(self, obj: Object) -> Deferred[Object]:
        kind = self._kind(obj)
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        key = self._key(kind, meta["name"], meta.get("namespace"))
        cur = self.objects.get(key)
        if cur is None:
            return fail(errors.not_found(kind.resource, meta["name"]))
        if meta.get("resourceVersion") and meta["resourceVersion"] != cur["metadata"]["resourceVersion"]:
            return fail(errors.conflict(kind.resource, meta["name"]))
        self._bump(obj)
        self.objects[key] = obj
        self._emit(kind, MODIFIED, obj)
        return succeed(copy.deepcopy(obj))

    def update_status(self, obj: Object) -> Deferred[Object]:
        return self.update(obj)

    def patch(
        self, kind: ResourceType, name: str, patch: Object, namespace: str | None = None,
        subresource: str | None = None,
    ) -> Deferred[Object]:
        key = self._key(kind, name, namespace)
        cur = self.objects.get(key)
        if cur is None:
            return fail(errors.not_found(kind.resource, name))
        new = _merge(copy.deepcopy(cur), patch)
        new["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"]
        return self.update(new)

    def delete(
        self, kind: ResourceType, name: str, namespace: str | None = None,
        resource_version: str | None = None,
    ) -> Deferred[Object | None]:
        key = self._key(kind, name, namespace)
        cur = self.objects.pop(key, None)
        if cur is None:
            return fail(errors.not_found(kind.resource, name))
        self._bump(cur)
        self._emit(kind, DELETED, cur)
        return succeed(None)

    def watch(
        self, kind: ResourceType, callback: Callable[[WatchEvent], object],
        namespace: str | None = None, resource_version: str | None = None,
        label_selector: str | None = None, field_selector: str | None = None,
        bookmarks: bool = False,
    ) -> Deferred[IWatch]:
        self.watch_calls.append(resource_version)
        if self.fail_watches:
            return fail(self.fail_watches.pop(0))
        w = FakeWatch(self, kind, callback, namespace, LabelSelector.parse(label_selector))
        if resource_version:
            if int(resource_version) < self.compacted:
                return fail(errors.Gone(f"too old resource version: {resource_version}"))
            self.watches.append(w)
            for rv, k, ev in list(self.history):
                if k == kind.kind and rv > int(resource_version):
                    w.deliver(ev)
        else:
            self.watches.append(w)
            for (k, _, _), o in sorted(self.objects.items()):
                if k == kind.kind:
                    w.deliver(WatchEvent(ADDED, o))
        return succeed(w)


def _merge(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if not isinstance(target, dict):
        target = {}
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        else:
            target[k] = _merge(target.get(k), v)
    return target
