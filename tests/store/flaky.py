"""A real store that fails, hangs, races or drops its watches when the test says so.

Unit tests of what sits on a store (informers, the controller runtime, the lease elector) run
against the real embedded store (L{tests.store.inline.inline_store}) wrapped in L{FlakyStore},
so the store's semantics (resourceVersions, watch resumption, L{Gone}, deletes, patches) are
the product's own and cannot drift from a fake's; only the faults are staged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure
from zope.interface import implementer

from sidero.api.registry import ResourceType
from sidero.store.interfaces import IResourceStore, IWatch, WatchEvent


@implementer(IWatch)
class FlakyWatch:
    """A watch of the inner store that the test can end with an error (L{FlakyStore.end_watches})."""

    def __init__(self, store: FlakyStore) -> None:
        self.store = store
        self.inner: IWatch | None = None
        self.done: Deferred[None] = Deferred()

    def started(self, inner: IWatch) -> FlakyWatch:
        self.inner = inner
        self.store.watches.append(self)
        inner.done.addBoth(self._inner_done)
        return self

    def _inner_done(self, result: None | Failure) -> None:
        if not self.done.called:
            self._forget()
            if isinstance(result, Failure):
                self.done.errback(result)
            else:
                self.done.callback(None)

    def _forget(self) -> None:
        if self in self.store.watches:
            self.store.watches.remove(self)

    def stop(self) -> None:
        assert self.inner is not None
        self.inner.stop()

    def end(self, error: Exception) -> None:
        """End as a backend going away would: no more events, C{done} fails with C{error}."""
        if self.done.called:
            return
        self._forget()
        self.done.errback(error)
        assert self.inner is not None
        self.inner.stop()


@implementer(IResourceStore)
class FlakyStore:
    """Passes calls to a real store, unless the test makes them fail, hang or race.

    @ivar calls: the name of every call but C{watch}, in order.
    @ivar fail_lists, fail_watches: the next lists (watches) fail with these errors, in order.
    @ivar watch_calls: the resourceVersion each watch was asked to start from.
    @ivar watches: the watches running now.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.error: Callable[[], Exception] | None = None  # every call fails with error()
        self.hang = False  # every call's Deferred never fires
        self.create_error: Callable[[], Exception] | None = None
        self.before_update: Callable[[], object] | None = None  # runs once, before the next update
        self.calls: list[str] = []
        self.fail_lists: list[Exception] = []
        self.fail_watches: list[Exception] = []
        self.watch_calls: list[str | None] = []
        self.watches: list[FlakyWatch] = []

    @property
    def list_calls(self) -> int:
        return self.calls.count("list")

    def end_watches(self, error: Exception) -> None:
        """End every running watch with C{error} (as an API server restart would)."""
        for w in list(self.watches):
            w.end(error)

    def _pass(self, name: str, *args: Any, **kwargs: Any) -> Deferred[Any]:
        self.calls.append(name)
        if self.hang:
            return Deferred()
        if self.error is not None:
            return fail(self.error())
        if name == "list" and self.fail_lists:
            return fail(self.fail_lists.pop(0))
        if name == "create" and self.create_error is not None:
            return fail(self.create_error())
        if name == "update" and self.before_update is not None:
            hook, self.before_update = self.before_update, None
            hook()
        result: Deferred[Any] = getattr(self.inner, name)(*args, **kwargs)
        return result

    def get(self, *a: Any, **kw: Any) -> Deferred[Any]:
        return self._pass("get", *a, **kw)

    def list(self, *a: Any, **kw: Any) -> Deferred[Any]:
        return self._pass("list", *a, **kw)

    def create(self, *a: Any, **kw: Any) -> Deferred[Any]:
        return self._pass("create", *a, **kw)

    def update(self, *a: Any, **kw: Any) -> Deferred[Any]:
        return self._pass("update", *a, **kw)

    def update_status(self, *a: Any, **kw: Any) -> Deferred[Any]:
        return self._pass("update_status", *a, **kw)

    def patch(self, *a: Any, **kw: Any) -> Deferred[Any]:
        return self._pass("patch", *a, **kw)

    def delete(self, *a: Any, **kw: Any) -> Deferred[Any]:
        return self._pass("delete", *a, **kw)

    def watch(self, kind: ResourceType, callback: Callable[[WatchEvent], object],
              namespace: str | None = None, resource_version: str | None = None,
              label_selector: str | None = None, field_selector: str | None = None,
              bookmarks: bool = False) -> Deferred[IWatch]:
        self.watch_calls.append(resource_version)
        if self.fail_watches:
            return fail(self.fail_watches.pop(0))
        watch = FlakyWatch(self)

        def deliver(event: WatchEvent) -> object:
            return None if watch.done.called else callback(event)

        d: Deferred[IWatch] = self.inner.watch(kind, deliver, namespace, resource_version,
                                               label_selector, field_selector, bookmarks)
        return d.addCallback(watch.started)
