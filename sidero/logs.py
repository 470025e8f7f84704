# -*- test-case-name: tests.service.test_logs -*-
"""Log output: readable text or JSON lines, a level filter, and stdlib logging bridged in.

twisted.logger events are formatted by the pure functions L{format_text} and L{format_json};
L{make_observer} wraps one of them in a thread-safe writer behind a level filter. Libraries
that use stdlib C{logging} (kubernetes, urllib3, pyghmi, grpc) reach the same observer through
L{StdlibBridge}, so an operator sees one stream in one format.

Twisted's own legacy lines ("Site starting on 8081", "(TCP Port 8081 Closed)", access-log
lines, "Starting factory ...") are folded by L{fold_event} into structured events (fields
C{factory}, C{port}, C{transport}; chatty ones at debug), and urllib3's retry warnings during
an API server outage become one warning when it stops answering and one when it answers
again (L{OutageFolder}).

Under twistd the root service registers the observer as the application's C{ILogObserver}
component (see L{sidero.tap}); C{twistd --logger=sidero.logs.observer} also works and reads
C{SIDERO_LOG_FORMAT}/C{SIDERO_LOG_LEVEL}.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
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
    fmt = event.get("log_format")
    if isinstance(fmt, str):
        # The common case, named fields only: str.format_map is C, where formatEvent's
        # string.Formatter is Python (a fifth of a boot request's CPU went to log lines).
        # Anything it cannot do (twisted's "{callable()}", a missing key) goes the long way.
        try:
            return fmt.format_map(event)
        except Exception:
            pass
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
    fields = _fields(event)
    for key, value in fields.items():
        record.setdefault(key, value)
    failure = _failure(event)
    if failure is not None:
        record["error"] = f"{getattr(failure.type, '__name__', 'Error')}: {failure.getErrorMessage()}"
        record["traceback"] = failure.getTraceback()
    try:
        # One encoding of the whole line; only a line that cannot be encoded as it is
        # (a circular value, a key that is not a string) has its fields made safe one by one.
        return json.dumps(record, default=repr, ensure_ascii=False) + "\n"
    except (TypeError, ValueError):
        for key, value in fields.items():
            if record.get(key) is value:
                record[key] = _json_safe(value)
        return json.dumps(record, default=repr, ensure_ascii=False) + "\n"


FORMATTERS = {"text": format_text, "json": format_json}


@implementer(ILogObserver)
class StreamObserver:
    """Write formatted events to a stream; any thread may log, so writes take a lock.

    A signal handler can log in the middle of a write on the same thread (Twisted's SIGTERM
    handler logs "Received SIGTERM"; Python runs handlers between bytecodes and inside a
    write that a signal interrupted): waiting for a plain lock there waits for itself, and
    the process never stops. So the lock is re-entrant and a line logged while this thread
    is already writing is queued, then written by the interrupted call when its own line is
    out (never a nested write into the stream, which a BufferedWriter refuses).
    """

    def __init__(self, stream: IO[str], formatter: Any) -> None:
        self.stream = stream
        self.formatter = formatter
        self._lock = threading.RLock()
        self._writing = False
        self._pending: list[str] = []

    def __call__(self, event: LogEvent) -> None:
        text = self.formatter(event)
        with self._lock:
            self._pending.append(text)
            if self._writing:
                return  # re-entered by a signal handler: the outer call writes it
            self._writing = True
            try:
                while self._pending:
                    self.stream.write(self._pending.pop(0))
                self.stream.flush()
            finally:
                self._writing = False


# --- folding Twisted's legacy lines ----------------------------------------------------------

_LISTENING = re.compile(r"^(?P<factory>\S+) starting on (?P<address>.+)$")
_CLOSED = re.compile(r"^\((?P<transport>TCP|UDP|UNIX|SSL|TLS)(?: Port)? (?P<address>.+) Closed\)$")
_PROTOCOL = re.compile(r"^(?P<verb>Starting|Stopping) protocol (?P<protocol>.+)$")
_ACCESS = re.compile(
    r'^"?(?P<remote>[^" ]+)"? - (?P<user>\S+) \[(?P<when>[^\]]+)\] "(?P<method>\S+) (?P<uri>\S+)'
    r' (?P<version>[^"]+)" (?P<status>\d{3}) (?P<size>\S+) "(?P<referrer>[^"]*)" "(?P<agent>[^"]*)"$')
_FACTORY_FORMATS = frozenset({"Starting factory {factory!r}", "Stopping factory {factory!r}"})


def _address_fields(address: str) -> dict[str, Any]:
    address = address.strip("'\"")
    if address.isdigit():
        return {"port": int(address)}
    return {"address": address}


def fold_event(event: LogEvent) -> LogEvent:
    """Twisted's unstructured lines as structured events (a new dict; others unchanged).

    Listening/closed ports keep info level with C{factory}/C{transport}/C{port} fields; the
    per-connection chatter (factories and UDP protocols starting and stopping, the web access
    log, which C{BootSite} already logs with fields for the boot routes) drops to debug.
    """
    namespace = event.get("log_namespace")
    if namespace == "log_legacy":
        text = str(event.get("log_text") or "")
        m = _LISTENING.match(text)
        if m:
            fields = _address_fields(m.group("address"))
            where = "{port}" if "port" in fields else "{address}"
            return _refold(event, "twisted.internet", LogLevel.info,
                           "{factory} listening on " + where, factory=m.group("factory"),
                           event="listening", **fields)
        m = _CLOSED.match(text)
        if m:
            fields = _address_fields(m.group("address"))
            where = "{port}" if "port" in fields else "{address}"
            return _refold(event, "twisted.internet", LogLevel.info,
                           "{transport} port " + where + " closed",
                           transport=m.group("transport"), event="closed", **fields)
        m = _PROTOCOL.match(text)
        if m:
            return _refold(event, "twisted.internet", LogLevel.debug,
                           m.group("verb") + " protocol {protocol}", protocol=m.group("protocol"))
        return _refold(event, "twisted", event.get("log_level") or LogLevel.info, "{text}", text=text)
    if event.get("log_format") in _FACTORY_FORMATS:
        folded = dict(event)
        folded["log_level"] = LogLevel.debug
        return folded
    if namespace == "twisted.python.log" and "log_io" in event:
        m = _ACCESS.match(str(event.get("log_io") or ""))
        if m:
            size = m.group("size")
            return _refold(
                event, "twisted.web.access", LogLevel.debug,
                "HTTP {method} {uri} {status} {size} {remote}", method=m.group("method"),
                uri=m.group("uri"), status=int(m.group("status")),
                size=int(size) if size.isdigit() else 0, remote=m.group("remote"),
                user_agent=m.group("agent"), referrer=m.group("referrer"))
    return event


def _refold(source: LogEvent, namespace: str, level: LogLevel, fmt: str, **fields: Any) -> LogEvent:
    folded = {k: v for k, v in source.items()
              if k.startswith("log_") and k not in ("log_text", "log_io", "log_format")}
    folded.update(fields)
    folded["log_namespace"] = namespace
    folded["log_level"] = level
    folded["log_format"] = fmt
    return folded


@implementer(ILogObserver)
class FoldingObserver:
    """Applies L{fold_event} before the next observer (the level filter) sees an event."""

    def __init__(self, observer: ILogObserver) -> None:
        self.observer = observer

    def __call__(self, event: LogEvent) -> None:
        try:
            event = fold_event(event)
        except Exception:
            pass  # never lose an event over folding it
        self.observer(event)


def make_observer(log_format: str = "text", level: str = "info", stream: IO[str] | None = None) -> ILogObserver:
    """The observer sidero logs through: C{log_format} lines at C{level} and above."""
    writer = StreamObserver(stream if stream is not None else sys.stdout, FORMATTERS[log_format])
    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
    return FoldingObserver(FilteringLogObserver(writer, [predicate]))


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


# --- urllib3 during an outage ---------------------------------------------------------------

_URLLIB3_POOL = "urllib3.connectionpool"
_HOST_IN_ERROR = re.compile(r"host='(?P<host>[^']+)', port=(?P<port>\d+)")
_REASON = re.compile(r"\): (?P<reason>[^\"')]+)")
_RESPONSE_FORMAT = '%s://%s:%s "%s %s %s" %s %s'
_PASS = object()


class OutageFolder:
    """urllib3 logs a warning per retry of every request while an API server is away (three
    per call, and the informers call again and again). This keeps one warning per host when
    it stops answering and one info line, with the count of retries it swallowed, when a
    request to it completes again. Thread-safe: urllib3 logs from the k8s pool's threads."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._down: dict[str, list[Any]] = {}  # host -> [since, suppressed retries, reason]

    @property
    def down(self) -> dict[str, str]:
        """Hosts in an outage and why (for tests and health output)."""
        with self._lock:
            return {host: state[2] for host, state in self._down.items()}

    def handle(self, record: logging.LogRecord) -> Any:
        """C{(level, format, fields)} to log instead, None to drop, or C{_PASS}."""
        if record.name != _URLLIB3_POOL:
            return _PASS
        msg = record.msg if isinstance(record.msg, str) else ""
        args = record.args if isinstance(record.args, tuple) else ()
        if msg.startswith("Retrying (") and record.levelno >= logging.WARNING and len(args) >= 2:
            return self._retry(args[1])
        if msg == _RESPONSE_FORMAT and len(args) >= 3:
            return self._answered(f"{args[1]}:{args[2]}")
        return _PASS

    def _retry(self, error: Any) -> Any:
        text = str(error)
        m = _HOST_IN_ERROR.search(text)
        host = f"{m.group('host')}:{m.group('port')}" if m else ""
        why = _REASON.search(text)
        reason = why.group("reason") if why else type(error).__name__
        with self._lock:
            state = self._down.get(host)
            if state is not None:
                state[1] += 1
                return None
            self._down[host] = [self.clock(), 0, reason]
        return (LogLevel.warn, "API server {host} is not answering ({reason}); retrying, and not"
                " logging each retry until it answers again",
                {"host": host or "(unknown)", "reason": reason, "event": "outage"})

    def _answered(self, host: str) -> Any:
        with self._lock:
            state = self._down.pop(host, None)
            if state is None:
                state = self._down.pop("", None)
        if state is None:
            return _PASS
        return (LogLevel.info, "API server {host} answers again after {seconds:.1f}s"
                " ({suppressed} retries not logged)",
                {"host": host, "seconds": self.clock() - state[0], "suppressed": state[1],
                 "event": "recovered"})


class StdlibBridge(logging.Handler):
    """A stdlib C{logging} handler that re-emits records as twisted.logger events.

    A thread-local guard stops a loop should anything forward twisted.logger back into
    stdlib logging (C{STDLibLogObserver}). urllib3's pool logs every request at debug so that
    L{OutageFolder} sees recoveries; those records go no further unless C{min_level} is debug.
    """

    def __init__(self, publisher: Any = None, outages: OutageFolder | None = None,
                 min_level: int = logging.DEBUG) -> None:
        super().__init__()
        self.publisher = publisher
        self.outages = outages if outages is not None else OutageFolder()
        self.min_level = min_level
        self._local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._local, "active", False):
            return
        folded = self.outages.handle(record)
        if folded is None:
            return
        if folded is not _PASS:
            level, fmt, fields = folded
            Logger(namespace=record.name, observer=self.publisher).emit(level, fmt, **fields)
            return
        if record.levelno < self.min_level:
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
    # Completed requests (debug) tell the outage folder that a host answers again.
    logging.getLogger(_URLLIB3_POOL).setLevel(logging.DEBUG)
    _bridge.min_level = logging.DEBUG if level == "debug" else logging.INFO
    return _bridge
