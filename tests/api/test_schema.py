"""Structural-schema rules for every custom kind and served version (sidero.api.schema)."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from sidero.api import registry, schema
from sidero.api.admission import validate


def structural_problems(node: dict[str, Any], path: str = "") -> list[str]:
    """The Kubernetes structural-schema violations of a schema tree (the subset CRDs can hit)."""
    problems: list[str] = []
    if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields") \
            and not node.get("x-kubernetes-int-or-string"):
        problems.append(f"{path or '<root>'}: missing type")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties and additionalProperties together")
    for forbidden in ("$ref", "allOf", "oneOf", "anyOf", "not", "definitions", "dependencies",
                      "patternProperties", "nullable"):
        if forbidden in node:
            problems.append(f"{path}: {forbidden} is not used by sidero schemas")
    for key in node.get("required") or []:
        if key not in (node.get("properties") or {}):
            problems.append(f"{path}: required {key!r} is not a property")
    if node.get("type") == "array" and "items" not in node:
        problems.append(f"{path}: array without items")
    for key, sub in (node.get("properties") or {}).items():
        problems += structural_problems(sub, f"{path}.{key}")
    if isinstance(node.get("additionalProperties"), dict):
        problems += structural_problems(node["additionalProperties"], f"{path}[*]")
    if "items" in node:
        problems += structural_problems(node["items"], f"{path}[]")
    if "default" in node and validate(node["default"], node, path or "<root>"):
        problems.append(f"{path}: default does not validate")
    return problems


def every_schema() -> list[tuple[str, str, dict[str, Any]]]:
    return [(k.kind, v, schema.schema_for(k, v)) for k in registry.CUSTOM_KINDS for v in k.served_versions]


def node(root: dict[str, Any], path: str) -> dict[str, Any]:
    current = root
    for step in path.split("."):
        current = current["items"] if step == "[]" else current["properties"][step]
    return current


class StructuralTests(SynchronousTestCase):
    def test_every_served_version_has_a_schema(self) -> None:
        """Each of the 13 (kind, version) pairs of §1 yields a schema."""
        self.assertEqual(len(every_schema()), 13)

    def test_schemas_are_structural(self) -> None:
        """No schema breaks the structural rules a real API server enforces."""
        for kind, version, s in every_schema():
            self.assertEqual(structural_problems(s), [], f"{kind} {version}")

    def test_metadata_is_only_an_object(self) -> None:
        """metadata is described as {type: object} and nothing more."""
        for kind, version, s in every_schema():
            self.assertEqual(s["properties"]["metadata"], {"type": "object"}, f"{kind} {version}")

    def test_unserved_version_raises(self) -> None:
        """Asking for a version the kind does not serve is a KeyError."""
        self.assertRaises(KeyError, schema.schema_for, registry.SERVER_BINDING, "v1alpha2")
        self.assertRaises(KeyError, schema.schema_for, registry.SECRET, "v1")

    def test_schema_copies_are_independent(self) -> None:
        """Mutating a returned schema does not change the next one."""
        s = schema.schema_for(registry.SERVER, "v1alpha2")
        s["properties"].clear()
        self.assertIn("spec", schema.schema_for(registry.SERVER, "v1alpha2")["properties"])


class FieldTests(SynchronousTestCase):
    def test_server_accepted_required_with_default(self) -> None:
        """Server spec.accepted is required and defaults to false."""
        for version in ("v1alpha1", "v1alpha2"):
            spec = node(schema.schema_for(registry.SERVER, version), "spec")
            self.assertEqual(spec["required"], ["accepted"])
            self.assertEqual(spec["properties"]["accepted"], {
                "type": "boolean", "default": False,
                "description": spec["properties"]["accepted"]["description"]})

    def test_config_patch_value_preserves_unknown_fields(self) -> None:
        """configPatches[].value keeps arbitrary JSON, op and path are required."""
        s = schema.schema_for(registry.SERVER_CLASS, "v1alpha2")
        item = node(s, "spec.configPatches.[]")
        self.assertEqual(item["required"], ["op", "path"])
        self.assertTrue(item["properties"]["value"]["x-kubernetes-preserve-unknown-fields"])
        self.assertNotIn("type", item["properties"]["value"])

    def test_unsigned_integers(self) -> None:
        """uint32 fields are non-negative integers with a format; uint64 too."""
        s = schema.schema_for(registry.SERVER, "v1alpha2")
        port = node(s, "spec.bmc.port")
        self.assertEqual((port["type"], port["format"], port["minimum"], port["maximum"]),
                         ("integer", "int64", 0, 4294967295))
        size = node(s, "spec.hardware.storage.devices.[].size")
        self.assertEqual((size["type"], size["format"], size["minimum"]), ("integer", "int64", 0))
        endpoint_port = node(schema.schema_for(registry.METAL_CLUSTER, "v1alpha3"),
                             "spec.controlPlaneEndpoint.port")
        self.assertEqual(endpoint_port["format"], "int32")

    def test_version_differences(self) -> None:
        """v1alpha1 Server has system/cpu, v1alpha2 has hardware/strategicPatches (§1.4)."""
        v1 = node(schema.schema_for(registry.SERVER, "v1alpha1"), "spec")["properties"]
        v2 = node(schema.schema_for(registry.SERVER, "v1alpha2"), "spec")["properties"]
        self.assertIn("cpu", v1)
        self.assertNotIn("uuid", v1["system"]["properties"])
        self.assertNotIn("hardware", v1)
        self.assertIn("uuid", v2["hardware"]["properties"]["system"]["properties"])
        self.assertIn("strategicPatches", v2)
        q1 = node(schema.schema_for(registry.SERVER_CLASS, "v1alpha1"), "spec.qualifiers")["properties"]
        self.assertEqual(sorted(q1), ["cpu", "labelSelectors", "systemInformation"])
        mm2 = node(schema.schema_for(registry.METAL_MACHINE, "v1alpha2"), "status")
        self.assertEqual(mm2["required"], ["ready"])
        self.assertNotIn("serverClassRef", node(schema.schema_for(registry.METAL_MACHINE, "v1alpha2"),
                                                "spec")["properties"])

    def test_server_class_status_lists_required(self) -> None:
        """ServerClass status lists are required and default to empty lists."""
        status = node(schema.schema_for(registry.SERVER_CLASS, "v1alpha2"), "status")
        self.assertEqual(status["required"], ["serversAvailable", "serversInUse"])
        self.assertEqual(status["properties"]["serversInUse"]["default"], [])

    def test_condition_schema(self) -> None:
        """CAPI conditions require type, status and a date-time lastTransitionTime."""
        item = node(schema.schema_for(registry.SERVER_BINDING, "v1alpha3"), "status.conditions.[]")
        self.assertEqual(item["required"], ["lastTransitionTime", "status", "type"])
        self.assertEqual(item["properties"]["lastTransitionTime"]["format"], "date-time")
        env = node(schema.schema_for(registry.ENVIRONMENT, "v1alpha2"), "status.conditions.[]")
        self.assertEqual(env["required"], ["status", "type"])

    def test_template_requires_spec(self) -> None:
        """MetalMachineTemplate requires template and template.spec."""
        spec = node(schema.schema_for(registry.METAL_MACHINE_TEMPLATE, "v1alpha3"), "spec")
        self.assertEqual(spec["required"], ["template"])
        self.assertEqual(spec["properties"]["template"]["required"], ["spec"])
        self.assertNotIn("status", schema.schema_for(registry.METAL_MACHINE_TEMPLATE, "v1alpha3")["properties"])


class SharedSchemaTests(SynchronousTestCase):
    def test_admission_leaves_shared_schema_untouched(self) -> None:
        """Admitting objects (pruning, defaulting) never modifies the cached schema."""
        from sidero.api.admission import Admission

        before = schema.schema_for(registry.SERVER_CLASS, "v1alpha2")
        Admission().admit(registry.SERVER_CLASS, "CREATE", {"metadata": {"name": "c"}}, None)
        out = Admission().admit(registry.SERVER_CLASS, "CREATE", {"metadata": {"name": "d"}}, None)
        assert out is not None
        out["status"]["serversInUse"].append("x")
        self.assertEqual(schema.shared_schema(registry.SERVER_CLASS, "v1alpha2"), before)
