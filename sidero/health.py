# -*- test-case-name: tests.service.test_health -*-
"""Liveness and readiness as controller-runtime's probe server serves them (spec 3.1).

C{/healthz} and C{/readyz} run named checks; each also answers on its own path
(C{/readyz/informers}). The answers are controller-runtime's: C{ok} with 200 when every check
passes; otherwise 500 and one C{[+]name ok} / C{[-]name failed: reason withheld} line per
check, then C{healthz check failed}. C{?verbose} lists the checks on success too and gives the
reasons of failures; C{?exclude=name} leaves a check out.

The same L{HealthChecks} feed the systemd notifier (L{sidero.systemd}), so C{READY=1} and the
watchdog mean what the probes mean.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.application.internet import TCPServer
from twisted.application.service import IService
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Site

HEALTHZ = "healthz"
READYZ = "readyz"
ENDPOINTS = (HEALTHZ, READYZ)

#: Spec 3.1: the probes' own GET of /boot.ipxe gives up after 10 s.
DEFAULT_CHECK_TIMEOUT = 10.0


@dataclass(frozen=True)
class CheckResult:
    """One check's answer; C{message} says why it failed (or what it saw when it passed)."""

    ok: bool
    message: str = "ok"


CheckValue = CheckResult | bool | Deferred[Any] | Awaitable[Any]
Check = Callable[[], CheckValue]


class HealthChecks:
    """Named checks per endpoint, run concurrently, each within C{timeout} seconds."""

    log = Logger()

    def __init__(self, clock: IReactorTime, timeout: float = DEFAULT_CHECK_TIMEOUT) -> None:
        self.clock = clock
        self.timeout = timeout
        self.checks: dict[str, dict[str, Check]] = {endpoint: {} for endpoint in ENDPOINTS}

    def add(self, endpoint: str, name: str, check: Check) -> None:
        """Add C{check} to C{endpoint} (C{healthz} or C{readyz}) as C{name}."""
        if endpoint not in self.checks:
            raise ValueError(f"unknown health endpoint {endpoint!r}")
        if not name or "/" in name:
            raise ValueError(f"bad check name {name!r}")
        self.checks[endpoint][name] = check

    def names(self, endpoint: str) -> list[str]:
        return list(self.checks[endpoint])

    async def run(self, endpoint: str, only: str | None = None,
                  exclude: Iterable[str] = ()) -> list[tuple[str, CheckResult]]:
        """Every check of C{endpoint} (or just C{only}) and its result, in the order added."""
        skip = set(exclude)
        chosen = [(n, c) for n, c in self.checks[endpoint].items()
                  if (only is None or n == only) and n not in skip]
        pending = [self._one(name, check) for name, check in chosen]
        results = []
        for (name, _), d in zip(chosen, pending, strict=True):
            results.append((name, await d))
        return results

    async def passing(self, endpoint: str) -> tuple[bool, str]:
        """Whether every check passes, and a one-line summary naming those that fail."""
        results = await self.run(endpoint)
        failed = [f"{name}: {r.message}" for name, r in results if not r.ok]
        return (not failed, "; ".join(failed) if failed else "ok")

    def _one(self, name: str, check: Check) -> Deferred[CheckResult]:
        try:
            value = check()
        except Exception as e:
            return _completed(CheckResult(False, str(e) or type(e).__name__))
        if isinstance(value, CheckResult):
            return _completed(value)
        if isinstance(value, bool):
            return _completed(CheckResult(value, "ok" if value else "failed"))
        d = value if isinstance(value, Deferred) else ensureDeferred(_await(value))
        d.addTimeout(self.timeout, self.clock)

        def normalise(result: Any) -> CheckResult:
            if isinstance(result, CheckResult):
                return result
            return CheckResult(bool(result), "ok" if result else "failed")

        def failed(failure: Failure) -> CheckResult:
            return CheckResult(False, failure.getErrorMessage() or repr(failure.value))

        return d.addCallbacks(normalise, failed)


def _completed(result: CheckResult) -> Deferred[CheckResult]:
    d: Deferred[CheckResult] = Deferred()
    d.callback(result)
    return d


async def _await(value: Awaitable[Any]) -> Any:
    return await value


# -- standard checks --------------------------------------------------------------------------


def ping() -> CheckResult:
    """controller-runtime's C{healthz.Ping}: the process answers at all."""
    return CheckResult(True)


def informers_synced(informers: Callable[[], Iterable[Any]]) -> Check:
    """Ready once every informer's first list is in its cache (protocols read those caches)."""

    def check() -> CheckResult:
        waiting = sorted({str(i.kind.plural) for i in informers() if not i.has_synced})
        if waiting:
            return CheckResult(False, "caches not synced: " + ", ".join(waiting))
        return CheckResult(True, "caches synced")

    return check


def leadership_reported(elector: Any) -> Check:
    """Ready once the elector knows who leads (this replica or another): a standby is ready,
    since every replica serves the protocols; the message says which it is."""

    def check() -> CheckResult:
        if elector.is_leader():
            return CheckResult(True, "leader")
        holder = getattr(elector, "current_leader", None)
        if holder is None:
            return CheckResult(False, "leader election has not read the Lease yet")
        return CheckResult(True, f"standby (leader: {holder})" if holder else "standby (no leader)")

    return check


def http_ok(reactor: Any, url: str) -> Check:
    """Spec 3.1's probe: C{GET url} must answer 200 (C{/boot.ipxe} on our own HTTP port)."""

    async def check() -> CheckResult:
        from twisted.web.client import Agent, readBody

        response = await Agent(reactor).request(b"GET", url.encode("ascii"))
        await readBody(response)
        if response.code != 200:
            return CheckResult(False, f"GET {url}: HTTP {response.code}")
        return CheckResult(True)

    return lambda: ensureDeferred(check())


def local_url(listen_address: str, port: int, path: str) -> str:
    """A URL for our own listener: loopback when it binds every address."""
    host = listen_address or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}{path}"


# -- the probe server -------------------------------------------------------------------------


class HealthRoot(Resource):
    """C{/healthz}, C{/readyz} and their per-check paths; 404 elsewhere."""

    def __init__(self, checks: HealthChecks) -> None:
        super().__init__()
        for endpoint in ENDPOINTS:
            self.putChild(endpoint.encode(), _Endpoint(checks, endpoint, None))

    def getChild(self, path: bytes, request: Any) -> IResource:
        return _NotFound()

    def render(self, request: Any) -> bytes:
        return _NotFound().render(request)


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"404 page not found\n"


class _Endpoint(Resource):
    log = Logger()

    def __init__(self, checks: HealthChecks, endpoint: str, only: str | None) -> None:
        super().__init__()
        self.checks = checks
        self.endpoint = endpoint
        self.only = only

    def getChild(self, path: bytes, request: Any) -> IResource:
        if self.only is None and path == b"":
            return self
        name = path.decode("utf-8", "replace")
        if self.only is None and name in self.checks.checks[self.endpoint]:
            return _Endpoint(self.checks, self.endpoint, name)
        return _NotFound()

    def render_GET(self, request: Any) -> int:
        # Twisted drops blank values (?verbose); parse the query ourselves, keeping them.
        query = request.uri.partition(b"?")[2].decode("utf-8", "replace")
        args = urllib.parse.parse_qs(query, keep_blank_values=True)
        verbose = "verbose" in args
        exclude = args.get("exclude", [])
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = ensureDeferred(self.checks.run(self.endpoint, self.only, exclude))

        def answer(results: Sequence[tuple[str, CheckResult]]) -> None:
            status, body = self._format(results, verbose)
            head = request.method == b"HEAD"
            request.setResponseCode(status)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.setHeader(b"x-content-type-options", b"nosniff")
            if not gone:
                if not head:
                    request.write(body)
                request.finish()

        def crashed(failure: Failure) -> None:
            self.log.failure("{endpoint} check crashed", failure, endpoint=self.endpoint)
            if not gone:
                request.setResponseCode(500)
                request.finish()

        d.addCallbacks(answer, crashed)
        return NOT_DONE_YET

    render_HEAD = render_GET

    def _format(self, results: Sequence[tuple[str, CheckResult]],
                verbose: bool) -> tuple[int, bytes]:
        failed = [(n, r) for n, r in results if not r.ok]
        for name, result in failed:
            self.log.info("{endpoint} check {check} failed: {reason}", endpoint=self.endpoint,
                          check=name, reason=result.message)
        if self.only is not None:
            if failed:
                return 500, f"internal server error: {failed[0][1].message}\n".encode()
            return 200, b"ok"
        if not failed and not verbose:
            return 200, b"ok"
        lines = []
        for name, result in results:
            if result.ok:
                lines.append(f"[+]{name} ok")
            else:
                reason = result.message if verbose else "reason withheld"
                lines.append(f"[-]{name} failed: {reason}")
        for name in sorted(set(self._excluded_names(results))):
            lines.append(f"[+]{name} excluded: ok")
        lines.append(f"{self.endpoint} check {'failed' if failed else 'passed'}")
        return (500 if failed else 200), ("\n".join(lines) + "\n").encode()

    def _excluded_names(self, results: Sequence[tuple[str, CheckResult]]) -> list[str]:
        ran = {n for n, _ in results}
        return [n for n in self.checks.names(self.endpoint) if n not in ran]


def make_health_service(reactor: Any, checks: HealthChecks, port: int,
                        interface: str = "") -> IService:
    """The probe server on C{port} (controller-runtime's C{:9440})."""
    site = Site(HealthRoot(checks), reactor=reactor)
    site.displayTracebacks = False
    site.noisy = False
    return TCPServer(port, site, interface=interface, reactor=reactor)


__all__ = [
    "CheckResult", "HealthChecks", "HealthRoot", "http_ok", "informers_synced",
    "leadership_reported", "local_url", "make_health_service", "ping",
]
