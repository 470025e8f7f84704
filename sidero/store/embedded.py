# -*- test-case-name: tests.store.test_embedded -*-
"""The embedded resource store: Kubernetes API semantics on a local SQLite file.

Used when sidero runs without a Kubernetes cluster.  Controllers must not be able to tell it
from the API server, so it keeps the API server's rules (resourceVersion preconditions, status
subresource, generation, finalizers, background garbage collection, watch semantics) and its
error wording.

Threads: every SQLite call, and each write's whole read-admit-check-write sequence, runs in
one dedicated thread, so writes are serialised without locks and a precondition is checked in
the same transaction that writes.  The admission hook is therefore called in that thread; it
must be pure (defaulting and validation), which L{IAdmission} implementations are.  Results,
watch fan-out and garbage collection happen on the reactor thread.

Database calls get no time limit on purpose: a write's result must always be published, in
order, or watchers would see a gap.
"""

from __future__ import annotations

import copy
import datetime
import json
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from sidero.api import registry
from sidero.api.registry import ResourceType
from sidero.api.selectors import FieldSelector, LabelSelector, SelectorError
from sidero.store import _objects as objects
from sidero.store import errors
from sidero.store._sqlite import Database, StoredEvent
from sidero.store._watch import Hub, Watcher
from sidero.store.interfaces import (
    ADDED,
    MODIFIED,
    IAdmission,
    IResourceStore,
    IWatch,
    ResourceList,
    WatchEvent,
)
from sidero.store.kinds import kind_of, namespace_for
from sidero.store.merge import merge_patch
from sidero.threads import ThreadPoolService

Object = dict[str, Any]
T = TypeVar("T")

DEFAULT_EVENT_LOG_SIZE = 10_000
DEFAULT_BOOKMARK_INTERVAL = 60.0
#: kube-apiserver's --event-ttl default: Events vanish an hour after their last write.
DEFAULT_EVENT_TTL = 3600.0

_BY_RESOURCE = {rt.resource: rt for rt in registry.ALL_KINDS}


@dataclass
class _Written:
    """What a write transaction hands back to the reactor thread."""

    value: Object | None
    events: list[StoredEvent] = field(default_factory=list)
    # uids whose dependents must be garbage collected (removed objects, absent owners).
    collect: list[str] = field(default_factory=list)


def _last_written(event: Object) -> float:
    """When an Event was last written, from the timestamps writers set (0 when none parse)."""
    latest = 0.0
    meta = event.get("metadata") or {}
    for value in (event.get("lastTimestamp"), event.get("eventTime"), event.get("firstTimestamp"),
                  meta.get("creationTimestamp") if isinstance(meta, dict) else None):
        if isinstance(value, str) and value:
            try:
                moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=datetime.UTC)
            latest = max(latest, moment.timestamp())
    return latest


def _copy_json(obj: Any, what: str = "object") -> Any:
    """A private deep copy that is also proof the value is JSON (and so storable)."""
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as e:
        raise errors.BadRequest(f"the {what} is not valid JSON: {e}") from None


def _selectors(label_selector: str | None, field_selector: str | None) -> tuple[LabelSelector, FieldSelector]:
    try:
        return LabelSelector.parse(label_selector), FieldSelector.parse(field_selector)
    except SelectorError as e:
        raise errors.BadRequest(str(e)) from None


@implementer(IResourceStore)
class EmbeddedStore:
    """L{IResourceStore} on SQLite (C{path} a file, or C{":memory:"} for tests).

    @param event_log_size: how many past changes are kept for watches that resume from a
        resourceVersion; older ones end such a watch with L{errors.Gone}.
    @param bookmark_interval: seconds between BOOKMARK events of watches that asked for them.
    @param pool: a thread pool to run SQLite in (tests pass an inline one); it must run one
        call at a time.  By default the store owns a single-thread pool.
    @param event_ttl: seconds after its last write an Event is deleted (as the API server's
        --event-ttl), so a long-running install does not grow without bound; 0 keeps them.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        path: str,
        admission: IAdmission | None = None,
        *,
        event_log_size: int = DEFAULT_EVENT_LOG_SIZE,
        bookmark_interval: float = DEFAULT_BOOKMARK_INTERVAL,
        pool: ThreadPool | None = None,
        event_ttl: float = DEFAULT_EVENT_TTL,
    ) -> None:
        self._reactor = reactor
        self.path = path
        self._admission = admission
        self._db = Database(path, event_log_size)
        self._bookmark_interval = bookmark_interval
        self._service: ThreadPoolService | None = None
        if pool is None:
            self._service = ThreadPoolService(reactor, "store", max_threads=1, min_threads=1)
            pool = self._service.pool
        self._pool = pool
        self._hub = Hub()
        self._collector = _Collector(self)
        self._open = False
        self.event_ttl = event_ttl
        self._expiry: LoopingCall | None = None

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        """Open (creating if needed) the database and resume interrupted garbage collection."""
        if self._open:
            return
        if self._service is not None and not self._service.running:
            self._service.startService()
        try:
            await self._run(self._db.open)
        except BaseException:
            # A database that cannot be opened must not leave our thread behind.
            if self._service is not None and self._service.running:
                await self._service.stopService()  # type: ignore[misc]
            raise
        self._hub.rv = self._db.rv
        self._open = True
        self._collector.start()
        for uid in await self._run(self._db.absent_owner_uids):
            self._collector.enqueue(uid)
        if self.event_ttl > 0:
            self._expiry = LoopingCall(self._expire_events)
            self._expiry.clock = self._reactor
            self._expiry.start(min(self.event_ttl / 6, 600.0), now=True)
        self.log.info("resource store open at {path}, resourceVersion {rv}", path=self.path, rv=self._db.rv)

    async def close(self) -> None:
        """Stop garbage collection and watches (they end with Unavailable), then close the file."""
        if not self._open:
            return
        self._open = False
        if self._expiry is not None and self._expiry.running:
            self._expiry.stop()
        await self._collector.stop()
        self._hub.fail_all(errors.Unavailable("the resource store is closed"))
        await self._run(self._db.close)
        if self._service is not None and self._service.running:
            await self._service.stopService()  # type: ignore[misc]

    @property
    def resource_version(self) -> str:
        """The resourceVersion of the last change published to watchers."""
        return str(self._hub.rv)

    def gc_idle(self) -> Deferred[None]:
        """Fires once background garbage collection has nothing left to do."""
        return self._collector.idle()

    def _expire_events(self) -> Deferred[None]:
        """Delete Events whose last write is older than the TTL (one transaction each)."""
        cutoff = self._now() - self.event_ttl
        rt = registry.EVENT

        async def expire() -> None:
            events, _ = await self._run(self._db.list_objects, rt.resource, None)
            expired = 0
            for event in events:
                if not self._open:
                    return
                if _last_written(event) >= cutoff:
                    continue
                meta = event.get("metadata") or {}
                try:
                    await self._write(self._tx_delete, rt, str(meta.get("namespace") or ""),
                                      str(meta.get("name") or ""), meta.get("resourceVersion"),
                                      self._now())
                    expired += 1
                except (errors.NotFound, errors.Conflict):
                    continue  # deleted or rewritten meanwhile: a rewrite renews its TTL
            if expired:
                self.log.debug("expired {count} events older than {ttl:.0f}s", count=expired, ttl=self.event_ttl)

        def failed(f: Failure) -> None:
            self.log.failure("expiring old events failed", f)

        return Deferred.fromCoroutine(expire()).addErrback(failed)

    # -- plumbing ---------------------------------------------------------------------------

    def _run(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def _check_open(self) -> None:
        if not self._open:
            raise errors.Unavailable("the resource store is not open")

    def _write(self, f: Callable[..., _Written], *args: Any) -> Deferred[Object | None]:
        """Run a write transaction; publish its changes before anyone else sees the result."""
        published = self._run(f, *args).addCallback(self._after_write)
        outer: Deferred[Object | None] = Deferred()
        # A caller cancelling its Deferred must not stop the changes from being published.
        published.chainDeferred(outer)
        return outer

    def _after_write(self, written: _Written) -> Object | None:
        for event in written.events:
            self._hub.publish(event)
        for uid in written.collect:
            self._collector.enqueue(uid)
        return written.value

    def _admit(self, rt: ResourceType, operation: str, new: Object | None, old: Object | None) -> Object | None:
        if self._admission is None:
            return new
        result = self._admission.admit(rt, operation, copy.deepcopy(new), copy.deepcopy(old))
        if operation == "DELETE":
            return None
        if result is None:
            return new
        if not isinstance(result, dict):
            raise errors.StoreError(f"admission returned {type(result).__name__} for {rt.kind}")
        return result

    def _now(self) -> float:
        return float(self._reactor.seconds())

    # -- reads ------------------------------------------------------------------------------

    def get(self, kind: ResourceType, name: str, namespace: str | None = None) -> Deferred[Object]:
        try:
            self._check_open()
        except errors.StoreError as e:
            return fail(e)
        ns = namespace_for(kind, namespace)

        def found(obj: Object | None) -> Object:
            if obj is None:
                raise errors.not_found(kind.resource, name)
            return obj

        return self._run(self._db.get, kind.resource, ns, name).addCallback(found)

    def list(
        self,
        kind: ResourceType,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> Deferred[ResourceList]:
        try:
            self._check_open()
            labels, fields = _selectors(label_selector, field_selector)
        except errors.StoreError as e:
            return fail(e)
        ns = namespace if kind.namespaced and namespace else None

        def listed(result: tuple[list[Object], int]) -> ResourceList:
            items, rv = result
            if not labels.empty or not fields.empty:
                items = [o for o in items
                         if labels.matches((o.get("metadata") or {}).get("labels")) and fields.matches(o)]
            return ResourceList(items=items, resource_version=str(rv), kind=kind)

        return self._run(self._db.list_objects, kind.resource, ns).addCallback(listed)

    # -- writes -----------------------------------------------------------------------------

    def create(self, obj: Object) -> Deferred[Object]:
        try:
            self._check_open()
            payload = _copy_json(obj)
            rt = kind_of(payload)
        except errors.StoreError as e:
            return fail(e)
        return self._write(self._tx_create, rt, payload, self._now())  # type: ignore[return-value]

    def update(self, obj: Object) -> Deferred[Object]:
        return self._replace(obj, status=False)

    def update_status(self, obj: Object) -> Deferred[Object]:
        return self._replace(obj, status=True)

    def _replace(self, obj: Object, status: bool) -> Deferred[Object]:
        """update (metadata and spec) or update_status (status only), as one transaction."""
        try:
            self._check_open()
            payload = _copy_json(obj)
            rt = kind_of(payload)
            name, ns = self._identity(rt, payload)
        except errors.StoreError as e:
            return fail(e)
        return self._write(self._tx_update, rt, ns, name, payload, status)  # type: ignore[return-value]

    def patch(
        self,
        kind: ResourceType,
        name: str,
        patch: Object,
        namespace: str | None = None,
        subresource: str | None = None,
    ) -> Deferred[Object]:
        try:
            self._check_open()
            if not isinstance(patch, dict):
                raise errors.BadRequest("a merge patch must be a JSON object")
            if subresource not in (None, "", "status"):
                raise errors.NotFound("the server could not find the requested resource")
            payload = _copy_json(patch, "patch")
        except errors.StoreError as e:
            return fail(e)
        ns = namespace_for(kind, namespace)
        return self._write(  # type: ignore[return-value]
            self._tx_patch, kind, ns, name, payload, subresource == "status")

    def delete(
        self,
        kind: ResourceType,
        name: str,
        namespace: str | None = None,
        resource_version: str | None = None,
    ) -> Deferred[Object | None]:
        try:
            self._check_open()
            if resource_version:
                objects.parse_resource_version(resource_version)
        except errors.StoreError as e:
            return fail(e)
        ns = namespace_for(kind, namespace)
        return self._write(self._tx_delete, kind, ns, name, resource_version or None, self._now())

    def _identity(self, rt: ResourceType, obj: Object) -> tuple[str, str]:
        meta = objects.metadata_of(obj)
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            raise errors.invalid(rt.kind, rt.group, "", [{
                "field": "metadata.name", "message": "Required value: name is required",
                "reason": "FieldValueRequired"}])
        return name, namespace_for(rt, meta.get("namespace"))

    # -- transactions (database thread) -----------------------------------------------------

    def _tx_create(self, rt: ResourceType, obj: Object, now: float) -> _Written:
        db = self._db
        meta = objects.metadata_of(obj)
        ns = namespace_for(rt, meta.get("namespace"))
        with db.transaction():
            name = meta.get("name") or ""
            if not name and meta.get("generateName"):
                base = str(meta["generateName"])
                for _ in range(8):
                    name = objects.generate_name(base)
                    if db.get(rt.resource, ns, name) is None:
                        break
                else:
                    raise errors.already_exists(rt.resource, name)
            prepared = objects.prepare_create(rt, obj, now=now, uid=str(uuid.uuid4()), name=name)
            if db.get(rt.resource, ns, name) is not None:
                raise errors.already_exists(rt.resource, name)
            admitted = self._admit(rt, "CREATE", prepared, None)
            assert admitted is not None
            new = objects.reassert_identity(admitted, prepared)
            owners = objects.owner_uids(new)
            event = db.put(rt.resource, ns, name, new, ADDED, None, owners)
            absent = [u for u in owners if not db.uid_exists(u)]
        return _Written(new, [event], absent)

    def _tx_update(self, rt: ResourceType, ns: str, name: str, obj: Object, status: bool) -> _Written:
        with self._db.transaction():
            old = self._load(rt, ns, name)
            return self._commit(rt, ns, old, obj, status)

    def _tx_patch(self, rt: ResourceType, ns: str, name: str, patch: Object, status: bool) -> _Written:
        with self._db.transaction():
            old = self._load(rt, ns, name)
            pmeta = patch.get("metadata")
            if isinstance(pmeta, dict) and pmeta.get("resourceVersion") is not None:
                wanted = str(pmeta["resourceVersion"])
                objects.parse_resource_version(wanted)
                if wanted != old["metadata"]["resourceVersion"]:
                    raise errors.conflict(rt.resource, name)
            merged = merge_patch(old, patch)
            if not isinstance(merged.get("metadata"), dict):
                merged["metadata"] = {}
            merged["apiVersion"], merged["kind"] = old["apiVersion"], old["kind"]
            merged["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
            return self._commit(rt, ns, old, merged, status)

    def _tx_delete(self, rt: ResourceType, ns: str, name: str, resource_version: str | None,
                   now: float) -> _Written:
        with self._db.transaction():
            old = self._load(rt, ns, name)
            if resource_version is not None and resource_version != old["metadata"]["resourceVersion"]:
                raise errors.conflict(rt.resource, name)
            self._admit(rt, "DELETE", None, old)
            return self._delete(rt, ns, old, now)

    def _tx_collect(self, rt: ResourceType, ns: str, name: str, now: float) -> _Written:
        """Garbage-collect one dependent: delete it when no owner is left, else drop dangling refs."""
        db = self._db
        with db.transaction():
            old = db.get(rt.resource, ns, name)
            if old is None:
                return _Written(None)
            uids = objects.owner_uids(old)
            dangling = {u for u in uids if not db.uid_exists(u)}
            if not dangling:
                return _Written(None)
            if len(dangling) == len(uids):
                self._admit(rt, "DELETE", None, old)
                return self._delete(rt, ns, old, now)
            # Some owner is still there: only forget the owners that are gone, as the
            # Kubernetes garbage collector patches them away.
            new = copy.deepcopy(old)
            new["metadata"]["ownerReferences"] = [
                r for r in old["metadata"].get("ownerReferences") or []
                if not (isinstance(r, dict) and r.get("uid") in dangling)]
            return self._commit(rt, ns, old, new, False)

    def _load(self, rt: ResourceType, ns: str, name: str) -> Object:
        old = self._db.get(rt.resource, ns, name)
        if old is None:
            raise errors.not_found(rt.resource, name)
        return old

    def _commit(self, rt: ResourceType, ns: str, old: Object, obj: Object, status: bool) -> _Written:
        """Apply an update (or status update) of C{old} by C{obj}, inside a transaction."""
        name = old["metadata"]["name"]
        if status:
            prepared = objects.prepare_status_update(rt, old, obj)
            admitted = self._admit(rt, "UPDATE", prepared, old)
            assert admitted is not None
            new = copy.deepcopy(old)
            if "status" in admitted:
                new["status"] = admitted["status"]
            else:
                new.pop("status", None)
        else:
            prepared = objects.prepare_update(rt, old, obj)
            admitted = self._admit(rt, "UPDATE", prepared, old)
            assert admitted is not None
            new = objects.reassert_identity(admitted, prepared)
            if rt.status_subresource:
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
            objects.bump_generation(rt, old, new)
        if objects.same_object(new, old):
            return _Written(old)
        if objects.should_remove(new):
            event = self._db.remove(rt.resource, ns, name, new, old)
            return _Written(new, [event], [old["metadata"]["uid"]])
        owners = objects.owner_uids(new)
        event = self._db.put(rt.resource, ns, name, new, MODIFIED, old, owners)
        absent = [u for u in owners if u not in objects.owner_uids(old) and not self._db.uid_exists(u)]
        return _Written(new, [event], absent)

    def _delete(self, rt: ResourceType, ns: str, old: Object, now: float) -> _Written:
        name = old["metadata"]["name"]
        if old["metadata"].get("finalizers"):
            new = objects.mark_deleting(rt, old, now)
            if new is None:
                return _Written(old)
            event = self._db.put(rt.resource, ns, name, new, MODIFIED, old, objects.owner_uids(new))
            return _Written(new, [event])
        event = self._db.remove(rt.resource, ns, name, copy.deepcopy(old), old)
        return _Written(None, [event], [old["metadata"]["uid"]])

    # -- watch ------------------------------------------------------------------------------

    def watch(
        self,
        kind: ResourceType,
        callback: Callable[[WatchEvent], object],
        namespace: str | None = None,
        resource_version: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        bookmarks: bool = False,
    ) -> Deferred[IWatch]:
        try:
            self._check_open()
            labels, fields = _selectors(label_selector, field_selector)
            start = None
            if resource_version not in (None, "", "0"):
                start = objects.parse_resource_version(resource_version)
        except errors.StoreError as e:
            return fail(e)
        watcher = Watcher(self._hub, self._reactor, kind, callback, namespace or None, labels, fields,
                          bookmarks, self._bookmark_interval)
        self._hub.add(watcher)
        d: Deferred[Any]
        if start is None:
            ns = namespace if kind.namespaced and namespace else None
            d = self._run(self._db.list_objects, kind.resource, ns)
            d.addCallback(lambda r: watcher.start_from_list(*r))
        else:
            d = self._run(self._db.events_since, kind.resource, start)
            d.addCallback(lambda r: watcher.start_from_events(*r))

        def ended(f: Failure) -> None:
            if not f.check(errors.StoreError):
                self.log.failure("watch of {kind} failed to start", f, kind=kind.resource)
            watcher.fail(f)

        d.addErrback(ended)
        d.addCallback(lambda _: watcher)
        return d

    def watcher_count(self) -> int:
        """Running watches (for tests and metrics)."""
        return self._hub.watcher_count()


class _Collector:
    """Background garbage collection, driven from the reactor after each removal.

    Queue of owner uids whose dependents must be looked at; one dependent is handled per
    write transaction, like the Kubernetes garbage collector's attemptToDelete.
    """

    log = Logger()

    def __init__(self, store: EmbeddedStore) -> None:
        self.store = store
        self._queue: deque[str] = deque()
        self._queued: set[str] = set()
        self._busy = False
        self._waiters: list[Deferred[None]] = []
        self._active = False

    def start(self) -> None:
        self._active = True

    def enqueue(self, uid: str) -> None:
        if not self._active or uid in self._queued:
            return
        self._queue.append(uid)
        self._queued.add(uid)
        if not self._busy:
            self._busy = True
            Deferred.fromCoroutine(self._work())

    async def _work(self) -> None:
        store = self.store
        try:
            while self._queue and self._active:
                uid = self._queue.popleft()
                self._queued.discard(uid)
                try:
                    dependents = await store._run(store._db.dependents, uid)
                except Exception:
                    self.log.failure("garbage collection could not list dependents of {uid}", uid=uid)
                    continue
                for kind, ns, name in dependents:
                    rt = _BY_RESOURCE.get(kind)
                    if rt is None or not self._active:
                        continue
                    try:
                        await store._write(store._tx_collect, rt, ns, name, store._now())
                    except errors.StoreError as e:
                        self.log.warn("garbage collection of {kind} {name} refused: {error}",
                                      kind=kind, name=name, error=e.message)
                    except Exception:
                        self.log.failure("garbage collection of {kind} {name} failed", kind=kind, name=name)
        finally:
            self._busy = False
            if not self._queue or not self._active:
                waiters, self._waiters = self._waiters, []
                for w in waiters:
                    w.callback(None)

    def idle(self) -> Deferred[None]:
        if not self._busy and (not self._queue or not self._active):
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    async def stop(self) -> None:
        """Finish the dependent in hand, then stop; the rest is found again at the next open."""
        self._active = False
        if self._busy:
            await self.idle()
        self._queue.clear()
        self._queued.clear()
