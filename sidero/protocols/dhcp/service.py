# -*- test-case-name: tests.protocols.dhcp.test_service -*-
"""The C{dhcp-proxy} service: pick the interfaces, bind :67 and :4011 to each, serve.

Each interface gets its own sockets and its own server address (siaddr, options 54 and 66,
HTTP-boot URLs): a multi-homed host answers each network with an address it can reach.

As root (C{fatal}), a proxy that cannot start (no interface, a port that cannot be bound)
stops the process with one line, as Sidero does (spec 3.5): a half-started sidero hides an
outage. As a normal user it logs ONE line saying why and what to pass and stays stopped; the
rest of the process (HTTP, TFTP, controllers) keeps running.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from sidero.protocols.dhcp.interfaces import (
    AddressReader,
    InterfaceSelectionError,
    netlink_ipv4_addresses,
    resolve_ipv4,
    select_interfaces,
)
from sidero.protocols.dhcp.policy import BootFiles, ProxyConfig
from sidero.protocols.dhcp.protocol import (
    MAX_PACKET,
    DHCPCounters,
    DHCPProxyProtocol,
    RateLimitedLog,
)
from sidero.protocols.dhcp.ratelimit import PerClientLimiter

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)

SocketOpener = Callable[[str, int], socket.socket]


def open_bound_socket(interface: str, port: int) -> socket.socket:
    """A UDP socket on 0.0.0.0:C{port} tied to C{interface}.

    SO_BINDTODEVICE makes 255.255.255.255 go out of that interface (a namespace or host
    without a default route otherwise gives ENETUNREACH) and keeps us from answering on
    other networks. SO_REUSEADDR lets another proxy bind the same port on another device.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, interface.encode())
        sock.bind(("0.0.0.0", port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class DHCPProxyStartError(Exception):
    """The proxy cannot start and that is fatal (root); the message is the one line."""


class DHCPProxyService(MultiService):
    """proxyDHCP on each chosen interface: :67 DISCOVER→OFFER and :4011 REQUEST→ACK.

    @ivar failure: why the proxy did not start, or None.
    @ivar interface: the (first) interface bound, once bound.
    @ivar configs: interface -> the decision's configuration there (its server address).
    """

    log = Logger()
    #: an L{sidero.timeline.ITimeline} handed to each protocol (set before start), or None.
    timeline: Any = None

    def __init__(self, reactor: Any, *, endpoint: str, api_port: int, interface: str | None,
                 dhcp_port: int = 67, proxy_port: int | None = 4011,
                 boot_files: BootFiles | None = None,
                 read_addresses: AddressReader = netlink_ipv4_addresses,
                 resolve: Callable[[str], str] = resolve_ipv4,
                 open_socket: SocketOpener = open_bound_socket,
                 counters: DHCPCounters | None = None, fatal: bool = False,
                 limiter: PerClientLimiter | None = None, trace: bool = False) -> None:
        super().__init__()
        self.setName("dhcp-proxy")
        self.reactor = reactor
        self.endpoint = endpoint
        self.api_port = api_port
        self.requested_interface = interface
        self.dhcp_port = dhcp_port
        self.proxy_port = proxy_port
        self.boot_files = boot_files or BootFiles()
        self._read_addresses = read_addresses
        self._resolve = resolve
        self._open_socket = open_socket
        self.counters = counters if counters is not None else DHCPCounters()
        self.rate_limit = RateLimitedLog(reactor)
        self.limiter = limiter
        self.fatal = fatal
        self.trace = trace  # a debug line per reply (costly at full rate: off unless debugging)
        self.config: ProxyConfig | None = None
        self.configs: dict[str, ProxyConfig] = {}
        self.interface: str | None = None
        self.failure: str | None = None
        self._attempted = False
        self._ports: list[IListeningPort] = []

    def privilegedStartService(self) -> None:
        # Ports below 1024 must be bound before twistd drops privileges.
        super().privilegedStartService()
        self._bind()

    def startService(self) -> None:
        if not self._attempted:
            self._bind()
        if self.failure is not None:
            return  # stays stopped; the reason was logged once in _bind
        super().startService()

    def _bind(self) -> None:
        self._attempted = True
        self.failure = None
        ports: list[IListeningPort] = []
        configs: dict[str, ProxyConfig] = {}
        try:
            endpoint_ip = self._resolve(self.endpoint)
            targets = select_interfaces(endpoint_ip, self.requested_interface,
                                        self._read_addresses)
            for iface, server_ip in targets:
                # URLs carry the address this network reached us on (spec 3.5: serverIP).
                config = ProxyConfig(server_ip=server_ip, endpoint=server_ip,
                                     api_port=self.api_port, boot_files=self.boot_files)
                configs[iface] = config
                for port, is_proxy in ((self.dhcp_port, False), (self.proxy_port, True)):
                    if port is None:
                        continue
                    try:
                        sock = self._open_socket(iface, port)
                    except OSError as e:
                        raise InterfaceSelectionError(
                            f"cannot bind UDP 0.0.0.0:{port} on {iface} ({e.strerror or e}); "
                            "the proxy needs root or CAP_NET_RAW+CAP_NET_BIND_SERVICE and host "
                            "networking, or pass --disable-dhcp-proxy") from e
                    try:
                        proto = DHCPProxyProtocol(config, proxy_port=is_proxy, clock=self.reactor,
                                                  counters=self.counters,
                                                  rate_limit=self.rate_limit,
                                                  limiter=self.limiter)
                        proto.timeline = self.timeline
                        proto.trace = self.trace
                        ports.append(self.reactor.adoptDatagramPort(
                            sock.fileno(), socket.AF_INET, proto, maxPacketSize=MAX_PACKET + 1))
                    finally:
                        sock.close()  # the reactor holds its own duplicate
        except (InterfaceSelectionError, ValueError) as e:
            self._fail(str(e), ports)
            return
        except Exception as e:  # never take the process down for the proxy by accident
            self._fail(f"unexpected error: {e!r}", ports)
            return
        self._ports = ports
        self.configs = configs
        self.interface, self.config = next(iter(configs.items()))
        for iface, config in configs.items():
            self.log.info(
                "DHCP proxy listening on {interface} (server {server_ip}, UDP {dhcp_port}"
                "{proxy}); boot URLs http://{address}:{api_port}/",
                interface=iface, server_ip=config.server_ip, dhcp_port=self.dhcp_port,
                proxy=f" and {self.proxy_port}" if self.proxy_port is not None else "",
                address=config.server_ip, api_port=self.api_port)

    def _fail(self, reason: str, ports: list[IListeningPort]) -> None:
        for p in ports:
            p.stopListening()
        self.failure = reason
        if self.fatal:
            raise DHCPProxyStartError(f"DHCP proxy: {reason}")
        self.log.error("DHCP proxy NOT started: {reason}", reason=reason)

    def stopService(self) -> Deferred[Any]:
        ports, self._ports = self._ports, []
        ds: list[Deferred[Any]] = [maybeDeferred(p.stopListening) for p in ports]
        if self.running:
            ds.append(maybeDeferred(super().stopService))
        self._attempted = False  # a restart tries again; self.failure stays for reporting
        return gatherResults(ds, consumeErrors=True)


def make_dhcp_proxy_service(reactor: Any, *, endpoint: str, api_port: int,
                            interface: str | None, dhcp_port: int = 67,
                            proxy_port: int | None = 4011, **kwargs: Any) -> IService:
    """The C{dhcp-proxy} service (see L{DHCPProxyService} for the optional hooks)."""
    return DHCPProxyService(reactor, endpoint=endpoint, api_port=api_port, interface=interface,
                            dhcp_port=dhcp_port, proxy_port=proxy_port, **kwargs)
