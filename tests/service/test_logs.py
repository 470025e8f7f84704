"""Log formats, the level filter and the stdlib logging bridge."""

from __future__ import annotations

import io
import json
import logging

from twisted.logger import LogLevel, LogPublisher, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from sidero import logs

T = 1_700_000_000.25  # 2023-11-14T22:13:20.250Z


def event(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "log_time": T, "log_level": LogLevel.info, "log_namespace": "sidero.tftp",
        "log_format": "RRQ {filename} from {peer}", "filename": "ipxe.efi", "peer": "10.0.0.9",
    }
    base.update(kw)
    return base


def failed() -> Failure:
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        return Failure()
    raise AssertionError("unreachable")


class TextFormatTests(SynchronousTestCase):
    """format_text."""

    def test_line(self) -> None:
        """Time in UTC with milliseconds, level, namespace, rendered message."""
        self.assertEqual(
            logs.format_text(event()),
            "2023-11-14T22:13:20.250Z INFO     [sidero.tftp] RRQ ipxe.efi from 10.0.0.9\n",
        )

    def test_failure_traceback_indented(self) -> None:
        """A failure's traceback follows, indented, so one event stays one block."""
        text = logs.format_text(event(log_level=LogLevel.critical, log_failure=failed(),
                                      log_format="boom"))
        lines = text.splitlines()
        self.assertIn("CRITICAL", lines[0])
        self.assertTrue(all(line.startswith("    ") for line in lines[1:]))
        self.assertIn("ZeroDivisionError", text)


class JSONFormatTests(SynchronousTestCase):
    """format_json."""

    def test_fields(self) -> None:
        """One JSON object per line, with the structured fields kept as keys."""
        line = logs.format_json(event())
        self.assertTrue(line.endswith("\n"))
        self.assertEqual(line.count("\n"), 1)
        record = json.loads(line)
        self.assertEqual(record, {
            "time": "2023-11-14T22:13:20.250Z", "level": "info", "logger": "sidero.tftp",
            "msg": "RRQ ipxe.efi from 10.0.0.9", "filename": "ipxe.efi", "peer": "10.0.0.9",
        })

    def test_unserialisable_and_failure(self) -> None:
        """Odd values become strings; a failure adds error and traceback."""
        record = json.loads(logs.format_json(event(peer=object(), log_failure=failed())))
        self.assertIsInstance(record["peer"], str)
        self.assertEqual(record["error"], "ZeroDivisionError: division by zero")
        self.assertIn("Traceback", record["traceback"])


    def test_unencodable_line_falls_back_per_field(self) -> None:
        """A circular value or a map with non-string keys cannot go through one json.dumps:
        those fields alone become their repr, the rest of the line is kept."""
        loop: dict[str, object] = {}
        loop["self"] = loop
        record = json.loads(logs.format_json(event(loop=loop, keyed={(1, 2): "x"})))
        self.assertEqual(record["filename"], "ipxe.efi")
        self.assertEqual(record["loop"], repr(loop))
        self.assertEqual(record["keyed"], repr({(1, 2): "x"}))


class MessageTests(SynchronousTestCase):
    """The message of an event is what twisted.logger's formatEvent makes of it."""

    def test_same_as_format_event(self) -> None:
        """Named fields, attributes, indexes, conversions and format specs (the fast path)
        and twisted's callables and missing keys (the long way) render as formatEvent does."""
        class Peer:
            host = "10.0.0.9"

            def describe(self) -> str:
                return "peer 10.0.0.9"

        for fmt in ["RRQ {filename} from {peer}", "{peer_obj.host}:{ports[1]}", "{filename!r}",
                    "{count:>5}|{ratio:.2f}", "{peer_obj.describe()}", "missing {nothing}",
                    "{{literal}} {filename}", "unbalanced {filename", ""]:
            e = event(log_format=fmt, peer_obj=Peer(), ports=[67, 4011], count=7, ratio=0.5)
            self.assertEqual(logs.format_json(e) and json.loads(logs.format_json(e))["msg"],
                             formatEvent(e), fmt)


class ObserverTests(SynchronousTestCase):
    """make_observer and the environment factory."""

    def test_level_filter(self) -> None:
        """Events below the configured level are dropped."""
        out = io.StringIO()
        observer = logs.make_observer("json", "warn", out)
        observer(event(log_level=LogLevel.info))
        observer(event(log_level=LogLevel.error))
        lines = out.getvalue().splitlines()
        self.assertEqual([json.loads(x)["level"] for x in lines], ["error"])

    def test_environment_factory(self) -> None:
        """twistd --logger=sidero.logs.observer honours SIDERO_LOG_FORMAT/LEVEL, tolerating junk."""
        observer = logs.observer({"SIDERO_LOG_FORMAT": "json", "SIDERO_LOG_LEVEL": "WARNING"})
        writer = observer.observer._observer  # type: ignore[attr-defined]
        self.assertIs(writer.formatter, logs.format_json)
        self.assertIs(logs.observer({"SIDERO_LOG_FORMAT": "xml"}).observer._observer.formatter,  # type: ignore[attr-defined]
                      logs.format_text)


class _ReenteringStream(io.StringIO):
    """A stream whose first write logs again through the observer, on the same thread, as a
    signal handler run in the middle of that write does."""

    def __init__(self) -> None:
        super().__init__()
        self.observer: logs.StreamObserver | None = None
        self.depth = 0
        self.max_depth = 0

    def write(self, text: str) -> int:
        self.depth += 1
        self.max_depth = max(self.max_depth, self.depth)
        try:
            if self.observer is not None:
                observer, self.observer = self.observer, None
                observer(event(log_format="Received SIGTERM, shutting down."))
            return super().write(text)
        finally:
            self.depth -= 1


#: A child that logs lines from the reactor as fast as it can into stdout (a pipe the test
#: leaves unread, so a write blocks) and stops on SIGTERM with Twisted's own handler, which
#: logs "Received SIGTERM" from inside the blocked write.
_LOGGING_CHILD = """
import sys
from twisted.internet import reactor, task
from twisted.logger import Logger, globalLogBeginner
from sidero.logs import make_observer

globalLogBeginner.beginLoggingTo([make_observer("json", "info", sys.stdout)],
                                 redirectStandardIO=False)
log = Logger()
counter = iter(range(10**9))
task.LoopingCall(lambda: [log.info("line {n}", n=next(counter)) for _ in range(50)]).start(0)
reactor.run()
"""


class StreamObserverReentryTests(SynchronousTestCase):
    """A line logged while this thread is already writing (a signal handler) is written after
    the interrupted line, never waits for the lock its own thread holds."""

    def test_reentered_write_is_queued_not_deadlocked(self) -> None:
        import threading

        stream = _ReenteringStream()
        observer = logs.StreamObserver(stream, logs.format_text)
        stream.observer = observer
        # On a thread of its own, so that a deadlock fails the test instead of hanging it.
        worker = threading.Thread(target=observer, args=(event(),), daemon=True)
        worker.start()
        worker.join(10)
        self.assertFalse(worker.is_alive(), "the re-entered log call waited for its own lock")
        lines = stream.getvalue().splitlines()
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("RRQ ipxe.efi from 10.0.0.9", lines[0])
        self.assertIn("Received SIGTERM", lines[1])
        self.assertEqual(stream.max_depth, 1, "a write nested inside another write")
        observer(event(peer="10.0.0.10"))  # and the observer still works afterwards
        self.assertIn("10.0.0.10", stream.getvalue().splitlines()[2])

    def test_sigterm_during_a_blocked_log_write_stops_the_process(self) -> None:
        """The failure seen in a full test run: twistd got SIGTERM while its main thread was
        writing a log line to a full pipe and never stopped (Twisted's handler logged, and
        waited for the lock the interrupted write held). Now it stops, and says why."""
        import os
        import signal
        import subprocess
        import sys
        import time

        from tests.paths import REPO, tree_env

        proc = subprocess.Popen([sys.executable, "-c", _LOGGING_CHILD], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=tree_env(), cwd=str(REPO))
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        first = b""
        deadline = time.monotonic() + 30
        while b"line 0" not in first and time.monotonic() < deadline:
            first += proc.stdout.read() or b""
            time.sleep(0.05)
        self.assertIn(b"line 0", first, "the child never logged")
        time.sleep(1.0)  # unread: the pipe fills and the child's write blocks inside the lock
        proc.send_signal(signal.SIGTERM)
        out = b""
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            out += proc.stdout.read() or b""
            time.sleep(0.01)
        out += proc.stdout.read() or b""
        self.assertIsNotNone(proc.returncode, "the child did not stop within 30 s of SIGTERM")
        self.assertIn(b"Received SIGTERM", out)


class BridgeTests(SynchronousTestCase):
    """stdlib logging into twisted.logger."""

    def test_record_becomes_event(self) -> None:
        """A stdlib record arrives with its logger name as namespace and a mapped level."""
        seen: list[dict[str, object]] = []
        publisher = LogPublisher(seen.append)
        bridge = logs.StdlibBridge(publisher)
        logger = logging.getLogger("kubernetes.test")
        logger.propagate = False
        logger.addHandler(bridge)
        self.addCleanup(logger.removeHandler, bridge)
        logger.warning("watch of %s {braces} failed", "servers")
        (ev,) = seen
        self.assertEqual(ev["log_namespace"], "kubernetes.test")
        self.assertIs(ev["log_level"], LogLevel.warn)
        self.assertEqual(formatEvent(ev), "watch of servers {braces} failed")

    def test_exception_becomes_failure(self) -> None:
        """logger.exception() carries the exception as log_failure."""
        seen: list[dict[str, object]] = []
        bridge = logs.StdlibBridge(LogPublisher(seen.append))
        logger = logging.getLogger("pyghmi.test")
        logger.propagate = False
        logger.addHandler(bridge)
        self.addCleanup(logger.removeHandler, bridge)
        try:
            raise OSError("bmc down")
        except OSError:
            logger.exception("ipmi")
        self.assertIsInstance(seen[0]["log_failure"], Failure)

    def test_levels(self) -> None:
        """Stdlib levels map to the nearest twisted level at or below them."""
        self.assertIs(logs.twisted_level(logging.DEBUG), LogLevel.debug)
        self.assertIs(logs.twisted_level(logging.INFO), LogLevel.info)
        self.assertIs(logs.twisted_level(logging.WARNING + 5), LogLevel.warn)
        self.assertIs(logs.twisted_level(logging.ERROR), LogLevel.error)
        self.assertIs(logs.twisted_level(logging.CRITICAL), LogLevel.critical)

    def test_install_is_idempotent(self) -> None:
        """bridge_stdlib_logging adds one handler however often it is called."""
        for name in ["", *logs.LIBRARY_LOGGERS]:
            self.addCleanup(logging.getLogger(name).setLevel, logging.getLogger(name).level)
        first = logs.bridge_stdlib_logging("info")
        second = logs.bridge_stdlib_logging("debug")
        self.addCleanup(logging.getLogger().removeHandler, first)
        self.addCleanup(setattr, logs, "_bridge", None)
        self.assertIs(first, second)
        self.assertEqual(logging.getLogger().handlers.count(first), 1)
        self.assertEqual(logging.getLogger("urllib3").level, logging.DEBUG)
