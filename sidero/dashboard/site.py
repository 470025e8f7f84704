# -*- test-case-name: tests.dashboard.test_site -*-
"""The dashboard's routes (klein, bound to an instance): pages, the event stream, static files,
log in and out.

Only GET and HEAD read anything; POST exists for the login form and logout and changes nothing
but the session.  Every answer carries a strict Content-Security-Policy (scripts, styles and
connections from this origin only: no inline code, no CDN, nothing leaves the machine),
C{nosniff}, no referrer and no caching.  Without a login (loopback), requests whose Host is not
a loopback name are refused (L{sidero.dashboard.auth.host_header_is_local}).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.server import Request

from sidero.dashboard import auth, views
from sidero.dashboard.live import LiveHub, StreamResource

SECURITY_HEADERS = {
    b"content-security-policy": b"default-src 'none'; script-src 'self'; style-src 'self';"
                                b" connect-src 'self'; img-src 'self'; form-action 'self';"
                                b" frame-ancestors 'none'; base-uri 'none'",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"x-frame-options": b"DENY",
    b"cache-control": b"no-store",
}

STATIC = {"dashboard.js": b"text/javascript; charset=utf-8",
          "dashboard.css": b"text/css; charset=utf-8"}

#: Seconds a wrong password waits for its answer (slows guessing; the reactor is not held).
FAILED_LOGIN_DELAY = 1.0
#: Longest login form body read.
MAX_FORM = 8192


def load_static() -> dict[str, bytes]:
    """The script and style sheet, read once from the package (before the reactor runs)."""
    folder = resources.files("sidero.dashboard") / "static"
    return {name: (folder / name).read_bytes() for name in STATIC}


class DashboardApp:
    """The klein application.

    @param password: the login password, or None when no login is asked (loopback only).
    @param sessions: the logged-in sessions (needed with a password).
    """

    app = Klein()
    log = Logger()

    def __init__(self, hub: LiveHub, clock: Any, password: bytes | None = None,
                 sessions: auth.Sessions | None = None, static: dict[str, bytes] | None = None,
                 failed_login_delay: float = FAILED_LOGIN_DELAY) -> None:
        self.hub = hub
        self.clock = clock
        self.password = password
        self.sessions = sessions if sessions is not None else auth.Sessions(clock.seconds)
        self.static = static if static is not None else load_static()
        self.failed_login_delay = failed_login_delay
        self.counters = {"logins": 0, "failed_logins": 0, "refused_hosts": 0}

    def resource(self) -> Any:
        return self.app.resource()

    # -- access -----------------------------------------------------------------------

    @property
    def login_required(self) -> bool:
        return self.password is not None

    def _headers(self, request: Request) -> None:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)

    def _session(self, request: Request) -> bytes | None:
        return request.getCookie(auth.COOKIE)

    def _allowed(self, request: Request) -> str | None:
        """None when the request may see the dashboard, else why not (C{host}, C{login})."""
        self._headers(request)
        if not self.login_required:
            if not auth.host_header_is_local(request.getHeader(b"host")):
                self.counters["refused_hosts"] += 1
                return "host"
            return None
        return None if self.sessions.valid(self._session(request)) else "login"

    def _refuse(self, request: Request, why: str, page: bool) -> bytes:
        if why == "host":
            request.setResponseCode(421, b"Misdirected Request")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"this dashboard answers only to localhost names (it has no login)\n"
        if page:
            request.setResponseCode(303)
            request.setHeader(b"location", b"/login")
            return b""
        request.setResponseCode(401)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"log in first\n"

    def _html(self, request: Request, text: str) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return text.encode("utf-8")

    # -- pages ------------------------------------------------------------------------

    @app.route("/", methods=["GET", "HEAD"])
    def overview(self, request: Request) -> bytes:
        why = self._allowed(request)
        if why is not None:
            return self._refuse(request, why, page=True)
        return self._html(request, views.overview_page(self.hub.overview_sections(),
                                                       logged_in=self.login_required))

    @app.route("/servers/<name>", methods=["GET", "HEAD"])
    def server_page(self, request: Request, name: str) -> bytes:
        why = self._allowed(request)
        if why is not None:
            return self._refuse(request, why, page=True)
        s = self.hub.server_sections(name)
        return self._html(request, views.server_page(name, s["details"], s["steps"], s["lines"],
                                                     logged_in=self.login_required))

    @app.route("/events", methods=["GET"])
    def events(self, request: Request) -> Any:
        why = self._allowed(request)
        if why is not None:
            return self._refuse(request, why, page=False)
        values = (request.args or {}).get(b"server")
        name = values[0].decode("utf-8", "replace") if values else None
        return StreamResource(self.hub, name or None)

    @app.route("/static/<name>", methods=["GET", "HEAD"])
    def static_file(self, request: Request, name: str) -> bytes:
        self._headers(request)
        if name not in self.static:
            request.setResponseCode(404)
            return b"not found\n"
        request.setHeader(b"content-type", STATIC[name])
        return self.static[name]

    # -- log in and out -----------------------------------------------------------------

    @staticmethod
    def _see_other(request: Request, location: bytes) -> bytes:
        request.setResponseCode(303)
        request.setHeader(b"location", location)
        return b""

    @app.route("/login", methods=["GET", "HEAD"])
    def login_form(self, request: Request) -> bytes:
        self._headers(request)
        if not self.login_required:
            return self._see_other(request, b"/")
        return self._html(request, views.login_page())

    @app.route("/login", methods=["POST"])
    def login(self, request: Request) -> Any:
        self._headers(request)
        if not self.login_required:
            return self._see_other(request, b"/")
        content = request.content
        body = content.read(MAX_FORM + 1) if content is not None else b""
        given = _form_field(body, b"password") if len(body) <= MAX_FORM else None
        assert self.password is not None
        if given is not None and auth.password_matches(given, self.password):
            self.counters["logins"] += 1
            token = self.sessions.create()
            request.addCookie(auth.COOKIE, token.encode(), path=b"/", httpOnly=True,
                              max_age=str(int(self.sessions.lifetime)).encode(),
                              sameSite=b"strict")
            request.setResponseCode(303)
            request.setHeader(b"location", b"/")
            self.log.info("dashboard: login from {peer}", peer=_peer(request))
            return b""
        self.counters["failed_logins"] += 1
        if self.counters["failed_logins"] <= 5 or self.counters["failed_logins"] % 100 == 0:
            self.log.warn("dashboard: wrong password from {peer} ({count} so far)",
                          peer=_peer(request), count=self.counters["failed_logins"])
        answer: Deferred[bytes] = Deferred()

        def later() -> None:
            request.setResponseCode(401)
            answer.callback(self._html(request, views.login_page("Wrong password.")))

        call = self.clock.callLater(self.failed_login_delay, later)
        answer.addErrback(lambda f: call.cancel() if call.active() else None)
        return answer

    @app.route("/logout", methods=["POST"])
    def logout(self, request: Request) -> bytes:
        self._headers(request)
        self.sessions.drop(self._session(request))
        request.addCookie(auth.COOKIE, b"", path=b"/", httpOnly=True, max_age=b"0",
                          sameSite=b"strict")
        request.setResponseCode(303)
        request.setHeader(b"location", b"/login" if self.login_required else b"/")
        return b""


def _peer(request: Request) -> str:
    return str(getattr(request.getClientAddress(), "host", "?"))


def _form_field(body: bytes, field: bytes) -> bytes | None:
    """One field of an C{application/x-www-form-urlencoded} body (its first value)."""
    from urllib.parse import parse_qs

    try:
        values = parse_qs(body, keep_blank_values=True, strict_parsing=False,
                          max_num_fields=16).get(field)
    except ValueError:
        return None
    return values[0] if values else None
