"""Running the embedded store synchronously in unit tests: its SQLite calls complete at once
on the test's thread, and a Clock stands in for the reactor (L{inline_store})."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from sidero.store.embedded import EmbeddedStore


class InlinePool:
    """A thread pool stand-in that runs each call at once, on the calling thread."""

    def callInThreadWithCallback(self, on_result: Callable[[bool, Any], None], f: Callable[..., Any],
                                 *args: Any, **kwargs: Any) -> None:
        try:
            result = f(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class FakeReactor(Clock):
    """A Clock whose callFromThread runs immediately (there is no other thread)."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


#: Where an inline store's clock starts (2023-11-14T22:13:20Z), so timestamps look real.
START = 1_700_000_000.0


def inline_store(path: str = ":memory:", **kwargs: Any) -> tuple[EmbeddedStore, FakeReactor]:
    """The real embedded store on an L{InlinePool} and a L{FakeReactor} at L{START}: every call
    has completed when it returns, and time moves only when the test advances the clock.
    C{kwargs} go to L{EmbeddedStore} (admission, event_log_size, ...)."""
    reactor = FakeReactor()
    reactor.advance(START)
    store = EmbeddedStore(reactor, path, pool=InlinePool(), **kwargs)  # type: ignore[arg-type]
    return store, reactor


def open_inline_store(test: SynchronousTestCase, path: str = ":memory:",
                      **kwargs: Any) -> tuple[EmbeddedStore, FakeReactor]:
    """L{inline_store}, opened now and closed when C{test} ends."""
    store, reactor = inline_store(path, **kwargs)
    test.successResultOf(Deferred.fromCoroutine(store.open()))
    test.addCleanup(lambda: test.successResultOf(Deferred.fromCoroutine(store.close())))
    return store, reactor
