# -*- test-case-name: tests.controllers.test_events -*-
"""Kubernetes core/v1 Events written through the resource store (spec §0.4).

The recorder behaves like client-go's: the same event (object, type, reason, message) seen
again bumps C{count} and C{lastTimestamp} of the Event already written instead of creating
another, and each involved object has a token bucket (burst 25, one token per 5 minutes) so a
reconcile loop stuck on a failing BMC cannot flood the store.  Recording never fails the
caller: a write error is logged and counted, because events are advisory.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from sidero.api.conditions import rfc3339
from sidero.api.registry import EVENT
from sidero.store.errors import AlreadyExists, NotFound, StoreError
from sidero.store.interfaces import IResourceStore, Object

NORMAL = "Normal"
WARNING = "Warning"

#: Component name of the controllers of sidero-controller-manager (spec §0.4).
CONTROLLER_MANAGER = "sidero-controller-manager"
#: the reporting component of the Cluster API provider's controllers (spec §0.4).
CAPS_CONTROLLER_MANAGER = "caps-controller-manager"

#: Where Events about cluster-scoped objects go (client-go uses the default namespace).
DEFAULT_EVENT_NAMESPACE = "default"

DEFAULT_BURST = 25
DEFAULT_REFILL_SECONDS = 300.0
DEFAULT_CACHE_SIZE = 4096

DedupKey = tuple[str, str, str, str, str, str]


@dataclass
class _Bucket:
    tokens: float
    stamp: float


@dataclass
class _Written:
    namespace: str
    name: str
    count: int


def _meta(obj: Object) -> dict[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def involved_object(obj: Object) -> dict[str, str]:
    """The C{ObjectReference} of C{obj} as an Event's C{involvedObject}."""
    meta = _meta(obj)
    ref = {
        "apiVersion": str(obj.get("apiVersion") or ""),
        "kind": str(obj.get("kind") or ""),
        "name": str(meta.get("name") or ""),
    }
    for field in ("namespace", "uid", "resourceVersion"):
        if meta.get(field):
            ref[field] = str(meta[field])
    return ref


def event_namespace(obj: Object) -> str:
    """Namespaced objects get their Events beside them; cluster-scoped ones in C{default}."""
    ns = _meta(obj).get("namespace")
    return str(ns) if ns else DEFAULT_EVENT_NAMESPACE


class EventRecorder:
    """Write de-duplicated, rate-limited Events about objects through C{store}.

    @ivar dropped: events not written because their object's bucket was empty.
    @ivar failed: events whose write failed.
    """

    log = Logger()

    def __init__(
        self,
        store: IResourceStore,
        clock: IReactorTime,
        component: str = CONTROLLER_MANAGER,
        *,
        host: str = "",
        burst: int = DEFAULT_BURST,
        refill_seconds: float = DEFAULT_REFILL_SECONDS,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self.store = store
        self.clock = clock
        self.component = component
        self.host = host
        self.burst = burst
        self.refill_seconds = refill_seconds
        self.cache_size = cache_size
        self.dropped = 0
        self.failed = 0
        self._written: OrderedDict[DedupKey, _Written] = OrderedDict()
        self._chains: dict[DedupKey, Deferred[Object | None]] = {}
        self._buckets: dict[tuple[str, str, str, str], _Bucket] = {}
        self._seq = 0

    # -- public -----------------------------------------------------------------------------

    def normal(self, obj: Object, reason: str, message: str) -> Deferred[Object | None]:
        return self.event(obj, NORMAL, reason, message)

    def warning(self, obj: Object, reason: str, message: str) -> Deferred[Object | None]:
        return self.event(obj, WARNING, reason, message)

    def event(self, obj: Object, type_: str, reason: str, message: str) -> Deferred[Object | None]:
        """Record an event about C{obj}; the Deferred fires with the Event as stored, or None
        when it was rate-limited or its write failed (it never errbacks)."""
        ref = involved_object(obj)
        self.log.info(
            "event {type} {reason} on {kind} {name}: {message}",
            type=type_, reason=reason, kind=ref["kind"], name=ref["name"], message=message,
        )
        if not self._take_token(ref):
            self.dropped += 1
            self.log.debug(
                "event {reason} on {kind} {name} dropped by the rate limiter",
                reason=reason, kind=ref["kind"], name=ref["name"],
            )
            return succeed(None)
        key: DedupKey = (
            ref["kind"], ref.get("namespace", ""), ref["name"], ref.get("uid", ""),
            f"{type_}\0{reason}", message,
        )
        # One write at a time per key, so count increments are never lost to a race.
        previous = self._chains.get(key)
        d: Deferred[Object | None]
        if previous is None:
            d = Deferred.fromCoroutine(self._write(key, obj, ref, type_, reason, message))
        else:
            d = Deferred()

            def go(_: object) -> None:
                Deferred.fromCoroutine(self._write(key, obj, ref, type_, reason, message)).chainDeferred(d)

            previous.addBoth(go)
        self._chains[key] = d

        def done(result: Object | None) -> Object | None:
            if self._chains.get(key) is d:
                del self._chains[key]
            return result

        out: Deferred[Object | None] = Deferred()
        d.addBoth(done).chainDeferred(out)
        return out

    # -- internals --------------------------------------------------------------------------

    def _take_token(self, ref: dict[str, str]) -> bool:
        bucket_key = (ref["kind"], ref.get("namespace", ""), ref["name"], ref.get("uid", ""))
        now = self.clock.seconds()
        bucket = self._buckets.get(bucket_key)
        if bucket is None:
            if len(self._buckets) >= self.cache_size:
                self._buckets.pop(next(iter(self._buckets)))
            bucket = self._buckets[bucket_key] = _Bucket(float(self.burst), now)
        if self.refill_seconds > 0:
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.stamp) / self.refill_seconds)
        bucket.stamp = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def _new_name(self, ref: dict[str, str]) -> str:
        self._seq += 1
        nanos = int(self.clock.seconds() * 1e9) + self._seq
        return f"{ref['name']}.{nanos:x}"

    async def _write(
        self, key: DedupKey, obj: Object, ref: dict[str, str], type_: str, reason: str, message: str
    ) -> Object | None:
        now = rfc3339(self.clock.seconds())
        try:
            seen = self._written.get(key)
            if seen is not None:
                try:
                    patched = await self.store.patch(
                        EVENT, seen.name, {"count": seen.count + 1, "lastTimestamp": now},
                        namespace=seen.namespace,
                    )
                except NotFound:
                    self._written.pop(key, None)
                else:
                    seen.count = int(patched.get("count") or seen.count + 1)
                    self._written.move_to_end(key)
                    return patched
            created = await self._create(obj, ref, type_, reason, message, now)
            meta = _meta(created)
            self._written[key] = _Written(str(meta.get("namespace") or ""), str(meta.get("name") or ""),
                                          int(created.get("count") or 1))
            while len(self._written) > self.cache_size:
                self._written.popitem(last=False)
            return created
        except StoreError as e:
            # Expected (namespace missing, API server down...): one line, no traceback.
            self.failed += 1
            self.log.warn("writing event {reason} on {kind} {name} failed: {error}",
                          reason=reason, kind=ref["kind"], name=ref["name"], error=str(e))
            return None
        except Exception:
            self.failed += 1
            self.log.failure("writing event {reason} on {kind} {name} failed",
                             reason=reason, kind=ref["kind"], name=ref["name"])
            return None

    async def _create(
        self, obj: Object, ref: dict[str, str], type_: str, reason: str, message: str, now: str
    ) -> Object:
        namespace = event_namespace(obj)
        source: dict[str, str] = {"component": self.component}
        if self.host:
            source["host"] = self.host
        for _ in range(3):
            event: Object = {
                "apiVersion": EVENT.api_version,
                "kind": EVENT.kind,
                "metadata": {"name": self._new_name(ref), "namespace": namespace},
                "involvedObject": ref,
                "reason": reason,
                "message": message,
                "type": type_,
                "source": source,
                "firstTimestamp": now,
                "lastTimestamp": now,
                "count": 1,
                "reportingComponent": self.component,
            }
            if self.host:
                # As client-go: the instance is the source host, absent when unknown (kubectl
                # prints "component, instance", so a copy of the component would show twice).
                event["reportingInstance"] = self.host
            try:
                return await self.store.create(event)
            except AlreadyExists:
                continue
        raise AlreadyExists(f"could not find a free Event name for {ref['name']}")
