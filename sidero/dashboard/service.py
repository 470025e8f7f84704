# -*- test-case-name: tests.dashboard.test_site -*-
"""The C{dashboard} service: the klein site on its own listener (C{--dashboard-port}, default
8082, on C{--dashboard-address}, default 127.0.0.1).

Its own listener, not the API port: the API port faces the provisioning network, where every
booting machine reaches it, while the dashboard is for operators.  On loopback it asks for no
login; anywhere else it needs C{--dashboard-password-file} (the tap refuses to start without).
A port that cannot be bound is one error line and the rest of sidero runs: the dashboard is
never what boots a machine.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.server import Site

from sidero.dashboard.live import LiveHub
from sidero.dashboard.site import MAX_FORM, DashboardApp
from sidero.web import limited_request_factory


class DashboardService(Service):
    """Listens for the dashboard while running; starts and stops the live hub with it.

    @ivar port: the bound port (None before start, or when binding failed).
    @ivar failure: why it is not listening (None when it is).
    """

    log = Logger()

    def __init__(self, reactor: Any, app: DashboardApp, hub: LiveHub, port: int,
                 interface: str = "127.0.0.1") -> None:
        self.setName("dashboard")
        self.reactor = reactor
        self.app = app
        self.hub = hub
        self.port_number = port
        self.interface = interface
        self.port: IListeningPort | None = None
        self.failure: str | None = None
        # Request bodies (only the login form has one) stop being kept past MAX_FORM.
        self.site = Site(app.resource(), requestFactory=limited_request_factory(MAX_FORM),
                         reactor=reactor)
        self.site.displayTracebacks = False
        self.site.noisy = False

    def startService(self) -> None:
        super().startService()
        self.hub.start()
        try:
            self.port = self.reactor.listenTCP(self.port_number, self.site, interface=self.interface)
        except CannotListenError as e:
            self.failure = str(e.socketError)
            self.log.error("dashboard NOT listening on {address}:{port}: {error}"
                           " (--dashboard-port, or --disable-dashboard)",
                           address=self.interface or "*", port=self.port_number, error=self.failure)
            return
        host: Any = self.port.getHost()
        self.log.info("dashboard on http://{address}:{port}/ ({access})",
                      address=(f"[{host.host}]" if ":" in host.host else host.host), port=host.port,
                      access="login with the password file" if self.app.login_required
                      else "no login: loopback only")

    def stopService(self) -> Any:
        super().stopService()
        self.hub.stop()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None
