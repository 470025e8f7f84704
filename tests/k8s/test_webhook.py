"""
Tests for L{sidero.k8s.webhook} and L{sidero.k8s.tls}: the pure review layer, certificates and
their reloading (with a L{task.Clock}), and the server over a real loopback TLS socket with a
real HTTPS client that verifies the certificate against the generated CA with service_identity.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import stat
from pathlib import Path
from typing import Any

import treq
import yaml
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address
from twisted.internet import defer, protocol, task
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

from sidero.api import registry
from sidero.api.conversion import CONVERSION_DATA_ANNOTATION
from sidero.k8s import tls
from sidero.k8s.webhook.registration import (
    CONVERSION_KINDS,
    WebhookEndpoint,
    conversion_stanza,
    validating_webhook_configuration,
)
from sidero.k8s.webhook.review import (
    METAL_MACHINE_TEMPLATE_V1ALPHA3,
    SERVER_V1ALPHA1,
    SERVER_V1ALPHA2,
    WebhookCounters,
    WebhookCountersCollector,
    WebhookHandler,
    decode_review,
)
from sidero.k8s.webhook.service import WebhookService, make_webhook_service
from tests.k8s.apiserver import CRD_DIR, TinyCA

UID = "705ab4f5-6393-11e8-b7cc-42010a800002"

# ---- sample objects, one per kind, in the hub (storage) version --------------------------------

SAMPLES: dict[str, dict[str, Any]] = {
    "Server": {
        "apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Server",
        "metadata": {"name": "4c4c4544-0035-3010-8030-c4c04f4a4633", "uid": "u1", "resourceVersion": "7"},
        "spec": {"accepted": True, "hostname": "n1", "strategicPatches": ["machine: {}"],
                 "hardware": {"system": {"uuid": "4c4c4544", "manufacturer": "Dell", "productName": "R640"},
                              "compute": {"processors": [{"manufacturer": "Intel", "productName": "Xeon",
                                                          "coreCount": 8}]}},
                 "configPatches": [{"op": "add", "path": "/a", "value": 1}]},
        "status": {"ready": True, "power": "on"}},
    "ServerClass": {
        "apiVersion": "metal.sidero.dev/v1alpha2", "kind": "ServerClass", "metadata": {"name": "sc"},
        "spec": {"qualifiers": {"hardware": [{"system": {"manufacturer": "Dell"}},
                                             {"compute": {"processors": [{"manufacturer": "AMD",
                                                                          "productName": "EPYC"}]}}],
                                "labelSelectors": [{"rack": "a"}]},
                 "strategicPatches": ["x: 1"]},
        "status": {"serversAvailable": ["a"], "serversInUse": []}},
    "Environment": {
        "apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Environment", "metadata": {"name": "env"},
        "spec": {"kernel": {"url": "http://x/vmlinuz", "args": ["a=b"]}, "initrd": {"url": "http://x/initrd"}}},
    "MetalCluster": {
        "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha3", "kind": "MetalCluster",
        "metadata": {"name": "mc", "namespace": "ns"},
        "spec": {"controlPlaneEndpoint": {"host": "10.0.0.1", "port": 6443}}, "status": {"ready": True}},
    "MetalMachine": {
        "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha3", "kind": "MetalMachine",
        "metadata": {"name": "mm", "namespace": "ns"},
        "spec": {"providerID": "sidero://a", "serverRef": {"kind": "Server", "name": "a"},
                 "serverClassRef": {"kind": "ServerClass", "name": "any"}},
        "status": {"ready": True, "failureReason": "r", "failureMessage": "m",
                   "addresses": [{"type": "InternalIP", "address": "10.0.0.2"}]}},
    "MetalMachineTemplate": {
        "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha3", "kind": "MetalMachineTemplate",
        "metadata": {"name": "mmt", "namespace": "ns"},
        "spec": {"template": {"spec": {"serverClassRef": {"kind": "ServerClass", "name": "any"}}}}},
}


def conversion_review(objects: list[Any], desired: str, api_version: str = "apiextensions.k8s.io/v1",
                      uid: Any = UID) -> bytes:
    return json.dumps({"apiVersion": api_version, "kind": "ConversionReview",
                       "request": {"uid": uid, "desiredAPIVersion": desired, "objects": objects}}).encode()


def admission_review(operation: str, obj: Any, old: Any = None, kind: registry.ResourceType = registry.SERVER,
                     version: str | None = None) -> bytes:
    version = version or kind.storage_version
    return json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": UID, "kind": {"group": kind.group, "version": version, "kind": kind.kind},
        "resource": {"group": kind.group, "version": version, "resource": kind.plural},
        "operation": operation, "object": obj, "oldObject": old}}).encode()


def bad_server(op: str = "error", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Server", "metadata": {"name": "s1"},
            "spec": {"accepted": False, "configPatches": [{"op": op, "path": "/x"}], **spec}}


def strip_annotation(obj: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    annotations = out.get("metadata", {}).get("annotations", {})
    annotations.pop(CONVERSION_DATA_ANNOTATION, None)
    if "annotations" in out.get("metadata", {}) and not annotations:
        del out["metadata"]["annotations"]
    return out


# ---- conversion ------------------------------------------------------------------------------

class ConversionReviewTests(SynchronousTestCase):
    """ConversionReview in, ConversionReview out, through sidero.api.conversion.convert."""

    def setUp(self) -> None:
        self.handler = WebhookHandler()

    def convert(self, objects: list[Any], desired: str, **kw: Any) -> dict[str, Any]:
        code, doc = self.handler.handle("/convert", conversion_review(objects, desired, **kw))
        self.assertEqual(code, 200)
        return doc

    def test_conversion_kinds_are_the_multi_version_crds(self) -> None:
        """The kinds given a conversion webhook are exactly the CRDs in deploy/crds serving two versions."""
        multi = set()
        for path in CRD_DIR.glob("*.yaml"):
            crd = yaml.safe_load(path.read_text())
            if len([v for v in crd["spec"]["versions"] if v.get("served")]) > 1:
                multi.add(crd["metadata"]["name"])
        self.assertEqual({f"{k.plural}.{k.group}" for k in CONVERSION_KINDS}, multi)
        self.assertEqual(len(multi), 6)

    def test_every_pair_round_trips(self) -> None:
        """For every kind and ordered pair of served versions, converting there and back gives the object again."""
        for kind in CONVERSION_KINDS:
            hub = SAMPLES[kind.kind]
            for version in kind.served_versions:
                for target in kind.served_versions:
                    source = self.convert([hub], registry.api_version(kind.group, version))
                    obj = source["response"]["convertedObjects"][0]
                    there = self.convert([obj], registry.api_version(kind.group, target))
                    self.assertEqual(there["response"]["result"]["status"], "Success")
                    converted = there["response"]["convertedObjects"][0]
                    self.assertEqual(converted["apiVersion"], registry.api_version(kind.group, target))
                    back = self.convert([converted], registry.api_version(kind.group, version))
                    self.assertEqual(strip_annotation(back["response"]["convertedObjects"][0]),
                                     strip_annotation(obj), (kind.kind, version, target))
                back_to_hub = self.convert([obj], kind.api_version)["response"]["convertedObjects"][0]
                self.assertEqual(back_to_hub, hub, kind.kind)

    def test_server_fields_per_spec(self) -> None:
        """Server v1alpha2 -> v1alpha1: hardware.system without uuid becomes system, processors[0] becomes cpu."""
        doc = self.convert([SAMPLES["Server"]], "metal.sidero.dev/v1alpha1")
        spec = doc["response"]["convertedObjects"][0]["spec"]
        self.assertEqual(spec["system"], {"manufacturer": "Dell", "productName": "R640"})
        self.assertEqual(spec["cpu"], {"manufacturer": "Intel", "version": "Xeon"})
        self.assertNotIn("hardware", spec)
        self.assertNotIn("strategicPatches", spec)

    def test_several_objects_in_order(self) -> None:
        """Every object of the request is converted, in order, and the uid is echoed."""
        objects = [dict(SAMPLES["Environment"], metadata={"name": f"e{i}"}) for i in range(5)]
        doc = self.convert(objects, "metal.sidero.dev/v1alpha1")
        self.assertEqual(doc["response"]["uid"], UID)
        self.assertEqual([o["metadata"]["name"] for o in doc["response"]["convertedObjects"]],
                         [f"e{i}" for i in range(5)])
        self.assertEqual(self.handler.counters.objects_converted, 5)

    def test_v1beta1_review_answered_in_kind(self) -> None:
        """A v1beta1 ConversionReview gets a v1beta1 response."""
        doc = self.convert([SAMPLES["Environment"]], "metal.sidero.dev/v1alpha1",
                           api_version="apiextensions.k8s.io/v1beta1")
        self.assertEqual(doc["apiVersion"], "apiextensions.k8s.io/v1beta1")
        self.assertEqual(doc["kind"], "ConversionReview")
        self.assertEqual(doc["response"]["result"]["status"], "Success")

    def test_unknown_version_is_failure(self) -> None:
        """A desired version the kind does not serve fails the review with a message, converting nothing."""
        doc = self.convert([SAMPLES["Server"]], "metal.sidero.dev/v9")
        result = doc["response"]["result"]
        self.assertEqual(result["status"], "Failure")
        self.assertIn('cannot convert Server to "metal.sidero.dev/v9"', result["message"])
        self.assertEqual(doc["response"]["convertedObjects"], [])
        self.assertEqual(self.handler.counters.conversion_failures, 1)

    def test_one_bad_object_fails_the_review(self) -> None:
        """An unknown kind among good objects fails the whole review (the API server needs all or none)."""
        doc = self.convert([SAMPLES["Environment"], {"apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Nope",
                                                     "metadata": {"name": "n"}}], "metal.sidero.dev/v1alpha1")
        self.assertEqual(doc["response"]["result"]["status"], "Failure")
        self.assertIn('Nope metal.sidero.dev/v1alpha2 "n"', doc["response"]["result"]["message"])

    def test_misshapen_object_is_failure_not_crash(self) -> None:
        """An object whose spec is not an object fails the review; the handler does not raise."""
        obj = dict(SAMPLES["ServerClass"], spec={"qualifiers": ["not", "an", "object"]})
        doc = self.convert([obj, "string"], "metal.sidero.dev/v1alpha1")
        self.assertEqual(doc["response"]["result"]["status"], "Failure")
        doc = self.convert(["string"], "metal.sidero.dev/v1alpha1")
        self.assertIn("object of type str", doc["response"]["result"]["message"])

    def test_missing_desired_version_is_failure(self) -> None:
        """No desiredAPIVersion: a Failure result naming the field."""
        code, doc = self.handler.handle("/convert", json.dumps({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "ConversionReview",
            "request": {"uid": UID, "objects": []}}).encode())
        self.assertEqual(code, 200)
        self.assertEqual(doc["response"]["result"]["message"], "desiredAPIVersion is missing")


class MalformedReviewTests(SynchronousTestCase):
    """What is not a review gets HTTP 400 with a Status body, and is counted."""

    def check(self, path: str, body: bytes, fragment: str) -> None:
        handler = WebhookHandler()
        code, doc = handler.handle(path, body)
        self.assertEqual(code, 400)
        self.assertEqual((doc["kind"], doc["status"], doc["code"], doc["reason"]),
                         ("Status", "Failure", 400, "BadRequest"))
        self.assertIn(fragment, doc["message"])
        self.assertEqual(handler.counters.malformed, 1)

    def test_bad_json(self) -> None:
        """Bytes that are not JSON."""
        self.check("/convert", b"{nope", "cannot decode the ConversionReview")

    def test_not_utf8(self) -> None:
        """Bytes that are not UTF-8."""
        self.check("/convert", b"\xff\xfe\x00", "cannot decode")

    def test_not_an_object(self) -> None:
        """A JSON array."""
        self.check(SERVER_V1ALPHA2.path, b"[1]", "must be a JSON object, not list")

    def test_wrong_kind(self) -> None:
        """An AdmissionReview sent to /convert."""
        self.check("/convert", admission_review("CREATE", bad_server()), "expected kind ConversionReview")

    def test_wrong_api_version(self) -> None:
        """A ConversionReview of an unknown apiVersion."""
        self.check("/convert", conversion_review([], "x", api_version="apiextensions.k8s.io/v2"),
                   "unsupported ConversionReview apiVersion")

    def test_missing_uid(self) -> None:
        """A review without a uid cannot be answered."""
        self.check("/convert", conversion_review([], "x", uid=""), "request has no uid")

    def test_missing_request(self) -> None:
        """A review without a request."""
        self.check(SERVER_V1ALPHA2.path, b'{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}',
                   "has no request")

    def test_deep_nesting(self) -> None:
        """JSON nested deeper than the decoder's recursion limit is a 400, not a crash."""
        self.check("/convert", b"[" * 100000 + b"]" * 100000, "cannot decode")

    def test_decode_returns_request(self) -> None:
        """A good review decodes to its apiVersion and request."""
        api_version, request = decode_review(conversion_review([], "v"), "ConversionReview", ["apiextensions.k8s.io/v1"])
        self.assertEqual((api_version, request["uid"]), ("apiextensions.k8s.io/v1", UID))

    def test_unknown_path(self) -> None:
        """A POST to a path with no webhook is a 404 Status."""
        handler = WebhookHandler()
        code, doc = handler.handle("/validate-nothing", b"{}")
        self.assertEqual((code, doc["reason"]), (404, "NotFound"))

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(["/convert", SERVER_V1ALPHA2.path, METAL_MACHINE_TEMPLATE_V1ALPHA3.path]),
           st.binary(max_size=512))
    def test_fuzz_bytes_never_raise(self, path: str, body: bytes) -> None:
        """Arbitrary bytes to any path give a JSON answer with 200 or 400, never an exception."""
        code, doc = WebhookHandler().handle(path, body)
        self.assertIn(code, (200, 400))
        json.dumps(doc)

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=20)

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(["/convert", SERVER_V1ALPHA2.path, SERVER_V1ALPHA1.path,
                            METAL_MACHINE_TEMPLATE_V1ALPHA3.path]),
           st.sampled_from(["CREATE", "UPDATE", "DELETE", "PATCH", None]),
           json_values, json_values, st.sampled_from(list(SAMPLES.values())))
    def test_fuzz_review_shapes_never_raise(self, path: str, operation: Any, noise: Any, spec: Any,
                                            sample: dict[str, Any]) -> None:
        """Well-framed reviews with arbitrary objects get an answer (no 500), whatever their shape."""
        obj = dict(sample, spec=spec, extra=noise)
        if path == "/convert":
            kind = registry.by_api_version_kind(sample["apiVersion"], sample["kind"])
            other = next(v for v in kind.served_versions if v != kind.storage_version)
            body = conversion_review([obj, noise], registry.api_version(kind.group, other))
        else:
            body = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
                "uid": "u", "operation": operation, "kind": {"group": "metal.sidero.dev", "kind": "Server"},
                "object": obj, "oldObject": noise}}).encode()
        handler = WebhookHandler()
        code, doc = handler.handle(path, body)
        self.assertEqual(code, 200, doc)
        self.assertEqual(handler.counters.errors, 0)


# ---- admission -------------------------------------------------------------------------------

class AdmissionReviewTests(SynchronousTestCase):
    """The validating webhooks of spec §1.1 and §1.5."""

    def setUp(self) -> None:
        self.handler = WebhookHandler()

    def review(self, path: str, *args: Any, **kw: Any) -> dict[str, Any]:
        code, doc = self.handler.handle(path, admission_review(*args, **kw))
        self.assertEqual(code, 200)
        self.assertEqual((doc["apiVersion"], doc["kind"], doc["response"]["uid"]),
                         ("admission.k8s.io/v1", "AdmissionReview", UID))
        response: dict[str, Any] = doc["response"]
        return response

    def test_valid_server_allowed(self) -> None:
        """A valid Server CREATE is allowed, with no status."""
        response = self.review(SERVER_V1ALPHA2.path, "CREATE", bad_server(op="add"))
        self.assertEqual(response, {"uid": UID, "allowed": True})
        self.assertEqual(self.handler.counters.admission_allowed, 1)

    def test_invalid_patch_op_denied(self) -> None:
        """A configPatches op outside RFC 6902 is a 422 Invalid with the Kubernetes field error."""
        response = self.review(SERVER_V1ALPHA2.path, "CREATE", bad_server())
        self.assertFalse(response["allowed"])
        status = response["status"]
        self.assertEqual((status["code"], status["reason"], status["status"]), (422, "Invalid", "Failure"))
        self.assertEqual(status["message"], 'Server.metal.sidero.dev "s1" is invalid: spec.configPatches.0.op: '
                                            'Invalid value: "error": valid values are: ["add" "copy" "move" '
                                            '"remove" "replace" "test"]')
        self.assertEqual(status["details"]["causes"][0]["field"], "spec.configPatches.0.op")
        self.assertEqual(self.handler.counters.admission_denied, 1)

    def test_all_errors_aggregated(self) -> None:
        """bootFromDiskMethod, pxeMode and patch op errors come back together."""
        response = self.review(SERVER_V1ALPHA2.path, "UPDATE", bad_server(bootFromDiskMethod="x", pxeMode="y"),
                               bad_server(op="add"))
        fields = [c["field"] for c in response["status"]["details"]["causes"]]
        self.assertEqual(fields, ["spec.bootFromDiskMethod", "spec.pxeMode", "spec.configPatches.0.op"])
        self.assertIn('Invalid value: "x"', response["status"]["message"])

    def test_delete_allowed(self) -> None:
        """DELETE is always allowed, even of an object that would not validate."""
        response = self.review(SERVER_V1ALPHA2.path, "DELETE", None, bad_server())
        self.assertTrue(response["allowed"])

    def test_v1alpha1_server_path(self) -> None:
        """The v1alpha1 path validates v1alpha1 objects with the same rules."""
        obj = {"apiVersion": "metal.sidero.dev/v1alpha1", "kind": "Server", "metadata": {"name": "s1"},
               "spec": {"accepted": True, "pxeMode": "efi", "cpu": {"manufacturer": "x"}}}
        response = self.review(SERVER_V1ALPHA1.path, "CREATE", obj, version="v1alpha1")
        self.assertFalse(response["allowed"])
        self.assertIn('spec.pxeMode: Invalid value: "efi"', response["status"]["message"])
        obj["spec"]["pxeMode"] = "uefi"  # type: ignore[index]
        self.assertTrue(self.review(SERVER_V1ALPHA1.path, "CREATE", obj, version="v1alpha1")["allowed"])

    def test_template_spec_immutable(self) -> None:
        """Changing a MetalMachineTemplate spec is a 400 with the spec's message; a label change is allowed."""
        old = SAMPLES["MetalMachineTemplate"]
        new = copy.deepcopy(old)
        new["spec"]["template"]["spec"]["providerID"] = "sidero://x"
        response = self.review(METAL_MACHINE_TEMPLATE_V1ALPHA3.path, "UPDATE", new, old,
                               kind=registry.METAL_MACHINE_TEMPLATE)
        self.assertFalse(response["allowed"])
        self.assertEqual((response["status"]["code"], response["status"]["message"]),
                         (400, "MetalMachineTemplate.Spec is immutable"))
        relabelled = copy.deepcopy(old)
        relabelled["metadata"]["labels"] = {"a": "b"}
        self.assertTrue(self.review(METAL_MACHINE_TEMPLATE_V1ALPHA3.path, "UPDATE", relabelled, old,
                                    kind=registry.METAL_MACHINE_TEMPLATE)["allowed"])
        self.assertTrue(self.review(METAL_MACHINE_TEMPLATE_V1ALPHA3.path, "CREATE", new,
                                    kind=registry.METAL_MACHINE_TEMPLATE)["allowed"])

    def test_wrong_kind_for_path_denied(self) -> None:
        """A Server sent to the MetalMachineTemplate webhook is denied with 400, not validated as a template."""
        response = self.review(METAL_MACHINE_TEMPLATE_V1ALPHA3.path, "CREATE", bad_server())
        self.assertEqual(response["status"]["code"], 400)
        self.assertIn("validates MetalMachineTemplate", response["status"]["message"])

    def test_update_without_old_object_denied(self) -> None:
        """An UPDATE review with no oldObject is denied with 400."""
        response = self.review(SERVER_V1ALPHA2.path, "UPDATE", bad_server(op="add"), None)
        self.assertEqual((response["allowed"], response["status"]["code"]), (False, 400))

    def test_collector_reports_counters(self) -> None:
        """The prometheus collector exposes the outcome counters."""
        counters = WebhookCounters(admission_denied=2, malformed=1)
        families = {f.name: {tuple(s.labels.values()): s.value for s in f.samples}
                    for f in WebhookCountersCollector(counters).collect()}
        self.assertEqual(families["sidero_webhook_reviews"][("denied",)], 2)
        self.assertEqual(families["sidero_webhook_reviews"][("malformed",)], 1)


# ---- registration documents ------------------------------------------------------------------

class RegistrationDocumentTests(SynchronousTestCase):
    """What install_webhooks writes into the CRDs and the ValidatingWebhookConfiguration."""

    def test_url_endpoint(self) -> None:
        """A URL endpoint gives clientConfig.url with the path, and the CA base64-encoded."""
        stanza = conversion_stanza(WebhookEndpoint(url="https://127.0.0.1:9443/"), b"PEM")
        self.assertEqual(stanza, {"strategy": "Webhook", "webhook": {
            "clientConfig": {"caBundle": "UEVN", "url": "https://127.0.0.1:9443/convert"},
            "conversionReviewVersions": ["v1", "v1beta1"]}})

    def test_service_endpoint(self) -> None:
        """A Service endpoint gives clientConfig.service with the path."""
        config = WebhookEndpoint(service_name="sidero-webhook-service").client_config("/convert", b"x")
        self.assertEqual(config["service"], {"name": "sidero-webhook-service", "namespace": "sidero-system",
                                             "path": "/convert", "port": 443})

    def test_endpoint_needs_exactly_one(self) -> None:
        """Neither or both of url and service_name is refused."""
        self.assertRaises(ValueError, WebhookEndpoint)
        self.assertRaises(ValueError, WebhookEndpoint, url="https://x", service_name="y")

    def test_example_manifest_matches(self) -> None:
        """deploy/webhooks/cert-manager.yaml registers the same webhooks as install_webhooks, by Service."""
        docs = list(yaml.safe_load_all((CRD_DIR.parent / "webhooks" / "cert-manager.yaml").read_text()))
        example = next(d for d in docs if d["kind"] == "ValidatingWebhookConfiguration")
        ours = validating_webhook_configuration(WebhookEndpoint(service_name="sidero-webhook-service"), b"")
        for hook in ours["webhooks"]:
            del hook["clientConfig"]["caBundle"]
        self.assertEqual(example["webhooks"], ours["webhooks"])
        service = next(d for d in docs if d["kind"] == "Service")
        self.assertEqual(service["spec"]["ports"][0]["targetPort"], 9443)

    def test_validating_configuration(self) -> None:
        """One webhook per kind, at the spec paths and names, failurePolicy Fail, sideEffects None."""
        doc = validating_webhook_configuration(WebhookEndpoint(url="https://h:1"), b"ca")
        hooks = {w["name"]: w for w in doc["webhooks"]}
        server = hooks["vservers.metal.sidero.dev"]
        self.assertEqual(server["clientConfig"]["url"], "https://h:1/validate-metal-sidero-dev-v1alpha2-server")
        self.assertEqual(server["rules"], [{"apiGroups": ["metal.sidero.dev"], "apiVersions": ["v1alpha2"],
                                            "operations": ["CREATE", "UPDATE", "DELETE"],
                                            "resources": ["servers"], "scope": "Cluster"}])
        self.assertEqual((server["failurePolicy"], server["sideEffects"], server["admissionReviewVersions"]),
                         ("Fail", "None", ["v1"]))
        mmt = hooks["vmetalmachinetemplates.infrastructure.cluster.x-k8s.io"]
        self.assertEqual(mmt["rules"][0]["scope"], "Namespaced")
        self.assertTrue(mmt["clientConfig"]["url"].endswith(
            "/validate-infrastructure-cluster-x-k8s-io-v1alpha3-metalmachinetemplate"))


# ---- certificates ----------------------------------------------------------------------------

class CertificateTests(SynchronousTestCase):
    """ensure_certificate: generate when absent, keep cert-manager's, renew our own when stale."""

    def setUp(self) -> None:
        self.dir = self.mktemp()

    def test_generates_pair_and_ca(self) -> None:
        """Absent files are generated: 0600, the leaf names every host and is signed by the exposed CA."""
        files = tls.ensure_certificate(self.dir, ["sidero.example", "127.0.0.1", "::1"])
        self.assertTrue(files.generated)
        assert files.ca_pem is not None
        for name in ("tls.crt", "tls.key", "ca.crt"):
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.dir, name)).st_mode), 0o600)
        self.assertEqual([n for n in os.listdir(self.dir) if n.startswith(".tmp")], [])
        chain = x509.load_pem_x509_certificates(Path(files.cert_path).read_bytes())
        ca = x509.load_pem_x509_certificate(files.ca_pem)
        chain[0].verify_directly_issued_by(ca)
        verify_certificate_hostname(chain[0], "sidero.example")
        verify_certificate_ip_address(chain[0], "127.0.0.1")
        verify_certificate_ip_address(chain[0], "::1")
        self.assertRaises(VerificationError, verify_certificate_hostname, chain[0], "other.example")
        tls.build_context(Path(files.cert_path).read_bytes(), Path(files.key_path).read_bytes())

    def test_reuses_existing(self) -> None:
        """A second call keeps the files and still exposes the CA."""
        first = tls.ensure_certificate(self.dir, ["localhost"])
        before = Path(first.cert_path).read_bytes()
        second = tls.ensure_certificate(self.dir, ["localhost"])
        self.assertFalse(second.generated)
        self.assertEqual(Path(second.cert_path).read_bytes(), before)
        self.assertEqual(second.ca_pem, first.ca_pem)

    def test_regenerates_own_when_hosts_change(self) -> None:
        """Our own certificate is replaced when it no longer names every host."""
        tls.ensure_certificate(self.dir, ["localhost"])
        files = tls.ensure_certificate(self.dir, ["localhost", "10.5.0.1"])
        self.assertTrue(files.generated)
        leaf = x509.load_pem_x509_certificates(Path(files.cert_path).read_bytes())[0]
        verify_certificate_ip_address(leaf, "10.5.0.1")

    def test_regenerates_own_near_expiry(self) -> None:
        """Our own certificate is replaced within RENEW_BEFORE of expiry."""
        tls.ensure_certificate(self.dir, ["localhost"])
        later = datetime.datetime.now(datetime.UTC) + tls.SERVING_LIFETIME - datetime.timedelta(days=1)
        self.assertTrue(tls.ensure_certificate(self.dir, ["localhost"], now=later).generated)

    def test_keeps_cert_manager_files(self) -> None:
        """Files from another issuer (cert-manager) are served as they are, even for other hosts."""
        os.makedirs(self.dir)
        pair = TinyCA("cert-manager-ca").issue("svc", server_names=["sidero-webhook-service.sidero-system.svc"])
        Path(self.dir, "tls.crt").write_bytes(pair.cert)
        Path(self.dir, "tls.key").write_bytes(pair.key)
        files = tls.ensure_certificate(self.dir, ["localhost"])
        self.assertEqual((files.generated, files.ca_pem), (False, None))
        self.assertEqual(Path(self.dir, "tls.crt").read_bytes(), pair.cert)

    def test_half_pair_is_an_error(self) -> None:
        """tls.crt without tls.key is a clear error, not a silent regeneration."""
        os.makedirs(self.dir)
        Path(self.dir, "tls.crt").write_bytes(b"x")
        with self.assertRaises(tls.CertificateError) as caught:
            tls.ensure_certificate(self.dir, ["localhost"])
        self.assertIn("tls.key is missing", str(caught.exception))

    def test_unwritable_dir_is_an_error(self) -> None:
        """A cert dir that cannot be created is a CertificateError naming it."""
        Path(self.dir).write_text("a file, not a directory")
        with self.assertRaises(tls.CertificateError) as caught:
            tls.ensure_certificate(os.path.join(self.dir, "sub"), ["localhost"])
        self.assertIn("cannot write webhook certificates", str(caught.exception))

    def test_mismatched_pair_refused(self) -> None:
        """A key that does not belong to the certificate is refused by build_context."""
        ca = TinyCA("x")
        a, b = ca.issue("a", server_names=["a"]), ca.issue("b", server_names=["b"])
        self.assertRaises(tls.CertificateError, tls.build_context, a.cert, b.key)
        self.assertRaises(tls.CertificateError, tls.build_context, b"junk", b.key)
        self.assertRaises(tls.CertificateError, tls.build_context, a.cert, a.key, "VersionTLS10")


def sync_run(f: Any, *args: Any) -> Deferred[Any]:
    """Run a blocking function inline (unit tests only)."""
    try:
        return succeed(f(*args))
    except Exception:
        return defer.fail()


class ReloaderTests(SynchronousTestCase):
    """CertificateReloader follows the files on a clock."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.ca = TinyCA("rotating-ca")
        self.cert, self.key = os.path.join(self.dir, "tls.crt"), os.path.join(self.dir, "tls.key")
        self.write(self.ca.issue("one", server_names=["one"]))
        self.clock = task.Clock()
        self.reloader = tls.CertificateReloader(self.clock, sync_run, self.cert, self.key, interval=5.0)
        self.successResultOf(Deferred.fromCoroutine(self.reloader.load()))
        self.reloader.start()
        self.addCleanup(self.reloader.stop)

    def write(self, pair: Any, key: bool = True) -> None:
        tls.write_atomically(self.cert, pair.cert)
        if key:
            tls.write_atomically(self.key, pair.key)

    def served_name(self) -> str:
        ctx = self.reloader.context
        assert ctx is not None
        conn = SSL.Connection(ctx, None)
        cert = conn.get_certificate(as_cryptography=True)
        assert cert is not None
        return str(cert.subject.rfc4514_string())

    def test_unchanged_files_not_reloaded(self) -> None:
        """With no change, the context object stays the same across checks."""
        before = self.reloader.context
        self.clock.advance(20)
        self.assertIs(self.reloader.context, before)
        self.assertEqual(self.reloader.reloads, 1)

    def test_rotation_picked_up_on_next_check(self) -> None:
        """A rotated pair is served after the next check, not before."""
        self.write(self.ca.issue("two", server_names=["two"]))
        self.clock.advance(4.9)
        self.assertEqual(self.served_name(), "CN=one")
        self.clock.advance(0.1)
        self.assertEqual(self.served_name(), "CN=two")
        self.assertEqual(self.reloader.reloads, 2)

    def test_half_rotation_keeps_old_context(self) -> None:
        """A new certificate without its key yet keeps the old pair, then the complete pair loads."""
        pair = self.ca.issue("three", server_names=["three"])
        self.write(pair, key=False)
        self.clock.advance(5)
        self.assertEqual((self.served_name(), self.reloader.failures), ("CN=one", 1))
        tls.write_atomically(self.key, pair.key)
        self.clock.advance(5)
        self.assertEqual(self.served_name(), "CN=three")

    def test_removed_files_keep_old_context(self) -> None:
        """Files vanishing is a logged failure, and the loop keeps running."""
        os.unlink(self.cert)
        self.clock.advance(5)
        self.clock.advance(5)
        self.assertEqual((self.served_name(), self.reloader.failures), ("CN=one", 2))


# ---- over a real loopback TLS socket ---------------------------------------------------------

class LoopbackTLSTests(TestCase):
    """The service on 127.0.0.1 with a generated certificate, and a verifying HTTPS client."""

    timeout = 60

    async def start(self, **kw: Any) -> WebhookService:
        from twisted.internet import reactor

        kw.setdefault("cert_dir", self.mktemp())
        service = make_webhook_service(reactor, port=0, interface="127.0.0.1",
                                       hosts=["localhost", "127.0.0.1"], **kw)
        await service.startService()
        self.addCleanup(service.stopService)
        return service

    def client(self, ca_pem: bytes) -> Any:
        from twisted.internet import reactor

        policy = BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(ca_pem))
        return treq.client.HTTPClient(Agent(reactor, contextFactory=policy))

    def url(self, service: WebhookService, path: str, host: str = "127.0.0.1") -> str:
        assert service.port is not None
        return f"https://{host}:{service.bound_port}{path}"

    async def test_conversion_over_tls(self) -> None:
        """A verified HTTPS POST of a ConversionReview to /convert gets the converted objects."""
        service = await self.start()
        assert service.ca_bundle is not None
        http = self.client(service.ca_bundle)
        response = await http.post(self.url(service, "/convert"), data=conversion_review(
            [SAMPLES["Server"]], "metal.sidero.dev/v1alpha1"), headers={"Content-Type": ["application/json"]})
        self.assertEqual(response.code, 200)
        doc = await response.json()
        self.assertEqual(doc["response"]["convertedObjects"][0]["apiVersion"], "metal.sidero.dev/v1alpha1")

    async def test_hostname_verified(self) -> None:
        """The served certificate names localhost (service_identity), and not another name."""
        service = await self.start()
        assert service.ca_bundle is not None
        http = self.client(service.ca_bundle)
        response = await http.get(self.url(service, "/healthz", host="localhost"))
        self.assertEqual((response.code, await response.content()), (200, b"ok"))
        from twisted.internet import reactor
        assert service.port is not None
        options = optionsForClientTLS("wrong.example", Certificate.loadPEM(service.ca_bundle))
        endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", service.bound_port, options)
        lost: Deferred[Any] = Deferred()

        class Probe(protocol.Protocol):
            def connectionMade(self) -> None:
                self.transport.write(b"GET /healthz HTTP/1.0\r\n\r\n")  # type: ignore[union-attr]

            def connectionLost(self, reason: Any) -> None:
                lost.callback(reason.value)

        await connectProtocol(endpoint, Probe())
        why = await lost
        self.assertIsInstance(why, VerificationError)
        self.assertIn("wrong.example", repr(why))

    async def test_untrusted_ca_refused(self) -> None:
        """A client trusting another CA cannot talk to the server."""
        service = await self.start()
        http = self.client(TinyCA("other").cert_pem)
        with self.assertRaises(Exception) as caught:
            await http.get(self.url(service, "/healthz"))
        self.assertIn("certificate verify failed", repr(caught.exception))

    async def test_http_errors(self) -> None:
        """GET of a review path is 405, a non-JSON POST 415, an unknown path 404, a bad review 400."""
        service = await self.start()
        assert service.ca_bundle is not None
        http = self.client(service.ca_bundle)
        response = await http.get(self.url(service, "/convert"))
        self.assertEqual((response.code, response.headers.getRawHeaders("allow")), (405, ["POST"]))
        self.assertEqual((await response.json())["reason"], "MethodNotAllowed")
        response = await http.post(self.url(service, SERVER_V1ALPHA2.path), data=b"{}",
                                   headers={"Content-Type": ["text/plain"]})
        self.assertEqual(response.code, 415)
        await response.content()
        response = await http.post(self.url(service, "/mutate-x"), data=b"{}",
                                   headers={"Content-Type": ["application/json"]})
        self.assertEqual(response.code, 404)
        await response.content()
        response = await http.post(self.url(service, "/convert"), data=b"{oops",
                                   headers={"Content-Type": ["application/json; charset=utf-8"]})
        self.assertEqual(response.code, 400)
        self.assertIn("cannot decode", (await response.json())["message"])
        self.assertEqual(service.handler.counters.malformed, 1)
        self.assertEqual(service.handler.counters.rejected[405], 1)

    async def test_body_limit(self) -> None:
        """A body above the limit is refused with 413 and not processed."""
        service = await self.start(max_body=1024)
        assert service.ca_bundle is not None
        http = self.client(service.ca_bundle)
        response = await http.post(self.url(service, "/convert"), data=b" " * 5000,
                                   headers={"Content-Type": ["application/json"]})
        self.assertEqual(response.code, 413)
        await response.content()
        self.assertEqual(service.handler.counters.conversion_reviews, 0)
        response = await http.post(self.url(service, "/convert"), data=conversion_review([], "metal.sidero.dev/v1alpha1"),
                                   headers={"Content-Type": ["application/json"]})
        self.assertEqual(response.code, 200)
        await response.content()

    async def test_tls13_minimum_refuses_tls12_client(self) -> None:
        """With --tls-min-version VersionTLS13 a TLS 1.2-only client is refused; TLS 1.2 works by default."""
        import ssl

        from twisted.internet import threads

        strict = await self.start(tls_min_version="VersionTLS13")
        default = await self.start()

        def handshake(service: WebhookService, ca_path: str) -> str:
            assert service.port is not None
            ctx = ssl.create_default_context(cafile=ca_path)
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            import socket
            with socket.create_connection(("127.0.0.1", service.bound_port), timeout=5) as sock:
                with ctx.wrap_socket(sock, server_hostname="localhost") as tls_sock:
                    return str(tls_sock.version())

        for service in (strict, default):
            assert service.files is not None
        with self.assertRaises(ssl.SSLError):
            await threads.deferToThread(handshake, strict, os.path.join(strict.cert_dir, "ca.crt"))
        version = await threads.deferToThread(handshake, default, os.path.join(default.cert_dir, "ca.crt"))
        self.assertEqual(version, "TLSv1.2")

    async def test_rotation_served_without_restart(self) -> None:
        """cert-manager style files rotated on disk are served to new connections within the reload interval."""
        from twisted.internet import reactor

        cert_dir = self.mktemp()
        os.makedirs(cert_dir)
        ca = TinyCA("cert-manager")
        first = ca.issue("first", server_names=["localhost"], server_ips=["127.0.0.1"])
        Path(cert_dir, "tls.crt").write_bytes(first.cert)
        Path(cert_dir, "tls.key").write_bytes(first.key)
        Path(cert_dir, "ca.crt").write_bytes(ca.cert_pem)
        service = await self.start(cert_dir=cert_dir, reload_interval=0.2)
        self.assertEqual(service.ca_bundle, ca.cert_pem)
        self.assertFalse(service.files.generated if service.files else True)

        async def served_cn() -> str:
            from twisted.internet import threads
            return str(await threads.deferToThread(self._peer_cn, service, ca.cert_pem))

        self.assertEqual(await served_cn(), "CN=first")
        second = ca.issue("second", server_names=["localhost"], server_ips=["127.0.0.1"])
        tls.write_atomically(os.path.join(cert_dir, "tls.key"), second.key)
        tls.write_atomically(os.path.join(cert_dir, "tls.crt"), second.cert)
        for _ in range(50):
            if await served_cn() == "CN=second":
                break
            await task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(await served_cn(), "CN=second")

    @staticmethod
    def _peer_cn(service: WebhookService, ca_pem: bytes) -> str:
        import socket
        import ssl

        assert service.port is not None
        ctx = ssl.create_default_context(cadata=ca_pem.decode())
        with socket.create_connection(("127.0.0.1", service.bound_port), timeout=5) as sock:
            with ctx.wrap_socket(sock, server_hostname="localhost") as tls_sock:
                der = tls_sock.getpeercert(binary_form=True)
        assert der is not None
        return str(x509.load_der_x509_certificate(der).subject.rfc4514_string())

    async def test_stop_closes_connections(self) -> None:
        """Stopping the service closes kept-alive connections, and new connections are refused."""
        service = await self.start()
        assert service.ca_bundle is not None and service.port is not None
        url = self.url(service, "/healthz")
        http = self.client(service.ca_bundle)
        response = await http.get(url)
        await response.content()
        self.assertEqual(len(service.connections.protocols), 1)
        await service.stopService()
        self.assertEqual(len(service.connections.protocols), 0)
        with self.assertRaises(Exception) as caught:
            await self.client(service.ca_bundle).get(url)
        self.assertIn("Connection refused", repr(caught.exception))

    async def test_bad_min_version_fails_start(self) -> None:
        """An unknown --tls-min-version fails the start with a clear message."""
        from twisted.internet import reactor

        service = make_webhook_service(reactor, port=0, interface="127.0.0.1", cert_dir=self.mktemp(),
                                       tls_min_version="VersionTLS10")
        with self.assertRaises(tls.CertificateError) as caught:
            await service.startService()
        self.assertIn("VersionTLS10", str(caught.exception))

    async def test_failed_registration_is_retried_in_the_background(self) -> None:
        """A registration that fails at start does not fail the start: it is retried with backoff."""
        from twisted.internet import reactor

        from sidero.k8s.webhook import service as webhook

        calls: list[bytes] = []

        def flaky_install(api_client: Any, endpoint: Any, ca_bundle: bytes) -> list[str]:
            calls.append(ca_bundle)
            if len(calls) < 3:
                raise ConnectionResetError("Remote end closed connection without response")
            return ["servers.metal.sidero.dev"]

        self.patch(webhook, "install_webhooks", flaky_install)
        self.patch(webhook, "REGISTER_RETRY_INITIAL", 0.05)
        service = await self.start(api_client=object(),
                                   endpoint=WebhookEndpoint(url="https://127.0.0.1:9443"))
        self.assertTrue(service.running)
        self.assertEqual(len(calls), 1)
        for _ in range(100):
            if len(calls) >= 3:
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(calls), 3)
        self.assertEqual(set(calls), {service.ca_bundle})
        await task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(len(calls), 3, "kept registering after a success")
