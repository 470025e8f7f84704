# -*- test-case-name: tests.protocols.grpc.test_port -*-
"""One TCP port for HTTP/1.1 and h2c gRPC (spec §3.1, §8).

iPXE, Talos' metadata fetch and probes speak HTTP/1.1; the agent and Talos' SideroLink client
speak gRPC over cleartext HTTP/2 with prior knowledge: they open with the fixed 24-byte
connection preface C{PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n} and no Upgrade dance.  So the
first bytes of a connection decide it:

  - the preface: the connection is spliced byte for byte onto a grpcio server listening on a
    private local address (loopback ephemeral port or a UNIX socket), with flow control both
    ways (each side is the other's push producer, so a slow reader stops the other reading);
  - anything else (a request line never starts like the preface): the bytes read so far are
    replayed into an ordinary twisted.web HTTP channel of the site, which keeps the
    connection from then on (keep-alive, pipelining, timeouts all as usual).

Bounds (L{sidero.protocols.http.limits.HTTPLimits}): at most C{max_connections} open
connections and C{max_connections_per_source} from one source address (more are closed at
once, counted in C{refused}), so a flood of idle connections cannot take every descriptor; the
HTTP side has a per-request deadline and header/body limits; gRPC message and stream limits
are grpcio's options (L{sidero.protocols.grpc.server.GRPC_OPTIONS}).

The splice keeps grpcio in charge of HTTP/2 and gRPC (framing, HPACK, flow control, unknown
methods answered UNIMPLEMENTED); Twisted only moves bytes.  HTTP/2 requests that are not gRPC
also reach grpcio (Go routes those to its HTTP mux); no known client sends them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import grpc
from twisted.application.internet import TCPServer
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource
from twisted.web.server import Site

from sidero.protocols.grpc.h2guard import FrameGuard
from sidero.protocols.http.limits import (
    H2_FLOOD,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_FROM_SOURCE,
    HTTPLimits,
    guarded_site,
    new_refusals,
)

#: The HTTP/2 client connection preface (RFC 9113 §3.4).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

#: Seconds a connection may take to send enough bytes to be told apart.
DEFAULT_SNIFF_TIMEOUT = 10.0

SNIFFING, HTTP, CONNECTING, GRPC, CLOSED = "sniffing", "http", "connecting", "grpc", "closed"


def classify(data: bytes) -> str | None:
    """C{GRPC} for the HTTP/2 preface, C{HTTP} for anything else, None while undecided."""
    head = data[: len(PREFACE)]
    if not PREFACE.startswith(head):
        return HTTP
    return GRPC if len(head) == len(PREFACE) else None


#: Pending connections the kernel queues for the API port (Twisted's default is 50): a fleet
#: booting at once opens connections faster than one accept per reactor turn, and a full
#: queue drops SYNs, which clients retry only after a second (bench/fleet saw that as 1-3 s
#: latencies). The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 4096

class _Backend(Protocol):
    """Our connection to the grpcio server, spliced to one client connection."""

    def __init__(self, front: SplitProtocol) -> None:
        self.front = front

    def connectionMade(self) -> None:
        self.front.factory.backends.add(self)

    def dataReceived(self, data: bytes) -> None:
        self.front.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.front.factory.backends.discard(self)
        self.front.backend_lost()


class _BackendFactory(Factory):
    def __init__(self, front: SplitProtocol) -> None:
        self.front = front

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return _Backend(self.front)


class SplitProtocol(Protocol):
    """One client connection: sniff, then become an HTTP channel or a splice to grpcio."""

    log = Logger()

    def __init__(self, factory: ApiPortFactory, addr: IAddress | None) -> None:
        self.factory = factory
        self.addr = addr
        self.state = SNIFFING
        self.buffer = b""
        self.http: Protocol | None = None
        self.backend: _Backend | None = None
        self._connecting: Deferred[Any] | None = None
        self._timer: IDelayedCall | None = None
        self.guard: FrameGuard | None = None

    def connectionMade(self) -> None:
        self.factory.connections.add(self)
        self.factory.opened(self.addr)
        self._timer = self.factory.reactor.callLater(self.factory.sniff_timeout, self._too_slow)

    def _too_slow(self) -> None:
        self._timer = None
        if self.state == SNIFFING:
            self.factory.counters["sniff_timeouts"] += 1
            self.log.debug("API port: {peer} sent too little to classify; closing", peer=self.addr)
            self.transport.abortConnection()  # type: ignore[union-attr]

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def dataReceived(self, data: bytes) -> None:
        if self.state == HTTP:
            assert self.http is not None
            self.http.dataReceived(data)
        elif self.state == GRPC:
            assert self.backend is not None
            if self._flooding(data):
                return
            self.backend.transport.write(data)  # type: ignore[union-attr]
        elif self.state == CONNECTING:
            # Read before the pause took effect; sent once the backend is there.
            if self._flooding(data):
                return
            self.buffer += data
        elif self.state == SNIFFING:
            self.buffer += data
            kind = classify(self.buffer)
            if kind == HTTP:
                self._become_http()
            elif kind == GRPC:
                self._become_grpc()

    def _become_http(self) -> None:
        self._stop_timer()
        self.state = HTTP
        self.factory.counters["http"] += 1
        data, self.buffer = self.buffer, b""
        channel = self.factory.site.buildProtocol(self.addr)
        assert channel is not None
        self.http = channel
        channel.makeConnection(self.transport)
        if self.state == HTTP:
            channel.dataReceived(data)

    def _flooding(self, data: bytes) -> bool:
        """Whether C{data} pushes this connection past a control-frame limit (then it is
        aborted and counted; L{sidero.protocols.grpc.h2guard})."""
        if self.guard is None:
            return False
        kind = self.guard.feed(data)
        if kind is None:
            return False
        self.factory.count_refusal(H2_FLOOD, _host(self.addr), f"a flood of HTTP/2 {kind} frames")
        self.state = CLOSED
        self.transport.abortConnection()  # type: ignore[union-attr]
        if self.backend is not None:
            self.backend.transport.abortConnection()  # type: ignore[union-attr]
        return True

    def _become_grpc(self) -> None:
        self._stop_timer()
        self.guard = FrameGuard(self.factory.reactor.seconds)
        if self._flooding(self.buffer):
            return
        self.state = CONNECTING
        self.factory.counters["grpc"] += 1
        # Stop reading until there is somewhere to put the bytes.
        self.transport.pauseProducing()  # type: ignore[union-attr]
        d = self.factory.backend_endpoint().connect(_BackendFactory(self))
        self._connecting = d
        d.addCallbacks(self._backend_connected, self._backend_failed)

    def _backend_connected(self, backend: _Backend) -> None:
        self._connecting = None
        if self.state != CONNECTING:  # the client left while we connected
            backend.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.state = GRPC
        self.backend = backend
        data, self.buffer = self.buffer, b""
        front, back = self.transport, backend.transport
        assert front is not None and back is not None
        back.write(data)
        # Each side throttles the other: a full write buffer pauses reading on the far side.
        front.registerProducer(back, True)  # type: ignore[attr-defined]
        back.registerProducer(front, True)  # type: ignore[attr-defined]
        front.resumeProducing()  # type: ignore[attr-defined]

    def _backend_failed(self, failure: Failure) -> None:
        self._connecting = None
        if self.state == CONNECTING:
            self.factory.counters["backend_failures"] += 1
            self.log.error("API port: cannot reach the gRPC backend: {error}",
                           error=failure.getErrorMessage())
            self.transport.loseConnection()  # type: ignore[union-attr]

    def backend_lost(self) -> None:
        """grpcio closed its side (GOAWAY after bad input, shutdown): close the client too."""
        if self.state == GRPC:
            self.factory.counters["grpc_closed_by_backend"] += 1
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:
        state, self.state = self.state, CLOSED
        self._stop_timer()
        if self in self.factory.connections:
            self.factory.connections.discard(self)
            self.factory.closed(self.addr)
        if state == HTTP and self.http is not None:
            self.http.connectionLost(reason if reason is not None else Failure(ConnectionDone()))
        elif state == GRPC and self.backend is not None:
            self.backend.transport.loseConnection()  # type: ignore[union-attr]
        elif state == CONNECTING and self._connecting is not None:
            self._connecting.cancel()


class ApiPortFactory(Factory):
    """Builds L{SplitProtocol}s for the API port.

    @param backend_endpoint: called per gRPC connection for the endpoint of the grpcio server
        (a callable, because the grpcio port is only known once the backend has started).
    @ivar connections: open client connections; @ivar backends: open grpcio connections.
    @ivar counters: connections classified (C{http}, C{grpc}), C{sniff_timeouts},
        C{backend_failures}, C{grpc_closed_by_backend} (grpcio hung up first: a GOAWAY after
        a flood or bad input, or shutdown).
    @ivar refused: connections and requests refused, by reason
        (L{sidero.protocols.http.limits.REASONS}); the HTTP channels count into it too.
    @ivar per_source: open connections by source host.
    """

    log = Logger()

    def __init__(
        self, reactor: Any, site: Site, backend_endpoint: Callable[[], IStreamClientEndpoint],
        sniff_timeout: float = DEFAULT_SNIFF_TIMEOUT, limits: HTTPLimits | None = None,
        refused: dict[str, int] | None = None,
    ) -> None:
        self.reactor = reactor
        self.site = site
        self.backend_endpoint = backend_endpoint
        self.sniff_timeout = sniff_timeout
        self.limits = limits if limits is not None else HTTPLimits()
        self.connections: set[SplitProtocol] = set()
        self.backends: set[_Backend] = set()
        self.per_source: dict[str, int] = {}
        self.counters = {"http": 0, "grpc": 0, "sniff_timeouts": 0, "backend_failures": 0,
                         "grpc_closed_by_backend": 0}
        self.refused = refused if refused is not None else new_refusals()
        self._last_refusal_log = -float("inf")
        self._unlogged = 0

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        host = _host(addr)
        # Returning None makes Twisted close the accepted socket at once.
        if len(self.connections) >= self.limits.max_connections:
            self.count_refusal(TOO_MANY_CONNECTIONS, host, "too many open connections")
            return None
        if self.per_source.get(host, 0) >= self.limits.max_connections_per_source:
            self.count_refusal(TOO_MANY_FROM_SOURCE, host, "too many connections from it")
            return None
        return SplitProtocol(self, addr)

    def count_refusal(self, reason: str, host: str, what: str) -> None:
        """Count a refused connection; log one line per 10 s at most during a flood."""
        self.refused[reason] = self.refused.get(reason, 0) + 1
        self._unlogged += 1
        now = self.reactor.seconds()
        if now - self._last_refusal_log >= 10.0:
            self._last_refusal_log = now
            self.log.warn("API port: closed a connection from {host}: {what} ({open} open,"
                          " {from_source} from it; {count} refusals since the last line)",
                          host=host, what=what, open=len(self.connections),
                          from_source=self.per_source.get(host, 0), count=self._unlogged)
            self._unlogged = 0

    def opened(self, addr: IAddress | None) -> None:
        host = _host(addr)
        self.per_source[host] = self.per_source.get(host, 0) + 1

    def closed(self, addr: IAddress | None) -> None:
        host = _host(addr)
        left = self.per_source.get(host, 0) - 1
        if left > 0:
            self.per_source[host] = left
        else:
            self.per_source.pop(host, None)

    def doStart(self) -> None:
        super().doStart()
        self.site.doStart()

    def doStop(self) -> None:
        self.site.doStop()
        super().doStop()


def _host(addr: IAddress | None) -> str:
    return str(getattr(addr, "host", addr))


class GrpcBackendService(Service):
    """Runs the grpcio server on a private local address for the API port to splice onto.

    @param address: C{127.0.0.1:0} (an ephemeral loopback port, the default) or
        C{unix:/path/to.sock} (its directory must exist; a stale socket is replaced).
    @param stop_grace: seconds in-flight RPCs get to finish on stop before grpcio cancels them.
    """

    log = Logger()

    def __init__(
        self, reactor: Any, server_factory: Callable[[], grpc.Server],
        address: str = "127.0.0.1:0", stop_grace: float = 5.0,
    ) -> None:
        self.reactor = reactor
        self.server_factory = server_factory
        self.address = address
        self.stop_grace = stop_grace
        self.server: grpc.Server | None = None
        self.port = 0

    def privilegedStartService(self) -> None:
        # Bound before the public listener so no client ever finds the backend missing.
        self._start()
        super().privilegedStartService()

    def startService(self) -> None:
        self._start()
        super().startService()

    def _start(self) -> None:
        if self.server is not None:
            return
        if self.address.startswith("unix:"):
            path = self.address[len("unix:"):]
            if os.path.exists(path):
                os.unlink(path)
        server = self.server_factory()
        port = server.add_insecure_port(self.address)
        if not self.address.startswith("unix:") and port == 0:
            raise OSError(f"cannot bind the gRPC backend to {self.address}")
        server.start()
        self.server, self.port = server, port
        self.log.info("gRPC backend listening on {address}", address=self.backend_address())

    def backend_address(self) -> str:
        if self.address.startswith("unix:"):
            return self.address
        host = self.address.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def endpoint(self) -> IStreamClientEndpoint:
        """Where to connect to reach the running grpcio server."""
        if self.address.startswith("unix:"):
            return UNIXClientEndpoint(self.reactor, self.address[len("unix:"):], timeout=5)
        host = self.address.rsplit(":", 1)[0]
        return TCP4ClientEndpoint(self.reactor, host, self.port, timeout=5)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        server, self.server = self.server, None
        if server is None:
            return None
        stopped = server.stop(self.stop_grace)
        # Wait without blocking the reactor: in-flight RPCs need it to finish their store calls.
        done: Deferred[None] = Deferred()
        deadline = self.reactor.seconds() + self.stop_grace + 5.0

        def poll() -> None:
            if stopped.is_set() or self.reactor.seconds() >= deadline:
                if self.address.startswith("unix:"):
                    try:
                        os.unlink(self.address[len("unix:"):])
                    except OSError:
                        pass
                done.callback(None)
            else:
                self.reactor.callLater(0.02, poll)

        poll()
        return done


class ApiPortService(MultiService):
    """The API port: children C{grpc-backend} (L{GrpcBackendService}) and C{listener} (a
    TCPServer whose C{.factory} is the L{ApiPortFactory}).

    Stopping is ordered: stop accepting; close HTTP connections (gracefully) and undecided
    ones; let grpcio finish in-flight RPCs and close its connections (which closes their
    clients); then abort whatever is still open, so nothing outlives the service.
    """

    def __init__(self, backend: GrpcBackendService, listener: TCPServer,
                 factory: ApiPortFactory, reactor: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.backend = backend
        self.listener = listener
        self.factory = factory
        backend.setServiceParent(self)
        listener.setServiceParent(self)

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        Service.stopService(self)
        await maybeDeferred(self.listener.stopService)
        for conn in list(self.factory.connections):
            if conn.state != GRPC and conn.transport is not None:
                conn.transport.loseConnection()
        await maybeDeferred(self.backend.stopService)
        for conn in list(self.factory.connections):
            if conn.transport is not None:
                conn.transport.abortConnection()  # type: ignore[attr-defined]
        for _ in range(250):
            if not self.factory.connections and not self.factory.backends:
                break
            await deferLater(self.reactor, 0.02, lambda: None)


def make_api_port_service(
    reactor: Any,
    site_resource: IResource,
    grpc_server_factory: Callable[[], grpc.Server],
    port: int,
    interface: str = "",
    backend_address: str = "127.0.0.1:0",
    sniff_timeout: float = DEFAULT_SNIFF_TIMEOUT,
    stop_grace: float = 5.0,
    limits: HTTPLimits | None = None,
) -> IService:
    """The API port service, named C{http}: HTTP/1.1 for C{site_resource} and h2c gRPC for the
    server C{grpc_server_factory} builds (unstarted; this service binds and starts it).
    See L{ApiPortService}.
    """
    limits = limits if limits is not None else HTTPLimits()
    refused = new_refusals()
    site = guarded_site(site_resource, reactor, limits, refused)
    backend = GrpcBackendService(reactor, grpc_server_factory, backend_address, stop_grace)
    backend.setName("grpc-backend")
    factory = ApiPortFactory(reactor, site, backend.endpoint, sniff_timeout=sniff_timeout,
                             limits=limits, refused=refused)
    listener = TCPServer(port, factory, interface=interface, reactor=reactor, backlog=LISTEN_BACKLOG)
    listener.setName("listener")
    listener.factory = factory  # type: ignore[attr-defined]
    service = ApiPortService(backend, listener, factory, reactor)
    service.setName("http")
    return service
