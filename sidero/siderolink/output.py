# -*- test-case-name: tests.siderolink.test_logreceiver -*-
"""Where server logs go: one JSON object per line, to stdout or a file (C{--server-log}).

Lines are queued on the reactor and written by one job at a time in the C{disk} thread pool,
so a slow disk or a full pipe never stalls the reactor.  When too much is queued the
connections feeding it are paused (TCP pushes back to the nodes) and resumed once the queue
has drained; nothing is dropped for being slow.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import IO, Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger

#: Pause producers above this many queued bytes; resume below the low mark.
HIGH_WATER = 4 * 1024 * 1024
LOW_WATER = 1 * 1024 * 1024


class Runner(Protocol):
    def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]: ...


def open_output(target: str) -> IO[str]:
    """stdout for C{-} or empty, else the file C{target} opened for appending (blocking).

    stdout is the process's own (C{sys.__stdout__}): twistd replaces C{sys.stdout} with a
    file that turns writes into log events, which would wrap every line in a log record.
    """
    if target in ("", "-"):
        return sys.__stdout__ or sys.stdout
    directory = os.path.dirname(target)
    if directory:
        os.makedirs(directory, exist_ok=True)
    return open(target, "a", encoding="utf-8")


class LineWriter:
    """Queue lines; write them in order, off the reactor (see the module docstring).

    @ivar counters: C{lines} written, C{write_errors}, C{pauses}.
    """

    log = Logger()

    def __init__(self, runner: Runner, target: str = "-",
                 opener: Callable[[str], IO[str]] = open_output,
                 high_water: int = HIGH_WATER, low_water: int = LOW_WATER) -> None:
        self.runner = runner
        self.target = target
        self.opener = opener
        self.high_water = high_water
        self.low_water = low_water
        self._stream: IO[str] | None = None
        self._queue: list[str] = []
        self._queued = 0
        self._writing: Deferred[None] | None = None
        self._producers: set[IPushProducer] = set()
        self._paused = False
        self.counters = {"lines": 0, "write_errors": 0, "pauses": 0}

    @property
    def queued_bytes(self) -> int:
        return self._queued

    def register(self, producer: IPushProducer) -> None:
        """C{producer} (a connection's transport) is paused while the queue is too long."""
        self._producers.add(producer)
        if self._paused:
            producer.pauseProducing()

    def unregister(self, producer: IPushProducer) -> None:
        self._producers.discard(producer)

    def write(self, line: str) -> None:
        """Queue one line (it must end with a newline)."""
        self._queue.append(line)
        self._queued += len(line)
        if not self._paused and self._queued > self.high_water:
            self._paused = True
            self.counters["pauses"] += 1
            for p in list(self._producers):
                p.pauseProducing()
        if self._writing is None:
            self._flush()

    def _flush(self) -> None:
        batch, self._queue = "".join(self._queue), []
        count = batch.count("\n")
        d = self.runner.run(self._write_blocking, batch)
        self._writing = d

        def done(_: object) -> None:
            self.counters["lines"] += count
            self._after(len(batch))

        def failed(failure: Any) -> None:
            self.counters["write_errors"] += 1
            self.log.error("server logs: cannot write to {target}: {error}", target=self.target,
                           error=failure.getErrorMessage())
            self._after(len(batch))

        d.addCallbacks(done, failed)

    def _after(self, written: int) -> None:
        self._writing = None
        self._queued -= written
        if self._paused and self._queued <= self.low_water:
            self._paused = False
            for p in list(self._producers):
                p.resumeProducing()
        if self._queue:
            self._flush()

    def _write_blocking(self, text: str) -> None:
        if self._stream is None:
            self._stream = self.opener(self.target)
        self._stream.write(text)
        self._stream.flush()

    def drained(self) -> Deferred[None]:
        """Fires once everything queued so far is written (tests, shutdown)."""
        if self._writing is None and not self._queue:
            return succeed(None)
        d: Deferred[None] = Deferred()

        def check(result: object = None) -> object:
            if self._writing is None and not self._queue:
                d.callback(None)
            elif self._writing is not None:
                self._writing.addBoth(check)
            return result

        check()
        return d

    def close(self) -> Deferred[None]:
        """Write what is queued, then close a file we opened (never stdout)."""
        def close_blocking() -> None:
            stream, self._stream = self._stream, None
            if stream is not None and stream not in (sys.stdout, sys.__stdout__):
                stream.close()

        return self.drained().addCallback(lambda _: self.runner.run(close_blocking))
