"""CRD generation (sidero.api.crdgen): committed manifests, determinism, per-kind settings."""

from __future__ import annotations

import io
import os
from contextlib import redirect_stdout

import yaml
from twisted.trial.unittest import SynchronousTestCase

from sidero.api import crdgen, registry
from tests.paths import REPO

CRD_DIR = REPO / "deploy" / "crds"


class CommittedManifestTests(SynchronousTestCase):
    def test_committed_equal_generated(self) -> None:
        """deploy/crds holds exactly what crdgen generates now (run it after editing schemas)."""
        fresh = crdgen.manifests()
        committed = {p.name: p.read_text(encoding="utf-8") for p in CRD_DIR.glob("*.yaml")}
        self.assertEqual(sorted(committed), sorted(fresh))
        for name, text in fresh.items():
            self.assertEqual(committed[name], text, f"{name} is stale: run python -m sidero.api.crdgen")

    def test_deterministic(self) -> None:
        """Two generations are byte-identical."""
        self.assertEqual(crdgen.manifests(), crdgen.manifests())

    def test_main_writes_every_kind(self) -> None:
        """The command line writes one file per custom kind into --output."""
        out = self.mktemp()
        with redirect_stdout(io.StringIO()) as printed:
            self.assertEqual(crdgen.main(["--output", out]), 0)
        self.assertEqual(sorted(os.listdir(out)), sorted(crdgen.manifests()))
        self.assertEqual(len(printed.getvalue().splitlines()), 7)


class CRDContentTests(SynchronousTestCase):
    def load(self, kind: registry.ResourceType) -> dict:
        return yaml.safe_load(crdgen.render(kind))

    def test_identity(self) -> None:
        """Names, scope, group and list kind follow the registry."""
        crd = self.load(registry.SERVER)
        self.assertEqual(crd["apiVersion"], "apiextensions.k8s.io/v1")
        self.assertEqual(crd["metadata"]["name"], "servers.metal.sidero.dev")
        self.assertEqual(crd["spec"]["scope"], "Cluster")
        self.assertEqual(crd["spec"]["names"]["listKind"], "ServerList")
        self.assertEqual(self.load(registry.METAL_MACHINE)["spec"]["scope"], "Namespaced")

    def test_served_and_storage(self) -> None:
        """Every served version is listed, exactly one stored."""
        for kind in registry.CUSTOM_KINDS:
            versions = self.load(kind)["spec"]["versions"]
            self.assertEqual([v["name"] for v in versions], list(kind.served_versions))
            self.assertEqual([v["name"] for v in versions if v["storage"]], [kind.storage_version])
            self.assertTrue(all(v["served"] for v in versions))

    def test_conversion(self) -> None:
        """Multi-version kinds convert through the webhook; ServerBinding has no conversion."""
        conv = self.load(registry.SERVER_CLASS)["spec"]["conversion"]
        self.assertEqual(conv["strategy"], "Webhook")
        self.assertEqual(conv["webhook"]["conversionReviewVersions"], ["v1", "v1beta1"])
        self.assertEqual(conv["webhook"]["clientConfig"]["service"],
                         {"namespace": "sidero-system", "name": "sidero-webhook-service", "path": "/convert"})
        self.assertNotIn("conversion", self.load(registry.SERVER_BINDING)["spec"])

    def test_labels_and_categories(self) -> None:
        """CAPI contract labels on every CRD; move label on metal ones; cluster-api category."""
        server = self.load(registry.SERVER)["metadata"]["labels"]
        self.assertEqual(server["cluster.x-k8s.io/v1beta1"], "v1alpha3")
        self.assertEqual(server["clusterctl.cluster.x-k8s.io/move"], "")
        machine = self.load(registry.METAL_MACHINE)
        self.assertNotIn("clusterctl.cluster.x-k8s.io/move", machine["metadata"]["labels"])
        self.assertEqual(machine["spec"]["names"]["categories"], ["cluster-api"])

    def test_subresources_and_columns(self) -> None:
        """Status subresource except MetalMachineTemplate; printer columns from the registry."""
        template = self.load(registry.METAL_MACHINE_TEMPLATE)["spec"]["versions"][0]
        self.assertNotIn("subresources", template)
        server = self.load(registry.SERVER)["spec"]["versions"][1]
        self.assertEqual(server["subresources"], {"status": {}})
        bmc = [c for c in server["additionalPrinterColumns"] if c["name"] == "BMC IP"][0]
        self.assertEqual((bmc["jsonPath"], bmc["priority"]), (".spec.bmc.endpoint", 1))
        age = server["additionalPrinterColumns"][-1]
        self.assertEqual((age["name"], age["type"]), ("Age", "date"))

    def test_foreign_kind_refused(self) -> None:
        """Built-in kinds have no CRD."""
        self.assertRaises(ValueError, crdgen.crd, registry.SECRET)
