# -*- test-case-name: tests.k8s.test_webhook -*-
"""The admission and conversion webhooks the Kubernetes API server calls (spec §1.1, §1.4-1.6).

Three layers, thinnest I/O last:

 - L{WebhookHandler}: pure.  C{handle(path, body) -> (http status, JSON document)} for
   C{ConversionReview} (C{/convert}, every object through L{sidero.api.conversion.convert}) and
   C{AdmissionReview} (the validating paths, through L{sidero.api.admission.Admission}, so the
   API server prints the same Kubernetes-worded field errors as the embedded store does).
   A review that cannot be answered (bad JSON, wrong kind, no uid) gets HTTP 400 with a
   C{Status} body; it is logged and counted, never raised.
 - L{WebhookResource}: twisted.web; POST of JSON only, a body size limit, C{/healthz}.
 - L{WebhookService} (from L{make_webhook_service}): TLS listener whose certificate follows the
   files in the cert dir (L{sidero.k8s.tls}), and optionally L{install_webhooks} once listening,
   for a self-managed install (no cert-manager): the CRDs' C{spec.conversion} and a
   C{ValidatingWebhookConfiguration} pointing at us with our CA as C{caBundle}.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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

from sidero.api import registry
from sidero.api.admission import CREATE, DELETE, UPDATE, Admission
from sidero.api.conversion import ConversionError, convert
from sidero.api.registry import ResourceType
from sidero.controllers.informer import Backoff
from sidero.k8s import tls
from sidero.store.errors import StoreError
from sidero.store.interfaces import IAdmission
from sidero.threads import with_timeout

Object = dict[str, Any]

CONVERT_PATH = "/convert"
HEALTHZ_PATH = "/healthz"
CONVERSION_API_VERSIONS = ("apiextensions.k8s.io/v1", "apiextensions.k8s.io/v1beta1")
ADMISSION_API_VERSIONS = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")
#: Bodies above this are refused with 413 before being kept: the API server sends at most a
#: few objects of at most ~3 MiB each (a list conversion can batch several).
DEFAULT_MAX_BODY = 32 * 1024 * 1024
#: Seconds the Kubernetes calls of L{install_webhooks} may take, all together.
INSTALL_TIMEOUT = 60.0
#: Background retries of a failed registration: 1 s doubling up to a minute.
REGISTER_RETRY_INITIAL = 1.0
REGISTER_RETRY_MAX = 60.0
REQUEST_TIMEOUT = (5.0, 30.0)

VALIDATING_WEBHOOK_CONFIGURATION = "sidero-validating-webhook-configuration"


@dataclass(frozen=True)
class ValidatingWebhook:
    """One validating webhook path: which kind and version it is registered for."""

    path: str
    name: str
    kind: ResourceType
    version: str
    operations: tuple[str, ...] = (CREATE, UPDATE, DELETE)


SERVER_V1ALPHA2 = ValidatingWebhook(
    "/validate-metal-sidero-dev-v1alpha2-server", "vservers.metal.sidero.dev", registry.SERVER, "v1alpha2")
SERVER_V1ALPHA1 = ValidatingWebhook(
    "/validate-metal-sidero-dev-v1alpha1-server", "vservers.metal.sidero.dev", registry.SERVER, "v1alpha1")
METAL_MACHINE_TEMPLATE_V1ALPHA3 = ValidatingWebhook(
    "/validate-infrastructure-cluster-x-k8s-io-v1alpha3-metalmachinetemplate",
    "vmetalmachinetemplates.infrastructure.cluster.x-k8s.io", registry.METAL_MACHINE_TEMPLATE, "v1alpha3",
    (CREATE, UPDATE))

VALIDATING_WEBHOOKS = (SERVER_V1ALPHA2, SERVER_V1ALPHA1, METAL_MACHINE_TEMPLATE_V1ALPHA3)
#: What L{install_webhooks} registers: one per kind.  With the API server's default
#: C{matchPolicy: Equivalent} a v1alpha1 Server write is converted and sent to the v1alpha2 path.
REGISTERED_WEBHOOKS = (SERVER_V1ALPHA2, METAL_MACHINE_TEMPLATE_V1ALPHA3)

#: Kinds with more than one served version: only these need a conversion webhook.
CONVERSION_KINDS: tuple[ResourceType, ...] = tuple(
    k for k in registry.all_kinds() if k.custom and len(k.served_versions) > 1)


class ReviewError(Exception):
    """A request that is not an answerable review: answered with HTTP C{code} and C{message}."""

    def __init__(self, message: str, code: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass
class WebhookCounters:
    """Outcomes since start; a closed set of keys (bounded memory)."""

    conversion_reviews: int = 0
    objects_converted: int = 0
    conversion_failures: int = 0
    admission_allowed: int = 0
    admission_denied: int = 0
    malformed: int = 0
    rejected: dict[int, int] = field(default_factory=lambda: {404: 0, 405: 0, 413: 0, 415: 0})
    errors: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "conversion_reviews": self.conversion_reviews, "objects_converted": self.objects_converted,
            "conversion_failures": self.conversion_failures, "admission_allowed": self.admission_allowed,
            "admission_denied": self.admission_denied, "malformed": self.malformed,
            "rejected": dict(self.rejected), "errors": self.errors,
        }


def status_document(code: int, message: str, reason: str = "BadRequest") -> Object:
    """A Kubernetes C{Status} failure body, for requests that are not reviews at all."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


# ---- decoding --------------------------------------------------------------------------------

def decode_review(body: bytes, kind: str, api_versions: Sequence[str]) -> tuple[str, Object]:
    """C{(apiVersion, request)} of a C{kind} review in C{body}.

    @raise ReviewError: not UTF-8 JSON, not an object, another kind or apiVersion, no
        C{request} object, or no non-empty string C{request.uid}.
    """
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ReviewError(f"cannot decode the {kind}: {e}") from None
    if not isinstance(doc, dict):
        raise ReviewError(f"the {kind} must be a JSON object, not {type(doc).__name__}")
    got_kind, api_version = doc.get("kind"), doc.get("apiVersion")
    if got_kind != kind:
        raise ReviewError(f"expected kind {kind}, got {got_kind!r}")
    if api_version not in api_versions:
        raise ReviewError(f"unsupported {kind} apiVersion {api_version!r}; expected one of "
                          f"{', '.join(api_versions)}")
    request = doc.get("request")
    if not isinstance(request, dict):
        raise ReviewError(f"the {kind} has no request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise ReviewError(f"the {kind} request has no uid")
    return str(api_version), request


# ---- conversion ------------------------------------------------------------------------------

def conversion_response(api_version: str, uid: str, converted: list[Object] | None,
                        failure: str | None = None) -> Object:
    result: Object = {"metadata": {}, "status": "Success"}
    response: Object = {"uid": uid, "result": result}
    if failure is not None:
        result.update(status="Failure", message=failure)
        response["convertedObjects"] = []
    else:
        response["convertedObjects"] = converted or []
    return {"apiVersion": api_version, "kind": "ConversionReview", "response": response}


def _describe(obj: Any) -> str:
    if not isinstance(obj, dict):
        return f"object of type {type(obj).__name__}"
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        meta = {}
    name = meta.get("name") or "?"
    ns = meta.get("namespace")
    return f'{obj.get("kind")} {obj.get("apiVersion")} "{ns + "/" if ns else ""}{name}"'


# ---- the handler -----------------------------------------------------------------------------

class WebhookHandler:
    """Answers reviews: pure, synchronous, never raises (see module doc)."""

    log = Logger()

    def __init__(self, admission: IAdmission | None = None,
                 webhooks: Sequence[ValidatingWebhook] = VALIDATING_WEBHOOKS,
                 counters: WebhookCounters | None = None) -> None:
        self.admission = admission if admission is not None else Admission()
        self.webhooks = {w.path: w for w in webhooks}
        self.counters = counters if counters is not None else WebhookCounters()

    @property
    def paths(self) -> tuple[str, ...]:
        return (CONVERT_PATH, *self.webhooks)

    def handle(self, path: str, body: bytes) -> tuple[int, Object]:
        """C{(HTTP status, JSON document)} for a POST of C{body} to C{path}."""
        try:
            if path == CONVERT_PATH:
                return 200, self.convert(body)
            webhook = self.webhooks.get(path)
            if webhook is None:
                self.counters.rejected[404] += 1
                return 404, status_document(404, f"no webhook at {path}", "NotFound")
            return 200, self.validate(webhook, body)
        except ReviewError as e:
            self.counters.malformed += 1
            self.log.warn("webhook {path}: malformed review: {error}", path=path, error=e.message)
            return e.code, status_document(e.code, e.message)
        except Exception:
            self.counters.errors += 1
            self.log.failure("webhook {path}: internal error", path=path)
            return 500, status_document(500, "internal error handling the review", "InternalError")

    def convert(self, body: bytes) -> Object:
        api_version, request = decode_review(body, "ConversionReview", CONVERSION_API_VERSIONS)
        self.counters.conversion_reviews += 1
        uid = request["uid"]
        desired = request.get("desiredAPIVersion")
        objects = request.get("objects")
        if not isinstance(desired, str) or not desired:
            return self._conversion_failed(api_version, uid, "desiredAPIVersion is missing")
        if objects is None:
            objects = []
        if not isinstance(objects, list):
            return self._conversion_failed(api_version, uid, "objects must be a list")
        converted = []
        for obj in objects:
            if not isinstance(obj, dict):
                return self._conversion_failed(api_version, uid, f"cannot convert {_describe(obj)}")
            try:
                converted.append(convert(obj, desired))
            except ConversionError as e:
                return self._conversion_failed(api_version, uid, f"{_describe(obj)}: {e}")
            except Exception as e:
                # A shape the converters do not expect (e.g. spec not an object; the API server
                # validates against the schema, so only a hand-made review gets here): a failed
                # conversion, logged by _conversion_failed, never a failed server.
                return self._conversion_failed(
                    api_version, uid, f"{_describe(obj)}: cannot convert to {desired}: {type(e).__name__}: {e}")
        self.counters.objects_converted += len(converted)
        self.log.debug("converted {count} objects to {version}", count=len(converted), version=desired)
        return conversion_response(api_version, uid, converted)

    def _conversion_failed(self, api_version: str, uid: str, message: str) -> Object:
        self.counters.conversion_failures += 1
        self.log.warn("conversion {uid} failed: {message}", uid=uid, message=message)
        return conversion_response(api_version, uid, None, message)

    def validate(self, webhook: ValidatingWebhook, body: bytes) -> Object:
        api_version, request = decode_review(body, "AdmissionReview", ADMISSION_API_VERSIONS)
        uid = request["uid"]
        status = self._decide(webhook, request)
        response: Object = {"uid": uid, "allowed": status is None}
        if status is not None:
            response["status"] = status
            self.counters.admission_denied += 1
            self.log.info("webhook {name} denied {operation} of {obj}: {message}", name=webhook.name,
                          operation=request.get("operation"), obj=_describe(request.get("object")
                                                                            or request.get("oldObject")),
                          message=status.get("message"))
        else:
            self.counters.admission_allowed += 1
        return {"apiVersion": api_version, "kind": "AdmissionReview", "response": response}

    def _decide(self, webhook: ValidatingWebhook, request: Object) -> Object | None:
        """None to allow, else the C{Status} to deny with."""
        operation = request.get("operation")
        if operation not in (CREATE, UPDATE, DELETE, "CONNECT"):
            return _denial(400, f"unknown admission operation {operation!r}")
        if operation not in (CREATE, UPDATE):
            return None
        gvk = request.get("kind")
        if not isinstance(gvk, dict):
            gvk = {}
        kind = webhook.kind
        if (gvk.get("group"), gvk.get("kind")) != (kind.group, kind.kind):
            return _denial(400, f"this webhook validates {kind.kind}.{kind.group}, not "
                                f"{gvk.get('kind')}.{gvk.get('group')}")
        new = request.get("object")
        old = request.get("oldObject")
        if not isinstance(new, dict):
            return _denial(400, f"{operation} review without an object")
        if operation == UPDATE:
            if not isinstance(old, dict):
                return _denial(400, "UPDATE review without an oldObject")
            old = self._normalised(kind, old)
        else:
            old = None
        try:
            self.admission.admit(kind, operation, new, old)
        except StoreError as e:
            status = e.to_status()
            status.pop("kind", None)
            status.pop("apiVersion", None)
            return status
        return None

    def _normalised(self, kind: ResourceType, old: Object) -> Object:
        """The old object as admission would store it (pruned, defaulted, storage version), so
        comparisons with the new one see only what the client changed."""
        try:
            return self.admission.admit(kind, CREATE, old, None) or old
        except StoreError:
            return old


def _denial(code: int, message: str) -> Object:
    reason = {400: "BadRequest", 403: "Forbidden", 422: "Invalid"}.get(code, "")
    return {"metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code}


class WebhookCountersCollector:
    """prometheus-client custom collector for L{WebhookCounters} (register it yourself)."""

    def __init__(self, counters: WebhookCounters) -> None:
        self.counters = counters

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        c = self.counters
        reviews = CounterMetricFamily("sidero_webhook_reviews", "Webhook reviews by outcome",
                                      labels=["outcome"])
        for outcome, value in (
            ("converted", c.conversion_reviews - c.conversion_failures),
            ("conversion_failed", c.conversion_failures), ("allowed", c.admission_allowed),
            ("denied", c.admission_denied), ("malformed", c.malformed), ("error", c.errors),
        ):
            reviews.add_metric([outcome], value)
        yield reviews
        rejected = CounterMetricFamily("sidero_webhook_http_rejected", "Webhook HTTP requests refused",
                                       labels=["code"])
        for code, value in c.rejected.items():
            rejected.add_metric([str(code)], value)
        yield rejected


# ---- HTTP ------------------------------------------------------------------------------------

class LimitedRequest(server.Request):
    """A request that stops keeping its body once it exceeds C{max_body} (memory stays bounded
    whatever a client sends); the resource then answers 413."""

    max_body = DEFAULT_MAX_BODY
    too_large = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body:
            self.too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._received += len(data)
        if self._received > self.max_body:
            self.too_large = True
            if self.content is not None:
                self.content.seek(0)
                self.content.truncate()
            return
        super().handleContentChunk(data)


def limited_request_factory(max_body: int) -> type[LimitedRequest]:
    return type("LimitedRequest", (LimitedRequest,), {"max_body": max_body})


def _is_json(content_type: bytes | None) -> bool:
    if content_type is None:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json"


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
        if not _is_json(request.getHeader(b"content-type")):
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
        reason = {404: "NotFound", 405: "MethodNotAllowed", 413: "RequestEntityTooLarge",
                  415: "UnsupportedMediaType"}.get(code, "BadRequest")
        return self._json(request, code, status_document(code, message, reason))

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


# ---- registration with the API server ---------------------------------------------------------

@dataclass(frozen=True)
class WebhookEndpoint:
    """How the API server reaches this server: a base URL (e.g. C{https://127.0.0.1:9443}, for
    an API server outside the cluster), or an in-cluster Service."""

    url: str | None = None
    service_name: str | None = None
    service_namespace: str = "sidero-system"
    service_port: int = 443

    def __post_init__(self) -> None:
        if (self.url is None) == (self.service_name is None):
            raise ValueError("give exactly one of url and service_name")

    def client_config(self, path: str, ca_bundle: bytes) -> Object:
        config: Object = {"caBundle": base64.b64encode(ca_bundle).decode("ascii")}
        if self.url is not None:
            config["url"] = self.url.rstrip("/") + path
        else:
            config["service"] = {"name": self.service_name, "namespace": self.service_namespace,
                                 "path": path, "port": self.service_port}
        return config


def crd_name(kind: ResourceType) -> str:
    return f"{kind.plural}.{kind.group}"


def conversion_stanza(endpoint: WebhookEndpoint, ca_bundle: bytes) -> Object:
    """A CRD's C{spec.conversion} pointing at our C{/convert}."""
    return {"strategy": "Webhook", "webhook": {
        "clientConfig": endpoint.client_config(CONVERT_PATH, ca_bundle),
        "conversionReviewVersions": ["v1", "v1beta1"]}}


def validating_webhook_configuration(endpoint: WebhookEndpoint, ca_bundle: bytes,
                                     name: str = VALIDATING_WEBHOOK_CONFIGURATION,
                                     webhooks: Sequence[ValidatingWebhook] = REGISTERED_WEBHOOKS,
                                     timeout_seconds: int = 10) -> Object:
    """The C{ValidatingWebhookConfiguration} of spec §1.1/§1.5 (failurePolicy Fail)."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name, "labels": {"app": "sidero"}},
        "webhooks": [{
            "name": w.name,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "matchPolicy": "Equivalent",
            "timeoutSeconds": timeout_seconds,
            "clientConfig": endpoint.client_config(w.path, ca_bundle),
            "rules": [{"apiGroups": [w.kind.group], "apiVersions": [w.version],
                       "operations": list(w.operations), "resources": [w.kind.plural],
                       "scope": "Namespaced" if w.kind.namespaced else "Cluster"}],
        } for w in webhooks],
    }


log = Logger()


def install_webhooks(api_client: Any, endpoint: WebhookEndpoint, ca_bundle: bytes, *,
                     kinds: Sequence[ResourceType] = CONVERSION_KINDS,
                     configuration_name: str = VALIDATING_WEBHOOK_CONFIGURATION,
                     webhooks: Sequence[ValidatingWebhook] = REGISTERED_WEBHOOKS) -> list[str]:
    """Point the API server at us (blocking: run it in the k8s thread pool).

    Replaces C{spec.conversion} of each CRD of C{kinds} that exists and serves more than one
    version (a JSON patch, so a previous C{service} reference does not linger beside a new
    C{url}), then creates or replaces the C{ValidatingWebhookConfiguration}.  Returns the
    names of the CRDs patched.

    @raise kubernetes.client.exceptions.ApiException: a call failed (other than a missing CRD).
    """
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    ext: Any = client.ApiextensionsV1Api(api_client)
    adm: Any = client.AdmissionregistrationV1Api(api_client)
    stanza = conversion_stanza(endpoint, ca_bundle)
    patched = []
    for kind in kinds:
        name = crd_name(kind)
        try:
            crd = ext.read_custom_resource_definition(name, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as e:
            if e.status == 404:
                log.warn("CRD {name} is not installed: no conversion webhook for it", name=name)
                continue
            raise
        served = [v.name for v in crd.spec.versions if v.served]
        if len(served) < 2:
            log.info("CRD {name} serves only {served}: no conversion needed", name=name, served=served)
            continue
        ext.patch_custom_resource_definition(
            name, [{"op": "add", "path": "/spec/conversion", "value": stanza}],
            _content_type="application/json-patch+json", _request_timeout=REQUEST_TIMEOUT)
        patched.append(name)
    body = validating_webhook_configuration(endpoint, ca_bundle, configuration_name, webhooks)
    try:
        adm.create_validating_webhook_configuration(body, _request_timeout=REQUEST_TIMEOUT)
    except ApiException as e:
        if e.status != 409:
            raise
        current = adm.read_validating_webhook_configuration(configuration_name, _request_timeout=REQUEST_TIMEOUT)
        body["metadata"]["resourceVersion"] = current.metadata.resource_version
        adm.replace_validating_webhook_configuration(configuration_name, body, _request_timeout=REQUEST_TIMEOUT)
    log.info("webhooks registered at {where}: conversion for {crds}, validation {config}",
             where=endpoint.url or f"service {endpoint.service_namespace}/{endpoint.service_name}",
             crds=patched, config=configuration_name)
    return patched


# ---- the service -----------------------------------------------------------------------------

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
                 api_client: Any = None, endpoint: WebhookEndpoint | None = None) -> None:
        self.reactor = reactor
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
            min_version=self.tls_min_version, interval=self.reload_interval)
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
                         counters: WebhookCounters | None = None) -> WebhookService:
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
                          max_body=max_body, api_client=api_client, endpoint=endpoint)
