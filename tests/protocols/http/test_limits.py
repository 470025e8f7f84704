"""The API port's HTTP/1.1 limits (slowloris deadline, 431/414/413) and connection caps, on fakes
with a fake clock.  The same limits against real clients on a running sidero are in
C{tests.integration.test_hostile}."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from sidero.protocols.grpc.port import ApiPortFactory
from sidero.protocols.http.limits import (
    BODY_TOO_LARGE,
    HEADERS_TOO_LARGE,
    REQUEST_TIMEOUT,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_FROM_SOURCE,
    URI_TOO_LONG,
    HTTPLimits,
    guarded_channel,
    guarded_site,
    new_refusals,
)


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return b"hello"

    def render_POST(self, request: Request) -> bytes:
        return b"posted %d" % len(request.content.read())


LIMITS = HTTPLimits(request_timeout=10.0, max_header_bytes=2048, max_headers=20, max_line=1024,
                    max_body=4096, max_connections=4, max_connections_per_source=2)


class ChannelTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.refused = new_refusals()
        self.site = Site(Hello(), reactor=self.clock)
        self.site.protocol = guarded_channel(LIMITS, self.refused)  # type: ignore[assignment]

    def connect(self) -> tuple[Any, StringTransport]:
        channel = self.site.buildProtocol(IPv4Address("TCP", "10.0.0.9", 40000))
        assert channel is not None
        t = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.9", 40000))
        channel.makeConnection(t)
        return channel, t

    def assert_refused(self, t: StringTransport, status: bytes, reason: str) -> None:
        self.assertTrue(t.value().startswith(b"HTTP/1.1 " + status), t.value()[:80])
        self.assertTrue(t.disconnecting)
        self.assertEqual(self.refused[reason], 1)
        self.assertEqual(sum(self.refused.values()), 1)

    def test_normal_requests(self) -> None:
        """Well-formed requests within the limits are answered, keep-alive included."""
        channel, t = self.connect()
        channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(t.value().count(b"200 OK"), 2)
        self.assertFalse(t.disconnecting)
        self.assertEqual(sum(self.refused.values()), 0)

    def test_slowloris_headers(self) -> None:
        """Headers trickled a byte at a time (each resetting the idle timer) still hit the
        request deadline: 408 and closed at 10 s, not kept forever."""
        channel, t = self.connect()
        request = b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 50
        for byte in request[:19]:
            channel.dataReceived(bytes([byte]))
            self.clock.advance(0.5)
        self.assertEqual(t.value(), b"")
        for byte in request[19:]:
            channel.dataReceived(bytes([byte]))
            self.clock.advance(0.5)
            if t.disconnecting:
                break
        self.assertLessEqual(self.clock.seconds(), 10.5)
        self.assert_refused(t, b"408", REQUEST_TIMEOUT)

    def test_deadline_rearms_per_request(self) -> None:
        """The deadline covers one request: a keep-alive connection idle between requests is
        not cut by it, and the next request gets its own 10 s."""
        channel, t = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.clock.advance(30)
        channel.dataReceived(b"GET / HTTP/1.1\r\n")
        self.clock.advance(9)
        channel.dataReceived(b"Host: x\r\n\r\n")
        self.assertEqual(t.value().count(b"200 OK"), 2)
        self.clock.advance(20)
        self.assertFalse(t.disconnecting)

    def test_slow_body(self) -> None:
        """A body trickled slower than the deadline is refused 408 too."""
        channel, t = self.connect()
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        for _ in range(30):
            channel.dataReceived(b"a")
            self.clock.advance(0.5)
        self.assert_refused(t, b"408", REQUEST_TIMEOUT)

    def test_too_many_headers(self) -> None:
        channel, t = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(30)))
        self.assert_refused(t, b"431", HEADERS_TOO_LARGE)

    def test_headers_too_large(self) -> None:
        channel, t = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\n" + b"X-Big: %s\r\n" % (b"b" * 900) * 3)
        self.assert_refused(t, b"431", HEADERS_TOO_LARGE)

    def test_header_line_too_long(self) -> None:
        """One header line past max_line (Twisted would close without a word) is a 431."""
        channel, t = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 1500)
        self.assert_refused(t, b"431", HEADERS_TOO_LARGE)

    def test_uri_too_long(self) -> None:
        channel, t = self.connect()
        channel.dataReceived(b"GET /" + b"u" * 1500 + b" HTTP/1.1\r\n")
        self.assert_refused(t, b"414", URI_TOO_LONG)

    def test_announced_body_too_large(self) -> None:
        """A Content-Length past max_body is refused 413 before any body byte is read."""
        channel, t = self.connect()
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
                             b"Expect: 100-continue\r\n\r\n")
        self.assertNotIn(b"100 Continue", t.value())
        self.assert_refused(t, b"413", BODY_TOO_LARGE)

    def test_chunked_body_too_large(self) -> None:
        channel, t = self.connect()
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(10):
            channel.dataReceived(b"400\r\n" + b"c" * 1024 + b"\r\n")
        self.assert_refused(t, b"413", BODY_TOO_LARGE)

    def test_small_body_accepted(self) -> None:
        channel, t = self.connect()
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n\r\n" + b"p" * 4000)
        self.assertIn(b"posted 4000", t.value())


class AccessLogTests(SynchronousTestCase):
    def test_boot_routes_site_writes_no_access_line(self) -> None:
        """The boot routes' Site writes no combined-format access line (BootSite logs each
        request itself); a plain Site does, which is what this test would notice."""
        from twisted.python import log as legacy

        written: list[str] = []

        class Capture:
            def write(self, line: str) -> None:
                written.append(line)

            def flush(self) -> None:
                pass

        self.patch(legacy, "logfile", Capture())
        for site, lines in [(guarded_site(Hello(), MemoryReactorClock(), LIMITS, new_refusals()), 0),
                            (Site(Hello(), reactor=MemoryReactorClock()), 1)]:
            site.startFactory()
            self.addCleanup(site.stopFactory)
            channel = site.buildProtocol(IPv4Address("TCP", "10.0.0.9", 40000))
            assert channel is not None
            t = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.9", 40000))
            channel.makeConnection(t)
            written.clear()
            channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertIn(b"200 OK", t.value())
            self.assertEqual(len(written), lines, written)


class ConnectionCapTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.factory = ApiPortFactory(self.clock, Site(Hello()), lambda: None,  # type: ignore[arg-type,return-value]
                                      limits=LIMITS)

    def connect(self, host: str) -> tuple[Any, StringTransport] | None:
        addr = IPv4Address("TCP", host, 40000)
        proto = self.factory.buildProtocol(addr)
        if proto is None:
            return None
        t = StringTransport()
        proto.makeConnection(t)
        return proto, t

    def test_per_source_and_total(self) -> None:
        """Two connections per source, four in all; the extra ones are refused and counted,
        and a closed connection frees its slot."""
        first = self.connect("10.0.0.1")
        self.assertIsNotNone(self.connect("10.0.0.1"))
        self.assertIsNone(self.connect("10.0.0.1"))
        self.assertEqual(self.factory.refused[TOO_MANY_FROM_SOURCE], 1)
        self.assertIsNotNone(self.connect("10.0.0.2"))
        self.assertIsNotNone(self.connect("10.0.0.3"))
        self.assertIsNone(self.connect("10.0.0.4"))
        self.assertEqual(self.factory.refused[TOO_MANY_CONNECTIONS], 1)
        assert first is not None
        first[0].connectionLost(None)
        self.assertEqual(self.factory.per_source["10.0.0.1"], 1)
        self.assertIsNotNone(self.connect("10.0.0.1"))
        for proto in list(self.factory.connections):
            proto.connectionLost(None)
        self.assertEqual(self.factory.per_source, {})


class PlainHTTPServiceTests(TestCase):
    """Without gRPC (C{--disable-grpc}) the HTTP listener has the same request limits."""

    async def test_limits_apply(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.threads import deferToThread

        from sidero.protocols.http.service import make_http_service

        service = make_http_service(reactor, Hello(), 0, interface="127.0.0.1", limits=LIMITS)
        service.startService()
        self.addCleanup(service.stopService)
        port = service._port.getHost().port  # type: ignore[attr-defined]

        def ask(request: bytes) -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(request)
                return s.recv(200)

        ok = await deferToThread(ask, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(ok.startswith(b"HTTP/1.1 200 "), ok)
        big = await deferToThread(ask, b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 3000 + b"\r\n\r\n")
        self.assertTrue(big.startswith(b"HTTP/1.1 431 "), big)
        self.assertEqual(service.refused[HEADERS_TOO_LARGE], 1)  # type: ignore[attr-defined]
