# -*- test-case-name: tests.k8s.test_webhook -*-
"""The webhook server: L{sidero.k8s.webhook.review} on HTTPS, as the C{webhook} service.

 - L{WebhookResource}: twisted.web; POST of JSON only, a body size limit, C{/healthz}.
 - L{WebhookService} (from L{make_webhook_service}): TLS listener whose certificate follows the
   files in the cert dir (L{sidero.k8s.tls}), and optionally
   L{install_webhooks<sidero.k8s.webhook.registration.install_webhooks>} once listening, retried
   in the background until it succeeds.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.web import server
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from sidero.backoff import Backoff
from sidero.k8s import tls
from sidero.k8s.webhook.registration import WebhookEndpoint, install_webhooks
from sidero.k8s.webhook.review import Object, WebhookCounters, WebhookHandler
from sidero.store.interfaces import IAdmission
from sidero.threads import with_timeout
from sidero.web import http_error, limited_request_factory, media_type

HEALTHZ_PATH = "/healthz"
#: Bodies above this are refused with 413 before being kept: the API server sends at most a
#: few objects of at most ~3 MiB each (a list conversion can batch several).
DEFAULT_MAX_BODY = 32 * 1024 * 1024
#: Seconds the Kubernetes calls of L{install_webhooks} may take, all together.
INSTALL_TIMEOUT = 60.0
#: Background retries of a failed registration: 1 s doubling up to a minute.
REGISTER_RETRY_INITIAL = 1.0
REGISTER_RETRY_MAX = 60.0


class WebhookResource(Resource):
    """twisted.web face of L{WebhookHandler}: C{POST} of C{application/json} to a review path,
    C{GET /healthz}; 404/405/413/415 otherwise, each with a C{Status} body."""

    isLeaf = True
    log = Logger()

    def __init__(self, handler: WebhookHandler) -> None:
        super().__init__()
        self.handler = handler

    def render(self, request: IRequest) -> bytes:
        path = request.path.decode("utf-8", "replace")
        method = request.method
        if path == HEALTHZ_PATH:
            if method not in (b"GET", b"HEAD"):
                return self._reject(request, 405, "method not allowed", allow=b"GET, HEAD")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"ok"
        if path not in self.handler.paths:
            return self._reject(request, 404, f"no webhook at {path}")
        if method != b"POST":
            return self._reject(request, 405, f"{method.decode('ascii', 'replace')} not allowed; use POST",
                                allow=b"POST")
        if media_type(request.getHeader(b"content-type")) != "application/json":
            ctype = (request.getHeader(b"content-type") or b"").decode("latin-1")
            return self._reject(request, 415, f"content type {ctype!r} not supported; expected application/json")
        if getattr(request, "too_large", False):
            return self._reject(request, 413, "request body too large")
        assert request.content is not None
        request.content.seek(0)
        body = request.content.read()
        code, doc = self.handler.handle(path, body)
        return self._json(request, code, doc)

    def _reject(self, request: IRequest, code: int, message: str, allow: bytes | None = None) -> bytes:
        self.handler.counters.rejected[code] = self.handler.counters.rejected.get(code, 0) + 1
        self.log.info("webhook HTTP {method} {path}: {code} {message}",
                      method=request.method.decode("ascii", "replace"),
                      path=request.path.decode("utf-8", "replace"), code=code, message=message)
        if allow is not None:
            request.setHeader(b"allow", allow)
        return self._json(request, code, http_error(code, message).to_status())

    @staticmethod
    def _json(request: IRequest, code: int, doc: Object) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def make_site(handler: WebhookHandler, max_body: int = DEFAULT_MAX_BODY) -> server.Site:
    site = server.Site(WebhookResource(handler), requestFactory=limited_request_factory(max_body))
    site.displayTracebacks = False
    site.timeOut = 60
    return site


class ConnectionTracker(WrappingFactory):
    """Knows the open connections, so stopping the server really stops it: the API server keeps
    connections alive, and a webhook that is "down" must not go on answering on them."""

    def __init__(self, wrapped: server.Site) -> None:
        super().__init__(wrapped)
        self._idle: list[Deferred[None]] = []

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiters, self._idle = self._idle, []
            for d in waiters:
                d.callback(None)

    def close_all(self) -> Deferred[None]:
        """Abort every open connection; fires once all are gone."""
        if not self.protocols:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        for p in list(self.protocols):
            p.transport.abortConnection()
        return d


Runner = Callable[..., "Deferred[Any]"]


class WebhookService(Service):
    """TLS listener for L{WebhookResource}; certificates from L{sidero.k8s.tls}.

    C{startService} returns a Deferred (the app's ordered start waits for it): the certificate
    is ensured and loaded in the thread pool, the port bound, then (if configured) the webhooks
    registered.  Any failure there fails the start with one clear message.

    @ivar ca_bundle: the CA PEM of the served certificate, when known (self-generated, or the
        cert-manager C{ca.crt}); what a caller injects as C{caBundle}.
    @ivar port: the listening port, once started.
    """

    log = Logger()

    def __init__(self, reactor: Any, handler: WebhookHandler, *, port: int, interface: str,
                 cert_dir: str, hosts: Sequence[str], run: Runner, tls_min_version: str = "VersionTLS12",
                 reload_interval: float = tls.DEFAULT_RELOAD_INTERVAL, max_body: int = DEFAULT_MAX_BODY,
                 api_client: Any = None, endpoint: WebhookEndpoint | None = None,
                 tls_cipher_suites: Sequence[str] = ()) -> None:
        self.reactor = reactor
        self.tls_cipher_suites = tuple(tls_cipher_suites)
        self.handler = handler
        self.port_number = port
        self.interface = interface
        self.cert_dir = cert_dir
        self.hosts = list(hosts)
        self.run = run
        self.tls_min_version = tls_min_version
        self.reload_interval = reload_interval
        self.site = make_site(handler, max_body)
        self.connections = ConnectionTracker(self.site)
        self.api_client = api_client
        self.endpoint = endpoint
        self.ca_bundle: bytes | None = None
        self.files: tls.ServingFiles | None = None
        self.reloader: tls.CertificateReloader | None = None
        self.port: IListeningPort | None = None
        self._retry_call: Any = None
        self.setName("webhook")

    def startService(self) -> Deferred[None]:
        super().startService()
        return ensureDeferred(self._start())

    async def _start(self) -> None:
        if self.tls_min_version not in tls.TLS_VERSIONS:
            raise tls.CertificateError(f"unsupported --tls-min-version {self.tls_min_version!r}")
        files = await self.run(tls.ensure_certificate, self.cert_dir, self.hosts)
        self.files, self.ca_bundle = files, files.ca_pem
        reloader = self.reloader = tls.CertificateReloader(
            self.reactor, self.run, files.cert_path, files.key_path,
            min_version=self.tls_min_version, interval=self.reload_interval,
            cipher_suites=self.tls_cipher_suites)
        await reloader.load()
        endpoint = SSL4ServerEndpoint(self.reactor, self.port_number, reloader,
                                      interface=self.interface)
        self.port = await endpoint.listen(self.connections)
        reloader.start()
        address = self.port.getHost()
        self.log.info("webhook server listening on https://{host}:{port} ({source} certificate)",
                      host=getattr(address, "host", "?"), port=getattr(address, "port", "?"),
                      source="self-generated" if files.generated else "provided")
        if self.api_client is not None and self.endpoint is not None:
            if self.ca_bundle is None:
                raise tls.CertificateError(
                    f"cannot register webhooks: no {tls.CA_FILE} in {self.cert_dir} to use as caBundle")
            try:
                await self.register()
            except Exception as e:
                # The API server answered the store a moment ago: keep serving and retry.
                self.log.warn("webhook registration failed: {error}; retrying in the background",
                              error=str(e) or repr(e))
                self._retry_registration(attempt=1)

    def _retry_registration(self, attempt: int) -> None:
        """Retry L{register} with backoff (1 s doubling to 60 s) until it succeeds or we stop."""
        backoff = Backoff(initial=REGISTER_RETRY_INITIAL, maximum=REGISTER_RETRY_MAX, jitter=0.0)
        delay = backoff.delay(attempt - 1, 0.0)

        def again() -> None:
            self._retry_call = None
            if not self.running:
                return

            def failed(f: Any) -> None:
                self.log.warn("webhook registration failed (attempt {attempt}): {error}",
                              attempt=attempt + 1, error=f.getErrorMessage())
                self._retry_registration(attempt + 1)

            ensureDeferred(self.register()).addErrback(failed)

        self._retry_call = self.reactor.callLater(delay, again)

    async def register(self) -> list[str]:
        """L{install_webhooks} with our CA, in the pool, with a time limit."""
        if self.ca_bundle is None:
            raise tls.CertificateError(
                f"cannot register webhooks: no {tls.CA_FILE} in {self.cert_dir} to use as caBundle")
        assert self.endpoint is not None
        d = self.run(install_webhooks, self.api_client, self.endpoint, self.ca_bundle)
        result: list[str] = await with_timeout(d, self.reactor, INSTALL_TIMEOUT, "webhook registration")
        return result

    @property
    def bound_port(self) -> int:
        """The TCP port actually listened on (useful with C{port=0}); 0 when not listening."""
        if self.port is None:
            return 0
        return int(getattr(self.port.getHost(), "port", 0))

    def stopService(self) -> Deferred[None]:
        """Stop listening and abort open connections (the API server keeps them alive)."""
        super().stopService()
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        if self.reloader is not None:
            self.reloader.stop()
        port, self.port = self.port, None
        steps: list[Deferred[Any]] = [self.connections.close_all()]
        if port is not None:
            stopped = port.stopListening()
            if stopped is not None:
                steps.append(stopped)
        d = DeferredList(steps, consumeErrors=True)
        return d.addCallback(lambda _: None)


def make_webhook_service(reactor: Any, admission: IAdmission | None = None, *, port: int = 9443,
                         interface: str = "", cert_dir: str, hosts: Sequence[str] = ("localhost", "127.0.0.1"),
                         pool: Any = None, tls_min_version: str = "VersionTLS12",
                         reload_interval: float = tls.DEFAULT_RELOAD_INTERVAL,
                         max_body: int = DEFAULT_MAX_BODY, api_client: Any = None,
                         endpoint: WebhookEndpoint | None = None,
                         counters: WebhookCounters | None = None,
                         tls_cipher_suites: Sequence[str] = ()) -> WebhookService:
    """The webhook server as a service (name C{webhook}).

    @param pool: a L{sidero.threads.ThreadPoolService} (or anything with C{run(f, *a)}) for
        disk and Kubernetes calls; default the reactor's own pool.
    @param api_client, endpoint: both given: once listening, register the CRD conversion and the
        validating webhooks at C{endpoint} with our CA (self-managed install, no cert-manager).
    """
    if pool is not None:
        run: Runner = pool.run
    else:
        def run(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
            return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)
    handler = WebhookHandler(admission, counters=counters)
    return WebhookService(reactor, handler, port=port, interface=interface, cert_dir=cert_dir, hosts=hosts,
                          run=run, tls_min_version=tls_min_version, reload_interval=reload_interval,
                          max_body=max_body, api_client=api_client, endpoint=endpoint,
                          tls_cipher_suites=tls_cipher_suites)
