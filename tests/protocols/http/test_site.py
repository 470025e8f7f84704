"""The HTTP routes over a real loopback socket: scripts, assets with Range/HEAD/conditional GET."""

from __future__ import annotations

import os
from typing import Any

import treq
from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from sidero.protocols.http.ipxe import BootSettings
from sidero.protocols.http.site import BootSite
from tests.protocols.http.test_ipxe import UUID, DictLookup, binding, ready_env, server

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class RecordedEvents:
    def __init__(self) -> None:
        self.recorded: list[tuple[dict[str, Any], str, str]] = []

    def warning(self, obj: dict[str, Any], reason: str, message: str) -> None:
        self.recorded.append((obj, reason, message))


class SiteTests(TestCase):
    def setUp(self) -> None:
        self.tmp = self.mktemp()
        os.makedirs(os.path.join(self.tmp, "env", "default"))
        os.makedirs(os.path.join(self.tmp, "own"))
        os.makedirs(os.path.join(self.tmp, "debian"))
        with open(os.path.join(self.tmp, "env", "default", "vmlinuz"), "wb") as f:
            f.write(PAYLOAD)
        with open(os.path.join(self.tmp, "debian", "ipxe.efi"), "wb") as f:
            f.write(b"debian")
        with open(os.path.join(self.tmp, "own", "ipxe.efi"), "wb") as f:
            f.write(b"operator")
        with open(os.path.join(self.tmp, "debian", "undionly.kpxe"), "wb") as f:
            f.write(b"debian-kpxe")
        self.lookup = DictLookup(servers={}, bindings={}, classes={},
                                 environments={"default": ready_env("default", [])})
        self.events = RecordedEvents()
        site = BootSite(
            self.lookup, BootSettings("127.0.0.1", 8081, siderolink_server_address="fdae::1"), os.path.join(self.tmp, "env"),
            [os.path.join(self.tmp, "own"), os.path.join(self.tmp, "debian")], events=self.events,
        )
        self.port = reactor.listenTCP(0, Site(site.resource()), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(self.port.stopListening)
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"

    async def fetch(self, method: str, path: str, **kwargs: Any) -> tuple[Any, bytes]:
        response = await treq.request(method, self.base + path, persistent=False, **kwargs)
        return response, await response.content()

    async def raw(self, request: bytes) -> bytes:
        """Send C{request} as it is on a fresh connection; everything the server answers."""
        from twisted.internet.defer import Deferred
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
        from twisted.internet.protocol import Protocol

        class Collect(Protocol):
            def __init__(self) -> None:
                self.data = b""
                self.done: Deferred[bytes] = Deferred()

            def dataReceived(self, data: bytes) -> None:
                self.data += data

            def connectionLost(self, reason: Any = None) -> None:
                self.done.callback(self.data)

        collect = Collect()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        await connectProtocol(endpoint, collect)
        assert collect.transport is not None
        collect.transport.write(request)
        return await collect.done

    def logged_failures(self) -> list[Any]:
        """The log events with a failure logged from now until the test ends."""
        from twisted.logger import globalLogPublisher

        failures: list[Any] = []

        def observe(event: dict[str, Any]) -> None:
            if "log_failure" in event:
                failures.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return failures

    async def test_malformed_host_is_400(self) -> None:
        """A Host header werkzeug cannot IDNA-encode (found by bench/fuzz, kept as
        corpus/http/crash-bad-host-idna) is a 400, as Go's malformed Host header, not a 500
        with a logged traceback; the next request on another connection is served."""
        failures = self.logged_failures()
        answer = await self.raw(b"GET /ipxe?uuid=x HTTP/1.1\r\nHost: 1..9202.1:80\x19\x1981\r\n"
                                b"Connection: close\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:80])
        self.assertIn(b"malformed Host header", answer)
        self.assertEqual(failures, [])
        response, _ = await self.fetch("GET", "/boot.ipxe")
        self.assertEqual(response.code, 200)

    async def test_malformed_host_on_every_route(self) -> None:
        """The Host check covers the boot routes (answered without klein) and klein's routes
        alike: IDNA that cannot encode is Go's malformed Host 400, a Host that is not UTF-8
        is klein's 400; neither is logged as a failure, and a good Host is served after."""
        failures = self.logged_failures()
        for path in (b"/boot.ipxe", b"/ipxe?uuid=x", b"/configdata?uuid=x", b"/healthz",
                     b"/env/default/vmlinuz"):
            for host, expected in ((b"1..9202.1:80\x19\x1981", b"malformed Host header"),
                                   (b"\xff\xfe", b"Non-UTF-8 encoding in URL.")):
                with self.subTest(path=path, host=host):
                    answer = await self.raw(b"GET " + path + b" HTTP/1.1\r\nHost: " + host
                                            + b"\r\nConnection: close\r\n\r\n")
                    self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:80])
                    self.assertIn(expected, answer)
        self.assertEqual(failures, [])
        response, _ = await self.fetch("GET", "/boot.ipxe", headers={"Host": "sidero.example"})
        self.assertEqual(response.code, 200)

    async def test_boot_routes_head_and_length(self) -> None:
        """The boot routes answer with Content-Length (as Go's server does for a small body),
        HEAD with the GET's headers and no body, and any other method as klein does (405)."""
        answer = await self.raw(b"GET /boot.ipxe HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertIn(b"Content-Length: %d" % len(body), head)
        self.assertNotIn(b"chunked", head.lower())
        self.assertTrue(body.startswith(b"#!ipxe"), body[:40])
        answer = await self.raw(b"HEAD /boot.ipxe HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        head_only, _, rest = answer.partition(b"\r\n\r\n")
        self.assertEqual(rest, b"")
        self.assertIn(b"Content-Length: %d" % len(body), head_only)
        response, _ = await self.fetch("POST", "/ipxe?uuid=x")
        self.assertEqual(response.code, 405)

    async def test_boot_routes_keep_alive_and_pipelining(self) -> None:
        """Several requests on one connection, sent at once, are answered in order."""
        requests = (b"GET /boot.ipxe HTTP/1.1\r\nHost: h\r\n\r\n"
                    + f"GET /ipxe?uuid={UUID} HTTP/1.1\r\nHost: h\r\n\r\n".encode()
                    + b"GET /healthz HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        answer = await self.raw(requests)
        self.assertEqual(answer.count(b"HTTP/1.1 200 OK"), 3, answer)
        self.assertLess(answer.index(b"#!ipxe"), answer.index(b"kernel /env/agent-amd64"))
        self.assertTrue(answer.endswith(b"3\r\nok\n\r\n0\r\n\r\n"), answer[-40:])  # klein: chunked

    async def test_boot_route_failure_is_logged_500(self) -> None:
        """A boot route that raises answers 500, logged with its traceback (klein's error
        handler, as for the other routes), and the server goes on."""
        failures = self.logged_failures()
        original = self.lookup.server

        def broken(name: str) -> Any:
            raise ZeroDivisionError("a bug")

        self.lookup.server = broken  # type: ignore[method-assign]
        response, body = await self.fetch("GET", f"/ipxe?uuid={UUID}")
        self.assertEqual((response.code, body), (500, b""))
        self.assertEqual(len(failures), 1)
        self.assertTrue(failures[0]["log_failure"].check(ZeroDivisionError))
        self.flushLoggedErrors(ZeroDivisionError)
        self.lookup.server = original  # type: ignore[method-assign]
        response, _ = await self.fetch("GET", f"/ipxe?uuid={UUID}")
        self.assertEqual(response.code, 200)

    async def test_listing_with_non_ascii_uri(self) -> None:
        """A directory listing for a URI with raw non-ASCII bytes is served (the title shows
        U+FFFD for the byte), not a logged 500 (found by bench/fuzz:
        corpus/http/crash-listing-non-ascii-uri)."""
        failures = self.logged_failures()
        answer = await self.raw(b"GET /env/?v\x81linuz HTTP/1.1\r\nHost: h\r\n"
                                b"Connection: close\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:80])
        self.assertIn("Directory listing for /env/?v\ufffdlinuz".encode(), answer)
        self.assertIn(b"default/", answer)
        self.assertEqual(failures, [])

    async def test_nul_byte_in_asset_path_is_404(self) -> None:
        """A path segment with a NUL byte under /env/ or /tftp/ is Go's 404, not a logged 500
        from stat() (found by bench/fuzz: corpus/http/crash-env-nul-byte)."""
        failures = self.logged_failures()
        for path in ("/env/1.%00/x", "/env/default/vm%00linuz", "/tftp/ipxe%00.efi"):
            with self.subTest(path=path):
                response, body = await self.fetch("GET", path)
                self.assertEqual((response.code, body), (404, b"404 page not found\n"))
        self.assertEqual(failures, [])
        response, body = await self.fetch("GET", "/env/default/vmlinuz")
        self.assertEqual((response.code, len(body)), (200, len(PAYLOAD)))

    async def test_subtree_without_slash_redirects(self) -> None:
        """C{/tftp} and C{/env} without their slash are a 301 to the subtree (Go's ServeMux),
        keeping the query, not a 500 (found by bench/fuzz: corpus/http/crash-tftp-without-slash)."""
        for path, location in (("/tftp", b"/tftp/"), ("/env?x=1", b"/env/?x=1")):
            with self.subTest(path=path):
                response, body = await self.fetch("GET", path, allow_redirects=False)
                self.assertEqual(response.code, 301)
                self.assertEqual(response.headers.getRawHeaders(b"location"), [location])
                self.assertIn(b"Moved Permanently", body)

    async def test_boot_script(self) -> None:
        """/boot.ipxe serves the chain script pointing at the configured endpoint."""
        response, body = await self.fetch("GET", "/boot.ipxe")
        self.assertEqual(response.code, 200)
        self.assertIn(b"http://127.0.0.1:8081/ipxe?uuid=${uuid}", body)

    async def test_ipxe_decision(self) -> None:
        """/ipxe answers with the agent for unknown servers and the Talos script when allocated."""
        response, body = await self.fetch("GET", f"/ipxe?uuid={UUID}&mac=52-54-00-12-34-56&arch=x86_64")
        self.assertEqual(response.code, 200)
        self.assertIn(b"kernel /env/agent-amd64/vmlinuz", body)
        self.lookup.kinds["servers"][UUID] = server()
        self.lookup.kinds["bindings"][UUID] = binding(None)
        response, body = await self.fetch("GET", f"/ipxe?uuid={UUID}")
        self.assertIn(b"kernel /env/default/vmlinuz", body)

    async def test_ipxe_error_events_recorded(self) -> None:
        """An /ipxe answer that needs the operator is recorded as a Warning Event on the Server."""
        self.lookup.kinds["servers"][UUID] = server(
            conditions=[{"type": "PXEBooted", "status": "True"}])
        self.lookup.kinds["bindings"][UUID] = binding("gone")
        response, body = await self.fetch("GET", f"/ipxe?uuid={UUID}")
        self.assertEqual(response.code, 500)
        self.assertIn(b'serverclass "gone"', body)
        self.assertEqual([(o["metadata"]["name"], r) for o, r, _ in self.events.recorded],
                         [(UUID, "BootFromDiskFailed")])

    async def test_ipxe_lookup_failure_is_500(self) -> None:
        """A failing lookup answers 500 with an empty body."""
        self.lookup.failing.add(UUID)
        response, body = await self.fetch("GET", f"/ipxe?uuid={UUID}")
        self.assertEqual((response.code, body), (500, b""))

    async def test_env_range_head_conditional(self) -> None:
        """Environment assets support Range, HEAD and If-Modified-Since."""
        response, body = await self.fetch("GET", "/env/default/vmlinuz")
        self.assertEqual((response.code, body), (200, PAYLOAD))
        response, body = await self.fetch("GET", "/env/default/vmlinuz", headers={"Range": "bytes=100-199"})
        self.assertEqual((response.code, body), (206, PAYLOAD[100:200]))
        response, body = await self.fetch("HEAD", "/env/default/vmlinuz")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-length"), [str(len(PAYLOAD))])
        self.assertEqual(body, b"")
        last_modified = response.headers.getRawHeaders("last-modified")[0]
        response, body = await self.fetch(
            "GET", "/env/default/vmlinuz", headers={"If-Modified-Since": last_modified})
        self.assertEqual(response.code, 304)

    async def test_tftp_roots_order_and_escape(self) -> None:
        """/tftp/ prefers the operator's directory, falls back to Debian's, and never escapes."""
        _, body = await self.fetch("GET", "/tftp/ipxe.efi")
        self.assertEqual(body, b"operator")
        _, body = await self.fetch("GET", "/tftp/undionly.kpxe")
        self.assertEqual(body, b"debian-kpxe")
        response, _ = await self.fetch("GET", "/tftp/../env/default/vmlinuz")
        self.assertNotEqual(response.code, 200)
        response, _ = await self.fetch("GET", "/tftp/%2e%2e/env/default/vmlinuz")
        self.assertEqual(response.code, 404)

    async def test_tftp_sidero_names_and_ipxe_script(self) -> None:
        """/tftp/ answers Sidero's names from Debian's files; iPXE asking for one gets the
        chain script (UEFI HTTP boot whose iPXE is handed the same URL again)."""
        with open(os.path.join(self.tmp, "debian", "snponly.efi"), "wb") as f:
            f.write(b"debian-snp")
        _, body = await self.fetch("GET", "/tftp/snp.efi")
        self.assertEqual(body, b"debian-snp")
        _, body = await self.fetch("GET", "/tftp/undionly.kpxe.0")
        self.assertEqual(body, b"debian-kpxe")
        response, body = await self.fetch(
            "GET", "/tftp/snp.efi", headers={"User-Agent": "iPXE/1.21.1+ (g8b4e)"})
        self.assertEqual(response.code, 200)
        self.assertTrue(body.startswith(b"#!ipxe\n"))
        self.assertIn(b"http://127.0.0.1:8081/ipxe?uuid=${uuid}", body)
        _, body = await self.fetch("GET", "/tftp/ipxe.efi", headers={"User-Agent": "UefiHttpBoot/1.0"})
        self.assertEqual(body, b"operator")

    async def test_unknown_path_is_go_404(self) -> None:
        """Unknown paths answer Go's `404 page not found`."""
        response, body = await self.fetch("GET", "/nothing-here")
        self.assertEqual((response.code, body), (404, b"404 page not found\n"))

    async def test_health(self) -> None:
        """/healthz and /readyz answer 200 when ready."""
        for path in ("/healthz", "/readyz"):
            response, _ = await self.fetch("GET", path)
            self.assertEqual(response.code, 200)
