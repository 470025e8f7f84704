# -*- test-case-name: tests.protocols.tftp.test_workers -*-
"""Several processes serving one TFTP port (C{SO_REUSEPORT}).

One Python thread cannot keep up with a rack booting at once (every DATA block is a trip
through the interpreter), so the service can bind C{workers} sockets to the same port with
C{SO_REUSEPORT}: the kernel spreads peers over them by a hash of their address, so all the
packets of one peer's transfer reach the same socket. The first socket is served in this
process by the ordinary L{TFTPProtocol}; each other one by a child process
(C{python -m sidero.protocols.tftp.worker}) that inherits it as file descriptor 3, already
bound (port 69 is bound as root before twistd drops privileges, children never need it).

Children report on their stdout, one JSON object per line: each finished transfer (for the
boot timeline, with the counters it changed in the same line), counter deltas (added to this process's L{TFTPStats}, so metrics stay one
set of counters) and log events at info and above (re-emitted here with C{worker=n}). A
child that exits while the service runs is started again after a second on the same socket
(this process keeps every socket open, so the kernel's spreading does not change); on stop
each child gets SIGTERM, and SIGKILL after C{stop_timeout}.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, fields
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from sidero.protocols.tftp.protocol import TFTPProtocol, TFTPStats

__all__ = ["WorkerPool", "apply_delta", "open_reuseport_sockets", "stats_delta"]

#: Longest report line accepted from a child (a transfer or a log line is far shorter).
MAX_LINE = 64 * 1024


def open_reuseport_sockets(interface: str, port: int, count: int) -> list[socket.socket]:
    """C{count} non-blocking UDP sockets bound to C{interface}:C{port} with C{SO_REUSEPORT}.

    Port 0 picks a free port for the first and binds the rest to it.
    """
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((interface, port))
            port = sock.getsockname()[1]
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


_COUNTERS = tuple(f.name for f in fields(TFTPStats) if f.name != "outcomes")


def stats_delta(now: TFTPStats, before: dict[str, Any]) -> dict[str, Any]:
    """What changed in C{now} since the snapshot C{before} (an C{asdict}); empty if nothing."""
    delta: dict[str, Any] = {}
    for name in _COUNTERS:
        diff = getattr(now, name) - before.get(name, 0)
        if diff:
            delta[name] = diff
    old = before.get("outcomes", {})
    outcomes = {k: v - old.get(k, 0) for k, v in now.outcomes.items() if v != old.get(k, 0)}
    if outcomes:
        delta["outcomes"] = outcomes
    return delta


def apply_delta(stats: TFTPStats, delta: dict[str, Any]) -> None:
    """Add a child's C{stats_delta} to C{stats} (unknown or non-integer fields are ignored)."""
    for name in _COUNTERS:
        value = delta.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(stats, name, getattr(stats, name) + value)
    outcomes = delta.get("outcomes")
    if isinstance(outcomes, dict):
        for outcome, n in outcomes.items():
            if isinstance(outcome, str) and isinstance(n, int) and not isinstance(n, bool):
                stats.outcomes[outcome] += n


class _Child(ProcessProtocol):
    """One worker process: reads its report lines, tells the pool when it ends."""

    def __init__(self, pool: WorkerPool, index: int, sock: socket.socket) -> None:
        self.pool = pool
        self.index = index
        self.sock = sock  # the socket it serves (kept for a restart)
        self.buffer = b""
        self.ended: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(json.dumps(self.pool.child_config).encode() + b"\n")
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        if len(self.buffer) > MAX_LINE:
            self.buffer = b""
        for line in lines:
            self.pool.report(self.index, line)

    def processEnded(self, reason: Failure) -> None:
        self.pool.child_ended(self, reason)
        self.ended.callback(None)


class WorkerPool(Service):
    """The child processes serving the extra C{SO_REUSEPORT} sockets of the TFTP port.

    @param sockets: returns the sockets to serve (the listener's extras, bound by then).
    @param child_config: the JSON the child reads on stdin (roots, options, chain script).
    @param server: the in-process protocol: the children's counter deltas go to its C{stats}
        and their transfers to its C{timeline} (read at each report: the tap sets it late).
    """

    log = Logger()

    def __init__(self, reactor: Any, sockets: Callable[[], list[socket.socket]],
                 child_config: dict[str, Any], server: TFTPProtocol, *,
                 stop_timeout: float = 5.0, argv: list[str] | None = None) -> None:
        self.setName("tftp-workers")
        self.reactor = reactor
        self._sockets = sockets
        self.child_config = child_config
        self.server = server
        self.stop_timeout = stop_timeout
        self.argv = argv or [sys.executable, "-m", "sidero.protocols.tftp.worker"]
        self.children: dict[int, _Child] = {}
        #: transfers reported, by worker index (children are 1..n-1; this process is 0)
        self.reported: Counter[int] = Counter()
        self._restarts: dict[int, IDelayedCall] = {}

    def startService(self) -> None:
        super().startService()
        for index, sock in enumerate(self._sockets(), start=1):
            self._spawn(index, sock)

    def _spawn(self, index: int, sock: socket.socket) -> None:
        self._restarts.pop(index, None)
        if not self.running or sock.fileno() < 0:
            return
        child = _Child(self, index, sock)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self.reactor.spawnProcess(
            child, self.argv[0], self.argv, env=env,
            childFDs={0: "w", 1: "r", 2: 2, 3: sock.fileno()})
        self.children[index] = child

    def report(self, index: int, line: bytes) -> None:
        """One line from child C{index}: a transfer, counter deltas or a log event."""
        try:
            message = json.loads(line)
            kind = message.get("t") if isinstance(message, dict) else None
            if kind == "stats":
                apply_delta(self.server.stats, message.get("delta") or {})
            elif kind == "timeline":
                apply_delta(self.server.stats, message.get("delta") or {})
                self.reported[index] += 1
                if self.server.timeline is None:
                    return
                fields = message.get("fields") or {}
                step = str(message.get("step", "tftp"))
                self.server.timeline.record(step, **{str(k): v for k, v in fields.items()})
            elif kind == "log":
                self._relay_log(index, message)
        except Exception:
            self.server.stats.internal_errors += 1  # a garbled line from a child; counted, not fatal

    def _relay_log(self, index: int, message: dict[str, Any]) -> None:
        """Re-emit a child's log event under its own namespace, with the same text and
        fields, plus C{worker}."""
        level = LogLevel.levelWithName(str(message.get("level", "info")))
        text = str(message.get("text", ""))
        fields = message.get("fields")
        fields = {str(k): v for k, v in fields.items()} if isinstance(fields, dict) else {}
        for reserved in ("worker", "level", "format", "namespace"):
            fields.pop(reserved, None)
        namespace = str(message.get("namespace") or self.log.namespace)
        Logger(namespace=namespace).emit(
            level, text.replace("{", "{{").replace("}", "}}"), worker=index, **fields)

    def child_ended(self, child: _Child, reason: Failure) -> None:
        if self.children.get(child.index) is not child:
            return
        del self.children[child.index]
        if self.running:
            self.log.error("TFTP worker {worker} exited ({reason}); restarting it in 1s",
                           worker=child.index, reason=reason.getErrorMessage())
            self._restarts[child.index] = self.reactor.callLater(
                1.0, self._spawn, child.index, child.sock)
        elif not reason.check(ProcessDone):
            self.log.info("TFTP worker {worker} stopped ({reason})", worker=child.index,
                          reason=reason.getErrorMessage())

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        ended = [child.ended for child in self.children.values()]
        for child in list(self.children.values()):
            self._signal(child, signal.SIGTERM)
        killer = self.reactor.callLater(self.stop_timeout, self._kill_all)
        done: Deferred[Any] = DeferredList(ended)

        def finished(result: Any) -> Any:
            if killer.active():
                killer.cancel()
            return result

        return done.addBoth(finished)

    def _kill_all(self) -> None:
        for child in list(self.children.values()):
            self.log.warn("TFTP worker {worker} did not stop; killing it", worker=child.index)
            self._signal(child, signal.SIGKILL)

    @staticmethod
    def _signal(child: _Child, signum: int) -> None:
        try:
            if child.transport is not None:
                child.transport.signalProcess(signum)
        except ProcessExitedAlready:
            pass


def snapshot(stats: TFTPStats) -> dict[str, Any]:
    """The C{before} argument of L{stats_delta}."""
    out = asdict(stats)
    out["outcomes"] = dict(stats.outcomes)
    return out
