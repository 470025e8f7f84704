"""The HTTP/1.1 side of the API port: iPXE scripts, boot assets, Talos metadata, health (§3.1).

Routes are bound to an instance (klein's router-on-self pattern), so the dependencies are
attributes, not module globals: the boot lookup (an in-memory cache), the settings, and the
directories files are served from.
"""

from __future__ import annotations

import dataclasses
import os
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.static import DirectoryLister, File, NoRangeStaticProducer
from werkzeug.exceptions import BadHost

from sidero.protocols import bootfiles
from sidero.protocols.http.configcache import ConfigDataCache
from sidero.protocols.http.ipxe import (
    BootQuery,
    BootSettings,
    LookupFailed,
    boot_script,
    decide,
)
from sidero.protocols.http.metadata import MetadataLookup, access
from sidero.protocols.http.sendfile import SendfileProducer, sendfile_socket

NOT_FOUND_BODY = b"404 page not found\n"


class NotFoundResource(Resource):
    """Go's C{http.NotFound}: 404 with C{404 page not found}."""

    isLeaf = True

    def render(self, request: IRequest) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return NOT_FOUND_BODY


class _WholeFileProducer(NoRangeStaticProducer):
    """Whole-file responses in 1 MiB reads instead of Twisted's 64 KiB (when sendfile cannot
    be used: TLS, HTTP/2).

    Larger reads cut the per-chunk reactor work several times over (see bench/http); a read
    from the page cache of this size takes well under a millisecond.
    """

    bufferSize = 1 << 20


class _Listing(DirectoryLister):
    """Twisted's directory listing, for a URI with non-ASCII bytes too (it decodes the URI as
    ASCII for the page title and would fail with a logged 500; bench/fuzz found it)."""

    def render(self, request: IRequest) -> bytes:
        uri = request.uri
        if not uri.isascii():
            request.uri = urllib.parse.quote_from_bytes(uri, safe="/?&=%;:@+$,!~*'()[]").encode()
        try:
            return bytes(super().render(request))
        finally:
            request.uri = uri


class AssetFile(File):
    """L{File} for boot assets: HEAD, Range, If-Modified-Since (all L{File}'s), bodies of
    whole-file and single-range responses through sendfile on plain TCP
    (L{sidero.protocols.http.sendfile}), large reads otherwise.

    @ivar run: runs the sendfile hops in a thread pool (L{SendfileProducer}); None runs
        them on the reactor thread. Carried to the files found under this one.
    """

    run: Callable[..., Any] | None = None

    def getChild(self, path: bytes, request: IRequest) -> IResource:
        if b"\x00" in path:
            # No file has such a name, and stat() raises on it (a logged 500 without this;
            # bench/fuzz found it: corpus/http/crash-env-nul-byte).
            return NotFoundResource()
        child: IResource = super().getChild(path, request)
        return child

    def directoryListing(self) -> _Listing:
        return _Listing(self.path, self.listNames(), self.contentTypes, self.contentEncodings,
                        self.defaultType)

    def createSimilarFile(self, path: str) -> File:
        f = super().createSimilarFile(path)
        f.run = self.run
        return f

    def makeProducer(self, request: IRequest, fileForReading: Any) -> Any:
        transport = sendfile_socket(request)
        byte_range = request.getHeader(b"range")
        if byte_range is None:
            self._setContentHeaders(request)
            request.setResponseCode(200)
            if transport is not None:
                return SendfileProducer(request, transport, fileForReading, 0,
                                        self.getFileSize(), self.run)
            return _WholeFileProducer(request, fileForReading)
        if transport is not None:
            try:
                ranges = self._parseRangeHeader(byte_range)
            except ValueError:
                ranges = []  # malformed: File answers the whole file
            if len(ranges) == 1:
                offset, size = self._doSingleRangeRequest(request, ranges[0])
                self._setContentHeaders(request, size)
                return SendfileProducer(request, transport, fileForReading, offset, size,
                                        self.run)
        # Malformed or several ranges (multipart), or no sendfile: File's own producers.
        return super().makeProducer(request, fileForReading)


class ScriptResource(Resource):
    """The chain script, for an iPXE client that asked for an iPXE binary (L{bootfiles})."""

    isLeaf = True

    def __init__(self, script: bytes) -> None:
        super().__init__()
        self.script = script

    def render(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return self.script


class StaticRoots(Resource):
    """Serve a file from the first of several directories that has it.

    The operator's own iPXE binaries shadow Debian's; each root is a L{File}, which gives HEAD,
    Range and If-Modified-Since, and refuses paths that leave its root. Sidero's names find
    Debian's files (L{bootfiles.candidates}); with C{chain_script}, iPXE asking for an iPXE
    binary gets the script.
    """

    def __init__(self, roots: Sequence[str], chain_script: bytes | None = None) -> None:
        super().__init__()
        self.roots = [r for r in roots if r]
        self.chain_script = chain_script

    def getChild(self, path: bytes, request: IRequest) -> IResource:
        name = path.decode("utf-8", "replace")
        if self.chain_script is not None and bootfiles.wants_chain_script(
                name, bootfiles.is_ipxe_http(request.getHeader(b"user-agent"))):
            return ScriptResource(self.chain_script)
        for root in self.roots:
            for alias in bootfiles.candidates(name):
                candidate = AssetFile(root)
                child = candidate.getChild(alias.encode("utf-8"), request)
                if isinstance(child, File) and child.exists():
                    return child
        return NotFoundResource()

    def render(self, request: IRequest) -> bytes:
        return NotFoundResource().render(request)


#: What klein answers a Host header or path it cannot decode as UTF-8.
NON_UTF8_BODY = b"Non-UTF-8 encoding in URL."
MALFORMED_HOST_BODY = b"400 Bad Request: malformed Host header\n"


class BootRoutes(Resource):
    """The root of the API port's HTTP/1.1 side: the klein resource, with the boot routes
    (GET and HEAD of C{/boot.ipxe}, C{/ipxe}, C{/configdata}) called directly.

    Every boot of every machine asks those, and klein's way to a handler (werkzeug's bind
    and match, an adapter, a Deferred chain) was about a third of their CPU; the rest of
    the API port (assets, health, the 404s and redirects) goes through klein.  A direct
    answer carries C{Content-Length}, as Go's does for a body this small (klein's is
    chunked).  Hosts are checked as klein and werkzeug check them, for every route: a Host
    that is not UTF-8 or that IDNA cannot encode is a 400 (Go's C{malformed Host header}),
    not a logged 500.

    @param routes: request path to handler, each as a klein route (request in, body out).
    @param on_error: klein's error handler (request and failure in, body out), for an
        exception a direct handler raises.
    """

    isLeaf = True

    def __init__(self, inner: IResource,
                 routes: Mapping[bytes, Callable[[IRequest], bytes]] | None = None,
                 on_error: Callable[[IRequest, Failure], bytes] | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.routes = dict(routes or {})
        self.on_error = on_error
        #: Host header -> its 400 body, or None when it is good (a few values in practice).
        self._hosts: dict[bytes | None, bytes | None] = {}

    def _host_error(self, request: IRequest) -> bytes | None:
        header = request.getHeader(b"host")
        try:
            return self._hosts[header]
        except KeyError:
            pass
        error: bytes | None = None
        try:
            name = request.getRequestHostname().decode("utf-8")
        except UnicodeDecodeError:
            error = NON_UTF8_BODY
        else:
            try:
                name.partition(":")[0].encode("idna")
            except UnicodeError:
                error = MALFORMED_HOST_BODY
        if len(self._hosts) >= 1024:
            self._hosts.clear()  # a bound, against a client cycling Host headers
        self._hosts[header] = error
        return error

    def render(self, request: IRequest) -> Any:
        error = self._host_error(request)
        if error is not None:
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return error
        handler = self.routes.get(request.path) if request.method in (b"GET", b"HEAD") else None
        if handler is None:
            try:
                return self.inner.render(request)
            except BadHost:  # the check above should have caught it; werkzeug has the last word
                request.setResponseCode(400)
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                return MALFORMED_HOST_BODY
        try:
            body = handler(request)
        except Exception:
            if self.on_error is None:
                raise
            body = self.on_error(request, Failure())
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)  # nothing for HEAD (Request.write knows)
        if not getattr(request, "_disconnected", False):  # a pipelined request's client left
            request.finish()
        return NOT_DONE_YET


class WarningRecorder(Protocol):
    """Where Warning Events go (L{sidero.controllers.events.EventRecorder}); never fails."""

    def warning(self, obj: dict[str, Any], reason: str, message: str) -> Any: ...


class BootSite:
    """Klein application for the HTTP routes of the API port.

    @ivar settings: replaced (not mutated) once the SideroLink identity is known.
    """

    app = Klein()
    log = Logger()
    #: an L{sidero.timeline.ITimeline} told of each /ipxe decision (set by the tap), or None.
    timeline: Any = None

    def __init__(
        self,
        lookup: MetadataLookup,
        settings: BootSettings,
        env_dir: str,
        tftp_roots: Sequence[str],
        ready: Callable[[], tuple[bool, str]] = lambda: (True, "ok"),
        events: WarningRecorder | None = None,
        sendfile_run: Callable[..., Any] | None = None,
    ) -> None:
        self.lookup = lookup
        self.settings = settings
        self.env_dir = env_dir
        self.tftp_roots = list(tftp_roots)
        self.ready = ready
        self.events = events
        self.sendfile_run = sendfile_run
        self.script = boot_script(settings.api_endpoint, settings.api_port)
        #: /configdata answers, reused while the objects they were made from are unchanged.
        self.configdata = ConfigDataCache()

    def resource(self) -> IResource:
        return BootRoutes(
            self.app.resource(),
            {b"/boot.ipxe": self.boot_ipxe, b"/ipxe": self.ipxe, b"/configdata": self.config_data},
            self.not_found,
        )

    def set_siderolink_server_address(self, address: str) -> None:
        """The tunnel address Talos' kernel args and config documents point at (§3.2, §3.6)."""
        self.settings = dataclasses.replace(self.settings, siderolink_server_address=address)

    def _log_request(self, request: IRequest, **fields: Any) -> None:
        peer = request.getClientAddress()
        self.log.info(
            "HTTP {method} {uri} {remote}",
            method=request.method.decode("ascii", "replace"),
            uri=request.uri.decode("utf-8", "replace"),
            remote=getattr(peer, "host", str(peer)),
            **fields,
        )

    def _timeline(self, request: IRequest, query: BootQuery, **details: Any) -> None:
        if self.timeline is not None:
            self.timeline.record(
                "ipxe-decision", source="http", uuid=query.uuid or None, mac=query.mac or None,
                ip=getattr(request.getClientAddress(), "host", None), arch=query.arch, **details)

    @app.route("/boot.ipxe", methods=["GET", "HEAD"])
    def boot_ipxe(self, request: IRequest) -> bytes:
        self._log_request(request)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return self.script

    @app.route("/ipxe", methods=["GET", "HEAD"])
    def ipxe(self, request: IRequest) -> bytes:
        query = BootQuery.from_args(request.args or {})
        try:
            response = decide(query, self.lookup, self.settings)
        except LookupFailed as e:
            self._log_request(request, uuid=query.uuid, decision="lookup failed", error=str(e))
            self._timeline(request, query, decision="lookup failed", status=500, error=str(e))
            request.setResponseCode(500)
            return b""
        self._log_request(
            request, uuid=query.uuid, mac=query.mac, arch=query.arch,
            decision=response.decision, environment=response.environment, status=response.status,
        )
        self._timeline(request, query, decision=response.decision, status=response.status,
                       environment=response.environment)
        if response.event is not None and self.events is not None:
            self.events.warning(response.event.obj, response.event.reason, response.event.message)
        request.setResponseCode(response.status)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return response.body

    @app.route("/configdata", methods=["GET", "HEAD"])
    def config_data(self, request: IRequest) -> bytes:
        values = (request.args or {}).get(b"uuid")
        uuid = values[0].decode("utf-8", "replace") if values else ""
        source = str(getattr(request.getClientAddress(), "host", ""))
        result = access(uuid, source, self.lookup, self.settings)
        if result is None:
            result = self.configdata(uuid, self.lookup, self.settings)
        fields: dict[str, Any] = {"uuid": uuid, "status": result.status}
        if result.status != 200:
            # The error message, never a config body (those hold the cluster's secrets).
            fields["error"] = result.body.decode("utf-8", "replace").strip()[:500]
        self._log_request(request, **fields)
        if result.event is not None and self.events is not None:
            self.events.warning(result.event.obj, result.event.reason, result.event.message)
        request.setResponseCode(result.status)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return result.body

    @app.route("/env/", branch=True)
    def env(self, request: IRequest) -> IResource:
        self._log_request(request)
        assets = AssetFile(self.env_dir)
        assets.run = self.sendfile_run
        return assets

    @app.route("/tftp/", branch=True)
    def tftp(self, request: IRequest) -> IResource:
        self._log_request(request)
        return StaticRoots(self.tftp_roots, chain_script=self.script)

    @app.route("/healthz", methods=["GET", "HEAD"])
    def healthz(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"ok\n"

    @app.route("/readyz", methods=["GET", "HEAD"])
    def readyz(self, request: IRequest) -> bytes:
        ok, why = self.ready()
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if not ok:
            request.setResponseCode(503)
        return (why + "\n").encode()

    @app.handle_errors(Exception)
    def not_found(self, request: IRequest, failure: Any) -> bytes:
        from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
        from werkzeug.routing import RequestRedirect

        if failure.check(NotFound):
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return NOT_FOUND_BODY
        if failure.check(MethodNotAllowed):
            request.setResponseCode(405)
            return b"method not allowed\n"
        if failure.check(RequestRedirect):
            # /tftp or /env without the slash: Go's ServeMux redirects (301) to the subtree,
            # with a relative Location (werkzeug's absolute one repeats the client's Host).
            target = request.path + b"/"
            query = request.uri.partition(b"?")[2]
            if query:
                target += b"?" + query
            request.setResponseCode(301)
            request.setHeader(b"location", target)
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            return b'<a href="' + target.replace(b'"', b"%22") + b'">Moved Permanently</a>.\n\n'
        if failure.check(HTTPException):  # any other routing answer is the client's error
            code = failure.value.code or 400
            request.setResponseCode(code)
            return f"{code} {failure.value.name}\n".encode()
        self.log.failure("HTTP handler failed for {uri}", failure, uri=request.uri)
        request.setResponseCode(500)
        return b""


def ensure_dirs(*paths: str) -> None:
    """Create asset directories at start-up (in the disk pool), like Sidero's data dir layout."""
    for path in paths:
        os.makedirs(path, exist_ok=True)
