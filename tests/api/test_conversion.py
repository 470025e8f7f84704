"""Conversion between served versions (sidero.api.conversion), spec §1.4, §1.5 and §7."""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from sidero.api.conversion import CONVERSION_DATA_ANNOTATION as ANNOTATION
from sidero.api.conversion import ConversionError, convert

V1 = "metal.sidero.dev/v1alpha1"
V2 = "metal.sidero.dev/v1alpha2"
I2 = "infrastructure.cluster.x-k8s.io/v1alpha2"
I3 = "infrastructure.cluster.x-k8s.io/v1alpha3"


def annotations_of(obj: dict[str, Any]) -> dict[str, str]:
    return obj.get("metadata", {}).get("annotations", {})


SERVER_V1: dict[str, Any] = {"apiVersion": V1, "kind": "Server", "metadata": {"name": "s"}, "spec": {
    "hostname": "example.com", "accepted": True,
    "system": {"manufacturer": "Sidero", "productName": "Server", "version": "v1.0"},
    "cpu": {"manufacturer": "Sidero CPU", "version": "v1"}}}
SERVER_V2: dict[str, Any] = {"apiVersion": V2, "kind": "Server", "metadata": {"name": "s"}, "spec": {
    "hostname": "example.com", "accepted": True, "hardware": {
        "system": {"manufacturer": "Sidero", "productName": "Server", "version": "v1.0"},
        "compute": {"processors": [{"manufacturer": "Sidero CPU", "productName": "v1"}]}}}}


class ServerConversionTests(SynchronousTestCase):
    def test_v1alpha1_to_v1alpha2(self) -> None:
        """TestServerConvertV1alpha1V1Alpha2: system and cpu move into hardware, hostname kept."""
        self.assertEqual(convert(SERVER_V1, V2), SERVER_V2)

    def test_v1alpha2_to_v1alpha1(self) -> None:
        """TestServerConvertV1alpha2V1Alpha1: the inverse, plus the hub JSON in the annotation."""
        down = convert(SERVER_V2, V1)
        stored = json.loads(annotations_of(down).pop(ANNOTATION))
        self.assertEqual(down["metadata"], {"name": "s", "annotations": {}})
        down["metadata"].pop("annotations")
        self.assertEqual(down, SERVER_V1)
        self.assertEqual(stored, {k: v for k, v in SERVER_V2.items() if k != "metadata"})

    def test_uuid_dropped_and_first_processor_only(self) -> None:
        """Down-conversion drops system.uuid and uses only processors[0]."""
        hub = {"apiVersion": V2, "kind": "Server", "metadata": {"name": "s"}, "spec": {"accepted": False, "hardware": {
            "system": {"uuid": "u", "family": "f"},
            "compute": {"processors": [{"manufacturer": "A", "productName": "P"}, {"manufacturer": "B"}]}}}}
        down = convert(hub, V1)
        self.assertEqual(down["spec"]["system"], {"family": "f"})
        self.assertEqual(down["spec"]["cpu"], {"manufacturer": "A", "version": "P"})

    def test_round_trip_restores_hub_only_fields(self) -> None:
        """v1alpha2 -> v1alpha1 -> v1alpha2 gives back the whole hub object (annotation removed)."""
        hub = json.loads(json.dumps(SERVER_V2))
        hub["spec"]["hardware"]["system"]["uuid"] = "4c4c4544"
        hub["spec"]["hardware"]["memory"] = {"totalSize": "32 GB", "moduleCount": 2}
        hub["spec"]["strategicPatches"] = ["machine:\n  network:\n    hostname: x\n"]
        hub["metadata"]["annotations"] = {"keep": "me"}
        self.assertEqual(convert(convert(hub, V1), V2), hub)

    def test_v1alpha1_edit_wins_over_annotation(self) -> None:
        """A field a v1alpha1 client changed takes the new value; the rest is restored."""
        hub = json.loads(json.dumps(SERVER_V2))
        hub["spec"]["hardware"]["system"]["uuid"] = "4c4c4544"
        hub["spec"]["hardware"]["compute"]["processors"][0]["speed"] = 2400
        hub["spec"]["hardware"]["memory"] = {"moduleCount": 2}
        down = convert(hub, V1)
        down["spec"]["system"]["manufacturer"] = "Other"
        down["spec"]["cpu"]["version"] = "v2"
        up = convert(down, V2)
        hw = up["spec"]["hardware"]
        self.assertEqual(hw["system"], {"manufacturer": "Other", "productName": "Server", "version": "v1.0",
                                        "uuid": "4c4c4544"})
        self.assertEqual(hw["compute"]["processors"], [{"manufacturer": "Sidero CPU", "productName": "v2",
                                                        "speed": 2400}])
        self.assertEqual(hw["memory"], {"moduleCount": 2})
        self.assertNotIn(ANNOTATION, annotations_of(up))

    def test_corrupt_annotation_ignored(self) -> None:
        """An unparsable conversion-data annotation is removed and ignored."""
        obj = json.loads(json.dumps(SERVER_V1))
        obj["metadata"]["annotations"] = {ANNOTATION: "{not json"}
        self.assertEqual(convert(obj, V2), SERVER_V2)

    def test_same_version_is_a_copy(self) -> None:
        """Converting to the same version returns an equal, independent copy."""
        out = convert(SERVER_V2, V2)
        self.assertEqual(out, SERVER_V2)
        out["spec"]["hostname"] = "changed"
        self.assertEqual(SERVER_V2["spec"]["hostname"], "example.com")

    def test_errors(self) -> None:
        """Unknown kinds, other groups and unserved versions raise ConversionError."""
        self.assertRaises(ConversionError, convert, {"apiVersion": V2, "kind": "Nope"}, V1)
        self.assertRaises(ConversionError, convert, SERVER_V2, I3)
        self.assertRaises(ConversionError, convert, SERVER_V2, "metal.sidero.dev/v1beta1")


SC_V1 = {"apiVersion": V1, "kind": "ServerClass", "metadata": {"name": "c"}, "spec": {"qualifiers": {
    "systemInformation": [{"manufacturer": "Dell"}],
    "cpu": [{"manufacturer": "Intel", "version": "Xeon"}, {"manufacturer": "AMD"}],
    "labelSelectors": [{"zone": "a"}]}}}
SC_V2 = {"apiVersion": V2, "kind": "ServerClass", "metadata": {"name": "c"}, "spec": {"qualifiers": {
    "hardware": [{"system": {"manufacturer": "Dell"}},
                 {"compute": {"processors": [{"manufacturer": "Intel", "productName": "Xeon"}]}},
                 {"compute": {"processors": [{"manufacturer": "AMD"}]}}],
    "labelSelectors": [{"zone": "a"}]}}}


class ServerClassConversionTests(SynchronousTestCase):
    def test_up(self) -> None:
        """systemInformation then cpu entries become separate hardware entries (OR)."""
        self.assertEqual(convert(SC_V1, V2), SC_V2)

    def test_down(self) -> None:
        """Each hardware entry contributes its system and its first processor."""
        down = convert(SC_V2, V1)
        self.assertIn(ANNOTATION, down["metadata"]["annotations"])
        del down["metadata"]["annotations"]
        self.assertEqual(down, SC_V1)

    def test_round_trip_keeps_combined_entries(self) -> None:
        """A v1alpha2-only shape (system AND cpu in one entry, strategicPatches) survives a round trip."""
        hub = {"apiVersion": V2, "kind": "ServerClass", "metadata": {"name": "c"}, "spec": {
            "strategicPatches": ["a: b"], "selector": {"matchLabels": {"x": "y"}}, "qualifiers": {"hardware": [
                {"system": {"manufacturer": "Dell"}, "compute": {"processors": [{"manufacturer": "Intel"}]},
                 "memory": {"totalSize": "32 GB"}}]}}}
        self.assertEqual(convert(convert(hub, V1), V2), hub)

    def test_changed_qualifiers_use_v1alpha1_values(self) -> None:
        """When a v1alpha1 client changes qualifiers, the converted v1alpha1 form wins."""
        hub = json.loads(json.dumps(SC_V2))
        down = convert(hub, V1)
        down["spec"]["qualifiers"]["cpu"] = [{"manufacturer": "ARM"}]
        up = convert(down, V2)
        self.assertEqual(up["spec"]["qualifiers"]["hardware"], [
            {"system": {"manufacturer": "Dell"}}, {"compute": {"processors": [{"manufacturer": "ARM"}]}}])


class EnvironmentConversionTests(SynchronousTestCase):
    def test_identical(self) -> None:
        """Environment versions differ only in apiVersion."""
        env = {"apiVersion": V2, "kind": "Environment", "metadata": {"name": "e"},
               "spec": {"kernel": {"url": "u", "args": ["a"]}}, "status": {"conditions": []}}
        down = convert(env, V1)
        self.assertEqual(down, dict(env, apiVersion=V1))
        self.assertEqual(convert(down, V2), env)


class CAPSConversionTests(SynchronousTestCase):
    def test_metal_cluster_down(self) -> None:
        """A non-zero endpoint becomes spec and status apiEndpoints."""
        hub = {"apiVersion": I3, "kind": "MetalCluster", "metadata": {"name": "m", "namespace": "default"},
               "spec": {"controlPlaneEndpoint": {"host": "10.0.0.1", "port": 6443}}, "status": {"ready": True}}
        down = convert(hub, I2)
        self.assertEqual(down["spec"], {"apiEndpoints": [{"host": "10.0.0.1", "port": 6443}]})
        self.assertEqual(down["status"], {"ready": True, "apiEndpoints": [{"host": "10.0.0.1", "port": 6443}]})
        self.assertEqual(convert(down, I3), hub)

    def test_metal_cluster_zero_endpoint(self) -> None:
        """A zero endpoint produces no apiEndpoints."""
        hub = {"apiVersion": I3, "kind": "MetalCluster", "metadata": {"name": "m"}, "spec": {}}
        self.assertEqual(convert(hub, I2)["spec"], {})

    def test_metal_cluster_up_prefers_spec(self) -> None:
        """Up-conversion takes spec.apiEndpoints[0], else status.apiEndpoints[0]."""
        old = {"apiVersion": I2, "kind": "MetalCluster", "metadata": {"name": "m"},
               "spec": {"apiEndpoints": [{"host": "a", "port": 1}, {"host": "b", "port": 2}]},
               "status": {"ready": False, "apiEndpoints": [{"host": "c", "port": 3}]}}
        self.assertEqual(convert(old, I3)["spec"], {"controlPlaneEndpoint": {"host": "a", "port": 1}})
        old["spec"] = {}
        self.assertEqual(convert(old, I3)["spec"], {"controlPlaneEndpoint": {"host": "c", "port": 3}})

    def test_metal_machine(self) -> None:
        """failure* <-> error*, hub-only fields restored from the annotation."""
        hub = {"apiVersion": I3, "kind": "MetalMachine", "metadata": {"name": "m", "namespace": "default"},
               "spec": {"providerID": "sidero://s", "serverRef": {"kind": "Server", "name": "s"},
                        "serverClassRef": {"kind": "ServerClass", "name": "any"}},
               "status": {"ready": True, "failureReason": "R", "failureMessage": "M",
                          "addresses": [{"type": "InternalIP", "address": "10.0.0.5"}],
                          "conditions": [{"type": "Ready", "status": "True",
                                          "lastTransitionTime": "2024-01-01T00:00:00Z"}]}}
        down = convert(hub, I2)
        self.assertEqual(down["spec"], {"providerID": "sidero://s", "serverRef": {"kind": "Server", "name": "s"}})
        self.assertEqual(down["status"], {"ready": True, "errorReason": "R", "errorMessage": "M"})
        self.assertEqual(convert(down, I3), hub)

    def test_metal_machine_without_annotation(self) -> None:
        """Without the annotation a v1alpha2 machine loses nothing it has and gains nothing."""
        old = {"apiVersion": I2, "kind": "MetalMachine", "metadata": {"name": "m"},
               "spec": {"providerID": "p"}, "status": {"ready": False, "errorMessage": "boom"}}
        self.assertEqual(convert(old, I3), {"apiVersion": I3, "kind": "MetalMachine", "metadata": {"name": "m"},
                                            "spec": {"providerID": "p"}, "status": {"failureMessage": "boom"}})

    def test_metal_machine_template(self) -> None:
        """The template's serverClassRef exists only in v1alpha3 and survives a round trip."""
        hub = {"apiVersion": I3, "kind": "MetalMachineTemplate", "metadata": {"name": "t"},
               "spec": {"template": {"spec": {"serverClassRef": {"name": "any"}}}}}
        down = convert(hub, I2)
        self.assertEqual(down["spec"], {"template": {"spec": {}}})
        self.assertEqual(convert(down, I3), hub)
