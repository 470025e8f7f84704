# -*- test-case-name: tests.protocols.http.test_limits -*-
"""Bounds on what one HTTP/1.1 client of the API port can make the server hold or wait for.

Twisted's C{HTTPChannel} resets its idle timeout on every byte, so a client that sends one
header byte every few seconds (slowloris) keeps a connection and a request object forever,
and it answers every oversized request with a bare C{400} (or, for a line past C{MAX_LENGTH},
no answer at all).  L{GuardedHTTPChannel} adds what Go's C{http.Server} and nginx have:

  - a request deadline (C{request_timeout}) from a request's first byte to its last byte
    (request line, headers, body): past it the client gets C{408} and the connection closes;
    the idle timeout between requests stays Twisted's;
  - explicit header limits answered C{431 Request Header Fields Too Large} (total bytes,
    number of headers, one header line) and C{414 URI Too Long} for the request line;
  - a body limit answered C{413 Content Too Large} before the body is read (announced
    C{Content-Length}) or as soon as a chunked body passes it.  No route of the API port takes
    a body, so the default is small.

Every refusal is counted in the shared C{refused} mapping (by reason) that metrics read.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import IResource
from twisted.web.server import Site

#: Refusal reasons (a closed set: metric label values).
REQUEST_TIMEOUT = "request-timeout"
HEADERS_TOO_LARGE = "headers-too-large"
URI_TOO_LONG = "uri-too-long"
BODY_TOO_LARGE = "body-too-large"
TOO_MANY_CONNECTIONS = "too-many-connections"
TOO_MANY_FROM_SOURCE = "too-many-from-source"
#: an h2c connection sent more control frames than any real client (the gRPC splice).
H2_FLOOD = "h2-flood"
REASONS = (REQUEST_TIMEOUT, HEADERS_TOO_LARGE, URI_TOO_LONG, BODY_TOO_LARGE,
           TOO_MANY_CONNECTIONS, TOO_MANY_FROM_SOURCE, H2_FLOOD)

_STATUS = {
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
}


@dataclass(frozen=True)
class HTTPLimits:
    """The limits of one API port (seconds and bytes)."""

    #: first byte of a request to its last byte (slowloris on headers or body).
    request_timeout: float = 10.0
    #: idle keep-alive connection (Twisted's C{timeOut}).
    idle_timeout: float = 60.0
    #: request line plus every header line.
    max_header_bytes: int = 16 * 1024
    max_headers: int = 100
    #: one line (the request line, or one header line).
    max_line: int = 8 * 1024
    max_body: int = 64 * 1024
    max_connections: int = 1024
    max_connections_per_source: int = 64


#: when the last refusal was logged, and how many were not logged since (process-wide).
_LOG_STATE: dict[str, float] = {"last": -float("inf"), "suppressed": 0}


def new_refusals() -> dict[str, int]:
    return dict.fromkeys(REASONS, 0)


class GuardedHTTPChannel(http.HTTPChannel):
    """An C{HTTPChannel} with a per-request deadline and explicit 408/413/414/431 answers.

    C{limits} and C{refused} are class attributes set by L{guarded_channel}.
    """

    log = Logger()
    limits = HTTPLimits()
    refused: MutableMapping[str, int] = new_refusals()

    _deadline: IDelayedCall | None = None
    _refusing = False
    _body_bytes = 0
    _reading_body = False

    def connectionMade(self) -> None:
        self.timeOut = self.limits.idle_timeout  # type: ignore[assignment]
        # Twisted's own limits sit above ours, so ours answer first and with the right status.
        self.MAX_LENGTH = self.limits.max_line
        self.totalHeadersSize = self.limits.max_header_bytes + 1
        self.maxHeaders = self.limits.max_headers + 1
        super().connectionMade()

    # -- the request deadline ------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._refusing:
            return
        if self._deadline is None and not self._handlingRequest and data:
            self._deadline = self.callLater(self.limits.request_timeout, self._too_slow)
        super().dataReceived(data)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        self.refuse(408, REQUEST_TIMEOUT, "request not received in time")

    def allContentReceived(self) -> None:
        self._cancel_deadline()
        self._reading_body = False
        super().allContentReceived()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        super().connectionLost(reason)

    # -- header and body limits ------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        if self._refusing:
            return
        if self._receivedHeaderSize + len(line) > self.limits.max_header_bytes:
            first = getattr(self, "_HTTPChannel__first_line", 0)
            if first:
                self.refuse(414, URI_TOO_LONG, "request line too long")
            else:
                self.refuse(431, HEADERS_TOO_LARGE, "request headers too large")
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if getattr(self, "_HTTPChannel__first_line", 0):
            self.refuse(414, URI_TOO_LONG, "request line too long")
        else:
            self.refuse(431, HEADERS_TOO_LARGE, "header line too long")

    def headerReceived(self, line: bytes) -> bool:
        if self._receivedHeaderCount >= self.limits.max_headers:
            self.refuse(431, HEADERS_TOO_LARGE, "too many request headers")
            return False
        return bool(super().headerReceived(line))

    def allHeadersReceived(self) -> None:
        length = self.length
        if length is not None and length > self.limits.max_body:
            self.refuse(413, BODY_TOO_LARGE, "request body too large")
            return
        self._body_bytes = 0
        self._reading_body = True
        super().allHeadersReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if self._refusing:
            return
        if self._reading_body:
            self._body_bytes += len(data)
            # Chunked framing counts too: a few bytes per chunk, still a bound.
            if self._body_bytes > self.limits.max_body + 4096:
                self.refuse(413, BODY_TOO_LARGE, "request body too large")
                return
        super().rawDataReceived(data)

    # -- answering a refusal ---------------------------------------------------------------

    def refuse(self, code: int, reason: str, message: str) -> None:
        """Answer C{code} with C{message}, close the connection, count C{reason}."""
        if self._refusing:
            return
        self._refusing = True
        self._cancel_deadline()
        self.refused[reason] = self.refused.get(reason, 0) + 1
        reactor = getattr(self.factory, "reactor", None)  # the Site's (a Clock in tests)
        now = reactor.seconds() if reactor is not None else 0.0
        if now - _LOG_STATE["last"] >= 10.0:  # one line per 10 s during a flood
            peer = self.transport.getPeer() if self.transport is not None else None
            self.log.info("API port: refused {peer}: {code} {message} ({suppressed} more refusals"
                          " not logged since the last line)", peer=getattr(peer, "host", peer),
                          code=code, message=message, suppressed=_LOG_STATE["suppressed"])
            _LOG_STATE["last"], _LOG_STATE["suppressed"] = now, 0
        else:
            _LOG_STATE["suppressed"] += 1
        body = (message + "\n").encode()
        if self.transport is not None:
            self.transport.write(
                b"HTTP/1.1 %d %s\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8"
                b"\r\nContent-Length: %d\r\n\r\n%s" % (code, _STATUS[code], len(body), body))
        self.setRawMode()  # stop LineReceiver handing us the rest of this buffer
        # Lose the connection; abort it after abortTimeout if the client does not read
        # (Twisted's timeoutConnection, without its log line per connection).
        self.setTimeout(None)
        if self.abortTimeout is not None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)
        self.loseConnection()


def guarded_channel(limits: HTTPLimits, refused: MutableMapping[str, int]) -> type[GuardedHTTPChannel]:
    """A L{GuardedHTTPChannel} class bound to C{limits}, counting into C{refused}."""
    attributes: dict[str, Any] = {"limits": limits, "refused": refused}
    return type("GuardedHTTPChannel", (GuardedHTTPChannel,), attributes)


class BootRoutesSite(Site):
    """The Site of the boot routes (API port and plain HTTP): no access log.

    L{sidero.protocols.http.site.BootSite} logs every request itself, with its fields; the
    combined-format line Twisted writes besides (folded to debug by L{sidero.logs}, then
    dropped at info) cost a tenth of a boot request's CPU for nothing.
    """

    def log(self, request: Any) -> None:
        pass


def guarded_site(resource: IResource, reactor: Any, limits: HTTPLimits,
                 refused: MutableMapping[str, int]) -> Site:
    """The boot routes' Site: tracebacks never shown, requests bounded by C{limits}."""
    site = BootRoutesSite(resource, reactor=reactor)
    site.displayTracebacks = False
    site.protocol = guarded_channel(limits, refused)  # type: ignore[assignment]
    return site
