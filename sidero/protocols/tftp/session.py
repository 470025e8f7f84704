# -*- test-case-name: tests.protocols.tftp.test_session -*-
"""One read transfer as a state machine on an injected clock.

A L{ReadSession} knows nothing about sockets: it is given a C{send(bytes)} callable and
fed the ACK/ERROR packets of its peer by the protocol, which owns demultiplexing.  That
keeps the RFC logic (option negotiation, windows, retransmission, rollover) testable
with a L{twisted.internet.task.Clock} and a list of sent packets.

States: OPENING (waiting for the backend) -> OACK_SENT (waiting for ACK 0, only when an
option was accepted) -> SENDING -> DONE.  Every state has the one retransmission timer:
when it fires without progress the last packet (OACK or window) is sent again, and after
C{max_retries} silent timeouts the session gives up, so no session outlives
C{timeout * (max_retries + 1)} of peer silence.

Windows (RFC 7440): blocks C{base .. base+windowsize-1} are sent back to back.  An ACK
for block k inside what was sent moves C{base} to k+1 and sends a full window from there
(an ACK short of the window's end is how a client reports a gap).  An ACK for C{base-1}
(a duplicate) is ignored: answering duplicates is the Sorcerer's Apprentice bug, only
the timer retransmits.  Block numbers are 64-bit inside and wrap to 0 after 65535 on the
wire, as tftp-hpa, atftp, curl, dnsmasq and iPXE expect.

Data comes from an L{IAssetReader} in chunks read ahead (at least 64 KiB, a window or
more, aligned to the block size so a block never spans two chunks): the reactor only
slices bytes already in memory, and the next chunk is requested while the current window
is in flight.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from sidero.protocols.tftp import codec
from sidero.protocols.tftp.backend import (
    AccessViolation,
    AssetNotFound,
    IAssetReader,
    IBootAssets,
)
from sidero.protocols.tftp.codec import ErrorCode

__all__ = ["Negotiated", "Outcome", "ReadSession", "SessionConfig", "State", "negotiate"]

_DATA_HEADER = codec._HEADER


@dataclass(frozen=True)
class SessionConfig:
    """Transfer limits and timings.

    @ivar timeout: retransmission interval when the client does not ask for one (Sidero:
        5 s).
    @ivar max_retries: silent timeouts tolerated before giving up.
    @ivar max_blksize: the largest block size accepted (the client's choice is capped).
    @ivar max_windowsize: the largest window accepted.
    @ivar max_window_bytes: cap on C{blksize * windowsize}, which bounds per-session memory
        (a window is buffered, plus one chunk of read-ahead).
    @ivar read_ahead: minimum bytes read from the backend per thread hop.
    """

    timeout: float = 5.0
    max_retries: int = 5
    max_blksize: int = codec.BLKSIZE_MAX
    max_windowsize: int = 64
    max_window_bytes: int = 1 << 20
    read_ahead: int = 64 * 1024

    def __post_init__(self) -> None:
        if not codec.BLKSIZE_MIN <= self.max_blksize <= codec.BLKSIZE_MAX:
            raise ValueError("max_blksize must be within 8..65464")
        if not 1 <= self.max_windowsize <= codec.WINDOWSIZE_MAX:
            raise ValueError("max_windowsize must be within 1..65535")
        if self.timeout <= 0 or self.max_retries < 0 or self.read_ahead < 1:
            raise ValueError("timeout, max_retries and read_ahead must be positive")


@dataclass(frozen=True)
class Negotiated:
    """The transfer parameters agreed on, and the OACK to send (empty: no OACK)."""

    blksize: int
    timeout: float
    windowsize: int
    oack: dict[str, str]


def negotiate(options: dict[str, str], size: int, config: SessionConfig) -> Negotiated:
    """Decide the transfer parameters for an RRQ's options (RFC 2347-2349, 7440).

    Accepted options are echoed in the order the client sent them; blksize and
    windowsize may come back smaller than asked, as the RFCs allow.
    """
    wanted = codec.parse_options(options)
    blksize, timeout, windowsize = 512, config.timeout, 1
    accepted: dict[str, str] = {}
    for name in options:
        if name == "blksize" and wanted.blksize is not None:
            blksize = min(wanted.blksize, config.max_blksize)
            accepted[name] = str(blksize)
        elif name == "timeout" and wanted.timeout is not None:
            timeout = float(wanted.timeout)
            accepted[name] = str(wanted.timeout)
        elif name == "tsize" and wanted.tsize is not None:
            accepted[name] = str(size)
        elif name == "windowsize" and wanted.windowsize is not None:
            windowsize = wanted.windowsize
            accepted[name] = ""  # filled in below, once blksize is known
    if "windowsize" in accepted:
        windowsize = max(
            1, min(windowsize, config.max_windowsize, config.max_window_bytes // blksize)
        )
        accepted["windowsize"] = str(windowsize)
    return Negotiated(blksize=blksize, timeout=timeout, windowsize=windowsize, oack=accepted)


class State(enum.Enum):
    OPENING = "opening"
    OACK_SENT = "oack-sent"
    SENDING = "sending"
    DONE = "done"


class Outcome(enum.StrEnum):
    """How a session ended (a label for logs and counters)."""

    COMPLETE = "complete"
    NOT_FOUND = "not-found"
    ACCESS_VIOLATION = "access-violation"
    BACKEND_ERROR = "backend-error"
    TIMEOUT = "timeout"
    PEER_ERROR = "peer-error"
    ILLEGAL = "illegal-operation"
    ABORTED = "aborted"


class ReadSession:
    """One RRQ being served to one peer.

    @param send: writes one datagram to the peer; must not raise.
    @param on_done: called once, with this session and its L{Outcome}, when it ends.
    """

    log = Logger()

    def __init__(
        self,
        *,
        clock: IReactorTime,
        assets: IBootAssets,
        request: codec.Request,
        peer: Any,
        send: Callable[[bytes], None],
        on_done: Callable[[ReadSession, Outcome], None],
        config: SessionConfig,
        raw_request: bytes = b"",
    ) -> None:
        self.clock = clock
        self.assets = assets
        self.request = request
        self.raw_request = raw_request
        self.peer = peer
        self._send = send
        self._on_done = on_done
        self.config = config
        self.state = State.OPENING
        self.outcome: Outcome | None = None
        self.started = clock.seconds()
        self._reader: IAssetReader | None = None
        self._timer: IDelayedCall | None = None
        self._retries = 0
        self._timeout = config.timeout
        # Set by negotiation:
        self.size = 0
        self.blksize = 512
        self.windowsize = 1
        self._oack = b""
        self._total = 0  # number of DATA blocks, the last one short (maybe empty)
        # Window: blocks [_base, _next) have been sent; _base-1 is the last ACKed.
        self._base = 1
        self._next = 1
        # Read-ahead buffer: contiguous chunks (offset, bytes) ending at _buf_end.
        self._chunks: deque[tuple[int, bytes]] = deque()
        self._buf_end = 0
        self._chunk_size = 0
        self._low_water = 0  # read the next chunk once less than this is buffered ahead
        self._current: tuple[int, bytes] = (0, b"")
        self._deadline = 0.0
        self._reading = False
        self.bytes_sent = 0
        self.retransmits = 0  # resends (timer or a repeated request), for metrics

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Open the file; the first packet goes out once the backend answers."""
        self._arm()
        try:
            d = self.assets.open(self.request.filename)
        except Exception:
            d = Deferred()
            d.errback()
        d.addCallbacks(self._opened, self._open_failed)
        d.addErrback(self._internal_error)

    def abort(self, reason: str = "aborted") -> None:
        """End silently (server shutdown, session replaced by a new RRQ)."""
        self._finish(Outcome.ABORTED, None, reason=reason)

    def _finish(
        self, outcome: Outcome, error: tuple[int, str] | None, reason: str = ""
    ) -> None:
        if self.state is State.DONE:
            return
        self.state = State.DONE
        self.outcome = outcome
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if error is not None:
            self._send(codec.encode_error(*error))
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self._chunks.clear()
        self._current = (0, b"")
        self._on_done(self, outcome)

    # -- opening and negotiation -------------------------------------------------------

    def _opened(self, reader: IAssetReader) -> None:
        if self.state is not State.OPENING:
            reader.close()  # timed out or aborted while the backend was busy
            return
        self._reader = reader
        self.size = int(reader.size)
        agreed = negotiate(self.request.options, self.size, self.config)
        self.blksize = agreed.blksize
        self.windowsize = agreed.windowsize
        self._timeout = agreed.timeout
        self._total = self.size // self.blksize + 1
        window_bytes = self.blksize * self.windowsize
        want = max(self.config.read_ahead, window_bytes)
        self._chunk_size = -(-want // self.blksize) * self.blksize
        self._low_water = window_bytes + self._chunk_size // 2
        self._retries = 0
        self._fill()
        if agreed.oack:
            self._oack = codec.encode_oack(agreed.oack)
            self.state = State.OACK_SENT
            self._send(self._oack)
            self._arm()
        else:
            self.state = State.SENDING
            self._send_window()

    def _open_failed(self, failure: Failure) -> None:
        if self.state is not State.OPENING:
            return
        if failure.check(AssetNotFound):
            self._finish(Outcome.NOT_FOUND, (ErrorCode.FILE_NOT_FOUND, "File not found"))
        elif failure.check(AccessViolation):
            self._finish(
                Outcome.ACCESS_VIOLATION, (ErrorCode.ACCESS_VIOLATION, "Access violation")
            )
        else:
            self.log.warn(
                "TFTP open of {filename!r} for {peer} failed: {error}",
                filename=self.request.filename, peer=self.peer,
                error=failure.getErrorMessage(),
            )
            self._finish(Outcome.BACKEND_ERROR, (ErrorCode.NOT_DEFINED, "Server error"))

    def _internal_error(self, failure: Failure) -> None:
        self.log.failure("TFTP session for {peer} failed", failure, peer=self.peer)
        self._finish(Outcome.BACKEND_ERROR, (ErrorCode.NOT_DEFINED, "Server error"))

    # -- packets from the peer ---------------------------------------------------------

    def ack_received(self, wire_block: int) -> None:
        """Handle an ACK from the peer (wire block number)."""
        state = self.state
        if state is State.SENDING:
            base = self._base
            # The only blocks an ACK can name are base-1 .. _next-1 (window <= 65535).
            acked = base - 1 + ((wire_block - base + 1) & 0xFFFF)
            if acked == base - 1 or acked >= self._next:
                return  # duplicate (no Sorcerer's Apprentice) or for a block never sent
            if acked == self._total:
                self._finish(Outcome.COMPLETE, None)
                return
            self._retries = 0
            self._base = acked + 1
            if self.windowsize == 1:
                # Lock-step (every client but atftp/EDK2): one block from the current
                # chunk, without _send_window's loop set-up.  Same effects.
                blksize = self.blksize
                offset = acked * blksize
                start, chunk = self._current
                rel = offset - start
                if 0 <= rel < len(chunk):
                    payload = chunk[rel:rel + blksize]
                    self._send(_DATA_HEADER.pack(codec.DATA, (acked + 1) & 0xFFFF) + payload)
                    self.bytes_sent += len(payload)
                    self._next = acked + 2
                    if self._buf_end - offset < self._low_water and not self._reading:
                        self._fill()
                    self._deadline = self.clock.seconds() + self._timeout
                    if self._timer is None:
                        self._arm()
                    return
            self._next = acked + 1
            self._send_window()
        elif state is State.OACK_SENT:
            if wire_block == 0:
                self.state = State.SENDING
                self._retries = 0
                self._send_window()

    def error_received(self, code: int, message: str) -> None:
        """The peer gave up (e.g. error 8 after our OACK): end without answering."""
        if self.state is not State.DONE:
            self.log.info(
                "TFTP peer {peer} aborted {filename!r}: error {code} {message!r}",
                peer=self.peer, filename=self.request.filename, code=code, message=message,
            )
            self._finish(Outcome.PEER_ERROR, None)

    def illegal_received(self, what: str) -> None:
        """The peer sent a packet that has no place in a read transfer (DATA, OACK...)."""
        self._finish(Outcome.ILLEGAL, (ErrorCode.ILLEGAL_OPERATION, f"Unexpected {what}"))

    def is_retransmitted_request(self, raw: bytes) -> bool:
        """Whether C{raw} repeats our RRQ before the peer acknowledged anything.

        A client that timed out waiting for our first packet sends its RRQ again; restarting
        would make two answers race, so the caller resends instead (L{resend}).
        """
        if raw != self.raw_request:
            return False
        return self.state in (State.OPENING, State.OACK_SENT) or (
            self.state is State.SENDING and self._base == 1
        )

    def resend(self) -> None:
        """Send the current packet again (if there is one yet)."""
        self.retransmits += 1
        if self.state is State.OACK_SENT:
            self._send(self._oack)
        elif self.state is State.SENDING:
            self._next = self._base
            self._send_window()

    # -- sending -----------------------------------------------------------------------

    def _arm(self) -> None:
        """Restart the retransmission deadline.

        The deadline is a number, not a rescheduled DelayedCall: it moves on every ACK,
        and re-sorting the reactor's timers per packet costs more than one timer that,
        when it fires early, sleeps again until the current deadline.
        """
        self._deadline = deadline = self.clock.seconds() + self._timeout
        timer = self._timer
        if timer is None:
            self._timer = self.clock.callLater(self._timeout, self._timer_fired)
        elif timer.getTime() > deadline:  # the negotiated timeout is shorter
            timer.reset(self._timeout)

    def _timer_fired(self) -> None:
        self._timer = None
        if self.state is State.DONE:
            return
        remaining = self._deadline - self.clock.seconds()
        if remaining > 0:
            self._timer = self.clock.callLater(remaining, self._timer_fired)
            return
        self._timed_out()

    def _timed_out(self) -> None:
        self._retries += 1
        if self._retries > self.config.max_retries:
            self.log.info(
                "TFTP transfer of {filename!r} to {peer} timed out at block {block}",
                filename=self.request.filename, peer=self.peer, block=self._base,
            )
            self._finish(Outcome.TIMEOUT, (ErrorCode.NOT_DEFINED, "Timed out"))
            return
        self.retransmits += 1
        if self.state is State.OACK_SENT:
            self._send(self._oack)
        elif self.state is State.SENDING:
            self._next = self._base
            self._send_window()
            return  # _send_window armed the timer
        self._arm()

    def _send_window(self) -> None:
        """Send what is missing of the window [base, base+windowsize); arm the timer.

        This is the per-packet hot path, hence the local variables and the cached
        current chunk.
        """
        end = self._base + self.windowsize
        if end > self._total + 1:
            end = self._total + 1
        blksize = self.blksize
        size = self.size
        send = self._send
        pack = _DATA_HEADER.pack
        block = self._next
        offset = (block - 1) * blksize
        start, chunk = self._current
        chunk_end = start + len(chunk)
        sent = 0
        while block < end:
            if start <= offset < chunk_end:
                rel = offset - start
                payload = chunk[rel:rel + blksize]
            elif offset >= size:
                payload = b""
            else:
                found = self._find_chunk(offset)
                if found is None:
                    break  # read-ahead not there yet: _chunk_read resumes
                start, chunk = found
                chunk_end = start + len(chunk)
                continue
            send(pack(codec.DATA, block & 0xFFFF) + payload)
            sent += len(payload)
            block += 1
            offset += blksize
        self.bytes_sent += sent
        self._next = block
        if self._buf_end - offset < self._low_water and not self._reading:
            self._fill()
        self._arm()

    def _find_chunk(self, offset: int) -> tuple[int, bytes] | None:
        """Make the chunk holding C{offset} current, dropping chunks before the window."""
        floor = (self._base - 1) * self.blksize
        chunks = self._chunks
        while chunks and chunks[0][0] + len(chunks[0][1]) <= floor:
            chunks.popleft()
        for start, chunk in chunks:
            if start <= offset < start + len(chunk):
                self._current = (start, chunk)
                return self._current
        self._fill()
        return None

    def _fill(self) -> None:
        """Keep at least C{_low_water} bytes buffered beyond what was sent."""
        if self._reading or self._reader is None or self._buf_end >= self.size:
            return
        if self._buf_end >= (self._next - 1) * self.blksize + self._low_water:
            return
        self._reading = True
        length = min(self._chunk_size, self.size - self._buf_end)
        d = self._reader.read(self._buf_end, length)
        d.addCallbacks(self._chunk_read, self._read_failed, callbackArgs=(length,))
        d.addErrback(self._internal_error)

    def _chunk_read(self, data: bytes, expected: int) -> None:
        self._reading = False
        if self.state is State.DONE:
            return
        if len(data) != expected:
            self.log.warn(
                "TFTP file {filename!r} changed size while being sent to {peer}",
                filename=self.request.filename, peer=self.peer,
            )
            self._finish(Outcome.BACKEND_ERROR, (ErrorCode.NOT_DEFINED, "File changed"))
            return
        self._chunks.append((self._buf_end, data))
        self._buf_end += len(data)
        if self.state is State.SENDING and self._next < min(
            self._base + self.windowsize, self._total + 1
        ):
            self._send_window()  # was stalled on this chunk
        else:
            self._fill()

    def _read_failed(self, failure: Failure) -> None:
        self._reading = False
        if self.state is State.DONE:
            return
        self.log.warn(
            "TFTP read of {filename!r} for {peer} failed: {error}",
            filename=self.request.filename, peer=self.peer, error=failure.getErrorMessage(),
        )
        self._finish(Outcome.BACKEND_ERROR, (ErrorCode.NOT_DEFINED, "Read error"))
