# -*- test-case-name: tests.controllers.test_workqueue -*-
"""A rate-limited, de-duplicating work queue with controller-runtime semantics.

Controllers are level-triggered: an event only says "look at this key again", so many events
for one key collapse into one pending entry, and a key is never reconciled by two workers at
once (two concurrent reconciles of one object would race on its resourceVersion).  A key
added while it is being processed is parked and runs once more after the current pass.

Everything runs on the reactor thread; time comes from an injected L{IReactorTime}, so tests
drive it with L{twisted.internet.task.Clock}.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

K = TypeVar("K", bound=Hashable)

#: controller-runtime's default per-item backoff: 5 ms, doubling, capped at 1000 s.
DEFAULT_BASE_DELAY = 0.005
DEFAULT_MAX_DELAY = 1000.0
#: Maximum concurrent reconciles per controller (spec §0.3).
DEFAULT_MAX_WORKERS = 10


class ShutDown(Exception):
    """The queue was shut down: a waiting L{WorkQueue.get} fails with this."""


class ExponentialBackoff(Generic[K]):
    """Per-key exponential failure backoff (client-go C{ItemExponentialFailureRateLimiter}).

    The n-th consecutive failure of a key waits C{base * 2**(n-1)}, capped at C{maximum}, so
    a persistently failing object is retried ever more slowly without slowing the others.
    """

    def __init__(self, base: float = DEFAULT_BASE_DELAY, maximum: float = DEFAULT_MAX_DELAY) -> None:
        self.base = base
        self.maximum = maximum
        self._failures: dict[K, int] = {}

    def when(self, key: K) -> float:
        """Record one more failure of C{key} and return how long to wait before retrying it."""
        exp = self._failures.get(key, 0)
        self._failures[key] = exp + 1
        if exp > 64:  # 2**64 * base is past any sane maximum; avoid float overflow.
            return self.maximum
        return min(self.base * (2**exp), self.maximum)

    def forget(self, key: K) -> None:
        """Reset C{key}'s failure count (it succeeded)."""
        self._failures.pop(key, None)

    def num_requeues(self, key: K) -> int:
        return self._failures.get(key, 0)


class WorkQueue(Generic[K]):
    """De-duplicating queue with per-key serialisation, delays and backoff.

    Consumers call L{get} (a Deferred firing with a key), process it, then call L{done}; or
    use L{serve}, which runs that loop in C{workers} concurrent loops (the concurrency cap).

    @ivar name: used in log events.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        name: str = "queue",
        rate_limiter: ExponentialBackoff[K] | None = None,
    ) -> None:
        self.clock = clock
        self.name = name
        self.rate_limiter: ExponentialBackoff[K] = rate_limiter or ExponentialBackoff()
        self._queue: deque[K] = deque()
        self._dirty: set[K] = set()
        self._processing: set[K] = set()
        self._waiters: deque[Deferred[K]] = deque()
        # key -> (ready time, timer); only the earliest pending add_after per key is kept.
        self._timers: dict[K, tuple[float, IDelayedCall]] = {}
        self._shutting_down = False
        self._drained: list[Deferred[None]] = []

    # -- producer side -----------------------------------------------------------------

    def add(self, key: K) -> None:
        """Mark C{key} as needing processing (a no-op if it already is, or after shutdown)."""
        if self._shutting_down or key in self._dirty:
            return
        self._dirty.add(key)
        if key in self._processing:
            return  # re-queued by done()
        self._push(key)

    def add_after(self, key: K, delay: float) -> None:
        """Add C{key} after C{delay} seconds; if it is already scheduled earlier, that wins."""
        if self._shutting_down:
            return
        if delay <= 0:
            self.add(key)
            return
        ready = self.clock.seconds() + delay
        pending = self._timers.get(key)
        if pending is not None:
            if pending[0] <= ready:
                return
            pending[1].cancel()
        timer = self.clock.callLater(delay, self._fire_timer, key)
        self._timers[key] = (ready, timer)

    def add_rate_limited(self, key: K) -> None:
        """Add C{key} after its per-key backoff (one more failure is recorded)."""
        self.add_after(key, self.rate_limiter.when(key))

    def forget(self, key: K) -> None:
        """Reset C{key}'s backoff; call after a successful pass."""
        self.rate_limiter.forget(key)

    def num_requeues(self, key: K) -> int:
        return self.rate_limiter.num_requeues(key)

    def _fire_timer(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def _push(self, key: K) -> None:
        if self._waiters:
            # Hand the key straight to a waiting worker: state first, then fire (re-entrancy).
            self._dirty.discard(key)
            self._processing.add(key)
            self._waiters.popleft().callback(key)
        else:
            self._queue.append(key)

    # -- consumer side -----------------------------------------------------------------

    def get(self) -> Deferred[K]:
        """The next key to process; it stays "processing" until L{done} is called for it.

        Fails with L{ShutDown} once the queue is shut down.
        """
        if self._queue:
            key = self._queue.popleft()
            self._dirty.discard(key)
            self._processing.add(key)
            return succeed(key)
        if self._shutting_down:
            d: Deferred[K] = Deferred()
            d.errback(ShutDown(self.name))
            return d
        d = Deferred()
        self._waiters.append(d)
        return d

    def done(self, key: K) -> None:
        """C{key} is finished; if it was re-added meanwhile, queue it again."""
        self._processing.discard(key)
        if key in self._dirty and not self._shutting_down:
            self._push(key)
        if self._shutting_down and not self._processing:
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)

    def __len__(self) -> int:
        """Keys waiting to be picked up (not counting processing or delayed ones)."""
        return len(self._queue)

    @property
    def processing(self) -> frozenset[K]:
        return frozenset(self._processing)

    @property
    def pending_delayed(self) -> dict[K, float]:
        """Delayed keys and the clock time they become ready (for tests and debugging)."""
        return {k: ready for k, (ready, _) in self._timers.items()}

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    # -- lifecycle --------------------------------------------------------------------

    def shut_down(self) -> Deferred[None]:
        """Stop accepting keys, drop queued ones, cancel timers, fail waiting getters.

        The returned Deferred fires once every key being processed has been L{done}.
        """
        self._shutting_down = True
        for _, timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        self._queue.clear()
        self._dirty.clear()
        waiters, self._waiters = self._waiters, deque()
        for w in waiters:
            w.errback(ShutDown(self.name))
        if not self._processing:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        return d

    def serve(
        self, process: Callable[[K], Awaitable[Any] | Any], workers: int = DEFAULT_MAX_WORKERS
    ) -> Deferred[None]:
        """Run C{workers} loops that take keys and C{await process(key)}.

        At most C{workers} keys are processed at once.  C{process} should handle its own
        errors; one that escapes is logged and the worker goes on.  The Deferred fires when
        every loop has ended after L{shut_down}.
        """
        if workers < 1:
            raise ValueError("workers must be at least 1")
        loops = [ensureDeferred(self._worker(process, i)) for i in range(workers)]
        return DeferredList(loops, consumeErrors=True).addCallback(lambda _: None)

    async def _worker(self, process: Callable[[K], Awaitable[Any] | Any], index: int) -> None:
        while True:
            try:
                key = await self.get()
            except ShutDown:
                return
            try:
                result = process(key)
                if isinstance(result, Deferred) or hasattr(result, "__await__"):
                    await result
            except Exception:
                self.log.failure(
                    "work queue {queue} worker {worker} failed processing {key}",
                    queue=self.name, worker=index, key=key,
                )
            finally:
                self.done(key)
