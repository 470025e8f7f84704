# -*- test-case-name: tests.api.test_conversion -*-
"""Conversion between the served versions of each kind (spec §1.4, §1.5).

Every conversion goes through the hub (the storage version): C{source -> hub -> target}.

Down-conversion (hub -> older version) stores the hub object, without its metadata, as JSON
in the annotation C{cluster.x-k8s.io/conversion-data}, as Cluster API's conversion helpers
do.  Up-conversion reads and removes that annotation.  Sidero v0.6 then threw the data away,
so a v1alpha1 client writing a Server lost its v1alpha2-only fields (a §8 quirk that may be
fixed).  We restore them, which is what Cluster API's own conversions do:

  - fields that exist only in the hub (Server C{strategicPatches}, MetalMachine
    C{serverClassRef}/C{addresses}/C{conditions}, ...) are copied back from the annotation;
  - fields the older version also carries keep the older object's value: when that value
    still equals what down-converting the annotation gives, the richer hub value is used
    (e.g. the whole C{hardware} of a Server); when the client changed it, the change wins.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

from sidero.api import registry
from sidero.api.registry import ResourceType, split_api_version

Object = dict[str, Any]

CONVERSION_DATA_ANNOTATION = "cluster.x-k8s.io/conversion-data"

_SYSTEM_FIELDS = ("manufacturer", "productName", "version", "serialNumber", "skuNumber", "family")


class ConversionError(ValueError):
    """The object cannot be converted to the requested apiVersion."""


def convert(obj: Object, api_version: str) -> Object:
    """A copy of C{obj} converted to C{api_version} (same group, any served version).

    @raise ConversionError: unknown kind, another group, or a version the kind does not serve.
    """
    try:
        kind = registry.by_api_version_kind(obj.get("apiVersion", ""), obj.get("kind", ""))
    except registry.UnknownKind as e:
        raise ConversionError(str(e)) from e
    group, version = split_api_version(api_version)
    if group != kind.group or version not in kind.served_versions:
        raise ConversionError(f'cannot convert {kind.kind} to "{api_version}"')
    _, source = split_api_version(obj["apiVersion"])
    out = copy.deepcopy(obj)
    if source == version:
        return out
    if source != kind.storage_version:
        up = _UP.get((kind.kind, source))
        if up is None:
            raise ConversionError(f"no conversion for {kind.kind} {source}")
        out = up(out)
        out["apiVersion"] = kind.api_version
    if version != kind.storage_version:
        down = _DOWN.get((kind.kind, version))
        if down is None:
            raise ConversionError(f"no conversion for {kind.kind} {version}")
        out = down(out)
        out["apiVersion"] = registry.api_version(kind.group, version)
    return out


def to_storage(obj: Object, kind: ResourceType | None = None) -> Object:
    """C{obj} in its kind's storage version."""
    if kind is None:
        kind = registry.by_api_version_kind(obj.get("apiVersion", ""), obj.get("kind", ""))
    return convert(obj, kind.api_version)


# ---- annotation helpers -----------------------------------------------------------------------

def _annotations(obj: Object) -> dict[str, str]:
    metadata = obj.setdefault("metadata", {})
    annotations = metadata.get("annotations")
    if not isinstance(annotations, dict):
        annotations = metadata["annotations"] = {}
    return annotations


def _store_hub(hub: Object, lower: Object) -> None:
    data = {k: v for k, v in hub.items() if k != "metadata"}
    _annotations(lower)[CONVERSION_DATA_ANNOTATION] = json.dumps(data, sort_keys=True, separators=(",", ":"))


def _take_hub(obj: Object) -> Object | None:
    """Remove the annotation from C{obj}; the hub object it held, or None (absent or corrupt)."""
    metadata = obj.get("metadata") or {}
    annotations = metadata.get("annotations") or {}
    raw = annotations.pop(CONVERSION_DATA_ANNOTATION, None)
    if "annotations" in metadata and not annotations:
        del metadata["annotations"]
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _prune(d: Object) -> Object:
    """Drop keys whose value is None or an empty dict (Go's omitempty on pointers)."""
    return {k: v for k, v in d.items() if v is not None and v != {}}


def _clean(d: Object | None) -> Object | None:
    """C{d} without zero-valued fields, None when nothing is left: the form compared when
    deciding whether a v1alpha1 client changed a field."""
    out = {k: v for k, v in (d or {}).items() if v not in (None, "", 0, {}, [])}
    return out or None


# ---- Server -----------------------------------------------------------------------------------

def _server_v1_fields(hub_spec: Object) -> tuple[Object | None, Object | None]:
    """(system, cpu) of the v1alpha1 form of a hub Server spec."""
    hardware = hub_spec.get("hardware") or {}
    system = None
    if hardware.get("system"):
        system = {k: v for k, v in hardware["system"].items() if k != "uuid"} or None
    cpu = None
    processors = (hardware.get("compute") or {}).get("processors") or []
    if processors and processors[0]:
        first = processors[0]
        cpu = _prune({"manufacturer": first.get("manufacturer") or None,
                      "version": first.get("productName") or None})
    return system, cpu


def server_down(hub: Object) -> Object:
    out = copy.deepcopy(hub)
    spec = out.get("spec") or {}
    system, cpu = _server_v1_fields(spec)
    spec.pop("hardware", None)
    spec.pop("strategicPatches", None)
    if system is not None:
        spec["system"] = system
    if cpu is not None:
        spec["cpu"] = cpu
    if "spec" in out:
        out["spec"] = spec
    _store_hub(hub, out)
    return out


def server_up(old: Object) -> Object:
    out = copy.deepcopy(old)
    restored = _take_hub(out)
    spec = out.get("spec")
    if not isinstance(spec, dict):
        return out
    system = spec.pop("system", None) or None
    cpu = spec.pop("cpu", None) or None
    hardware: Object = {}
    if system:
        hardware["system"] = {k: system[k] for k in _SYSTEM_FIELDS if k in system}
    if cpu:
        hardware["compute"] = {"processors": [_prune({"manufacturer": cpu.get("manufacturer"),
                                                      "productName": cpu.get("version")})]}
    if restored is not None:
        hub_spec = restored.get("spec") or {}
        if "strategicPatches" in hub_spec:
            spec["strategicPatches"] = hub_spec["strategicPatches"]
        hub_hw = hub_spec.get("hardware")
        if hub_hw is not None:
            hub_system, hub_cpu = _server_v1_fields(hub_spec)
            if (_clean(hub_system), _clean(hub_cpu)) == (_clean(system), _clean(cpu)):
                hardware = copy.deepcopy(hub_hw)
            else:
                hardware = _overlay_hardware(copy.deepcopy(hub_hw), system, cpu)
    if hardware:
        spec["hardware"] = hardware
    return out


def _overlay_hardware(hw: Object, system: Object | None, cpu: Object | None) -> Object:
    """The hub hardware with what a v1alpha1 client changed applied on top."""
    uuid = (hw.get("system") or {}).get("uuid")
    new_system = {k: system[k] for k in _SYSTEM_FIELDS if system and k in system}
    if uuid:
        new_system["uuid"] = uuid
    if new_system:
        hw["system"] = new_system
    else:
        hw.pop("system", None)
    compute = hw.get("compute") or {}
    processors = list(compute.get("processors") or [])
    if cpu:
        first = dict(processors[0] or {}) if processors else {}
        first.pop("manufacturer", None)
        first.pop("productName", None)
        first.update(_prune({"manufacturer": cpu.get("manufacturer"), "productName": cpu.get("version")}))
        processors[:1] = [first]
    elif processors:
        first = {k: v for k, v in (processors[0] or {}).items() if k not in ("manufacturer", "productName")}
        processors[0] = first
    if processors:
        compute["processors"] = processors
        hw["compute"] = compute
    return hw


# ---- ServerClass ------------------------------------------------------------------------------

def _server_class_v1_qualifiers(hardware: list[Object]) -> tuple[list[Object], list[Object]]:
    systems: list[Object] = []
    cpus: list[Object] = []
    for entry in hardware or []:
        entry = entry or {}
        if entry.get("system"):
            systems.append({k: v for k, v in entry["system"].items() if k != "uuid"})
        processors = (entry.get("compute") or {}).get("processors") or []
        if processors and processors[0]:
            cpus.append(_prune({"manufacturer": processors[0].get("manufacturer") or None,
                                "version": processors[0].get("productName") or None}))
    return systems, cpus


def server_class_down(hub: Object) -> Object:
    out = copy.deepcopy(hub)
    spec = out.get("spec")
    if isinstance(spec, dict):
        spec.pop("strategicPatches", None)
        qualifiers = spec.get("qualifiers")
        if isinstance(qualifiers, dict):
            systems, cpus = _server_class_v1_qualifiers(qualifiers.pop("hardware", None) or [])
            if systems:
                qualifiers["systemInformation"] = systems
            if cpus:
                qualifiers["cpu"] = cpus
    _store_hub(hub, out)
    return out


def server_class_up(old: Object) -> Object:
    out = copy.deepcopy(old)
    restored = _take_hub(out)
    spec = out.get("spec")
    if not isinstance(spec, dict):
        return out
    qualifiers = spec.get("qualifiers")
    if isinstance(qualifiers, dict):
        systems = qualifiers.pop("systemInformation", None) or []
        cpus = qualifiers.pop("cpu", None) or []
        hardware: list[Object] = [{"system": dict(s)} for s in systems]
        hardware += [{"compute": {"processors": [_prune({"manufacturer": c.get("manufacturer"),
                                                         "productName": c.get("version")})]}}
                     for c in cpus]
        if restored is not None:
            hub_hw = ((restored.get("spec") or {}).get("qualifiers") or {}).get("hardware")
            hub_systems, hub_cpus = _server_class_v1_qualifiers(hub_hw or [])
            if hub_hw and ([_clean(x) for x in hub_systems], [_clean(x) for x in hub_cpus]) == (
                    [_clean(x) for x in systems], [_clean(x) for x in cpus]):
                hardware = copy.deepcopy(hub_hw)
        if hardware:
            qualifiers["hardware"] = hardware
    if restored is not None:
        hub_spec = restored.get("spec") or {}
        if "strategicPatches" in hub_spec:
            spec["strategicPatches"] = hub_spec["strategicPatches"]
    return out


# ---- Environment (identical schemas) -----------------------------------------------------------

def _identity(obj: Object) -> Object:
    return copy.deepcopy(obj)


# ---- MetalCluster -----------------------------------------------------------------------------

def metal_cluster_down(hub: Object) -> Object:
    out = copy.deepcopy(hub)
    spec = out.get("spec") or {}
    endpoint = spec.pop("controlPlaneEndpoint", None) or {}
    status = out.get("status") or {}
    status = {"ready": bool(status.get("ready"))}
    if endpoint.get("host") or endpoint.get("port"):
        ep = {"host": endpoint.get("host", ""), "port": endpoint.get("port", 0)}
        spec["apiEndpoints"] = [dict(ep)]
        status["apiEndpoints"] = [dict(ep)]
    out["spec"] = spec
    out["status"] = status
    _store_hub(hub, out)
    return out


def metal_cluster_up(old: Object) -> Object:
    out = copy.deepcopy(old)
    restored = _take_hub(out)
    spec = out.get("spec") or {}
    status = out.get("status") or {}
    endpoints = spec.pop("apiEndpoints", None) or status.get("apiEndpoints") or []
    if endpoints:
        spec["controlPlaneEndpoint"] = {"host": endpoints[0].get("host", ""),
                                        "port": endpoints[0].get("port", 0)}
    out["spec"] = spec
    if "status" in out:
        out["status"] = {"ready": bool(status.get("ready"))}
        if restored is not None and "status" not in restored and not status.get("ready"):
            # v1alpha2 always serialises a status; the hub object had none.
            del out["status"]
    return out


# ---- MetalMachine and MetalMachineTemplate ----------------------------------------------------

def _machine_spec_down(spec: Object) -> Object:
    return {k: v for k, v in spec.items() if k in ("providerID", "serverRef")}


def _machine_spec_up(spec: Object, restored_spec: Object | None) -> Object:
    out = _machine_spec_down(spec)
    if restored_spec and restored_spec.get("serverClassRef"):
        out["serverClassRef"] = restored_spec["serverClassRef"]
    return out


def metal_machine_down(hub: Object) -> Object:
    out = copy.deepcopy(hub)
    out["spec"] = _machine_spec_down(out.get("spec") or {})
    status = out.get("status") or {}
    new_status: Object = {"ready": bool(status.get("ready"))}
    if status.get("failureReason"):
        new_status["errorReason"] = status["failureReason"]
    if status.get("failureMessage"):
        new_status["errorMessage"] = status["failureMessage"]
    out["status"] = new_status
    _store_hub(hub, out)
    return out


def metal_machine_up(old: Object) -> Object:
    out = copy.deepcopy(old)
    restored = _take_hub(out) or {}
    out["spec"] = _machine_spec_up(out.get("spec") or {}, restored.get("spec"))
    if "status" in out:
        status = out.get("status") or {}
        new_status: Object = {}
        if status.get("ready"):
            new_status["ready"] = True
        if status.get("errorReason"):
            new_status["failureReason"] = status["errorReason"]
        if status.get("errorMessage"):
            new_status["failureMessage"] = status["errorMessage"]
        hub_status = restored.get("status") or {}
        for key in ("addresses", "conditions"):
            if hub_status.get(key):
                new_status[key] = hub_status[key]
        out["status"] = new_status
        if not new_status and restored and "status" not in restored:
            # v1alpha2 always serialises a status; the hub object had none.
            del out["status"]
    return out


def metal_machine_template_down(hub: Object) -> Object:
    out = copy.deepcopy(hub)
    template = ((out.get("spec") or {}).get("template") or {})
    if "spec" in template:
        template["spec"] = _machine_spec_down(template.get("spec") or {})
    _store_hub(hub, out)
    return out


def metal_machine_template_up(old: Object) -> Object:
    out = copy.deepcopy(old)
    restored = _take_hub(out) or {}
    template = ((out.get("spec") or {}).get("template") or {})
    if "spec" in template:
        restored_spec = ((restored.get("spec") or {}).get("template") or {}).get("spec")
        template["spec"] = _machine_spec_up(template.get("spec") or {}, restored_spec)
    return out


Converter = Callable[[Object], Object]

_UP: dict[tuple[str, str], Converter] = {
    ("Server", "v1alpha1"): server_up,
    ("ServerClass", "v1alpha1"): server_class_up,
    ("Environment", "v1alpha1"): _identity,
    ("MetalCluster", "v1alpha2"): metal_cluster_up,
    ("MetalMachine", "v1alpha2"): metal_machine_up,
    ("MetalMachineTemplate", "v1alpha2"): metal_machine_template_up,
}
_DOWN: dict[tuple[str, str], Converter] = {
    ("Server", "v1alpha1"): server_down,
    ("ServerClass", "v1alpha1"): server_class_down,
    ("Environment", "v1alpha1"): _identity,
    ("MetalCluster", "v1alpha2"): metal_cluster_down,
    ("MetalMachine", "v1alpha2"): metal_machine_down,
    ("MetalMachineTemplate", "v1alpha2"): metal_machine_template_down,
}
