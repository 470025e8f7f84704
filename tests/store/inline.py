"""Running the embedded store synchronously in unit tests: its SQLite calls complete at once
on the test's thread, and a Clock stands in for the reactor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.task import Clock
from twisted.python.failure import Failure


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
