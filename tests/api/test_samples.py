"""Every manifest in deploy/samples passes Admission (and converts to every served version)."""

from __future__ import annotations

from typing import Any

import yaml
from twisted.trial.unittest import SynchronousTestCase

from sidero.api import registry
from sidero.api.admission import Admission
from sidero.api.conversion import convert
from sidero.api.matching import servers_for_class
from tests.paths import REPO

SAMPLES = REPO / "deploy" / "samples"


def load_samples() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(SAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                out.append((path.name, doc))
    return out


def admitted(name: str) -> dict[str, Any]:
    for file_name, doc in load_samples():
        if file_name == name:
            kind = registry.by_api_version_kind(doc["apiVersion"], doc["kind"])
            out = Admission().admit(kind, "CREATE", doc, None)
            assert out is not None
            return out
    raise KeyError(name)


class SampleTests(SynchronousTestCase):
    def test_there_is_a_sample_of_every_custom_kind(self) -> None:
        """Each custom kind has at least one sample."""
        kinds = {doc["kind"] for _, doc in load_samples()}
        self.assertEqual(kinds, {k.kind for k in registry.CUSTOM_KINDS})

    def test_every_sample_is_admitted_unchanged(self) -> None:
        """Samples in the storage version pass admission with nothing pruned from their spec."""
        for name, doc in load_samples():
            kind = registry.by_api_version_kind(doc["apiVersion"], doc["kind"])
            out = Admission().admit(kind, "CREATE", doc, None)
            assert out is not None
            self.assertEqual(out["apiVersion"], kind.api_version, name)
            if doc["apiVersion"] == kind.api_version:
                self.assertEqual(out["spec"], {**doc["spec"], **({"accepted": False} if kind is registry.SERVER
                                                                 and "accepted" not in doc["spec"] else {})},
                                 name)

    def test_samples_convert_to_every_served_version_and_back(self) -> None:
        """Each sample survives a round trip through every served version."""
        for name, doc in load_samples():
            kind = registry.by_api_version_kind(doc["apiVersion"], doc["kind"])
            hub = convert(doc, kind.api_version)
            for version in kind.api_versions():
                self.assertEqual(convert(convert(hub, version), kind.api_version), hub, f"{name} via {version}")

    def test_v1alpha1_server_sample_is_stored_as_v1alpha2(self) -> None:
        """The v1alpha1 Server sample is converted: cpu and system become hardware."""
        out = admitted("metal_v1alpha1_server.yaml")
        self.assertEqual(out["spec"]["hardware"]["compute"]["processors"],
                         [{"manufacturer": "Intel", "productName": "Intel(R) Core(TM) i7 CPU"}])
        self.assertEqual(out["spec"]["hardware"]["system"]["manufacturer"], "QEMU")

    def test_sample_class_selects_sample_server(self) -> None:
        """The sample ServerClass contains the sample R630 server but not the unaccepted one."""
        sc = admitted("metal_v1alpha2_serverclass.yaml")
        servers = [admitted("metal_v1alpha2_server.yaml"), admitted("metal_v1alpha1_server.yaml")]
        self.assertEqual([s["metadata"]["name"] for s in servers_for_class(sc, servers)],
                         ["4c4c4544-0051-3510-8052-b4c04f4d4d32"])
