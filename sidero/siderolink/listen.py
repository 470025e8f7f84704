# -*- test-case-name: tests.siderolink.test_logreceiver -*-
"""Listening on the tunnel address only (spec §0.2: 4001 and 4002 are reachable only through
the SideroLink tunnel).

The log receiver and the event sink bind C{[<server address>]:<port>}, never all addresses:
on a host network that would expose them to the LAN.  The address exists once the
C{siderolink} service has brought the interface up (it starts first); when it does not (the
tunnel failed, or it is run by something else, C{--disable-siderolink}), binding is retried
every L{RETRY} seconds, so the sink comes up when the address does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

#: Seconds between attempts to bind an address that is not there yet.
RETRY = 5.0


class TunnelListenerService(Service):
    """Binds with C{bind(host)} once C{host()} is known and bindable; C{unbind()} on stop.

    @ivar bound: the host bound, or None while waiting.
    """

    log = Logger()

    def __init__(self, reactor: Any, name: str, host: Callable[[], Awaitable[str]],
                 bind: Callable[[str], None], unbind: Callable[[], Deferred[None] | None],
                 what: str, port: int, retry: float = RETRY) -> None:
        self.setName(name)
        self.reactor = reactor
        self._host = host
        self._bind = bind
        self._unbind = unbind
        self.what = what
        self.port = port
        self.retry = retry
        self.bound: str | None = None
        self._timer: IDelayedCall | None = None
        self._warned = False

    def startService(self) -> Deferred[None]:
        super().startService()
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        host = await self._host()
        self._try(host)

    def _try(self, host: str) -> None:
        self._timer = None
        if not self.running:
            return
        try:
            self._bind(host)
        except OSError as e:
            level = self.log.debug if self._warned else self.log.warn
            level("{what} cannot listen on [{host}]:{port} yet ({error}); retrying every"
                  " {retry:g}s (the address comes with the SideroLink interface)",
                  what=self.what, host=host, port=self.port, error=e.strerror or str(e),
                  retry=self.retry)
            self._warned = True
            self._timer = self.reactor.callLater(self.retry, self._try, host)
            return
        self.bound = host
        self.log.info("{what} listening on [{host}]:{port}", what=self.what, host=host,
                      port=self.port)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.bound is None:
            return Deferred.fromCoroutine(_none())
        self.bound = None
        result = self._unbind()
        return result if result is not None else Deferred.fromCoroutine(_none())


async def _none() -> None:
    return None
