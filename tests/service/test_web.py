"""The shared HTTP pieces: the body-limited request and the Status-shaped HTTP failures."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import server
from twisted.web.resource import Resource

from sidero.store.errors import BadRequest, NotFound
from sidero.web import (
    InternalError,
    MethodNotAllowed,
    RequestEntityTooLarge,
    UnsupportedMediaType,
    http_error,
    limited_request_factory,
    media_type,
)


class Echo(Resource):
    """Answers with what the request kept: C{too_large} and the body."""

    isLeaf = True

    def render_POST(self, request: server.Request) -> bytes:
        assert request.content is not None
        request.content.seek(0)
        return b"%d:%s" % (getattr(request, "too_large", False), request.content.read())


def post(max_body: int, headers: bytes, *chunks: bytes) -> bytes:
    """POST through the real HTTP parser; the body Echo answered with."""
    site = server.Site(Echo(), requestFactory=limited_request_factory(max_body))
    site.timeOut = None  # no idle timer on the global reactor
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    assert channel is not None
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    for chunk in chunks:
        channel.dataReceived(chunk)
    return transport.value().split(b"\r\n\r\n", 1)[1]


def chunked(*parts: bytes) -> list[bytes]:
    return [b"%x\r\n%s\r\n" % (len(p), p) for p in parts] + [b"0\r\n\r\n"]


class LimitedRequestTests(SynchronousTestCase):
    def test_within_the_limit_keeps_the_body(self) -> None:
        """A body up to the limit is kept whole and not flagged."""
        self.assertEqual(post(10, b"Content-Length: 10\r\n", b"0123456789"), b"0:0123456789")

    def test_announced_length_over_the_limit(self) -> None:
        """A Content-Length over the limit flags the request and nothing is kept."""
        self.assertEqual(post(10, b"Content-Length: 11\r\n", b"01234567890"), b"1:")

    def test_chunked_body_over_the_limit(self) -> None:
        """A body of unannounced length is dropped as soon as it passes the limit."""
        self.assertEqual(post(10, b"Transfer-Encoding: chunked\r\n",
                              *chunked(b"012345", b"6789ab", b"more")), b"1:")

    def test_chunked_body_within_the_limit(self) -> None:
        """Chunks adding up to the limit are all kept."""
        self.assertEqual(post(10, b"Transfer-Encoding: chunked\r\n", *chunked(b"01234", b"56789")),
                         b"0:0123456789")

    def test_factory_sets_the_limit(self) -> None:
        """Each factory carries its own limit."""
        self.assertEqual(limited_request_factory(5).max_body, 5)
        self.assertEqual(limited_request_factory(7).max_body, 7)


class HTTPErrorTests(SynchronousTestCase):
    def test_types_by_code(self) -> None:
        """Each HTTP status the servers refuse with has its Kubernetes reason."""
        for code, cls, reason in [
            (400, BadRequest, "BadRequest"), (404, NotFound, "NotFound"),
            (405, MethodNotAllowed, "MethodNotAllowed"), (413, RequestEntityTooLarge, "RequestEntityTooLarge"),
            (415, UnsupportedMediaType, "UnsupportedMediaType"), (500, InternalError, "InternalError"),
        ]:
            err = http_error(code, "no")
            self.assertIsInstance(err, cls)
            self.assertEqual(err.to_status(), {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "no", "reason": reason, "code": code})

    def test_media_type(self) -> None:
        """The media type without parameters, lower case, from bytes or text."""
        self.assertEqual(media_type(b"Application/JSON; charset=utf-8"), "application/json")
        self.assertEqual(media_type("application/merge-patch+json"), "application/merge-patch+json")
        self.assertEqual(media_type(None), "")
