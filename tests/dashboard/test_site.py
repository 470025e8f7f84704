"""The dashboard's access rules over HTTP (klein in memory through treq's StubTreq), the
password file and sessions, and the tap refusing a dashboard off loopback without a login."""

from __future__ import annotations

import os
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from sidero import tap
from sidero.config import StartupError
from sidero.dashboard import auth
from sidero.dashboard.live import LiveHub
from sidero.dashboard.site import DashboardApp
from tests.dashboard.test_live import FakeInformer, server
from tests.service.test_tap import settings_for


class AuthTests(SynchronousTestCase):
    def test_password_file(self) -> None:
        """The first line, stripped; empty, missing or huge files are refused."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"  s3cret \nsecond line\n")
        self.assertEqual(auth.read_password_file(path), b"s3cret")
        for content in (b"\n\n", b" \n", b"x" * 5000):
            with open(path, "wb") as f:
                f.write(content)
            self.assertRaises(auth.PasswordFileError, auth.read_password_file, path)
        self.assertRaises(auth.PasswordFileError, auth.read_password_file, path + ".missing")
        os.chmod(path, 0o644)
        self.assertTrue(auth.loosely_readable(path))
        os.chmod(path, 0o600)
        self.assertFalse(auth.loosely_readable(path))

    def test_compare_and_hosts(self) -> None:
        self.assertTrue(auth.password_matches(b"abc", b"abc"))
        self.assertFalse(auth.password_matches(b"abd", b"abc"))
        self.assertFalse(auth.password_matches(b"", b"abc"))
        for host in (b"localhost", b"localhost:8082", b"127.0.0.1:8082", b"[::1]:8082", b"::1"):
            self.assertTrue(auth.host_header_is_local(host), host)
        for host in (None, b"", b"evil.example", b"evil.example:8082", b"10.0.0.1:8082",
                     b"localhost.evil.example"):
            self.assertFalse(auth.host_header_is_local(host), host)
        self.assertTrue(auth.is_loopback_address("127.0.0.1"))
        self.assertTrue(auth.is_loopback_address("::1"))
        self.assertFalse(auth.is_loopback_address(""))
        self.assertFalse(auth.is_loopback_address("0.0.0.0"))

    def test_sessions_expire_and_are_bounded(self) -> None:
        clock = Clock()
        sessions = auth.Sessions(clock.seconds, lifetime=10, limit=2)
        first = sessions.create().encode()
        self.assertTrue(sessions.valid(first))
        self.assertFalse(sessions.valid(b"forged"))
        self.assertFalse(sessions.valid(None))
        clock.advance(10)
        self.assertFalse(sessions.valid(first))
        a, b, c = (sessions.create().encode() for _ in range(3))
        self.assertEqual(len(sessions), 2)
        self.assertFalse(sessions.valid(a))  # the oldest went
        self.assertTrue(sessions.valid(c))
        sessions.drop(c)
        self.assertFalse(sessions.valid(c))


class SiteTests(SynchronousTestCase):
    def make(self, password: bytes | None) -> tuple[StubTreq, DashboardApp, Clock]:
        clock = Clock()
        hub = LiveHub(clock, FakeInformer(server("a")), FakeInformer(), FakeInformer(), FakeInformer())
        app = DashboardApp(hub, clock, password=password)
        return StubTreq(app.resource()), app, clock

    def get(self, stub: StubTreq, path: str, **kw: Any) -> tuple[int, Any, bytes]:
        response = self.successResultOf(stub.get("http://localhost" + path, allow_redirects=False, **kw))
        return response.code, response.headers, self.successResultOf(response.content())

    def test_loopback_no_login(self) -> None:
        """Without a password the pages answer at once, with the security headers, but only
        to localhost names; writes are refused."""
        stub, app, _ = self.make(None)
        code, headers, body = self.get(stub, "/")
        self.assertEqual(code, 200)
        self.assertIn(b'id="server:a"', body)
        self.assertIn(b"script-src 'self'", headers.getRawHeaders("content-security-policy")[0].encode())
        self.assertEqual(headers.getRawHeaders("x-content-type-options"), ["nosniff"])
        self.assertNotIn(b"<script>", body)  # no inline script; the one script is a file
        code, _, body = self.get(stub, "/", headers={"Host": "rebound.example"})
        self.assertEqual(code, 421)
        self.assertEqual(app.counters["refused_hosts"], 1)
        code, _, body = self.get(stub, "/servers/a")
        self.assertEqual(code, 200)
        code, headers, body = self.get(stub, "/static/dashboard.js")
        self.assertEqual((code, headers.getRawHeaders("content-type")), (200, ["text/javascript; charset=utf-8"]))
        self.assertIn(b"EventSource", body)
        self.assertEqual(self.get(stub, "/static/../../etc/passwd")[0], 404)
        for method in (stub.post, stub.put, stub.delete):
            response = self.successResultOf(method("http://localhost/", data=b""))
            self.assertEqual(response.code, 405)

    def test_login(self) -> None:
        """Pages send to /login; a wrong password waits and fails; the right one gets an
        HttpOnly, SameSite=Strict session that opens pages and the stream; logout ends it."""
        stub, app, clock = self.make(b"s3cret")
        code, headers, _ = self.get(stub, "/")
        self.assertEqual((code, headers.getRawHeaders("location")), (303, ["/login"]))
        self.assertEqual(self.get(stub, "/events")[0], 401)
        self.assertEqual(self.get(stub, "/login")[0], 200)
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        pending = stub.post("http://localhost/login", data=b"password=wrong", headers=form,
                            allow_redirects=False)
        self.assertNoResult(pending)
        clock.advance(1)
        stub.flush()
        response = self.successResultOf(pending)
        self.assertEqual(response.code, 401)
        self.assertIsNone(response.headers.getRawHeaders("set-cookie"))
        self.assertIn(b"Wrong password", self.successResultOf(response.content()))
        response = self.successResultOf(stub.post("http://localhost/login", data=b"password=s3cret",
                                                  headers=form, allow_redirects=False))
        self.assertEqual(response.code, 303)
        (cookie,) = response.headers.getRawHeaders("set-cookie")
        self.assertIn("HttpOnly", cookie)
        self.assertIn("SameSite=strict", cookie)
        token = cookie.split(";")[0].split("=", 1)[1]
        jar = {"Cookie": f"sidero_dashboard={token}"}
        code, _, body = self.get(stub, "/", headers=jar)
        self.assertEqual(code, 200)
        self.assertIn(b"Log out", body)
        # Host is not checked with a login (a proxy may use any name).
        self.assertEqual(self.get(stub, "/", headers={**jar, "Host": "dash.example"})[0], 200)
        self.assertEqual((app.counters["logins"], app.counters["failed_logins"]), (1, 1))
        response = self.successResultOf(stub.post("http://localhost/logout", headers=jar,
                                                  allow_redirects=False))
        self.assertEqual(response.code, 303)
        self.assertEqual(self.get(stub, "/", headers=jar)[0], 303)


class TapTests(SynchronousTestCase):
    def test_off_loopback_needs_a_password(self) -> None:
        """Bound to every address (or a LAN address) without a password file: no start."""
        for address in ("", "192.0.2.10"):
            settings = settings_for(self.mktemp(), dashboard_address=address)
            with self.assertRaises(StartupError) as caught:
                tap.build_service(settings, MemoryReactorClock())
            self.assertIn("--dashboard-password-file", str(caught.exception))

    def test_bad_password_file(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("\n")
        settings = settings_for(self.mktemp(), dashboard_address="", dashboard_password_file=path)
        with self.assertRaises(StartupError) as caught:
            tap.build_service(settings, MemoryReactorClock())
        self.assertIn("holds no password", str(caught.exception))
        with open(path, "w") as f:
            f.write("pw\n")
        root = tap.build_service(settings, MemoryReactorClock())
        self.assertTrue(root.context.dashboard is not None
                        and root.context.dashboard.app.login_required)
