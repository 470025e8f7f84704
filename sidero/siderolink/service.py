# -*- test-case-name: tests.siderolink.test_service -*-
"""The C{siderolink} service: the WireGuard server of the tunnel and the state Provision reads.

On start it loads (or creates) the installation identity, resolves the public endpoint
(C{--siderolink-endpoint}, default the API endpoint; a host name is resolved to its first
address, spec §3.8), opens the WireGuard device (L{sidero.siderolink.wireguard}) with the
server address C{<prefix>::1/64} and the listen port C{--siderolink-port}, and lets
L{sidero.siderolink.peers.PeerSync} keep its peers equal to the ServerBindings.

A tunnel that cannot be set up (not root, no wireguard-go, ...) does not stop the process
(the Go siderolink-manager also sleeps rather than crash when netlink is refused): it is one
error line, Provision answers UNAVAILABLE with the reason, and everything else runs.  A
wireguard-go that dies is restarted with backoff and gets every peer again.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from sidero.backoff import Backoff
from sidero.controllers.informer import Informer
from sidero.siderolink.config import SideroLinkConfig
from sidero.siderolink.peers import PeerSync
from sidero.siderolink.provision import format_endpoint
from sidero.siderolink.wireguard import IWireGuardDevice, Netlink, WireGuardError, open_device
from sidero.threads import ThreadPoolService

#: The interface name of the Go Sidero.
DEFAULT_INTERFACE = "siderolink"


def resolve_host(host: str) -> str:
    """An IP literal as is; a host name resolved to its first address (blocking)."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"{host} has no address")
    return str(infos[0][4][0])


DeviceOpener = Callable[..., Awaitable[IWireGuardDevice]]


class SideroLinkService(MultiService):
    """The tunnel (see the module docstring).

    @param identity: loads or creates the installation identity (L{sidero.siderolink.config}).
    @param bindings: the ServerBinding informer the peers come from.
    @ivar failure: why the tunnel is down (None while up or starting).
    @ivar device: the device while it is up.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        identity: Callable[[], Awaitable[SideroLinkConfig]],
        bindings: Informer,
        *,
        endpoint: str,
        port: int,
        mode: str = "auto",
        interface: str = DEFAULT_INTERFACE,
        opener: DeviceOpener = open_device,
        netlink: Netlink | None = None,
        resolve: Callable[[str], str] = resolve_host,
        restart_backoff: Backoff | None = None,
    ) -> None:
        super().__init__()
        self.setName("siderolink")
        self.reactor = reactor
        self._identity_source = identity
        self.bindings = bindings
        self.endpoint_host = endpoint
        self.port = port
        self.mode = mode
        self.interface = interface
        self.opener = opener
        self.netlink = netlink
        self._resolve = resolve
        self.restart_backoff = restart_backoff or Backoff(initial=1.0, maximum=60.0)
        # One thread: netlink calls happen one at a time, in order.
        self.runner = ThreadPoolService(reactor, "siderolink", max_threads=1)
        self.runner.setServiceParent(self)
        self.peers = PeerSync(reactor)
        self.identity: SideroLinkConfig | None = None
        self.public_endpoint: str | None = None
        self.device: IWireGuardDevice | None = None
        self.failure: str | None = None
        self._restarts = 0
        self._restart_timer: IDelayedCall | None = None
        self._stopping = False
        bindings.add_handler(
            on_add=self.peers.binding_changed,
            on_update=lambda old, new: self.peers.binding_changed(new),
            on_delete=self.peers.binding_deleted,
        )

    @property
    def unavailable(self) -> str | None:
        """Why Provision cannot answer: None once the identity and endpoint are known."""
        if self.failure is not None:
            return self.failure
        if self.identity is None or self.public_endpoint is None:
            return "starting"
        return None

    def startService(self) -> Deferred[None]:
        self._stopping = False
        super().startService()
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        # A store failure here is a start-up failure of the process (like the HTTP service's).
        identity = await self._identity_source()
        self.identity = identity
        try:
            host = await self.runner.run(self._resolve, self.endpoint_host)
        except OSError as e:
            self._fail(f"cannot resolve the SideroLink endpoint {self.endpoint_host}: {e}")
            return
        self.public_endpoint = format_endpoint(host, self.port)
        await self._open()

    async def _open(self, restart: bool = False) -> None:
        assert self.identity is not None
        try:
            kwargs: dict[str, Any] = {} if self.netlink is None else {"netlink": self.netlink}
            device = await self.opener(self.reactor, self.mode, self.interface, self.runner, **kwargs)
            await device.up(self.identity.private_key, self.port, self.identity.server_interface)
        except WireGuardError as e:
            self._failed(str(e), restart)
            return
        except Exception as e:
            self.log.failure("SideroLink: unexpected error setting up {interface}",
                             interface=self.interface)
            self._failed(f"unexpected error: {e!r}", restart)
            return
        if self._stopping:
            await device.down()
            return
        self.failure = None
        self.device = device
        self._restarts = 0
        device.on_lost(lambda reason: self._lost(device, reason))
        self.peers.attach(device)
        self.log.info(
            "SideroLink up: {interface} ({backend}) {address}, WireGuard port {port},"
            " endpoint {endpoint}", interface=self.interface, backend=device.backend,
            address=self.identity.server_interface.with_prefixlen, port=self.port,
            endpoint=self.public_endpoint)

    def _fail(self, reason: str) -> None:
        self.failure = reason
        self.log.error("SideroLink NOT started: {reason}; nodes cannot join the tunnel"
                       " (Provision answers UNAVAILABLE)", reason=reason)

    def _failed(self, reason: str, restart: bool) -> None:
        if not restart:
            self._fail(reason)
            return
        self.failure = reason
        self._schedule_restart(reason)

    def _lost(self, device: IWireGuardDevice, reason: str) -> None:
        if device is not self.device or self._stopping:
            return
        self.device = None
        self.peers.detach()
        self._schedule_restart(f"interface lost: {reason}")

    def _schedule_restart(self, reason: str) -> None:
        if self._stopping:
            return
        delay = self.restart_backoff.delay(self._restarts, 0.0)
        self._restarts += 1
        self.log.error("SideroLink {interface}: {reason}; restarting in {delay:.1f}s",
                       interface=self.interface, reason=reason, delay=delay)
        self._restart_timer = self.reactor.callLater(
            delay, lambda: Deferred.fromCoroutine(self._open(restart=True)))

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._stopping = True
        if self._restart_timer is not None and self._restart_timer.active():
            self._restart_timer.cancel()
        device, self.device = self.device, None
        self.peers.detach()
        if device is not None:
            try:
                await device.down()
            except Exception:
                self.log.failure("SideroLink: removing {interface} failed", interface=self.interface)
        await maybeDeferred(super().stopService)
