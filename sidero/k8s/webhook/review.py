# -*- test-case-name: tests.k8s.test_webhook -*-
"""The reviews the Kubernetes API server sends our webhooks, and the pure handler answering them.

L{WebhookHandler}: C{handle(path, body) -> (http status, JSON document)} for C{ConversionReview}
(C{/convert}, every object through L{sidero.api.conversion.convert}) and C{AdmissionReview} (the
validating paths, through L{sidero.api.admission.Admission}, so the API server prints the same
Kubernetes-worded field errors as the embedded store does).  A review that cannot be answered
(bad JSON, wrong kind, no uid) gets HTTP 400 with a C{Status} body; it is logged and counted,
never raised.  No I/O here: L{sidero.k8s.webhook.service} puts it on the network.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger

from sidero.api import registry
from sidero.api.admission import CREATE, DELETE, UPDATE, Admission
from sidero.api.conversion import ConversionError, convert
from sidero.api.registry import ResourceType
from sidero.store.errors import StoreError
from sidero.store.interfaces import IAdmission
from sidero.web import http_error

Object = dict[str, Any]

CONVERT_PATH = "/convert"
CONVERSION_API_VERSIONS = ("apiextensions.k8s.io/v1", "apiextensions.k8s.io/v1beta1")
ADMISSION_API_VERSIONS = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")


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
                return 404, http_error(404, f"no webhook at {path}").to_status()
            return 200, self.validate(webhook, body)
        except ReviewError as e:
            self.counters.malformed += 1
            self.log.warn("webhook {path}: malformed review: {error}", path=path, error=e.message)
            return e.code, http_error(e.code, e.message).to_status()
        except Exception:
            self.counters.errors += 1
            self.log.failure("webhook {path}: internal error", path=path)
            return 500, http_error(500, "internal error handling the review").to_status()

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
