# -*- test-case-name: tests.api.test_admission -*-
"""What the Kubernetes API server and sidero's webhooks do to an object before it is stored.

L{Admission} provides L{IAdmission} for every kind of the registry:

 1. the object is brought to its kind's storage version (converting a served older version);
 2. metadata is checked as the API server checks ObjectMeta (name or generateName, RFC 1123
    names, label and annotation syntax; namespace defaulted to C{default} for namespaced kinds
    and cleared for cluster-scoped ones);
 3. custom kinds are pruned, defaulted and validated against the structural schema of
    L{sidero.api.schema}, with Kubernetes' field error wording;
 4. the validating webhooks of spec §1.1 (Server) and §1.5 (MetalMachineTemplate) run.

Foreign kinds (Secret, Event, Lease, Namespace, Node, CAPI Cluster/Machine) only get the
metadata checks, plus Secret C{data} values being base64 (C{stringData} is folded into
C{data}, as the API server does).  Nothing here does I/O.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import re
from typing import Any

from zope.interface import implementer

from sidero.api import registry
from sidero.api.conversion import ConversionError, convert
from sidero.api.registry import ResourceType, split_api_version
from sidero.api.schema import Schema, shared_schema
from sidero.store.errors import BadRequest, invalid
from sidero.store.interfaces import IAdmission

Object = dict[str, Any]
Cause = dict[str, str]

CREATE = "CREATE"
UPDATE = "UPDATE"
DELETE = "DELETE"
DEFAULT_NAMESPACE = "default"

BOOT_FROM_DISK_METHODS = ("", "ipxe-exit", "http-404", "ipxe-sanboot")
PXE_MODES = ("", "bios", "uefi")
PATCH_OPS = ("add", "copy", "move", "remove", "replace", "test")

REQUIRED = "FieldValueRequired"
INVALID = "FieldValueInvalid"
TYPE_INVALID = "FieldValueTypeInvalid"
NOT_SUPPORTED = "FieldValueNotSupported"

_OBJECT_META_FIELDS = frozenset({
    "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
    "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels",
    "annotations", "ownerReferences", "finalizers", "managedFields",
})

_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN_RE = re.compile(rf"^{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*$")
_DNS1123_LABEL_RE = re.compile(rf"^{_DNS1123_LABEL}$")
_QUALIFIED_NAME_RE = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_CONFIG_KEY_RE = re.compile(r"^[-._a-zA-Z0-9]+$")
_DATE_TIME_RE = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")

SUBDOMAIN_MESSAGE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used "
    "for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
LABEL_MESSAGE = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and "
    "must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex "
    "used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
QUALIFIED_NAME_MESSAGE = (
    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
    "with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for "
    "validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
)
LABEL_VALUE_MESSAGE = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or "
    "'my_value',  or '12345', regex used for validation is "
    "'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
)
CONFIG_KEY_MESSAGE = (
    "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. "
    "'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')"
)
MAX_ANNOTATIONS_SIZE = 256 * 1024


def quote(value: Any) -> str:
    """A value as Kubernetes field errors print it: strings quoted (Go C{%q}), others bare."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def cause(field: str, message: str, reason: str = INVALID) -> Cause:
    return {"field": field, "message": message, "reason": reason}


def invalid_value(field: str, value: Any, detail: str) -> Cause:
    return cause(field, f"Invalid value: {quote(value)}: {detail}", INVALID)


def required_value(field: str, detail: str = "") -> Cause:
    return cause(field, "Required value" + (f": {detail}" if detail else ""), REQUIRED)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _type_ok(value: Any, wanted: str) -> bool:
    actual = _json_type(value)
    if wanted == "number":
        return actual in ("integer", "number")
    return actual == wanted


# ---- structural schema: prune, default, validate ----------------------------------------------

def prune(value: Any, schema: Schema) -> Any:
    """Drop what the schema does not describe, as the API server prunes unknown fields; null
    values of (non-nullable) fields are dropped too."""
    if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
        return value
    kind = schema.get("type")
    if kind == "object" and isinstance(value, dict):
        props = schema.get("properties")
        if props is not None:
            return {k: prune(v, props[k]) for k, v in value.items() if k in props and v is not None}
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            return {k: prune(v, extra) for k, v in value.items() if v is not None}
        return {}
    if kind == "array" and isinstance(value, list):
        items = schema.get("items") or {}
        return [prune(v, items) for v in value]
    return value


def apply_defaults(value: Any, schema: Schema) -> Any:
    """Fill absent fields that have a schema C{default}, recursively, in place."""
    kind = schema.get("type")
    if kind == "object" and isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(value[key], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in value:
                value[key] = apply_defaults(value[key], extra)
    elif kind == "array" and isinstance(value, list):
        items = schema.get("items") or {}
        for i, item in enumerate(value):
            value[i] = apply_defaults(item, items)
    return value


def validate(value: Any, schema: Schema, path: str) -> list[Cause]:
    """Field errors of C{value} against C{schema}, worded like the API server's."""
    causes: list[Cause] = []
    wanted = schema.get("type")
    if wanted is None:
        return causes
    if not _type_ok(value, wanted):
        actual = _json_type(value)
        return [cause(path, f'Invalid value: "{actual}": {path} in body must be of type {wanted}: "{actual}"',
                      TYPE_INVALID)]
    if wanted == "object":
        for key in schema.get("required") or []:
            if key not in value:
                causes.append(required_value(_child(path, key)))
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                causes += validate(value[key], sub, _child(path, key))
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, item in value.items():
                causes += validate(item, extra, _child(path, key))
    elif wanted == "array":
        items = schema.get("items") or {}
        for i, item in enumerate(value):
            causes += validate(item, items, f"{path}[{i}]")
    elif wanted == "string":
        if schema.get("format") == "date-time" and not _DATE_TIME_RE.match(value):
            causes.append(cause(path, f"Invalid value: {quote(value)}: {path} in body must be of type "
                                      f"date-time: {quote(value)}"))
    elif wanted in ("integer", "number"):
        if "minimum" in schema and value < schema["minimum"]:
            causes.append(invalid_value(path, value, f"{path} in body should be greater than or "
                                                     f"equal to {schema['minimum']}"))
        if "maximum" in schema and value > schema["maximum"]:
            causes.append(invalid_value(path, value, f"{path} in body should be less than or "
                                                     f"equal to {schema['maximum']}"))
    if "enum" in schema and value not in schema["enum"]:
        supported = ", ".join(quote(v) for v in schema["enum"])
        causes.append(cause(path, f"Unsupported value: {quote(value)}: supported values: {supported}",
                            NOT_SUPPORTED))
    return causes


def _child(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# ---- metadata ---------------------------------------------------------------------------------

def validate_metadata(kind: ResourceType, metadata: Object) -> list[Cause]:
    causes: list[Cause] = []
    name = metadata.get("name")
    generate_name = metadata.get("generateName")
    for key in ("name", "generateName", "namespace"):
        if key in metadata and not isinstance(metadata[key], str):
            causes.append(cause(f"metadata.{key}", f'Invalid value: "{_json_type(metadata[key])}": '
                                f'metadata.{key} in body must be of type string', TYPE_INVALID))
    if causes:
        return causes
    name_check = _dns_label if kind is registry.NAMESPACE else _dns_subdomain
    if not name:
        if not generate_name:
            causes.append(required_value("metadata.name", "name or generateName is required"))
        else:
            prefix = generate_name.rstrip("-")
            message = name_check(prefix) if prefix else None
            if message:
                causes.append(invalid_value("metadata.generateName", generate_name, message))
    else:
        message = name_check(name)
        if message:
            causes.append(invalid_value("metadata.name", name, message))
    if kind.namespaced:
        namespace = metadata.get("namespace", "")
        message = _dns_label(namespace)
        if message:
            causes.append(invalid_value("metadata.namespace", namespace, message))
    causes += _validate_labels(metadata.get("labels"))
    causes += _validate_annotations(metadata.get("annotations"))
    finalizers = metadata.get("finalizers")
    if finalizers is not None:
        if not isinstance(finalizers, list) or not all(isinstance(f, str) for f in finalizers):
            causes.append(cause("metadata.finalizers", "Invalid value: "
                                f'"{_json_type(finalizers)}": metadata.finalizers must be a list of strings',
                                TYPE_INVALID))
        else:
            for i, finalizer in enumerate(finalizers):
                message = _qualified_name(finalizer)
                if message:
                    causes.append(invalid_value(f"metadata.finalizers[{i}]", finalizer, message))
    owners = metadata.get("ownerReferences")
    if owners is not None:
        if not isinstance(owners, list):
            causes.append(cause("metadata.ownerReferences", f'Invalid value: "{_json_type(owners)}": '
                                "metadata.ownerReferences must be a list", TYPE_INVALID))
        else:
            for i, owner in enumerate(owners):
                path = f"metadata.ownerReferences[{i}]"
                if not isinstance(owner, dict):
                    causes.append(cause(path, f'Invalid value: "{_json_type(owner)}": {path} must be an object',
                                        TYPE_INVALID))
                    continue
                for key in ("apiVersion", "kind", "name", "uid"):
                    if not owner.get(key):
                        causes.append(required_value(f"{path}.{key}"))
    return causes


def _dns_subdomain(value: str) -> str | None:
    if len(value) > 253:
        return "must be no more than 253 characters"
    if not _DNS1123_SUBDOMAIN_RE.match(value):
        return SUBDOMAIN_MESSAGE
    return None


def _dns_label(value: str) -> str | None:
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not _DNS1123_LABEL_RE.match(value):
        return LABEL_MESSAGE
    return None


def _qualified_name(key: str) -> str | None:
    """Kubernetes qualified-name check: C{[prefix/]name}, prefix a DNS subdomain."""
    prefix, slash, name = key.rpartition("/")
    if slash:
        if not prefix:
            return "prefix part must be non-empty"
        message = _dns_subdomain(prefix)
        if message:
            return "prefix part " + message
    if not name:
        return "name part must be non-empty"
    if len(name) > 63:
        return "name part must be no more than 63 characters"
    if not _QUALIFIED_NAME_RE.match(name):
        return QUALIFIED_NAME_MESSAGE
    return None


def _validate_labels(labels: Any) -> list[Cause]:
    if labels is None:
        return []
    if not isinstance(labels, dict):
        return [cause("metadata.labels", f'Invalid value: "{_json_type(labels)}": '
                      "metadata.labels in body must be of type object", TYPE_INVALID)]
    causes = []
    for key, value in labels.items():
        message = _qualified_name(key)
        if message:
            causes.append(invalid_value("metadata.labels", key, message))
        if not isinstance(value, str):
            causes.append(cause(f"metadata.labels[{key}]", f'Invalid value: "{_json_type(value)}": '
                                f"metadata.labels[{key}] in body must be of type string", TYPE_INVALID))
        elif len(value) > 63:
            causes.append(invalid_value("metadata.labels", value, "must be no more than 63 characters"))
        elif not _LABEL_VALUE_RE.match(value):
            causes.append(invalid_value("metadata.labels", value, LABEL_VALUE_MESSAGE))
    return causes


def _validate_annotations(annotations: Any) -> list[Cause]:
    if annotations is None:
        return []
    if not isinstance(annotations, dict):
        return [cause("metadata.annotations", f'Invalid value: "{_json_type(annotations)}": '
                      "metadata.annotations in body must be of type object", TYPE_INVALID)]
    causes = []
    size = 0
    for key, value in annotations.items():
        message = _qualified_name(key.lower())
        if message:
            causes.append(invalid_value("metadata.annotations", key, message))
        if not isinstance(value, str):
            causes.append(cause(f"metadata.annotations[{key}]", f'Invalid value: "{_json_type(value)}": '
                                f"metadata.annotations[{key}] in body must be of type string", TYPE_INVALID))
            continue
        size += len(key) + len(value)
    if size > MAX_ANNOTATIONS_SIZE:
        causes.append(cause("metadata.annotations", f"Too long: must have at most {MAX_ANNOTATIONS_SIZE} bytes",
                            "FieldValueTooLong"))
    return causes


# ---- webhooks ---------------------------------------------------------------------------------

def _valid_values(values: tuple[str, ...]) -> str:
    return "valid values are: [" + " ".join(json.dumps(v) for v in values) + "]"


def server_webhook(server: Object) -> list[Cause]:
    """The C{vservers.metal.sidero.dev} rules (§1.1).

    Sidero reported the bootFromDiskMethod value in the pxeMode error; we report the pxeMode
    value itself (the wording and the list of valid values are unchanged).
    """
    spec = server.get("spec") or {}
    causes: list[Cause] = []
    method = spec.get("bootFromDiskMethod", "")
    if method not in BOOT_FROM_DISK_METHODS:
        causes.append(invalid_value("spec.bootFromDiskMethod", method, _valid_values(BOOT_FROM_DISK_METHODS)))
    mode = spec.get("pxeMode", "")
    if mode not in PXE_MODES:
        causes.append(invalid_value("spec.pxeMode", mode, _valid_values(PXE_MODES)))
    for i, patch in enumerate(spec.get("configPatches") or []):
        op = (patch or {}).get("op", "")
        if op not in PATCH_OPS:
            causes.append(invalid_value(f"spec.configPatches.{i}.op", op, _valid_values(PATCH_OPS)))
    return causes


def metal_machine_template_webhook(new: Object, old: Object | None) -> None:
    """The template's spec cannot change (§1.5).

    @raise BadRequest: C{MetalMachineTemplate.Spec is immutable}.
    """
    if old is not None and (new.get("spec") or {}) != (old.get("spec") or {}):
        raise BadRequest("MetalMachineTemplate.Spec is immutable")


# ---- Secret -----------------------------------------------------------------------------------

def _admit_secret(secret: Object) -> list[Cause]:
    causes: list[Cause] = []
    data = secret.get("data")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return [cause("data", f'Invalid value: "{_json_type(data)}": data in body must be of type object',
                      TYPE_INVALID)]
    for key, value in data.items():
        message = None if _CONFIG_KEY_RE.match(key) else CONFIG_KEY_MESSAGE
        if message:
            causes.append(invalid_value("data", key, message))
        if not isinstance(value, str):
            causes.append(cause(f"data[{key}]", f'Invalid value: "{_json_type(value)}": '
                                f"data[{key}] in body must be of type string", TYPE_INVALID))
            continue
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as e:
            # The value itself is a secret: never echo it.
            causes.append(invalid_value(f"data[{key}]", "<redacted>", f"illegal base64 data: {e}"))
    string_data = secret.pop("stringData", None)
    if isinstance(string_data, dict):
        for key, value in string_data.items():
            if not _CONFIG_KEY_RE.match(key):
                causes.append(invalid_value("stringData", key, CONFIG_KEY_MESSAGE))
            elif not isinstance(value, str):
                causes.append(cause(f"stringData[{key}]", f'Invalid value: "{_json_type(value)}": '
                                    f"stringData[{key}] in body must be of type string", TYPE_INVALID))
            else:
                data[key] = base64.b64encode(value.encode("utf-8")).decode("ascii")
    elif string_data is not None:
        causes.append(cause("stringData", f'Invalid value: "{_json_type(string_data)}": '
                            "stringData in body must be of type object", TYPE_INVALID))
    if data:
        secret["data"] = data
    secret.setdefault("type", "Opaque")
    return causes


# ---- admission --------------------------------------------------------------------------------

# Objects that should exist so that their schema defaults apply (Go always serialises them).
_ENSURE = {
    ("metal.sidero.dev", "Server"): ("spec",),
    ("metal.sidero.dev", "ServerClass"): ("status",),
}


@implementer(IAdmission)
class Admission:
    """Defaults, validation and webhook rules for every registered kind (see module doc)."""

    def admit(self, kind: ResourceType, operation: str, new: Object | None,
              old: Object | None) -> Object | None:
        if operation == DELETE:
            return new
        if operation not in (CREATE, UPDATE):
            raise BadRequest(f"unsupported admission operation {operation!r}")
        if not isinstance(new, dict):
            raise BadRequest(f"{kind.kind} object must be a JSON object")
        obj = self._to_storage(kind, copy.deepcopy(new))
        metadata = obj.get("metadata")
        if metadata is None:
            metadata = obj["metadata"] = {}
        if not isinstance(metadata, dict):
            raise invalid(kind.kind, kind.group, "", [cause(
                "metadata", f'Invalid value: "{_json_type(metadata)}": metadata in body must be of type object',
                TYPE_INVALID)])
        obj["metadata"] = metadata = {k: v for k, v in metadata.items()
                                      if k in _OBJECT_META_FIELDS and v is not None}
        if kind.namespaced:
            metadata.setdefault("namespace", DEFAULT_NAMESPACE)
            if metadata["namespace"] == "":
                metadata["namespace"] = DEFAULT_NAMESPACE
        else:
            metadata.pop("namespace", None)
        name = metadata.get("name") if isinstance(metadata.get("name"), str) else ""
        causes = validate_metadata(kind, metadata)
        if kind.custom:
            obj, schema_causes = self._structural(kind, obj)
            causes += schema_causes
        elif kind is registry.SECRET:
            causes += _admit_secret(obj)
        if causes:
            raise invalid(kind.kind, kind.group, name or "", causes)
        if kind is registry.SERVER:
            webhook_causes = server_webhook(obj)
            if webhook_causes:
                raise invalid(kind.kind, kind.group, name or "", webhook_causes)
        elif kind is registry.METAL_MACHINE_TEMPLATE and operation == UPDATE:
            metal_machine_template_webhook(obj, old)
        return obj

    def _to_storage(self, kind: ResourceType, obj: Object) -> Object:
        given_kind = obj.get("kind") or kind.kind
        if given_kind != kind.kind:
            raise BadRequest(f'the object kind "{given_kind}" does not match the resource kind "{kind.kind}"')
        api_version = obj.get("apiVersion") or kind.api_version
        group, version = split_api_version(api_version)
        if group != kind.group or version not in kind.served_versions:
            raise BadRequest(f'the API version in the data ({api_version}) does not match the expected '
                             f'API version ({kind.api_version})')
        obj["apiVersion"], obj["kind"] = api_version, kind.kind
        if version != kind.storage_version:
            try:
                obj = convert(obj, kind.api_version)
            except ConversionError as e:
                raise BadRequest(str(e)) from e
        return obj

    def _structural(self, kind: ResourceType, obj: Object) -> tuple[Object, list[Cause]]:
        schema = shared_schema(kind, kind.storage_version)
        metadata = obj.pop("metadata")
        for key in _ENSURE.get((kind.group, kind.kind), ()):
            if key not in obj and key in schema["properties"]:
                obj[key] = {}
        obj = prune(obj, schema)
        obj = apply_defaults(obj, schema)
        causes = validate(obj, schema, "")
        ordered = {"apiVersion": obj.pop("apiVersion"), "kind": obj.pop("kind"), "metadata": metadata}
        ordered.update(obj)
        return ordered, causes
