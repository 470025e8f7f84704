# -*- test-case-name: tests.service.test_systemd_notify -*-
"""systemd's notification protocol (sd_notify(3)) for C{Type=notify} and C{WatchdogSec=}.

C{READY=1} is sent once the readiness checks pass (every service started, caches synced,
leadership known), with C{STATUS=} lines saying what is awaited meanwhile; C{WATCHDOG=1} is
sent every half C{WATCHDOG_USEC} while the liveness checks pass, so a wedged reactor or a
dead HTTP port gets the process restarted; C{STOPPING=1} on shutdown. The protocol is one
datagram per message on the unix socket named by C{NOTIFY_SOCKET} (a leading C{@} names an
abstract socket); no libsystemd needed.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from sidero.health import HEALTHZ, READYZ, HealthChecks

#: How often readiness is re-checked before READY=1 has been sent.
READY_POLL = 1.0


class Notifier:
    """Sends sd_notify messages to one socket; never raises and never blocks."""

    log = Logger()

    def __init__(self, address: str) -> None:
        if not address or not (address.startswith("/") or address.startswith("@")):
            raise ValueError(f"NOTIFY_SOCKET {address!r} is not a unix socket path")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._socket.setblocking(False)
        self._warned = False

    def send(self, **fields: str) -> bool:
        """Send C{KEY=value} lines (C{send(READY="1", STATUS="...")}); False if it was lost."""
        message = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            self._socket.sendto(message, self.address)
        except OSError as e:
            if not self._warned:
                self._warned = True
                self.log.warn("systemd notification to {socket} failed: {error}",
                              socket=self.address.replace("\0", "@"), error=str(e))
            return False
        self._warned = False
        return True

    def close(self) -> None:
        self._socket.close()


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings (half the timeout), or None when the watchdog is not
    asked of this process (no C{WATCHDOG_USEC}, or C{WATCHDOG_PID} names another)."""
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2e6


class SystemdNotifierService(Service):
    """READY, STATUS, WATCHDOG and STOPPING from the health checks (see the module doc)."""

    log = Logger()

    def __init__(self, clock: IReactorTime, notifier: Notifier, checks: HealthChecks,
                 watchdog: float | None = None, ready_poll: float = READY_POLL) -> None:
        self.setName("systemd")
        self.clock = clock
        self.notifier = notifier
        self.checks = checks
        self.watchdog = watchdog
        self.ready_poll = ready_poll
        self.ready_sent = False
        self._status = ""
        self._ready_loop: LoopingCall | None = None
        self._watchdog_loop: LoopingCall | None = None
        self._watchdog_failing = ""

    def startService(self) -> None:
        super().startService()
        self._ready_loop = self._loop(self._check_ready, self.ready_poll)
        if self.watchdog is not None:
            self._watchdog_loop = self._loop(self._ping_watchdog, self.watchdog)
            self.log.info("systemd watchdog: pinging every {interval:g}s", interval=self.watchdog)

    def _loop(self, fn: Any, interval: float) -> LoopingCall:
        loop = LoopingCall(fn)
        loop.clock = self.clock
        loop.start(interval, now=True).addErrback(
            lambda f: self.log.failure("systemd notifier loop failed", f))
        return loop

    def stopService(self) -> Deferred[None]:
        super().stopService()
        for loop in (self._ready_loop, self._watchdog_loop):
            if loop is not None and loop.running:
                loop.stop()
        self._ready_loop = self._watchdog_loop = None
        self.notifier.send(STOPPING="1", STATUS="stopping")
        return succeed(None)

    def _status_line(self, status: str) -> None:
        if status != self._status:
            self._status = status
            self.notifier.send(STATUS=status)

    def _check_ready(self) -> Deferred[None]:
        async def check() -> None:
            ok, why = await self.checks.passing(READYZ)
            if not self.running or self.ready_sent:
                return
            if not ok:
                self._status_line("starting: " + why)
                return
            self.ready_sent = True
            self._status = "ready"
            self.notifier.send(READY="1", STATUS="ready", MAINPID=str(os.getpid()))
            self.log.info("systemd notified: ready")
            if self._ready_loop is not None and self._ready_loop.running:
                self._ready_loop.stop()

        return ensureDeferred(check())

    def _ping_watchdog(self) -> Deferred[None]:
        async def ping() -> None:
            ok, why = await self.checks.passing(HEALTHZ)
            if not self.running:
                return
            if ok:
                if self._watchdog_failing:
                    self.log.info("liveness checks pass again; watchdog pings resume")
                    self._watchdog_failing = ""
                    if self.ready_sent:
                        self._status_line("ready")
                self.notifier.send(WATCHDOG="1")
                return
            if why != self._watchdog_failing:
                self.log.warn("liveness checks fail ({reason}): no watchdog ping; systemd will"
                              " restart sidero if this lasts", reason=why)
                self._watchdog_failing = why
            self._status_line("unhealthy: " + why)

        return ensureDeferred(ping())


def make_notifier_service(clock: IReactorTime, checks: HealthChecks,
                          environ: Mapping[str, str] | None = None) -> SystemdNotifierService | None:
    """The notifier when systemd asked for notifications (C{NOTIFY_SOCKET}), else None."""
    environ = os.environ if environ is None else environ
    address = environ.get("NOTIFY_SOCKET", "")
    if not address:
        return None
    notifier = Notifier(address)
    return SystemdNotifierService(clock, notifier, checks,
                                  watchdog=watchdog_interval(environ, os.getpid()))
