"""HTTP power API manager: paths and verbs, status parsing, errors, time limit."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface.verify import verifyObject

from sidero.power.api import APIPowerManager, default_http_client, parse_status
from sidero.power.interfaces import APIError, IPowerManager
from sidero.threads import CallTimeout


class FakeVMAPI(Resource):
    """The Talos QEMU provisioner's power API, recording what it is asked."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, str]] = []
        self.powered = False
        self.code = 200
        self.hang = False
        self.status_body: bytes | None = None
        self.held: list[Request] = []

    def render(self, request: Request) -> Any:
        method, path = request.method.decode(), request.path.decode()
        self.requests.append((method, path))
        if self.hang:
            self.held.append(request)
            return NOT_DONE_YET
        request.setResponseCode(self.code)
        if (method, path) == ("GET", "/status"):
            return self.status_body or json.dumps({"PoweredOn": self.powered}).encode()
        if method != "POST":
            request.setResponseCode(405)
            return b""
        if path == "/poweron":
            self.powered = True
        elif path == "/poweroff":
            self.powered = False
        return b"ok"


class APIPowerManagerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.api = FakeVMAPI()
        self.stub = StubTreq(self.api)
        self.clock = Clock()
        self.manager = APIPowerManager("10.5.0.3:8080", self.clock, self.stub)  # type: ignore[arg-type]

    def test_provides_interface(self) -> None:
        """The API manager provides IPowerManager and is not fake."""
        verifyObject(IPowerManager, self.manager)
        self.assertEqual((self.manager.kind, self.manager.is_fake), ("api", False))

    def test_paths_and_verbs(self) -> None:
        """Each operation is one request on the paths of spec §3.12; set_pxe ignores the mode."""
        for op in (self.manager.power_on, self.manager.power_off, self.manager.power_cycle,
                   lambda: self.manager.set_pxe("bios"), lambda: self.manager.set_pxe("uefi")):
            self.successResultOf(op())
        self.assertEqual(self.api.requests, [
            ("POST", "/poweron"), ("POST", "/poweroff"), ("POST", "/reboot"),
            ("POST", "/pxeboot"), ("POST", "/pxeboot"),
        ])

    def test_status(self) -> None:
        """GET /status answers the PoweredOn field."""
        self.assertIs(self.successResultOf(self.manager.is_powered_on()), False)
        self.successResultOf(self.manager.power_on())
        self.assertIs(self.successResultOf(self.manager.is_powered_on()), True)
        self.assertEqual(self.api.requests[0], ("GET", "/status"))

    def test_non_200_is_an_api_error(self) -> None:
        """Any status but 200 fails with "API error: <code> <reason>"."""
        self.api.code = 500
        f = self.failureResultOf(self.manager.power_on(), APIError)
        self.assertEqual(f.getErrorMessage(), "API error: 500 Internal Server Error")
        self.api.code = 404
        f = self.failureResultOf(self.manager.is_powered_on(), APIError)
        self.assertEqual(f.getErrorMessage(), "API error: 404 Not Found")

    def test_bad_status_body(self) -> None:
        """A status body that is not the expected JSON is an API error, not a guess."""
        self.api.status_body = b"<html>"
        f = self.failureResultOf(self.manager.is_powered_on(), APIError)
        self.assertIn("invalid status response", f.getErrorMessage())

    def test_timeout(self) -> None:
        """A request with no answer fails with CallTimeout after 10 s."""
        self.api.hang = True
        d = self.manager.power_off()
        self.clock.advance(9.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        f = self.failureResultOf(d, CallTimeout)
        self.assertEqual(str(f.value), "power API power off on 10.5.0.3:8080 did not finish within 10s")


class ParseStatusTests(SynchronousTestCase):
    def test_variants(self) -> None:
        """Field names match case-insensitively and a missing field reads as off (Go's decoder)."""
        self.assertIs(parse_status(b'{"PoweredOn": true}'), True)
        self.assertIs(parse_status(b'{"poweredon": true, "x": 1}'), True)
        self.assertIs(parse_status(b"{}"), False)

    def test_invalid(self) -> None:
        """Non-objects and non-boolean values are refused."""
        for body in (b"[]", b'{"PoweredOn": "yes"}', b"nope"):
            self.assertRaises(APIError, parse_status, body)


class RealHTTPTests(TestCase):
    """The production treq client against a real loopback server."""

    async def test_real_round_trip(self) -> None:
        """Power on and status work over a real loopback TCP connection."""
        from twisted.internet import reactor as global_reactor

        reactor: Any = global_reactor
        api = FakeVMAPI()
        port = reactor.listenTCP(0, Site(api), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        manager = APIPowerManager(f"127.0.0.1:{port.getHost().port}", reactor, default_http_client(reactor))
        await manager.power_on()
        self.assertTrue(await manager.is_powered_on())
        self.assertEqual(api.requests, [("POST", "/poweron"), ("GET", "/status")])

    async def test_connection_refused(self) -> None:
        """A closed port fails with an API error naming the URL."""
        from twisted.internet import reactor as global_reactor

        reactor: Any = global_reactor
        port = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
        number = port.getHost().port
        await port.stopListening()
        manager = APIPowerManager(f"127.0.0.1:{number}", reactor, default_http_client(reactor))
        with self.assertRaises(APIError) as e:
            await manager.power_on()
        self.assertIn(f"POST http://127.0.0.1:{number}/poweron", str(e.exception))
