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
from collections.abc import Callable
from dataclasses import asdict
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
from sidero.protocols.tftp.workers import WorkerPool, open_reuseport_sockets
from sidero.threads import ThreadPoolService

__all__ = ["TFTPBindError", "TFTPListener", "build_protocol", "make_tftp_service"]

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
        fatal_bind: bool = False, sockets: int = 1,
    ) -> None:
        self.reactor = reactor
        self.protocol = protocol
        self.port = port
        self.interface = interface
        self.fatal_bind = fatal_bind
        #: how many SO_REUSEPORT sockets to bind; the first is served here, the others
        #: (C{extra_sockets}) by the worker processes.
        self.sockets = sockets
        self.extra_sockets: list[socket.socket] = []
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

    def _listen(self) -> IListeningPort:
        if self.sockets <= 1:
            listening: IListeningPort = self.reactor.listenUDP(
                self.port, self.protocol, interface=self.interface)
            return listening
        try:
            bound = open_reuseport_sockets(self.interface, self.port, self.sockets)
        except OSError as e:
            raise CannotListenError(self.interface, self.port, e) from e
        first, self.extra_sockets = bound[0], bound[1:]
        try:
            listening = self.reactor.adoptDatagramPort(
                first.fileno(), first.family, self.protocol)
        except BaseException:
            self._close_extra()
            raise
        finally:
            first.close()  # the reactor holds its own duplicate
        return listening

    def _close_extra(self) -> None:
        extra, self.extra_sockets = self.extra_sockets, []
        for sock in extra:
            sock.close()

    def _bind(self) -> None:
        try:
            self.listening = self._listen()
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
            "TFTP listening on UDP {host}:{port} ({mode}, {workers} worker{s})",
            host=host.host, port=host.port,
            mode="single-port" if self.protocol.single_port else "standard",
            workers=self.sockets, s="" if self.sockets == 1 else "s",
        )

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self._close_extra()  # our copies only: each worker holds its own until it exits
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


def build_protocol(
    reactor: Any,
    *,
    roots: list[str],
    run: Callable[..., Deferred[Any]],
    single_port: bool = True,
    interface: str = "",
    max_sessions: int = 1000,
    config: SessionConfig | None = None,
    chain_script: bytes | None = None,
) -> TFTPProtocol:
    """The TFTP protocol over C{roots}, reading files with C{run} (a disk pool's C{run});
    the same in the service and in each worker process."""
    log = Logger(namespace=__name__)
    assets = FilesystemAssets(roots, run, aliases=bootfiles.candidates)
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

    return TFTPProtocol(
        assets,
        clock=reactor,
        single_port=single_port,
        listen_transfer=None if single_port else listen_transfer,
        max_sessions=max_sessions,
        config=config,
        assets_for=assets_for,
    )


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
    workers: int = 1,
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
    @param workers: processes serving the port (L{sidero.protocols.tftp.workers}): this one
        and C{workers - 1} children, each with its own C{SO_REUSEPORT} socket and at most
        C{max_sessions} transfers.
    """
    if workers < 1:
        raise ValueError("workers must be at least 1")
    log = Logger(namespace=__name__)
    for root in roots:
        if not os.path.isdir(root):
            log.warn("TFTP root {root} does not exist (yet); it is skipped", root=root)
    top = MultiService()
    top.setName("tftp")
    pool = ThreadPoolService(reactor, "tftp-io", max_threads=io_threads)
    pool.setServiceParent(top)
    protocol = build_protocol(
        reactor, roots=roots, run=pool.run, single_port=single_port, interface=interface,
        max_sessions=max_sessions, config=config, chain_script=chain_script)
    listener = TFTPListener(reactor, protocol, port, interface, fatal_bind, sockets=workers)
    listener.setServiceParent(top)
    if workers > 1:
        child_config = {
            "roots": list(roots), "single_port": single_port, "interface": interface,
            "max_sessions": max_sessions, "io_threads": io_threads,
            "session": asdict(config or SessionConfig()),
            "chain_script": chain_script.decode("latin-1") if chain_script is not None else None,
        }
        WorkerPool(reactor, lambda: listener.extra_sockets, child_config,
                   protocol).setServiceParent(top)
    return top
