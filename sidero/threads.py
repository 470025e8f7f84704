"""Dedicated thread pools for blocking work, so the reactor thread never waits.

Kubernetes calls, IPMI, disk and subprocess work each get a pool of their own (the MAAS
model): a slow BMC cannot starve the Kubernetes client, and neither can stall a DHCP reply.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

P = ParamSpec("P")
T = TypeVar("T")


class CallTimeout(Exception):
    """A blocking call did not finish within its time limit.

    The thread itself cannot be interrupted; its result, when it comes, is discarded.
    """

    def __init__(self, name: str, seconds: float) -> None:
        super().__init__(f"{name} did not finish within {seconds:g}s")
        self.name = name
        self.seconds = seconds


def daemon_thread(*args: Any, **kwargs: Any) -> threading.Thread:
    """A worker thread that never holds the interpreter open at exit.

    Orderly shutdown stops every pool (and so joins its workers) before the process ends; a
    worker still blocked in a call that outlived its deadline (a BMC that never answers, a hung
    API server connection) must not keep the process, or a test run, from exiting. What such a
    worker was doing is abandoned: store writes are transactions, so nothing is half-written.
    """
    return threading.Thread(*args, daemon=True, **kwargs)


class ThreadPoolService(Service):
    """A named thread pool that starts and stops with the service tree.

    @ivar pool: the L{ThreadPool}; use L{run} rather than touching it directly.
    """

    def __init__(self, reactor: Any, name: str, max_threads: int, min_threads: int = 0) -> None:
        self.reactor = reactor
        self.setName(f"threads-{name}")
        self.pool = ThreadPool(minthreads=min_threads, maxthreads=max_threads, name=f"sidero-{name}")
        self.pool.threadFactory = daemon_thread  # type: ignore[assignment]

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        # ThreadPool.stop() joins the workers: do it in the reactor's own pool, not on its thread.
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self.pool.stop)

    def run(
        self, f: Callable[P, T], *args: P.args, **kwargs: P.kwargs
    ) -> Deferred[T]:
        """Run C{f} in this pool; the Deferred fires on the reactor thread."""
        return deferToThreadPool(self.reactor, self.pool, f, *args, **kwargs)


def with_timeout(
    d: Deferred[T], clock: IReactorTime, seconds: float, name: str
) -> Deferred[T]:
    """Fail C{d} with L{CallTimeout} if it has not fired after C{seconds}."""
    result: Deferred[T] = Deferred()
    timer = clock.callLater(seconds, lambda: result.errback(CallTimeout(name, seconds)))

    def settle(value: Any, fire: Callable[[Any], None]) -> None:
        if timer.active():
            timer.cancel()
            fire(value)

    d.addCallbacks(lambda v: settle(v, result.callback), lambda f: settle(f, result.errback))
    return result


def run_in_pool(
    reactor: IReactorFromThreads, pool: ThreadPool, seconds: float, name: str,
    f: Callable[..., T], *args: Any, **kwargs: Any,
) -> Deferred[T]:
    """C{deferToThreadPool} with a time limit (see L{with_timeout})."""
    return with_timeout(deferToThreadPool(reactor, pool, f, *args, **kwargs), reactor, seconds, name)  # type: ignore[arg-type]
