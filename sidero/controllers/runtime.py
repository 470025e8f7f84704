# -*- test-case-name: tests.controllers.test_runtime -*-
"""Controllers and the manager that runs them (controller-runtime semantics, on Twisted).

A L{Controller} owns a L{WorkQueue} of keys of its primary kind and calls an C{async def
reconcile(key)} for each, at most C{max_concurrent_reconciles} at once (10, spec §0.3), never
two for one key.  Events of the primary kind enqueue the object's key; events of secondary
kinds go through a mapping function (object → keys).  Errors are retried with per-key
exponential backoff, C{Result.requeue_after} schedules the next pass, success resets backoff.

The L{ControllerManager} shares one L{Informer} per kind between all controllers (one watch,
one cache) and runs controllers and start-up runnables only while this process leads.
Informers run regardless of leadership: protocols read their caches on every replica.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from sidero.api.registry import ResourceType
from sidero.backoff import Backoff
from sidero.controllers.informer import Informer, object_key, split_key
from sidero.controllers.leader import AlwaysLeader, ILeaderElector
from sidero.controllers.workqueue import DEFAULT_MAX_WORKERS, ExponentialBackoff, WorkQueue
from sidero.store.errors import Conflict, Timeout, Unavailable
from sidero.store.interfaces import IResourceStore, Object

__all__ = [
    "Controller", "ControllerManager", "ReconcileError", "Result", "object_key", "split_key", "DEFAULT_REQUEUE_AFTER",
]

class ReconcileError(Exception):
    """An expected failure whose message says everything (a download refused, a BMC away):
    logged as one warning line without a traceback, then retried with backoff like any error.
    The store's Unavailable, Conflict and Timeout are treated the same way."""


#: controller-runtime's default requeue delay for "requeue later" results (spec §0.3).
DEFAULT_REQUEUE_AFTER = 20.0


@dataclass(frozen=True)
class Result:
    """What a reconcile asks for next.

    C{requeue_after} (seconds, > 0) schedules another pass and resets the backoff;
    C{requeue} alone retries with the key's backoff; neither means done until the next event.
    """

    requeue: bool = False
    requeue_after: float | None = None


Reconciler = Callable[[str], Awaitable["Result | None"]]
MapFunc = Callable[[Object], Iterable[str]]
InformerFor = Callable[[ResourceType], Informer]


def _as_deferred(value: Any) -> Deferred[Any]:
    if isinstance(value, Deferred):
        return value
    if inspect.iscoroutine(value):
        return Deferred.fromCoroutine(value)
    if inspect.isawaitable(value):
        async def wrap() -> Any:
            return await value

        return Deferred.fromCoroutine(wrap())
    return succeed(value)


def name_of(service: Service) -> str:
    return str(service.name)


class Controller(Service):
    """One reconcile loop over keys of C{kind}.

    Bind it to informers with L{bind} (the manager does), then start/stop it as a service.
    Keys are C{namespace/name} or C{name} for cluster-scoped kinds (L{object_key}).

    @ivar queue: the live work queue while running, else None.
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        kind: ResourceType,
        reconcile: Reconciler,
        *,
        clock: IReactorTime,
        max_concurrent_reconciles: int = DEFAULT_MAX_WORKERS,
        rate_limiter: Callable[[], ExponentialBackoff[str]] | None = None,
        reconcile_timeout: float | None = None,
    ) -> None:
        self.setName(name)
        self.kind = kind
        self.reconcile = reconcile
        self.clock = clock
        self.max_concurrent_reconciles = max_concurrent_reconciles
        self._rate_limiter = rate_limiter or ExponentialBackoff
        self.reconcile_timeout = reconcile_timeout
        self._secondary: list[tuple[ResourceType, MapFunc]] = []
        self._informers: list[Informer] = []
        self._primary: Informer | None = None
        self.queue: WorkQueue[str] | None = None
        self._workers: Deferred[None] | None = None
        #: fires when the reconciles of the last run have ended (None when none are left).
        self._draining: Deferred[None] | None = None
        #: told of each reconcile's result and duration (L{sidero.metrics.Metrics.reconciled}).
        self.metrics: Any = None

    def watches(self, kind: ResourceType, map_fn: MapFunc) -> Controller:
        """Also react to C{kind}: each event of it enqueues C{map_fn(obj)} (for updates, the
        keys of both the old and the new object).  Call before L{bind}."""
        self._secondary.append((kind, map_fn))
        return self

    @property
    def primary(self) -> Informer:
        """The primary kind's informer (reconcilers read their objects from it)."""
        if self._primary is None:
            raise RuntimeError(f"controller {self.name} is not bound to informers")
        return self._primary

    def bind(self, informer_for: InformerFor) -> None:
        """Subscribe to the informers of the primary and secondary kinds."""
        primary = informer_for(self.kind)
        self._primary = primary
        self._informers = [primary]
        primary.add_handler(
            on_add=lambda o: self.enqueue(object_key(o)),
            on_update=lambda old, new: self.enqueue(object_key(new)),
            on_delete=lambda o: self.enqueue(object_key(o)),
        )
        for kind, fn in self._secondary:
            informer = informer_for(kind)
            if informer not in self._informers:
                self._informers.append(informer)
            informer.add_handler(
                on_add=lambda o, fn=fn: self._enqueue_mapped(fn, o),  # type: ignore[misc]
                on_update=lambda old, new, fn=fn: self._enqueue_mapped(fn, old, new),  # type: ignore[misc]
                on_delete=lambda o, fn=fn: self._enqueue_mapped(fn, o),  # type: ignore[misc]
            )

    def _enqueue_mapped(self, fn: MapFunc, *objs: Object) -> None:
        if self.queue is None:
            return
        for obj in objs:
            try:
                keys = list(fn(obj))
            except Exception:
                self.log.failure(
                    "controller {controller} mapping function failed for {obj}",
                    controller=self.name, obj=object_key(obj),
                )
                continue
            for key in keys:
                self.enqueue(key)

    def enqueue(self, key: str) -> None:
        """Ask for a reconcile of C{key} (dropped while the controller is not running)."""
        if self.queue is not None:
            self.queue.add(key)

    def enqueue_after(self, key: str, delay: float) -> None:
        if self.queue is not None:
            self.queue.add_after(key, delay)

    # -- lifecycle --------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        queue: WorkQueue[str] = WorkQueue(self.clock, name=name_of(self), rate_limiter=self._rate_limiter())
        self.queue = queue
        waits: list[Deferred[Any]] = [i.synced for i in self._informers]
        if self._draining is not None:
            # Restarted (leadership lost and gained again) while the last run's reconciles
            # are still going: two reconciles of one key must never overlap, so the new run
            # waits for them.
            drained: Deferred[None] = Deferred()

            def last_run_ended(result: None) -> None:
                drained.callback(None)
                return result

            self._draining.addCallback(last_run_ended)
            waits.append(drained)
        synced = gatherResults(waits)
        synced.addCallback(lambda _: self._begin(queue))

    def _begin(self, queue: WorkQueue[str]) -> None:
        """Caches are synced: enqueue every primary object (level-triggered start) and run."""
        if self.queue is not queue or queue.shutting_down:
            return
        if self._primary is not None:
            for key in self._primary.keys():
                queue.add(key)
        self.log.info(
            "controller {controller} started with {workers} workers",
            controller=self.name, workers=self.max_concurrent_reconciles,
        )
        self._workers = queue.serve(self._process, self.max_concurrent_reconciles)

    def stopService(self) -> Deferred[None]:
        """Stop taking keys, cancel delayed ones, and wait for reconciles in flight."""
        super().stopService()
        queue, self.queue = self.queue, None
        workers, self._workers = self._workers, None
        if queue is None:
            return succeed(None)
        waits: list[Deferred[Any]] = [queue.shut_down()]
        if workers is not None:
            waits.append(workers)
        stopped = DeferredList(waits).addCallback(lambda _: None)
        if not stopped.called:
            self._draining = stopped

            def ended(result: None) -> None:
                if self._draining is stopped:
                    self._draining = None
                return result

            stopped.addCallback(ended)
        return stopped

    # -- one reconcile ------------------------------------------------------------------

    async def _process(self, key: str) -> None:
        queue = self.queue
        started = self.clock.seconds()
        outcome = "success"
        try:
            d = _as_deferred(self.reconcile(key))
            if self.reconcile_timeout is not None:
                d.addTimeout(self.reconcile_timeout, self.clock)
            result = await d
        except Exception:
            failure = Failure()
            outcome = "error"
            if queue is not None:
                queue.add_rate_limited(key)
            fields: dict[str, Any] = dict(
                controller=self.name, key=key, outcome=outcome,
                duration=self.clock.seconds() - started,
                retries=queue.num_requeues(key) if queue is not None else 0,
            )
            if self.metrics is not None:
                self.metrics.reconciled(self.name, outcome, fields["duration"])
            if failure.check(ReconcileError, Unavailable, Conflict, Timeout):
                self.log.warn(
                    "controller {controller} reconcile of {key} failed after {duration:.3f}s:"
                    " {error}", error=failure.getErrorMessage(), **fields,
                )
            else:
                self.log.failure(
                    "controller {controller} reconcile of {key} failed after {duration:.3f}s",
                    failure, **fields,
                )
            return
        if not isinstance(result, Result | None):
            self.log.warn(
                "controller {controller} reconcile of {key} returned {result!r}, not a Result",
                controller=self.name, key=key, result=result,
            )
            result = None
        if result is not None and result.requeue_after is not None and result.requeue_after > 0:
            outcome = "requeue_after"
            if queue is not None:
                queue.forget(key)
                queue.add_after(key, result.requeue_after)
        elif result is not None and result.requeue:
            outcome = "requeue"
            if queue is not None:
                queue.add_rate_limited(key)
        else:
            if queue is not None:
                queue.forget(key)
        if self.metrics is not None:
            self.metrics.reconciled(self.name, outcome, self.clock.seconds() - started)
        self.log.debug(
            "controller {controller} reconciled {key} in {duration:.3f}s: {outcome}",
            controller=self.name, key=key, outcome=outcome,
            duration=self.clock.seconds() - started,
            requeue_after=result.requeue_after if result is not None else None,
        )


Runnable = Callable[[], Awaitable[Any]]


class ControllerManager(MultiService):
    """Shared informers for every kind used, plus controllers and runnables gated by the elector.

    Informers are child services (they run whenever the manager runs).  Controllers and
    runnables start when leadership is gained and stop when it is lost or the manager stops;
    on stop, controllers finish their reconciles before the informers go.
    """

    log = Logger()

    def __init__(
        self,
        store: IResourceStore,
        clock: IReactorTime,
        elector: ILeaderElector | None = None,
        resync_period: float | None = None,
        runnable_backoff: Backoff | None = None,
        metrics: Any = None,
    ) -> None:
        super().__init__()
        self.setName("controllers")
        self.metrics = metrics
        self.store = store
        self.clock = clock
        self.elector: ILeaderElector = elector if elector is not None else AlwaysLeader()
        self.resync_period = resync_period
        self.runnable_backoff = runnable_backoff or Backoff(initial=1.0, maximum=60.0)
        self._informers: dict[tuple[str, str, str | None], Informer] = {}
        self.controllers: list[Controller] = []
        self._runnables: list[tuple[str, Runnable]] = []
        self._runnable_timers: dict[str, IDelayedCall] = {}
        self._leading = False
        self._lead_epoch = 0
        self._unsubscribe: Callable[[], None] | None = None

    def informer(self, kind: ResourceType, namespace: str | None = None) -> Informer:
        """The shared informer of C{kind} (created, and started if running, on first use)."""
        key = (kind.group, kind.kind, namespace)
        informer = self._informers.get(key)
        if informer is None:
            informer = Informer(
                self.store, kind, namespace=namespace, clock=self.clock,
                resync_period=self.resync_period,
            )
            self._informers[key] = informer
            informer.setServiceParent(self)  # starts it if we are running
        return informer

    @property
    def informers(self) -> list[Informer]:
        return list(self._informers.values())

    def add_controller(self, controller: Controller) -> Controller:
        """Bind C{controller} to shared informers; it runs while this process leads."""
        controller.bind(self.informer)
        if controller.metrics is None:
            controller.metrics = self.metrics
        self.controllers.append(controller)
        if self.running and self._leading:
            controller.startService()
        return controller

    def add_runnable(self, name: str, fn: Runnable) -> None:
        """Run C{fn} each time leadership is gained, retried with backoff until it succeeds."""
        self._runnables.append((name, fn))
        if self.running and self._leading:
            self._run_runnable(name, fn, self._lead_epoch, 0)

    @property
    def leading(self) -> bool:
        return self._leading

    # -- lifecycle --------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._unsubscribe = self.elector.subscribe(self._gained, self._lost)
        if self.elector.is_leader():
            self._gained()

    def stopService(self) -> Deferred[None]:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        stopped = self._stop_leading()

        def stop_children(_: object) -> Deferred[None]:
            d = super(ControllerManager, self).stopService()
            return d if d is not None else succeed(None)

        return stopped.addCallback(stop_children)

    def _gained(self) -> None:
        if self._leading or not self.running:
            return
        self._leading = True
        self._lead_epoch += 1
        self.log.info("leadership gained: starting {n} controllers", n=len(self.controllers))
        for name, fn in self._runnables:
            self._run_runnable(name, fn, self._lead_epoch, 0)
        for c in self.controllers:
            c.startService()

    def _lost(self) -> Deferred[None]:
        """Stop controllers; the Deferred lets an elector wait for running reconciles."""
        if self._leading:
            self.log.warn("leadership lost: stopping controllers")
        return self._stop_leading()

    def _stop_leading(self) -> Deferred[None]:
        was = self._leading
        self._leading = False
        self._lead_epoch += 1
        for timer in self._runnable_timers.values():
            if timer.active():
                timer.cancel()
        self._runnable_timers.clear()
        if not was:
            return succeed(None)
        waits = [c.stopService() for c in self.controllers if c.running]
        return DeferredList(waits).addCallback(lambda _: None)

    def _run_runnable(self, name: str, fn: Runnable, epoch: int, attempt: int) -> None:
        self._runnable_timers.pop(name, None)
        if epoch != self._lead_epoch:
            return

        def failed(failure: Failure) -> None:
            if epoch != self._lead_epoch:
                return
            delay = self.backoff_delay(attempt)
            self.log.failure(
                "start-up runnable {runnable} failed; retrying in {delay:.1f}s",
                failure, runnable=name, delay=delay, attempt=attempt,
            )
            self._runnable_timers[name] = self.clock.callLater(
                delay, self._run_runnable, name, fn, epoch, attempt + 1
            )

        def ok(_: object) -> None:
            self.log.info("start-up runnable {runnable} done", runnable=name)

        try:
            d = _as_deferred(fn())
        except Exception:
            failed(Failure())
            return
        d.addCallbacks(ok, failed)

    def backoff_delay(self, attempt: int) -> float:
        return self.runnable_backoff.delay(attempt, 0.0)
