# -*- test-case-name: tests.service.test_logs -*-
"""Log output: readable text or JSON lines, a level filter, and stdlib logging bridged in.

twisted.logger events are formatted by the pure functions L{format_text} and L{format_json};
L{make_observer} wraps one of them in a thread-safe writer behind a level filter. Libraries
that use stdlib C{logging} (kubernetes, urllib3, pyghmi, grpc) reach the same observer through
L{StdlibBridge}, so an operator sees one stream in one format.

Under twistd the root service registers the observer as the application's C{ILogObserver}
component (see L{sidero.tap}); C{twistd --logger=sidero.logs.observer} also works and reads
C{SIDERO_LOG_FORMAT}/C{SIDERO_LOG_LEVEL}.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)
from twisted.python.failure import Failure
from zope.interface import implementer

LEVELS: dict[str, LogLevel] = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}

#: stdlib loggers of the libraries we bridge, with the level they are let through at "info"
#: (urllib3 and kubernetes are chatty at INFO about every connection).
LIBRARY_LOGGERS: dict[str, int] = {
    "kubernetes": logging.WARNING,
    "urllib3": logging.WARNING,
    "pyghmi": logging.INFO,
    "grpc": logging.INFO,
    "pyroute2": logging.WARNING,
}

# Keys twisted.logger and our bridge put on events that are not user fields.
_INTERNAL_KEYS = frozenset({"message", "format", "isError", "failure", "why", "system", "time"})


def _timestamp(event: LogEvent) -> str:
    when = event.get("log_time")
    moment = datetime.fromtimestamp(when, UTC) if when is not None else datetime.now(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _level(event: LogEvent) -> str:
    level = event.get("log_level")
    for name, known in LEVELS.items():
        if level is known:
            return name
    return "info"


def _message(event: LogEvent) -> str:
    text = formatEvent(event)
    if not text and event.get("log_failure") is not None:
        text = "Unhandled error"
    return text


def _fields(event: LogEvent) -> dict[str, Any]:
    """The structured fields of an event: what a caller passed besides the format."""
    return {
        k: v
        for k, v in event.items()
        if not k.startswith("log_") and not k.startswith("_") and k not in _INTERNAL_KEYS
    }


def _failure(event: LogEvent) -> Failure | None:
    failure = event.get("log_failure")
    return failure if isinstance(failure, Failure) else None


def format_text(event: LogEvent) -> str:
    """One readable line (plus an indented traceback): C{time LEVEL [namespace] message}."""
    namespace = event.get("log_namespace") or "-"
    line = f"{_timestamp(event)} {_level(event).upper():<8} [{namespace}] {_message(event)}"
    failure = _failure(event)
    if failure is not None:
        traceback = failure.getTraceback().rstrip("\n")
        line += "\n" + "\n".join("    " + tb for tb in traceback.splitlines())
    return line.replace("\r", "") + "\n"


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value) if not isinstance(value, bytes | str) else str(value)


def format_json(event: LogEvent) -> str:
    """One JSON object per line: time, level, logger, msg, then the event's own fields."""
    record: dict[str, Any] = {
        "time": _timestamp(event),
        "level": _level(event),
        "logger": event.get("log_namespace") or "-",
        "msg": _message(event),
    }
    for key, value in _fields(event).items():
        record.setdefault(key, _json_safe(value))
    failure = _failure(event)
    if failure is not None:
        record["error"] = f"{getattr(failure.type, '__name__', 'Error')}: {failure.getErrorMessage()}"
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, default=repr, ensure_ascii=False) + "\n"


FORMATTERS = {"text": format_text, "json": format_json}


@implementer(ILogObserver)
class StreamObserver:
    """Write formatted events to a stream; any thread may log, so writes take a lock."""

    def __init__(self, stream: IO[str], formatter: Any) -> None:
        self.stream = stream
        self.formatter = formatter
        self._lock = threading.Lock()

    def __call__(self, event: LogEvent) -> None:
        text = self.formatter(event)
        with self._lock:
            self.stream.write(text)
            self.stream.flush()


def make_observer(log_format: str = "text", level: str = "info", stream: IO[str] | None = None) -> ILogObserver:
    """The observer sidero logs through: C{log_format} lines at C{level} and above."""
    writer = StreamObserver(stream if stream is not None else sys.stdout, FORMATTERS[log_format])
    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
    return FilteringLogObserver(writer, [predicate])


def observer(environ: Mapping[str, str] | None = None) -> ILogObserver:
    """Factory for C{twistd --logger=sidero.logs.observer} (settings from the environment)."""
    env = os.environ if environ is None else environ
    log_format = env.get("SIDERO_LOG_FORMAT", "text").lower()
    level = env.get("SIDERO_LOG_LEVEL", "info").lower().replace("warning", "warn")
    return make_observer(
        log_format if log_format in FORMATTERS else "text", level if level in LEVELS else "info"
    )


_STDLIB_LEVELS = (
    (logging.CRITICAL, LogLevel.critical),
    (logging.ERROR, LogLevel.error),
    (logging.WARNING, LogLevel.warn),
    (logging.INFO, LogLevel.info),
)


def twisted_level(levelno: int) -> LogLevel:
    """Map a stdlib level number onto the nearest twisted.logger level at or below it."""
    for threshold, level in _STDLIB_LEVELS:
        if levelno >= threshold:
            return level
    return LogLevel.debug


class StdlibBridge(logging.Handler):
    """A stdlib C{logging} handler that re-emits records as twisted.logger events.

    A thread-local guard stops a loop should anything forward twisted.logger back into
    stdlib logging (C{STDLibLogObserver}).
    """

    def __init__(self, publisher: Any = None) -> None:
        super().__init__()
        self.publisher = publisher
        self._local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._local, "active", False):
            return
        self._local.active = True
        try:
            log = Logger(namespace=record.name, observer=self.publisher)
            failure = None
            if record.exc_info and record.exc_info[1] is not None:
                failure = Failure(record.exc_info[1], record.exc_info[0], record.exc_info[2])
            log.emit(
                twisted_level(record.levelno),
                "{log_text}",
                log_text=record.getMessage(),
                log_failure=failure,
            )
        except Exception:
            self.handleError(record)
        finally:
            self._local.active = False


_bridge: StdlibBridge | None = None


def bridge_stdlib_logging(level: str = "info") -> StdlibBridge:
    """Route stdlib logging (all libraries) into twisted.logger; idempotent.

    At C{debug} every library logs at DEBUG; otherwise the chatty ones are held to
    L{LIBRARY_LOGGERS} so a Kubernetes watch does not flood the log.
    """
    global _bridge
    root = logging.getLogger()
    if _bridge is None:
        _bridge = StdlibBridge()
        root.addHandler(_bridge)
    root.setLevel(logging.DEBUG if level == "debug" else logging.INFO)
    for name, library_level in LIBRARY_LOGGERS.items():
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else library_level)
    return _bridge
