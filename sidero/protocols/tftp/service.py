# -*- test-case-name: tests.protocols.tftp.test_service -*-
"""The C{tftp} service: a disk thread pool plus the UDP listener.

Binding happens in C{privilegedStartService} (before twistd drops privileges, as
L{twisted.application.internet.UDPServer} does).  As root (C{fatal_bind}), a failure to bind
(address in use, no such address) stops the process with one clear line: a half-started
sidero that serves HTTP but not TFTP hides an outage.  As a normal user (port 69 is not
ours to bind) it is one error line and the service stays down while the rest runs.

Requests for the iPXE binaries go through L{sidero.protocols.bootfiles}: Sidero's names
find Debian's files, and iPXE itself gets the chain script (C{chain_script}).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from sidero.protocols import bootfiles
from sidero.protocols.tftp import codec
from sidero.protocols.tftp.backend import FilesystemAssets, IBootAssets, OverrideAssets
from sidero.protocols.tftp.protocol import TFTPProtocol
from sidero.protocols.tftp.session import SessionConfig
from sidero.threads import ThreadPoolService

__all__ = ["TFTPBindError", "TFTPListener", "make_tftp_service"]

# Bursts of a window per peer times hundreds of peers overflow the default ~200 KiB
# socket buffers; the kernel caps these at net.core.[rw]mem_max without complaint.
SOCKET_BUFFER = 4 << 20


class TFTPBindError(Exception):
    """The TFTP port cannot be bound and that is fatal (root); the message is the one line."""


class TFTPListener(Service):
    """Binds the TFTP protocol's UDP port; raises out of start-up only with C{fatal_bind}."""

    log = Logger()

    def __init__(
        self, reactor: Any, protocol: TFTPProtocol, port: int, interface: str,
        fatal_bind: bool = False,
    ) -> None:
        self.reactor = reactor
        self.protocol = protocol
        self.port = port
        self.interface = interface
        self.fatal_bind = fatal_bind
        self.listening: IListeningPort | None = None
        self.bind_error: str | None = None
        self.setName("tftp-udp")

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._bind()

    def startService(self) -> None:
        super().startService()
        if self.listening is None and self.bind_error is None:
            self._bind()

    def _bind(self) -> None:
        try:
            self.listening = self.reactor.listenUDP(
                self.port, self.protocol, interface=self.interface
            )
        except CannotListenError as e:
            self.bind_error = str(e.socketError)
            if self.fatal_bind:
                raise TFTPBindError(
                    f"cannot listen on UDP {self.interface or '*'}:{self.port}: {self.bind_error}"
                    " (pass --disable-tftp to run without TFTP)") from e
            self.log.error(
                "TFTP disabled: cannot listen on UDP {interface}:{port}: {error}",
                interface=self.interface or "*", port=self.port, error=self.bind_error,
            )
            return
        except Exception as e:  # never take the process down with us
            self.bind_error = repr(e)
            if self.fatal_bind:
                raise TFTPBindError(
                    f"cannot listen on UDP {self.interface or '*'}:{self.port}: {e!r}") from e
            self.log.error(
                "TFTP disabled: cannot listen on UDP {interface}:{port}: {error}",
                interface=self.interface or "*", port=self.port, error=self.bind_error,
            )
            return
        tune_socket(self.listening)
        host: Any = self.listening.getHost()
        self.log.info(
            "TFTP listening on UDP {host}:{port} ({mode})", host=host.host, port=host.port,
            mode="single-port" if self.protocol.single_port else "standard",
        )

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        listening, self.listening = self.listening, None
        self.bind_error = None
        if listening is None:
            return None
        return listening.stopListening()


def tune_socket(port: IListeningPort) -> None:
    """Enlarge the socket buffers of a listening UDP port (best effort)."""
    sock = getattr(port, "socket", None)
    if sock is None:
        return
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError:
            pass


def make_tftp_service(
    reactor: Any,
    *,
    roots: list[str],
    port: int = 69,
    interface: str = "",
    single_port: bool = True,
    max_sessions: int = 1000,
    config: SessionConfig | None = None,
    io_threads: int = 4,
    chain_script: bytes | None = None,
    fatal_bind: bool = False,
) -> IService:
    """The read-only TFTP server as a service named C{tftp}.

    @param roots: directories searched in order for requested files.
    @param single_port: Sidero's mode (all packets on C{port}); False for RFC 1350
        ephemeral transfer ports.
    @param io_threads: size of the dedicated disk pool (reads are chunked and read ahead,
        so a few threads serve hundreds of transfers).
    @param chain_script: what an iPXE client asking for an iPXE binary gets instead
        (L{sidero.protocols.bootfiles}); None serves the files to everyone.
    @param fatal_bind: a failure to bind the port stops start-up (L{TFTPBindError}).
    """
    log = Logger(namespace=__name__)
    for root in roots:
        if not os.path.isdir(root):
            log.warn("TFTP root {root} does not exist (yet); it is skipped", root=root)
    top = MultiService()
    top.setName("tftp")
    pool = ThreadPoolService(reactor, "tftp-io", max_threads=io_threads)
    pool.setServiceParent(top)
    assets = FilesystemAssets(roots, pool.run, aliases=bootfiles.candidates)
    assets_for = None
    if chain_script is not None:
        script_assets = OverrideAssets(
            assets, chain_script, lambda name: bootfiles.wants_chain_script(name, True))

        def assets_for(request: codec.Request) -> IBootAssets:
            if bootfiles.is_ipxe_tftp(request.options) and bootfiles.wants_chain_script(
                    request.filename, True):
                log.info("TFTP: iPXE asked for {filename!r}: sending the chain script",
                         filename=request.filename)
                return script_assets
            return assets

    def listen_transfer(protocol: DatagramProtocol) -> IListeningPort:
        listening: IListeningPort = reactor.listenUDP(0, protocol, interface=interface)
        return listening

    protocol = TFTPProtocol(
        assets,
        clock=reactor,
        single_port=single_port,
        listen_transfer=None if single_port else listen_transfer,
        max_sessions=max_sessions,
        config=config,
        assets_for=assets_for,
    )
    TFTPListener(reactor, protocol, port, interface, fatal_bind).setServiceParent(top)
    return top
