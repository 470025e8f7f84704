"""Admission agrees with a real kube-apiserver serving the generated CRDs.

Each case is sent to the real server as a server-side dry-run create (nothing is persisted,
so the shared server is left as it was) and through L{Admission}; the pruned and defaulted
spec, or the set of offending fields, must be the same.  Skips loudly without the binary
(see L{tests.k8s.apiserver.require_binary}).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import threads
from twisted.trial.unittest import TestCase

from sidero.api import registry
from sidero.api.admission import Admission
from sidero.store.errors import Invalid
from tests.api.test_samples import load_samples
from tests.k8s.apiserver import KubeAPIServer, crd_manifests, sharedAPIServer

UUID = "4c4c4544-0051-3510-8052-b4c04f4d4d32"


def server(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Server", "metadata": {"name": UUID}, "spec": spec}


INVALID_CASES: list[tuple[str, dict[str, Any]]] = [
    ("type", server({"accepted": "yes"})),
    ("required", server({"accepted": True, "bmc": {"port": 1}, "configPatches": [{"op": "add"}]})),
    ("minimum", server({"accepted": True, "bmc": {"endpoint": "e", "port": -1}})),
    ("nested type", server({"accepted": True, "hardware": {"compute": {"processors": [{"speed": "fast"}]}}})),
    ("label map", {"apiVersion": "metal.sidero.dev/v1alpha2", "kind": "ServerClass", "metadata": {"name": "c"},
                   "spec": {"qualifiers": {"labelSelectors": [{"a": 1}]}}}),
    ("binding", {"apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha3", "kind": "ServerBinding",
                 "metadata": {"name": UUID}, "spec": {"siderolink": {"address": "a"}}}),
    ("template", {"apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha3", "kind": "MetalMachineTemplate",
                  "metadata": {"name": "t", "namespace": "default"}, "spec": {"template": {}}}),
]

PRUNE_CASES: list[tuple[str, dict[str, Any]]] = [
    ("default accepted", server({"hostname": "h"})),
    ("unknown fields", server({"accepted": True, "bogus": 1, "bmc": {"endpoint": "e", "extra": 2},
                               "configPatches": [{"op": "add", "path": "/x", "value": {"any": ["thing"]}}]})),
]


class APIServerParityTests(TestCase):
    timeout = 240

    async def setUp(self) -> None:  # type: ignore[override]
        self.server: KubeAPIServer = await sharedAPIServer()
        await threads.deferToThread(self.server.apply_crds, crd_manifests())

    def dry_run(self, obj: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
        """(created object, []) or (None, "field: message" causes) from the real server (blocking)."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        kind = registry.by_api_version_kind(obj["apiVersion"], obj["kind"])
        group, version = obj["apiVersion"].split("/")
        api_client = self.server.api_client()
        try:
            api: Any = client.CustomObjectsApi(api_client)
            try:
                if kind.namespaced:
                    out = api.create_namespaced_custom_object(group, version, "default", kind.plural, obj,
                                                              dry_run="All")
                else:
                    out = api.create_cluster_custom_object(group, version, kind.plural, obj, dry_run="All")
                return out, []
            except ApiException as e:
                if e.status != 422:
                    raise
                causes = json.loads(e.body or "{}").get("details", {}).get("causes", [])
                return None, sorted(f'{c.get("field", "")}: {c.get("message", "")}' for c in causes)
        finally:
            api_client.close()

    def admit(self, obj: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
        kind = registry.by_api_version_kind(obj["apiVersion"], obj["kind"])
        try:
            return Admission().admit(kind, "CREATE", obj, None), []
        except Invalid as e:
            return None, sorted(f'{c["field"]}: {c["message"]}' for c in e.causes)

    async def test_samples_accepted_identically(self) -> None:
        """Every storage-version sample is accepted by both, with the same spec."""
        for name, doc in load_samples():
            kind = registry.by_api_version_kind(doc["apiVersion"], doc["kind"])
            if doc["apiVersion"] != kind.api_version:
                continue  # needs the conversion webhook, which is not running here
            real, real_errors = await threads.deferToThread(self.dry_run, doc)
            ours, our_errors = self.admit(doc)
            self.assertEqual((real_errors, our_errors), ([], []), name)
            assert real is not None and ours is not None
            self.assertEqual(real.get("spec"), ours.get("spec"), name)

    async def test_pruning_and_defaults_match(self) -> None:
        """Unknown fields are pruned and defaults applied exactly as the real server does."""
        for name, doc in PRUNE_CASES:
            real, _ = await threads.deferToThread(self.dry_run, doc)
            ours, _ = self.admit(doc)
            assert real is not None and ours is not None, name
            self.assertEqual(real["spec"], ours["spec"], name)

    async def test_invalid_fields_match(self) -> None:
        """Schema violations are reported on the same fields, in the same words, by both."""
        for name, doc in INVALID_CASES:
            real, real_errors = await threads.deferToThread(self.dry_run, doc)
            ours, our_errors = self.admit(doc)
            self.assertIsNone(real, name)
            self.assertEqual(our_errors, real_errors, name)
