# -*- test-case-name: tests.k8s.test_webhook -*-
"""Pointing the API server at our webhooks, for a self-managed install (no cert-manager).

The builders are pure: the CRDs' C{spec.conversion} (L{conversion_stanza}) and the
C{ValidatingWebhookConfiguration} (L{validating_webhook_configuration}), both with our CA as
C{caBundle}.  L{install_webhooks} applies them with the Kubernetes client (blocking: callers run
it in the k8s thread pool).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from sidero.api import registry
from sidero.api.registry import ResourceType
from sidero.k8s.webhook.review import (
    CONVERT_PATH,
    METAL_MACHINE_TEMPLATE_V1ALPHA3,
    SERVER_V1ALPHA2,
    ValidatingWebhook,
)

Object = dict[str, Any]

REQUEST_TIMEOUT = (5.0, 30.0)
VALIDATING_WEBHOOK_CONFIGURATION = "sidero-validating-webhook-configuration"

#: What L{install_webhooks} registers: one per kind.  With the API server's default
#: C{matchPolicy: Equivalent} a v1alpha1 Server write is converted and sent to the v1alpha2 path.
REGISTERED_WEBHOOKS = (SERVER_V1ALPHA2, METAL_MACHINE_TEMPLATE_V1ALPHA3)

#: Kinds with more than one served version: only these need a conversion webhook.
CONVERSION_KINDS: tuple[ResourceType, ...] = tuple(
    k for k in registry.all_kinds() if k.custom and len(k.served_versions) > 1)


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
