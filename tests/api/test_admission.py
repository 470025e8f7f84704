"""Admission (sidero.api.admission): schema pruning/defaults/validation, metadata, webhooks."""

from __future__ import annotations

import base64
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from sidero.api import registry
from sidero.api.admission import Admission
from sidero.store.errors import BadRequest, Invalid
from sidero.store.interfaces import IAdmission

UUID = "4c4c4544-0051-3510-8052-b4c04f4d4d32"


def server(spec: dict[str, Any] | None = None, **metadata: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Server",
                           "metadata": {"name": UUID, **metadata}}
    if spec is not None:
        obj["spec"] = spec
    return obj


class AdmissionTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.admission = Admission()

    def admit(self, kind: registry.ResourceType, obj: dict[str, Any], operation: str = "CREATE",
              old: dict[str, Any] | None = None) -> dict[str, Any]:
        out = self.admission.admit(kind, operation, obj, old)
        assert out is not None
        return out

    def invalid(self, kind: registry.ResourceType, obj: dict[str, Any], operation: str = "CREATE") -> Invalid:
        return self.assertRaises(Invalid, self.admission.admit, kind, operation, obj, None)

    def fields(self, error: Invalid) -> list[str]:
        return [c["field"] for c in error.causes]


class InterfaceTests(AdmissionTestCase):
    def test_provides_iadmission(self) -> None:
        """Admission provides IAdmission."""
        self.assertTrue(verifyObject(IAdmission, self.admission))

    def test_delete_always_allowed(self) -> None:
        """DELETE returns the object untouched, even an invalid one."""
        bad = server({"pxeMode": "nope"})
        self.assertIs(self.admission.admit(registry.SERVER, "DELETE", bad, None), bad)

    def test_input_not_mutated(self) -> None:
        """The caller's dict is left as it was."""
        obj = server({"unknown": 1})
        self.admit(registry.SERVER, obj)
        self.assertEqual(obj["spec"], {"unknown": 1})


class SchemaTests(AdmissionTestCase):
    def test_accepted_defaulted(self) -> None:
        """Server spec.accepted is always present, even without a spec."""
        self.assertEqual(self.admit(registry.SERVER, server())["spec"], {"accepted": False})
        self.assertEqual(self.admit(registry.SERVER, server({"hostname": "h"}))["spec"],
                         {"hostname": "h", "accepted": False})

    def test_server_class_status_lists_defaulted(self) -> None:
        """ServerClass status lists are present and empty by default."""
        out = self.admit(registry.SERVER_CLASS, {"metadata": {"name": "c"}, "spec": {}})
        self.assertEqual(out["status"], {"serversAvailable": [], "serversInUse": []})
        self.assertEqual((out["apiVersion"], out["kind"]), ("metal.sidero.dev/v1alpha2", "ServerClass"))

    def test_unknown_fields_pruned(self) -> None:
        """Unknown fields are dropped at every level, configPatch values kept whole."""
        out = self.admit(registry.SERVER, server({
            "accepted": True, "bogus": 1, "bmc": {"endpoint": "e", "extra": True},
            "configPatches": [{"op": "add", "path": "/a", "value": {"deep": {"x": [1, None]}}, "junk": 1}]},
            bogus="meta"))
        self.assertEqual(out["spec"], {"accepted": True, "bmc": {"endpoint": "e"},
                                       "configPatches": [{"op": "add", "path": "/a",
                                                          "value": {"deep": {"x": [1, None]}}}]})
        self.assertEqual(out["metadata"], {"name": UUID})

    def test_type_errors(self) -> None:
        """Wrong types are reported per field in Kubernetes wording."""
        e = self.invalid(registry.SERVER, server({"accepted": "yes", "bmc": {"endpoint": "e", "port": "623"}}))
        self.assertEqual(self.fields(e), ["spec.accepted", "spec.bmc.port"])
        self.assertEqual(e.causes[0]["message"],
                         'Invalid value: "string": spec.accepted in body must be of type boolean: "string"')
        self.assertEqual(e.causes[0]["reason"], "FieldValueTypeInvalid")
        self.assertEqual(e.code, 422)
        self.assertTrue(e.message.startswith(f'Server.metal.sidero.dev "{UUID}" is invalid: ['))

    def test_bool_is_not_an_integer(self) -> None:
        """true is not accepted where an integer is expected."""
        e = self.invalid(registry.SERVER, server({"accepted": True, "bmc": {"endpoint": "e", "port": True}}))
        self.assertEqual(self.fields(e), ["spec.bmc.port"])

    def test_required_fields(self) -> None:
        """Missing required fields are Required value errors with list indexes in the path."""
        e = self.invalid(registry.SERVER, server({"accepted": True, "bmc": {},
                                                  "configPatches": [{"op": "add"}]}))
        self.assertEqual(self.fields(e), ["spec.bmc.endpoint", "spec.configPatches[0].path"])
        self.assertEqual(e.causes[0]["message"], "Required value")
        self.assertEqual(e.causes[0]["reason"], "FieldValueRequired")

    def test_integer_range(self) -> None:
        """uint32 fields reject negatives and values over 2^32-1."""
        e = self.invalid(registry.SERVER, server({"accepted": True, "bmc": {"endpoint": "e", "port": -1}}))
        self.assertIn("Invalid value: -1: spec.bmc.port in body should be greater than or equal to 0",
                      e.causes[0]["message"])
        self.invalid(registry.SERVER, server({"accepted": True, "hardware": {"compute": {"totalCoreCount": 2**32}}}))

    def test_condition_time_format(self) -> None:
        """lastTransitionTime must be a date-time."""
        binding: dict[str, Any] = {"metadata": {"name": UUID}, "spec": {"metalMachineRef": {"name": "m"}},
                   "status": {"conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "yesterday"}]}}
        e = self.invalid(registry.SERVER_BINDING, binding)
        self.assertEqual(self.fields(e), ["status.conditions[0].lastTransitionTime"])
        binding["status"]["conditions"][0]["lastTransitionTime"] = "2024-05-01T10:20:30Z"
        self.admit(registry.SERVER_BINDING, binding)

    def test_null_fields_dropped(self) -> None:
        """null values are pruned rather than failing type checks."""
        out = self.admit(registry.SERVER, server({"accepted": True, "hostname": None}))
        self.assertEqual(out["spec"], {"accepted": True})

    def test_label_selectors_map_values(self) -> None:
        """qualifiers.labelSelectors maps must hold strings."""
        e = self.invalid(registry.SERVER_CLASS, {"metadata": {"name": "c"},
                                                 "spec": {"qualifiers": {"labelSelectors": [{"a": 1}]}}})
        self.assertEqual(self.fields(e), ["spec.qualifiers.labelSelectors[0].a"])


class VersionTests(AdmissionTestCase):
    def test_v1alpha1_converted_to_storage(self) -> None:
        """A v1alpha1 Server is converted and stored as v1alpha2."""
        out = self.admit(registry.SERVER, {"apiVersion": "metal.sidero.dev/v1alpha1", "kind": "Server",
                                           "metadata": {"name": UUID},
                                           "spec": {"accepted": True, "cpu": {"manufacturer": "Intel"}}})
        self.assertEqual(out["apiVersion"], "metal.sidero.dev/v1alpha2")
        self.assertEqual(out["spec"]["hardware"], {"compute": {"processors": [{"manufacturer": "Intel"}]}})

    def test_wrong_kind_or_version(self) -> None:
        """Another kind or an unserved version is a BadRequest."""
        self.assertRaises(BadRequest, self.admission.admit, registry.SERVER, "CREATE",
                          {"apiVersion": "metal.sidero.dev/v1alpha2", "kind": "ServerClass",
                           "metadata": {"name": "x"}}, None)
        self.assertRaises(BadRequest, self.admission.admit, registry.SERVER, "CREATE",
                          {"apiVersion": "metal.sidero.dev/v1", "kind": "Server", "metadata": {"name": "x"}}, None)
        self.assertRaises(BadRequest, self.admission.admit, registry.SERVER, "PATCH", server(), None)


class MetadataTests(AdmissionTestCase):
    def test_name_required_unless_generate_name(self) -> None:
        """A missing name fails unless generateName is given."""
        e = self.invalid(registry.SERVER_CLASS, {"metadata": {}})
        self.assertEqual(e.causes[0], {"field": "metadata.name", "reason": "FieldValueRequired",
                                       "message": "Required value: name or generateName is required"})
        out = self.admit(registry.SERVER_CLASS, {"metadata": {"generateName": "class-"}})
        self.assertEqual(out["metadata"], {"generateName": "class-"})

    def test_dns_subdomain_names(self) -> None:
        """Names must be lowercase RFC 1123 subdomains of at most 253 characters."""
        e = self.invalid(registry.SERVER_CLASS, {"metadata": {"name": "Bad_Name"}})
        self.assertIn('Invalid value: "Bad_Name": a lowercase RFC 1123 subdomain', e.causes[0]["message"])
        self.invalid(registry.SERVER_CLASS, {"metadata": {"name": "a" * 254}})
        self.admit(registry.SERVER_CLASS, {"metadata": {"name": "a.b-c"}})

    def test_namespace_defaulted_and_cleared(self) -> None:
        """Namespaced kinds default to 'default'; cluster-scoped kinds lose any namespace."""
        mc = self.admit(registry.METAL_CLUSTER, {"metadata": {"name": "m"}})
        self.assertEqual(mc["metadata"]["namespace"], "default")
        self.assertEqual(mc["status"] if "status" in mc else None, None)
        s = self.admit(registry.SERVER, server(namespace="other"))
        self.assertNotIn("namespace", s["metadata"])
        e = self.invalid(registry.METAL_MACHINE, {"metadata": {"name": "m", "namespace": "Bad.NS"}})
        self.assertEqual(self.fields(e), ["metadata.namespace"])

    def test_labels(self) -> None:
        """Label keys are qualified names and values valid label values."""
        e = self.invalid(registry.SERVER, server(labels={"bad key": "v", "ok/key": "bad value", "n": 1}))
        self.assertEqual(len(e.causes), 3)
        self.assertIn('Invalid value: "bad key"', e.causes[0]["message"])
        self.assertIn('Invalid value: "bad value"', e.causes[1]["message"])
        self.admit(registry.SERVER, server(labels={"cluster.x-k8s.io/cluster-name": "c", "e": ""}))

    def test_annotations_and_finalizers(self) -> None:
        """Annotation values must be strings; finalizers qualified names."""
        e = self.invalid(registry.SERVER, server(annotations={"a": 1}, finalizers=["bad finalizer"]))
        self.assertEqual(self.fields(e), ["metadata.annotations[a]", "metadata.finalizers[0]"])
        self.admit(registry.SERVER, server(annotations={"x": "y"}, finalizers=["storage.finalizers.server.k8s.io"]))

    def test_owner_references(self) -> None:
        """Owner references need apiVersion, kind, name and uid."""
        e = self.invalid(registry.SECRET, {"metadata": {"name": "s", "ownerReferences": [{"kind": "Server"}]}})
        self.assertEqual(self.fields(e), ["metadata.ownerReferences[0].apiVersion",
                                          "metadata.ownerReferences[0].name", "metadata.ownerReferences[0].uid"])

    def test_namespace_kind_uses_dns_label(self) -> None:
        """Namespace names are DNS labels (no dots)."""
        self.invalid(registry.NAMESPACE, {"metadata": {"name": "a.b"}})
        self.admit(registry.NAMESPACE, {"metadata": {"name": "sidero-system"}})


class ServerWebhookTests(AdmissionTestCase):
    def test_boot_from_disk_method(self) -> None:
        """An unknown bootFromDiskMethod is rejected with the valid values listed."""
        e = self.invalid(registry.SERVER, server({"accepted": True, "bootFromDiskMethod": "magic"}))
        self.assertEqual(e.causes, [{"field": "spec.bootFromDiskMethod", "reason": "FieldValueInvalid",
                                     "message": 'Invalid value: "magic": valid values are: '
                                                '["" "ipxe-exit" "http-404" "ipxe-sanboot"]'}])
        self.assertIn('spec.bootFromDiskMethod: Invalid value: "magic"', e.message)

    def test_pxe_mode_reports_its_own_value(self) -> None:
        """pxeMode errors name the pxeMode value (the Go quirk reported bootFromDiskMethod)."""
        e = self.invalid(registry.SERVER, server({"accepted": True, "bootFromDiskMethod": "ipxe-exit",
                                                  "pxeMode": "efi"}))
        self.assertEqual(e.causes[0]["field"], "spec.pxeMode")
        self.assertEqual(e.causes[0]["message"], 'Invalid value: "efi": valid values are: ["" "bios" "uefi"]')

    def test_config_patch_ops(self) -> None:
        """Each configPatches op is checked, with the index in the path."""
        e = self.invalid(registry.SERVER, server({"accepted": True, "configPatches": [
            {"op": "add", "path": "/a"}, {"op": "merge", "path": "/b"}]}))
        self.assertEqual(e.causes[0]["field"], "spec.configPatches.1.op")
        self.assertEqual(e.causes[0]["message"], 'Invalid value: "merge": valid values are: '
                                                 '["add" "copy" "move" "remove" "replace" "test"]')

    def test_all_errors_aggregated(self) -> None:
        """Every webhook error is reported at once."""
        e = self.invalid(registry.SERVER, server({"accepted": True, "bootFromDiskMethod": "x", "pxeMode": "y",
                                                  "configPatches": [{"op": "z", "path": "/"}]}))
        self.assertEqual(len(e.causes), 3)

    def test_valid_values_pass(self) -> None:
        """Every valid value passes on create and update."""
        for method in ("", "ipxe-exit", "http-404", "ipxe-sanboot"):
            for mode in ("", "bios", "uefi"):
                spec = {"accepted": True, "bootFromDiskMethod": method, "pxeMode": mode}
                self.admit(registry.SERVER, server(spec), "UPDATE", server(spec))


class TemplateWebhookTests(AdmissionTestCase):
    def template(self, class_name: str) -> dict[str, Any]:
        return {"apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha3", "kind": "MetalMachineTemplate",
                "metadata": {"name": "t", "namespace": "default"},
                "spec": {"template": {"spec": {"serverClassRef": {"name": class_name}}}}}

    def test_spec_immutable(self) -> None:
        """Changing the spec on update is a BadRequest with the Sidero wording."""
        old = self.admit(registry.METAL_MACHINE_TEMPLATE, self.template("a"))
        e = self.assertRaises(BadRequest, self.admission.admit, registry.METAL_MACHINE_TEMPLATE, "UPDATE",
                              self.template("b"), old)
        self.assertEqual((e.message, e.code), ("MetalMachineTemplate.Spec is immutable", 400))

    def test_metadata_change_allowed(self) -> None:
        """Updating labels with the same spec passes."""
        old = self.admit(registry.METAL_MACHINE_TEMPLATE, self.template("a"))
        new = self.template("a")
        new["metadata"]["labels"] = {"x": "y"}
        self.assertEqual(self.admit(registry.METAL_MACHINE_TEMPLATE, new, "UPDATE", old)["metadata"]["labels"],
                         {"x": "y"})


class SecretTests(AdmissionTestCase):
    def test_base64_required(self) -> None:
        """Non-base64 data values are rejected without echoing the value."""
        e = self.invalid(registry.SECRET, {"metadata": {"name": "s"}, "data": {"pass": "not base64!"}})
        self.assertEqual(self.fields(e), ["data[pass]"])
        self.assertNotIn("not base64!", e.message)
        self.assertIn('Invalid value: "<redacted>"', e.message)

    def test_string_data_folded(self) -> None:
        """stringData is encoded into data and dropped; type defaults to Opaque."""
        out = self.admit(registry.SECRET, {"metadata": {"name": "s", "namespace": "default"},
                                           "data": {"user": base64.b64encode(b"admin").decode()},
                                           "stringData": {"pass": "secret"}})
        self.assertEqual(out["data"], {"user": "YWRtaW4=", "pass": base64.b64encode(b"secret").decode()})
        self.assertNotIn("stringData", out)
        self.assertEqual(out["type"], "Opaque")

    def test_data_keys(self) -> None:
        """Data keys must be valid config keys."""
        e = self.invalid(registry.SECRET, {"metadata": {"name": "s"}, "data": {"a/b": ""}})
        self.assertEqual(self.fields(e), ["data"])

    def test_foreign_kinds_keep_unknown_fields(self) -> None:
        """Foreign kinds are not pruned: only metadata is checked."""
        node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"}, "spec": {"providerID": "sidero://x"},
                "status": {"anything": [1]}}
        self.assertEqual(self.admit(registry.NODE, node), node)
        machine = {"apiVersion": "cluster.x-k8s.io/v1beta1", "kind": "Machine", "metadata": {"name": "m"},
                   "spec": {"clusterName": "c"}}
        self.assertEqual(self.admit(registry.CAPI_MACHINE, machine)["metadata"]["namespace"], "default")
