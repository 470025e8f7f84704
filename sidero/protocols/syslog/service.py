# -*- test-case-name: tests.protocols.syslog.test_protocol -*-
"""The C{syslog} service: UDP 514 and TCP 601 (C{--syslog-port}, C{--syslog-tcp-port}) on the
listen address.  Both bind before privileges are dropped; a port that cannot be bound (not
root, another syslog daemon) is one error line and the rest of sidero runs, as with the DHCP
proxy.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from sidero.protocols.syslog.codec import MAX_MESSAGE
from sidero.protocols.syslog.protocol import SyslogSink, SyslogTCPFactory, SyslogUDP


class SyslogService(Service):
    """@ivar failure: why a port is not served (None when both are); @ivar ports: bound ports."""

    log = Logger()

    def __init__(self, reactor: Any, sink: SyslogSink, *, udp_port: int = 514,
                 tcp_port: int = 601, interface: str = "",
                 register: Any = None, unregister: Any = None) -> None:
        self.setName("syslog")
        self.reactor = reactor
        self.sink = sink
        self.udp_port = udp_port
        self.tcp_port = tcp_port
        self.interface = interface
        self.tcp_factory = SyslogTCPFactory(sink, register, unregister)
        self.ports: list[IListeningPort] = []
        self.failure: str | None = None
        self._attempted = False

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._bind()

    def startService(self) -> None:
        if not self._attempted:
            self._bind()
        super().startService()

    def _bind(self) -> None:
        self._attempted = True
        failures = []
        interface = self.interface
        try:
            self.ports.append(self.reactor.listenUDP(self.udp_port, SyslogUDP(self.sink),
                                                     interface=interface,
                                                     maxPacketSize=MAX_MESSAGE + 1))
        except CannotListenError as e:
            failures.append(f"UDP {self.udp_port}: {e.socketError}")
        try:
            self.ports.append(self.reactor.listenTCP(self.tcp_port, self.tcp_factory,
                                                     interface=interface))
        except CannotListenError as e:
            failures.append(f"TCP {self.tcp_port}: {e.socketError}")
        if failures:
            self.failure = "; ".join(failures)
            self.log.error("syslog NOT listening on {ports} (needs root or CAP_NET_BIND_SERVICE"
                           " for ports below 1024; another syslog daemon may hold them, or pass"
                           " --disable-syslog)", ports=self.failure)
        if self.ports:
            bound = []
            for p in self.ports:
                host: Any = p.getHost()
                bound.append(f"{host.type} {host.port}")
            self.log.info("syslog listening on {ports}", ports=", ".join(bound))

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        ports, self.ports = self.ports, []
        self._attempted = False
        return gatherResults([maybeDeferred(p.stopListening) for p in ports], consumeErrors=True)
