# -*- test-case-name: tests.test_limits -*-
"""Concurrency limits as Ironic keeps them: at most N at once, the rest queued, none refused.

A rack of 200 servers accepted at once must not mean 200 IPMI sessions, 200 machines wiping
(and pulling the agent image) and every Environment download at the same moment.  Each limit
here queues in FIFO order and counts what waits, so the metrics show a queue rather than
errors:

  - L{ConcurrencyLimit}: operations that are one Deferred each (a power call, a download),
    over Twisted's C{DeferredSemaphore};
  - L{WipeSlots}: wipes, which are not one call but a state lasting from the power cycle into
    the agent until the agent marks the server clean (several reconciles apart), so a slot is
    held by server name and the server controller asks for it at each reconcile.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, DeferredSemaphore

T = TypeVar("T")


class ConcurrencyLimit:
    """At most C{limit} calls in flight; later ones wait in order.

    @ivar name: the metric label (C{power}, C{download}).
    """

    def __init__(self, name: str, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"{name}: a limit must be at least 1")
        self.name = name
        self.limit = limit
        self._semaphore = DeferredSemaphore(limit)
        self.completed = 0

    @property
    def in_flight(self) -> int:
        return self.limit - self._semaphore.tokens

    @property
    def queued(self) -> int:
        return len(self._semaphore.waiting)

    def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        """Call C{f} (returning a value, a Deferred or a coroutine) once a slot is free."""

        def call() -> Deferred[Any]:
            result = f(*args, **kwargs)
            if isinstance(result, Coroutine):
                result = Deferred.fromCoroutine(result)
            d: Deferred[Any] = result if isinstance(result, Deferred) else Deferred()
            if d is not result:
                d.callback(result)
            return d

        def done(result: T) -> T:
            self.completed += 1
            return result

        return self._semaphore.run(call).addBoth(done)

    def stats(self) -> dict[str, int]:
        return {"limit": self.limit, "in_flight": self.in_flight, "queued": self.queued}


class WipeSlots:
    """At most C{limit} servers wiping at once, by name; the others wait their turn (FIFO).

    @param wake: called with a waiting server's name when a slot it may take is freed (the
        server controller enqueues it, so it does not wait for its next requeue).
    """

    name = "wipe"

    def __init__(self, limit: int, wake: Callable[[str], None] | None = None) -> None:
        if limit < 1:
            raise ValueError("wipe: a limit must be at least 1")
        self.limit = limit
        self.wake = wake
        self.holders: set[str] = set()
        self.waiting: OrderedDict[str, None] = OrderedDict()

    def acquire(self, server: str) -> bool:
        """Whether C{server} may wipe now (it keeps the slot until L{release}); if not, it
        is queued (once) and L{wake} is called when its turn comes."""
        if server in self.holders:
            return True
        free = self.limit - len(self.holders)
        if free > 0:
            ahead = 0
            for name in self.waiting:
                if name == server:
                    break
                ahead += 1
            if ahead < free:
                self.waiting.pop(server, None)
                self.holders.add(server)
                return True
        self.waiting.setdefault(server, None)
        return False

    def adopt(self, server: str) -> None:
        """C{server} is already wiping (found so after a restart): count it, even past the limit."""
        self.waiting.pop(server, None)
        self.holders.add(server)

    def release(self, server: str) -> None:
        """C{server} is not wiping (clean, allocated, not accepted, gone): free its slot or its
        place in the queue, and wake the waiters that may now go."""
        self.waiting.pop(server, None)
        if server not in self.holders:
            return
        self.holders.discard(server)
        if self.wake is not None:
            for name in list(self.waiting)[: self.limit - len(self.holders)]:
                self.wake(name)

    @property
    def in_flight(self) -> int:
        return len(self.holders)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def stats(self) -> dict[str, int]:
        return {"limit": self.limit, "in_flight": self.in_flight, "queued": self.queued}
