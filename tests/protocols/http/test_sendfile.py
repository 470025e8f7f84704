"""Boot assets through sendfile, checked with real curl on loopback (and raw sockets where
curl cannot show it: pipelining, a reader that stops reading, a client that leaves)."""

from __future__ import annotations

import os
import shutil
import tempfile
from email.utils import formatdate
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.threadpool import ThreadPool
from twisted.test.proto_helpers import StringTransport
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.http import HTTPChannel
from twisted.web.server import Site
from zope.interface import implementer

from sidero.metrics import Metrics
from sidero.protocols.http import sendfile
from sidero.protocols.http.ipxe import BootSettings
from sidero.protocols.http.site import AssetFile, BootSite
from tests.protocols.http.test_ipxe import DictLookup

SIZE = 6 * 1024 * 1024 + 12345


def fd_targets() -> set[str]:
    """The sockets and files this process's descriptors point at (not pipes: the reactor and
    process support make some of those lazily)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(("socket:", "/")):
            found.add(target)
    return found


async def eventually(check: Any, timeout: float = 2.0) -> None:
    """Until C{check()} is true: the request's end is recorded when the reactor has seen the
    last hop return, which can be just after the client has all the bytes."""
    for _ in range(int(timeout / 0.02)):
        if check():
            return
        await deferLater(reactor, 0.02, lambda: None)


class RecordedTimeline:
    def __init__(self) -> None:
        self.steps: list[tuple[str, dict[str, Any]]] = []

    def record(self, step: str, **details: Any) -> None:
        self.steps.append((step, details))


class _Collect(Protocol):
    """A raw HTTP client: sends C{request}, keeps every byte received."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = bytearray()
        self.lost: Deferred[None] = Deferred()
        self.got: Deferred[None] | None = None
        self.want = 0

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.got is not None and len(self.data) >= self.want:
            d, self.got = self.got, None
            d.callback(None)

    def until(self, n: int) -> Deferred[None]:
        self.want = n
        self.got = Deferred()
        if len(self.data) >= n:
            d, self.got = self.got, None
            d.callback(None)
        return self.got

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


class Served:
    """A BootSite on loopback serving C{env/default/initrd}; sendfile calls counted.

    @cvar threads: send in a thread pool of that many threads (0: on the reactor thread).
    """

    threads = 0

    def setUp(self) -> None:
        run = None
        if self.threads:
            pool = ThreadPool(minthreads=0, maxthreads=self.threads, name="test-sendfile")
            pool.start()
            self.addCleanup(pool.stop)

            def run(f: Any, *args: Any) -> Deferred[Any]:
                return deferToThreadPool(reactor, pool, f, *args)  # type: ignore[arg-type]


        if shutil.which("curl") is None:
            raise SkipTest("curl is not installed (scripts/install-test-deps installs it)")
        self.dir = tempfile.mkdtemp(prefix="sidero-sendfile-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.payload = os.urandom(SIZE)
        os.makedirs(os.path.join(self.dir, "env", "default"))
        self.path = os.path.join(self.dir, "env", "default", "initrd")
        with open(self.path, "wb") as f:
            f.write(self.payload)
        os.utime(self.path, (1_700_000_000, 1_700_000_000))
        self.calls = 0
        real = sendfile._sendfile
        assert real is not None

        def counting(*args: Any) -> int:
            self.calls += 1
            return real(*args)

        self.patch(sendfile, "_sendfile", counting)
        self.opened: list[Any] = []
        opener = AssetFile.openForReading

        def recording(file: AssetFile) -> Any:
            f = opener(file)
            self.opened.append(f)
            return f

        self.patch(AssetFile, "openForReading", recording)
        self.metrics = Metrics()
        self.timeline = RecordedTimeline()
        boot = BootSite(DictLookup(servers={}, bindings={}, classes={}, environments={}),
                        BootSettings("127.0.0.1", 8081), os.path.join(self.dir, "env"), [],
                        sendfile_run=run)
        self.site = site = Site(self.metrics.instrument_resource(boot.resource(), self.timeline))
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(self.port.stopListening)
        self.url = f"http://127.0.0.1:{self.port.getHost().port}/env/default/initrd"
        self.fds = fd_targets()

    async def curl(self, *args: str) -> tuple[bytes, bytes, int]:
        out, err, code = await getProcessOutputAndValue(
            "curl", ["-sS", "--max-time", "20", *args], env=os.environ, path=self.dir)
        return out, err, code

    async def _connect(self, request: bytes) -> _Collect:
        proto = _Collect(request)
        factory = ClientFactory.forProtocol(lambda: proto)  # type: ignore[arg-type]
        connected: Deferred[None] = Deferred()
        original = proto.connectionMade

        def made() -> None:
            original()
            connected.callback(None)

        proto.connectionMade = made  # type: ignore[method-assign]
        reactor.connectTCP("127.0.0.1", self.port.getHost().port, factory)  # type: ignore[attr-defined]
        await connected
        return proto


class SendfileTests(Served, TestCase):
    async def test_whole_file(self) -> None:
        """A GET is sent with sendfile: the bytes are the file's, headers as File's."""
        out = os.path.join(self.dir, "out")
        _, err, code = await self.curl("-D", "-", "-o", out, self.url)
        self.assertEqual(code, 0, err)
        with open(out, "rb") as f:
            self.assertEqual(f.read(), self.payload)
        self.assertGreater(self.calls, 0)
        self.assertTrue(all(f.closed for f in self.opened))

    async def test_api_port(self) -> None:
        """Through the API port's HTTP/1.1-or-h2c splitter (as twistd serves it) too."""
        from sidero.protocols.grpc.port import ApiPortFactory

        factory = ApiPortFactory(reactor, self.site, lambda: None)  # type: ignore[arg-type,return-value]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        out = os.path.join(self.dir, "out")
        _, err, code = await self.curl(
            "-o", out, f"http://127.0.0.1:{port.getHost().port}/env/default/initrd")
        self.assertEqual(code, 0, err)
        with open(out, "rb") as f:
            self.assertEqual(f.read(), self.payload)
        self.assertGreater(self.calls, 0)
        self.assertEqual(factory.counters["http"], 1)

    async def test_headers_and_metrics(self) -> None:
        """Status, Content-Length, Accept-Ranges, Last-Modified; the request is counted with
        its status and the bytes really sent."""
        headers, err, code = await self.curl("-D", "-", "-o", "/dev/null", self.url)
        self.assertEqual(code, 0, err)
        lines = headers.decode().lower().splitlines()
        self.assertEqual(lines[0].strip(), "http/1.1 200 ok")
        self.assertIn(f"content-length: {SIZE}", lines)
        self.assertIn("accept-ranges: bytes", lines)
        self.assertIn("last-modified: " + formatdate(1_700_000_000, usegmt=True).lower(), lines)
        await eventually(lambda: self.timeline.steps)
        sample = self.metrics.registry.get_sample_value(
            "sidero_http_requests_total", {"route": "/env", "method": "GET", "code": "200"})
        self.assertEqual(sample, 1.0)
        [(step, details)] = self.timeline.steps
        self.assertEqual((step, details["status"], details["bytes"], details["path"]),
                         ("asset", 200, SIZE, "/env/default/initrd"))

    async def test_single_range(self) -> None:
        """Range answers 206 with Content-Range, from the offset, the right length."""
        out, err, code = await self.curl("-D", os.path.join(self.dir, "h"), "-r",
                                         "1000000-1999999", self.url)
        self.assertEqual(code, 0, err)
        self.assertEqual(out, self.payload[1000000:2000000])
        await eventually(lambda: self.timeline.steps)
        self.assertEqual(self.timeline.steps[0][1]["bytes"], 1000000)
        with open(os.path.join(self.dir, "h")) as f:
            head = f.read().lower()
        self.assertIn("206 partial content", head)
        self.assertIn(f"content-range: bytes 1000000-1999999/{SIZE}", head)
        out, _, code = await self.curl("-r", "-5000", self.url)  # suffix range
        self.assertEqual((code, out), (0, self.payload[-5000:]))
        self.assertGreater(self.calls, 0)

    async def test_curl_resume(self) -> None:
        """C{curl -C -} resumes a partial download into the whole file."""
        out = os.path.join(self.dir, "partial")
        with open(out, "wb") as f:
            f.write(self.payload[: 3 * 1024 * 1024 + 7])
        _, err, code = await self.curl("-C", "-", "-o", out, self.url)
        self.assertEqual(code, 0, err)
        with open(out, "rb") as f:
            self.assertEqual(f.read(), self.payload)

    async def test_unsatisfiable_range(self) -> None:
        """A range past the end is 416 with C{bytes */size} and no body."""
        out, err, code = await self.curl("-D", "-", "-r", f"{SIZE + 10}-", self.url)
        self.assertEqual(code, 0, err)
        text = out.decode().lower()
        self.assertIn("416 requested range not satisfiable", text)
        self.assertIn(f"content-range: bytes */{SIZE}", text)
        self.assertTrue(text.endswith("\r\n\r\n"))

    async def test_if_modified_since(self) -> None:
        """Not modified since: 304, empty; modified since an older date: 200, whole file."""
        out, err, code = await self.curl("-D", "-", "-z", self.path, self.url)
        self.assertEqual(code, 0, err)
        self.assertIn(b"304 Not Modified", out)
        self.assertTrue(out.endswith(b"\r\n\r\n"))
        out, err, code = await self.curl("-z", formatdate(1_600_000_000, usegmt=True), self.url)
        self.assertEqual((code, out), (0, self.payload))

    async def test_head(self) -> None:
        """HEAD: headers only, nothing sent with sendfile."""
        out, err, code = await self.curl("-I", self.url)
        self.assertEqual(code, 0, err)
        self.assertIn(f"content-length: {SIZE}".encode(), out.lower())
        self.assertEqual(self.calls, 0)

    async def test_multiple_ranges(self) -> None:
        """Several ranges: a multipart/byteranges 206 (Twisted's producer)."""
        out, err, code = await self.curl("-D", os.path.join(self.dir, "h"), "-r",
                                         "0-9,100-109", self.url)
        self.assertEqual(code, 0, err)
        with open(os.path.join(self.dir, "h")) as f:
            self.assertIn("multipart/byteranges", f.read())
        self.assertIn(self.payload[0:10], out)
        self.assertIn(self.payload[100:110], out)

    async def test_keep_alive(self) -> None:
        """Two whole-file GETs and a range on one curl connection."""
        out, err, code = await self.curl(
            "-o", "/dev/null", "-w", "%{num_connects} %{size_download}\n", self.url,
            "-o", "/dev/null", "-w", "%{num_connects} %{size_download}\n", self.url)
        self.assertEqual(code, 0, err)
        self.assertEqual(out.decode().split("\n")[:2], [f"1 {SIZE}", f"0 {SIZE}"])

    async def test_pipelined(self) -> None:
        """Pipelined requests on one connection: responses in order, bodies intact."""
        req = (b"GET /env/default/initrd HTTP/1.1\r\nHost: x\r\nRange: bytes=10-19\r\n\r\n"
               b"GET /env/default/initrd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        proto = await self._connect(req)
        await proto.lost
        data = bytes(proto.data)
        head1, rest = data.split(b"\r\n\r\n", 1)
        self.assertIn(b"206", head1.split(b"\r\n")[0])
        self.assertEqual(rest[:10], self.payload[10:20])
        head2, body2 = rest[10:].split(b"\r\n\r\n", 1)
        self.assertIn(b"200", head2.split(b"\r\n")[0])
        self.assertEqual(body2, self.payload)

    async def test_stalled_reader_does_not_spin(self) -> None:
        """A client that stops reading: the producer waits for writability (a handful of
        sendfile calls, not a loop) and other clients are served meanwhile."""
        proto = await self._connect(b"GET /env/default/initrd HTTP/1.1\r\nHost: x\r\n\r\n")
        await proto.until(1)
        proto.transport.pauseProducing()  # type: ignore[union-attr]
        await deferLater(reactor, 0.3, lambda: None)
        stalled = self.calls
        await deferLater(reactor, 0.5, lambda: None)
        self.assertLessEqual(self.calls - stalled, 2)
        out, err, code = await self.curl("-r", "0-99", self.url)
        self.assertEqual((code, out), (0, self.payload[:100]), err)
        proto.transport.resumeProducing()  # type: ignore[union-attr]
        head = bytes(proto.data).index(b"\r\n\r\n") + 4
        await proto.until(head + SIZE)
        self.assertEqual(bytes(proto.data[head:]), self.payload)
        proto.transport.loseConnection()  # type: ignore[union-attr]
        await proto.lost

    async def test_client_leaves(self) -> None:
        """A client that goes away mid-body: the file is closed and nothing fails."""
        proto = await self._connect(b"GET /env/default/initrd HTTP/1.1\r\nHost: x\r\n\r\n")
        await proto.until(1)
        proto.transport.pauseProducing()  # type: ignore[union-attr]
        await deferLater(reactor, 0.1, lambda: None)
        proto.transport.abortConnection()  # type: ignore[union-attr]
        await proto.lost
        for _ in range(50):
            if self.opened and all(f.closed for f in self.opened):
                break
            await deferLater(reactor, 0.02, lambda: None)
        self.assertTrue(self.opened and all(f.closed for f in self.opened))
        await eventually(lambda: self.timeline.steps)
        sample = self.metrics.registry.get_sample_value(
            "sidero_http_requests_total", {"route": "/env", "method": "GET", "code": "aborted"})
        self.assertEqual(sample, 1.0)
        [(step, details)] = self.timeline.steps
        self.assertEqual(details["status"], "aborted")
        self.assertLess(details["bytes"], SIZE)


class ThreadedSendfileTests(SendfileTests):
    """The same, with the sendfile hops in a thread pool (as twistd runs them)."""

    threads = 2

    async def test_finished_before_the_client_leaves(self) -> None:
        """A client that hangs up as soon as it has every byte: still a 200, never "aborted"
        (the last bytes go from the reactor thread, which finishes the request at once)."""
        for _ in range(8):
            _, err, code = await self.curl("-H", "Connection: close", "-o", "/dev/null",
                                           self.url)
            self.assertEqual(code, 0, err)
        for _ in range(8):  # and one in this process that aborts on the last byte
            proto = await self._connect(b"GET /env/default/initrd HTTP/1.1\r\nHost: x\r\n\r\n")
            await proto.until(1)
            head = bytes(proto.data).index(b"\r\n\r\n") + 4
            await proto.until(head + SIZE)
            proto.transport.abortConnection()  # type: ignore[union-attr]
            await proto.lost
        await eventually(lambda: len(self.timeline.steps) == 16)
        self.assertEqual([d["status"] for _, d in self.timeline.steps], [200] * 16)
        self.assertEqual([d["bytes"] for _, d in self.timeline.steps], [SIZE] * 16)

    async def test_no_descriptor_left(self) -> None:
        """The socket duplicates and files are all closed once the connections are."""
        for _ in range(3):
            _, err, code = await self.curl("-o", "/dev/null", self.url)
            self.assertEqual(code, 0, err)
        proto = await self._connect(b"GET /env/default/initrd HTTP/1.1\r\nHost: x\r\n\r\n")
        await proto.until(1)
        proto.transport.abortConnection()  # type: ignore[union-attr]
        await proto.lost
        await eventually(lambda: fd_targets() <= self.fds)
        self.assertEqual(fd_targets() - self.fds, set())


class FallbackTests(Served, TestCase):
    """Where sendfile cannot be used, Twisted's producers send the file: over TLS, and where
    the platform has no sendfile."""

    async def test_tls(self) -> None:
        from sidero.k8s.tls import build_context, generate

        ca, cert, key = generate(["127.0.0.1"])
        ca_path = os.path.join(self.dir, "ca.pem")
        with open(ca_path, "wb") as f:
            f.write(ca)
        ctx = build_context(cert, key)

        @implementer(IOpenSSLContextFactory)
        class Factory:
            def getContext(self) -> Any:
                return ctx

        boot = BootSite(DictLookup(servers={}, bindings={}, classes={}, environments={}),
                        BootSettings("127.0.0.1", 8081), os.path.join(self.dir, "env"), [])
        port = reactor.listenSSL(0, Site(boot.resource()), Factory(),  # type: ignore[attr-defined]
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"https://127.0.0.1:{port.getHost().port}/env/default/initrd"
        out = os.path.join(self.dir, "out")
        _, err, code = await self.curl("--cacert", ca_path, "-o", out, url)
        self.assertEqual(code, 0, err)
        with open(out, "rb") as f:
            self.assertEqual(f.read(), self.payload)
        out2, err, code = await self.curl("--cacert", ca_path, "-r", "100-199", url)
        self.assertEqual((code, out2), (0, self.payload[100:200]), err)
        self.assertEqual(self.calls, 0)

    async def test_no_sendfile(self) -> None:
        """Without os.sendfile: whole file and a range through Twisted's producers."""
        self.patch(sendfile, "_sendfile", None)
        out = os.path.join(self.dir, "out")
        _, err, code = await self.curl("-o", out, self.url)
        self.assertEqual(code, 0, err)
        with open(out, "rb") as f:
            self.assertEqual(f.read(), self.payload)
        out2, err, code = await self.curl("-r", "100-199", self.url)
        self.assertEqual((code, out2), (0, self.payload[100:200]), err)

    def test_choice(self) -> None:
        """sendfile_socket: None for a non-HTTPChannel request or a non-TCP transport."""
        class Req:
            channel: Any = None

        self.assertIsNone(sendfile.sendfile_socket(Req()))  # type: ignore[arg-type]
        channel = HTTPChannel()
        channel.makeConnection(StringTransport())
        self.addCleanup(channel.connectionLost, None)
        req = Req()
        req.channel = channel
        self.assertIsNone(sendfile.sendfile_socket(req))  # type: ignore[arg-type]
