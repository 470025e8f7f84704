# -*- test-case-name: tests.protocols.tftp.test_protocol -*-
"""The TFTP DatagramProtocol: demultiplexing, limits, and nothing else.

Two modes:
  - single-port (Sidero's, and the default): every packet of every transfer uses the
    server's port; sessions are keyed by the peer's (host, port).  A Kubernetes Service
    exposes one UDP port, and NAT/conntrack helpers are not needed.  A new RRQ from a
    peer that has a session replaces it, except an exact repeat of the RRQ before the
    peer acknowledged anything, which is answered by resending (the client merely timed
    out waiting for our first packet).
  - standard (RFC 1350): each transfer gets a fresh ephemeral port (its TID) from the
    injected C{listen_transfer}; packets from anyone but the peer on that port get an
    ERROR 5 (unknown transfer ID) and do not disturb the transfer.

Read-only: a WRQ is refused with ERROR 2 (access violation, "read-only server"), as
tftpd-hpa does without C{-c}.  Modes C{octet} and C{netascii} are both served as bytes
(boot files are binary; tftp-hpa's client asks for netascii unless told otherwise, and
Sidero's pin/tftp ignores the mode too); C{mail} or anything else is an illegal operation.

Robustness: a malformed datagram is dropped, counted and logged (rate-limited); stray
ACK/ERROR/DATA on the server port from peers without a session are dropped silently
(answering would make the server a reflector); at most C{max_sessions} transfers run
at once, further RRQs get ERROR 0 "server busy"; nothing raises out of
C{datagramReceived}.
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.error import MessageLengthError
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from sidero.protocols.tftp import codec
from sidero.protocols.tftp.backend import IBootAssets
from sidero.protocols.tftp.codec import ErrorCode, MalformedDatagram
from sidero.protocols.tftp.session import Outcome, ReadSession, SessionConfig

__all__ = ["RateLimiter", "TFTPProtocol", "TFTPStats"]

Address = Any  # (host, port) as Twisted gives it
ListenTransfer = Callable[[DatagramProtocol], IListeningPort]


@dataclass
class TFTPStats:
    """Counters (read by metrics and tests)."""

    requests: int = 0
    duplicate_requests: int = 0
    replaced: int = 0
    write_requests: int = 0
    bad_mode: int = 0
    busy: int = 0
    malformed: int = 0
    stray: int = 0
    unknown_tid: int = 0
    send_errors: int = 0
    internal_errors: int = 0
    bytes_sent: int = 0
    retransmits: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)


class RateLimiter:
    """At most C{burst} events per C{period} seconds; counts what it suppressed."""

    def __init__(self, clock: IReactorTime, burst: int = 10, period: float = 60.0) -> None:
        self.clock = clock
        self.burst = burst
        self.period = period
        self._window_start = -float("inf")
        self._count = 0
        self.suppressed = 0

    def allow(self) -> int | None:
        """None if the event must be dropped, else how many were suppressed before it."""
        now = self.clock.seconds()
        if now - self._window_start >= self.period:
            self._window_start = now
            self._count = 0
        if self._count >= self.burst:
            self.suppressed += 1
            return None
        self._count += 1
        suppressed, self.suppressed = self.suppressed, 0
        return suppressed


class _TransferPort(DatagramProtocol):
    """Standard mode: the ephemeral port of one transfer (its TID)."""

    noisy = False  # one port per transfer: Twisted's start/stop lines would flood the log

    def __init__(self, server: TFTPProtocol, peer: Address) -> None:
        self.server = server
        self.peer = peer
        self.session: ReadSession | None = None
        self.port: IListeningPort | None = None

    def datagramReceived(self, datagram: bytes, addr: Address) -> None:
        try:
            session = self.session
            if session is None:
                return
            if addr != self.peer:
                self.server.stats.unknown_tid += 1
                self.server._write(
                    self.transport,
                    codec.encode_error(ErrorCode.UNKNOWN_TID, "Unknown transfer ID"),
                    addr,
                )
                return
            block = codec.decode_ack_fast(datagram)
            if block >= 0:
                session.ack_received(block)
                return
            self.server._dispatch(session, datagram, addr)
        except Exception:
            self.server._internal_error()


class TFTPProtocol(DatagramProtocol):
    """Read-only TFTP server on one UDP port.

    @param listen_transfer: standard mode only: binds a new ephemeral port for a
        transfer's protocol and returns it (e.g. C{lambda p: reactor.listenUDP(0, p)}).
    @param assets_for: picks the assets for one request (by its options: iPXE gets the
        chain script for boot binaries); by default every request reads C{assets}.
    """

    log = Logger()
    noisy = False
    #: an L{sidero.timeline.ITimeline} told of each finished transfer, or None.
    timeline: Any = None

    def __init__(
        self,
        assets: IBootAssets,
        *,
        clock: IReactorTime,
        single_port: bool = True,
        listen_transfer: ListenTransfer | None = None,
        max_sessions: int = 1000,
        config: SessionConfig | None = None,
        assets_for: Callable[[codec.Request], IBootAssets] | None = None,
    ) -> None:
        if not single_port and listen_transfer is None:
            raise ValueError("standard mode needs listen_transfer")
        if max_sessions < 1:
            raise ValueError("max_sessions must be positive")
        self.assets = assets
        self.assets_for = assets_for
        self.clock = clock
        self.single_port = single_port
        self.listen_transfer = listen_transfer
        self.max_sessions = max_sessions
        self.config = config or SessionConfig()
        self.stats = TFTPStats()
        # Single-port sessions by peer; standard-mode sessions by identity.
        self.sessions: dict[Address, ReadSession] = {}
        self._transfers: dict[ReadSession, _TransferPort] = {}
        self._malformed_log = RateLimiter(clock)
        self._error_log = RateLimiter(clock)

    @property
    def active(self) -> int:
        """Number of transfers in progress."""
        return len(self.sessions) + len(self._transfers)

    # -- I/O ---------------------------------------------------------------------------

    def _write(self, transport: Any, packet: bytes, addr: Address) -> None:
        try:
            transport.write(packet, addr)
        except (OSError, MessageLengthError):
            # A full socket buffer or an unreachable peer is a lost packet: the
            # retransmission timer deals with it.
            self.stats.send_errors += 1

    def _sender(self, transport: Any, addr: Address) -> Callable[[bytes], None]:
        """A send function bound to one peer, for the DATA hot path.

        On a real UDP port it calls the socket's C{sendto} directly: Twisted's
        C{Port.write} re-validates the address (three C{inet_pton} calls) on every
        datagram, which was a tenth of the server's CPU time at 512-byte blocks; the
        peer's address came from C{recvfrom}, so it needs no validation.
        """
        sock = getattr(transport, "socket", None)
        if not isinstance(sock, socket.socket):
            write = self._write

            def send_via_transport(packet: bytes) -> None:
                write(transport, packet, addr)

            return send_via_transport
        sendto = sock.sendto
        stats = self.stats

        def send(packet: bytes) -> None:
            try:
                sendto(packet, addr)
            except OSError:
                stats.send_errors += 1  # a lost packet: the timer retransmits

        return send

    def _reply(self, packet: bytes, addr: Address) -> None:
        if self.transport is not None:
            self._write(self.transport, packet, addr)

    def datagramReceived(self, datagram: bytes, addr: Address) -> None:
        try:
            if self.single_port:
                session = self.sessions.get(addr)
                # The hot path: an ACK of a running transfer (decode_ack_fast, inlined).
                if (
                    session is not None and len(datagram) >= 4
                    and datagram[1] == codec.ACK and datagram[0] == 0
                ):
                    session.ack_received((datagram[2] << 8) | datagram[3])
                    return
            self._received(datagram, addr)
        except Exception:
            self._internal_error()

    def _internal_error(self) -> None:
        self.stats.internal_errors += 1
        suppressed = self._error_log.allow()
        if suppressed is not None:
            self.log.failure(
                "TFTP internal error ({suppressed} similar suppressed)", suppressed=suppressed
            )

    def _received(self, datagram: bytes, addr: Address) -> None:
        try:
            packet = codec.decode(datagram)
        except MalformedDatagram as e:
            self.stats.malformed += 1
            suppressed = self._malformed_log.allow()
            if suppressed is not None:
                self.log.warn(
                    "TFTP malformed datagram from {peer}: {reason} "
                    "({suppressed} similar suppressed)",
                    peer=addr, reason=e.reason, suppressed=suppressed,
                )
            return
        if isinstance(packet, codec.Request):
            self._request(packet, datagram, addr)
            return
        session = self.sessions.get(addr) if self.single_port else None
        if session is None:
            self.stats.stray += 1
            return
        self._dispatch(session, datagram, addr, packet)

    def _dispatch(
        self,
        session: ReadSession,
        datagram: bytes,
        addr: Address,
        packet: codec.Datagram | None = None,
    ) -> None:
        """Feed a non-ACK packet of the peer to its session."""
        if packet is None:
            try:
                packet = codec.decode(datagram)
            except MalformedDatagram:
                self.stats.malformed += 1
                return
        if isinstance(packet, codec.Ack):
            session.ack_received(packet.block)
        elif isinstance(packet, codec.Error):
            session.error_received(packet.code, packet.message)
        elif isinstance(packet, codec.Data):
            session.illegal_received("DATA")
        elif isinstance(packet, codec.OptionAck):
            session.illegal_received("OACK")
        else:
            session.illegal_received("request on a transfer port")

    # -- requests ----------------------------------------------------------------------

    def _request(self, request: codec.Request, datagram: bytes, addr: Address) -> None:
        if request.opcode == codec.WRQ:
            self.stats.write_requests += 1
            self._reply(codec.encode_error(ErrorCode.ACCESS_VIOLATION, "Read-only server"), addr)
            return
        if request.mode not in ("octet", "netascii"):
            self.stats.bad_mode += 1
            self._reply(
                codec.encode_error(ErrorCode.ILLEGAL_OPERATION, "Unsupported mode"), addr
            )
            return
        if self.single_port:
            existing = self.sessions.get(addr)
            if existing is not None:
                if existing.is_retransmitted_request(datagram):
                    self.stats.duplicate_requests += 1
                    existing.resend()
                    return
                self.stats.replaced += 1
                existing.abort("replaced by a new request")
        if self.active >= self.max_sessions:
            self.stats.busy += 1
            self._reply(codec.encode_error(ErrorCode.NOT_DEFINED, "Server busy"), addr)
            return
        self.stats.requests += 1
        self.log.debug(
            "TFTP RRQ {filename!r} from {peer} options {options}",
            filename=request.filename, peer=addr, options=request.options,
        )
        if self.single_port:
            session = self._new_session(
                request, datagram, addr, self._sender(self.transport, addr)
            )
            self.sessions[addr] = session
        else:
            assert self.listen_transfer is not None
            tid = _TransferPort(self, addr)
            try:
                tid.port = self.listen_transfer(tid)
            except Exception as e:
                self.log.error("TFTP cannot open a transfer port: {error}", error=e)
                self._reply(codec.encode_error(ErrorCode.NOT_DEFINED, "Server error"), addr)
                return
            # listen_transfer connected the protocol to its port synchronously.
            session = self._new_session(
                request, datagram, addr, self._sender(tid.transport, addr)
            )
            tid.session = session
            self._transfers[session] = tid
        session.start()

    def _new_session(
        self, request: codec.Request, datagram: bytes, addr: Address,
        send: Callable[[bytes], None],
    ) -> ReadSession:
        assets = self.assets_for(request) if self.assets_for is not None else self.assets
        return ReadSession(
            clock=self.clock, assets=assets, request=request, peer=addr, send=send,
            on_done=self._session_done, config=self.config, raw_request=datagram,
        )

    def _session_done(self, session: ReadSession, outcome: Outcome) -> None:
        if self.sessions.get(session.peer) is session:
            del self.sessions[session.peer]
        tid = self._transfers.pop(session, None)
        if tid is not None:
            tid.session = None
            if tid.port is not None:
                tid.port.stopListening()
        self.stats.outcomes[outcome.value] += 1
        self.stats.bytes_sent += session.bytes_sent
        self.stats.retransmits += session.retransmits
        if self.timeline is not None:
            self.timeline.record(
                "tftp", source="tftp", ip=str(session.peer[0]), file=session.request.filename,
                outcome=outcome.value, bytes=session.bytes_sent, size=session.size,
                seconds=round(self.clock.seconds() - session.started, 3), blksize=session.blksize,
                windowsize=session.windowsize)
        if outcome is Outcome.COMPLETE:
            self.log.info(
                "TFTP sent {filename!r} ({size} bytes) to {peer} in {seconds:.3f}s",
                filename=session.request.filename, size=session.size, peer=session.peer,
                seconds=self.clock.seconds() - session.started,
            )
        elif outcome in (Outcome.NOT_FOUND, Outcome.ACCESS_VIOLATION):
            self.log.info(
                "TFTP refused {filename!r} to {peer}: {outcome}",
                filename=session.request.filename, peer=session.peer, outcome=outcome.value,
            )

    def abort_all(self) -> None:
        """End every transfer (service shutdown)."""
        for session in list(self.sessions.values()) + list(self._transfers):
            session.abort("server stopping")

    def stopProtocol(self) -> None:
        self.abort_all()
