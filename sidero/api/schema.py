# -*- test-case-name: tests.api.test_schema -*-
"""OpenAPI v3 structural schemas of every custom kind, in every served version (spec §1).

Each field is described once, by a small builder below; the CRD generator
(L{sidero.api.crdgen}) writes these schemas into CustomResourceDefinitions and the admission
layer (L{sidero.api.admission}) validates, prunes and defaults objects with the very same
dicts, so the embedded store and a real API server agree on what an object may hold.

The schemas are structural (Kubernetes "structural schema" rules): every node has a C{type}
unless it preserves unknown fields, no C{additionalProperties} beside C{properties}, and
C{metadata} is only C{{type: object}}.
"""

from __future__ import annotations

import copy
from typing import Any

from sidero.api import registry
from sidero.api.registry import ResourceType

Schema = dict[str, Any]

UINT32_MAX = 4294967295
UINT64_MAX = 18446744073709551615


# ---- builders ---------------------------------------------------------------------------------

def string(description: str = "", **extra: Any) -> Schema:
    return _with({"type": "string"}, description, extra)


def boolean(description: str = "", **extra: Any) -> Schema:
    return _with({"type": "boolean"}, description, extra)


def int32(description: str = "") -> Schema:
    return _with({"type": "integer", "format": "int32"}, description, {})


def uint32(description: str = "") -> Schema:
    """Go C{uint32}: an integer in [0, 2^32-1]; C{int64} format so the whole range is legal."""
    return _with({"type": "integer", "format": "int64", "minimum": 0, "maximum": UINT32_MAX},
                 description, {})


def uint64(description: str = "") -> Schema:
    return _with({"type": "integer", "format": "int64", "minimum": 0}, description, {})


def array(items: Schema, description: str = "", **extra: Any) -> Schema:
    return _with({"type": "array", "items": items}, description, extra)


def obj(properties: dict[str, Schema], required: tuple[str, ...] = (), description: str = "",
        extra: dict[str, Any] | None = None) -> Schema:
    node: Schema = {"type": "object", "properties": properties}
    if required:
        node["required"] = sorted(required)
    return _with(node, description, extra or {})


def string_map(description: str = "") -> Schema:
    return _with({"type": "object", "additionalProperties": {"type": "string"}}, description, {})


def any_value(description: str = "") -> Schema:
    """Arbitrary JSON (a JSON-patch value): kept as given, never pruned."""
    return _with({"x-kubernetes-preserve-unknown-fields": True}, description, {})


def _with(node: Schema, description: str, extra: dict[str, Any]) -> Schema:
    if description:
        node["description"] = description
    node.update(extra)
    return node


# ---- shared types (§1.0) ----------------------------------------------------------------------

def object_reference(description: str = "") -> Schema:
    return obj({
        "apiVersion": string("API version of the referent."),
        "fieldPath": string("If referring to a piece of an object instead of an entire object, the field path."),
        "kind": string("Kind of the referent."),
        "name": string("Name of the referent."),
        "namespace": string("Namespace of the referent."),
        "resourceVersion": string("Specific resourceVersion to which this reference is made, if any."),
        "uid": string("UID of the referent."),
    }, description=description, extra={"x-kubernetes-map-type": "atomic"})


def config_patches(description: str = "RFC 6902 JSON patches applied to the Talos machine config.") -> Schema:
    return array(obj({
        "op": string("JSON patch operation: add, remove, replace, copy, move or test."),
        "path": string("JSON pointer the operation applies to."),
        "value": any_value("Value of the operation (any JSON)."),
    }, required=("op", "path")), description)


def strategic_patches() -> Schema:
    return array(string(), "Talos strategic merge patches (each a YAML or JSON config document set).")


def capi_conditions(description: str = "Current service state (Cluster API v1beta1 conditions).") -> Schema:
    return array(obj({
        "lastTransitionTime": string("Last time the condition transitioned from one status to another.",
                                     format="date-time"),
        "message": string("Human readable message about the transition; may be empty."),
        "reason": string("Reason for the last transition, in CamelCase."),
        "severity": string("Classification of the reason when status is False: Error, Warning or Info."),
        "status": string("Status of the condition: True, False or Unknown."),
        "type": string("Type of the condition, in CamelCase."),
    }, required=("lastTransitionTime", "status", "type")), description)


def label_selector(description: str = "") -> Schema:
    return obj({
        "matchExpressions": array(obj({
            "key": string("The label key the selector applies to."),
            "operator": string("One of In, NotIn, Exists and DoesNotExist."),
            "values": array(string(), "Values for In and NotIn; empty for Exists and DoesNotExist."),
        }, required=("key", "operator")), "Label selector requirements, ANDed."),
        "matchLabels": string_map("Label key/value pairs, each equivalent to an In requirement."),
    }, description=description, extra={"x-kubernetes-map-type": "atomic"})


BOOT_FROM_DISK_DESCRIPTION = (
    "Method to exit iPXE to force boot from disk; empty means the ServerClass value or the "
    "controller default. Valid values: ipxe-exit, http-404, ipxe-sanboot."
)


# ---- Server (§1.1, §1.4) ----------------------------------------------------------------------

def system_information(with_uuid: bool) -> Schema:
    props = {
        "family": string(),
        "manufacturer": string(),
        "productName": string(),
        "serialNumber": string(),
        "skuNumber": string(),
        "version": string(),
    }
    if with_uuid:
        props["uuid"] = string()
    return obj(props)


def cpu_information() -> Schema:
    return obj({"manufacturer": string(), "version": string()})


def hardware_information() -> Schema:
    processor = obj({
        "coreCount": uint32(),
        "manufacturer": string(),
        "productName": string(),
        "serialNumber": string(),
        "speed": uint32("Speed in megahertz."),
        "threadCount": uint32(),
    })
    memory_module = obj({
        "manufacturer": string(),
        "productName": string(),
        "serialNumber": string(),
        "size": uint32("Size in megabytes."),
        "speed": uint32("Speed in megatransfers per second."),
        "type": string(),
    })
    storage_device = obj({
        "deviceName": string(),
        "name": string(),
        "productName": string(),
        "serialNumber": string(),
        "size": uint64("Size in bytes."),
        "type": string("Unknown, SSD, HDD, NVMe or SD."),
        "uuid": string(),
        "wwid": string(),
    })
    interface = obj({
        "addresses": array(string(), "Addresses in CIDR notation."),
        "flags": string("Interface flags, e.g. up|broadcast|multicast."),
        "index": uint32(),
        "mac": string(),
        "mtu": uint32(),
        "name": string(),
    })
    return obj({
        "compute": obj({
            "processorCount": uint32(),
            "processors": array(processor),
            "totalCoreCount": uint32(),
            "totalThreadCount": uint32(),
        }, description="Processors and core/thread counts."),
        "memory": obj({
            "moduleCount": uint32(),
            "modules": array(memory_module),
            "totalSize": string("Total memory, e.g. \"32 GB\"."),
        }, description="Memory modules and total size."),
        "network": obj({
            "interfaceCount": uint32(),
            "interfaces": array(interface),
        }, description="Network interfaces."),
        "storage": obj({
            "deviceCount": uint32(),
            "devices": array(storage_device),
            "totalSize": string("Total storage, e.g. \"1116 GB\"."),
        }, description="Storage devices and total size."),
        "system": _with(system_information(with_uuid=True), "SMBIOS system information.", {}),
    })


def _credential_source(description: str) -> Schema:
    return obj({
        "secretKeyRef": obj({
            "key": string("Key to select in the secret's data."),
            "name": string("Name of the secret."),
            "namespace": string("Namespace of the secret."),
        }, required=("key", "name", "namespace"), description="A key within a secret."),
    }, description=description)


def bmc() -> Schema:
    return obj({
        "endpoint": string("BMC endpoint."),
        "interface": string("BMC interface type; defaults to lanplus."),
        "pass": string("BMC password value."),
        "passFrom": _credential_source("Source for the password value; unused when pass is set."),
        "port": uint32("BMC port; 0 means 623."),
        "user": string("BMC user value."),
        "userFrom": _credential_source("Source for the user value; unused when user is set."),
    }, required=("endpoint",), description="How to talk to the node's BMC over IPMI.")


def server_spec(version: str) -> Schema:
    props: dict[str, Schema] = {
        "accepted": boolean("Server is under Sidero control; nothing destructive happens before.",
                            default=False),
        "bmc": bmc(),
        "bootFromDiskMethod": string(BOOT_FROM_DISK_DESCRIPTION),
        "configPatches": config_patches(),
        "cordoned": boolean("Excluded from all ServerClass membership."),
        "environmentRef": object_reference("Environment to boot for this server (highest precedence)."),
        "hostname": string("Hostname reported by the agent at registration."),
        "managementApi": obj({"endpoint": string("host:port of the power API.")}, required=("endpoint",),
                             description="host:port of a simple HTTP power API."),
        "pxeBootAlways": boolean("Always serve the OS environment on PXE, even after install."),
        "pxeMode": string("IPMI boot-from-PXE flavour: bios or uefi; empty means the controller default."),
    }
    if version == "v1alpha1":
        props["cpu"] = _with(cpu_information(), "CPU information.", {})
        props["system"] = _with(system_information(with_uuid=False), "SMBIOS system information.", {})
    else:
        props["hardware"] = _with(hardware_information(), "Discovered hardware inventory, set at registration.", {})
        props["strategicPatches"] = strategic_patches()
    return obj(props, required=("accepted",), description="Desired state of the Server.")


def server_status() -> Schema:
    return obj({
        "addresses": array(obj({
            "address": string("The node address."),
            "type": string("Node address type, e.g. InternalIP."),
        }, required=("address", "type")), "Node IPs reported by the agent."),
        "conditions": capi_conditions(),
        "inUse": boolean("True when a ServerBinding with the same name exists."),
        "isClean": boolean("True when the disks are wiped and not allocated since."),
        "power": string("Current power state: on, off or unknown."),
        "ready": boolean("True when the server is accepted and in use."),
    }, description="Observed state of the Server.")


# ---- ServerClass (§1.2, §1.4) -----------------------------------------------------------------

def server_class_spec(version: str) -> Schema:
    label_selectors = array(string_map(), "Label maps; a server matches when any pair matches (OR).")
    if version == "v1alpha1":
        qualifiers = obj({
            "cpu": array(cpu_information(), "CPU filters; a server matches when any entry matches."),
            "labelSelectors": label_selectors,
            "systemInformation": array(system_information(with_uuid=False),
                                       "System filters; a server matches when any entry matches."),
        })
    else:
        qualifiers = obj({
            "hardware": array(hardware_information(),
                              "Hardware filters; a server matches when any entry partially equals its hardware."),
            "labelSelectors": label_selectors,
        })
    props: dict[str, Schema] = {
        "bootFromDiskMethod": string(BOOT_FROM_DISK_DESCRIPTION),
        "configPatches": config_patches(),
        "environmentRef": object_reference("Environment for servers allocated via this class."),
        "qualifiers": _with(qualifiers, "Hardware and label filters.", {}),
        "selector": label_selector("Label selector over Server labels."),
    }
    if version != "v1alpha1":
        props["strategicPatches"] = strategic_patches()
    return obj(props, description="Desired state of the ServerClass.")


def server_class_status() -> Schema:
    return obj({
        "serversAvailable": array(string(), "Names of matching servers not in use, sorted.", default=[]),
        "serversInUse": array(string(), "Names of matching servers in use, sorted.", default=[]),
    }, required=("serversAvailable", "serversInUse"), description="Observed state of the ServerClass.")


# ---- Environment (§1.3) -----------------------------------------------------------------------

def environment_spec() -> Schema:
    asset = {"sha512": string("Expected SHA-512, hex; a download that does not match is not served."),
             "url": string("Where to fetch it.")}
    return obj({
        "initrd": obj(dict(asset), description="The initial ramdisk."),
        "kernel": obj({**asset, "args": array(string(), "Kernel command line arguments.")},
                      description="The kernel and its arguments."),
    }, description="Kernel and initrd to boot.")


def environment_status() -> Schema:
    return obj({
        "conditions": array(obj({
            "message": string("Why the asset is not ready (a sha512 mismatch names both digests)."),
            "reason": string("Why the asset is not ready, in one word (Sha512Mismatch)."),
            "sha512": string(),
            "status": string("True when the asset is downloaded."),
            "type": string("Always Ready."),
            "url": string("Asset URL this condition is about."),
        }, required=("status", "type")), "One condition per asset."),
    }, description="Observed state of the Environment.")


# ---- CAPS kinds (§1.5) ------------------------------------------------------------------------

def metal_machine_spec(version: str) -> Schema:
    props: dict[str, Schema] = {
        "providerID": string("sidero://<server-name>, set on allocation."),
        "serverRef": object_reference("The Server allocated to this machine (or pinned by the user)."),
    }
    if version != "v1alpha2":
        props["serverClassRef"] = object_reference("ServerClass to allocate a server from.")
    return obj(props, description="Desired state of the MetalMachine.")


def metal_machine_status(version: str) -> Schema:
    if version == "v1alpha2":
        return obj({
            "errorMessage": string(),
            "errorReason": string(),
            "ready": boolean(default=False),
        }, required=("ready",))
    return obj({
        "addresses": array(obj({
            "address": string("The machine address."),
            "type": string("Hostname, ExternalIP, InternalIP, ExternalDNS or InternalDNS."),
        }, required=("address", "type")), "Addresses of the machine."),
        "conditions": capi_conditions(),
        "failureMessage": string("Terminal problem, human readable (never set by Sidero)."),
        "failureReason": string("Terminal problem, machine readable (never set by Sidero)."),
        "ready": boolean("True when the machine is provisioned."),
    }, description="Observed state of the MetalMachine.")


def api_endpoint() -> Schema:
    return obj({
        "host": string("Hostname or IP of the API server."),
        "port": int32("Port of the API server."),
    }, required=("host", "port"))


def metal_cluster_spec(version: str) -> Schema:
    if version == "v1alpha2":
        return obj({"apiEndpoints": array(api_endpoint())})
    return obj({"controlPlaneEndpoint": _with(api_endpoint(), "Control plane API endpoint.", {})},
               description="Desired state of the MetalCluster.")


def metal_cluster_status(version: str) -> Schema:
    props: dict[str, Schema] = {"ready": boolean("True when the infrastructure is ready.", default=False)}
    if version == "v1alpha2":
        props["apiEndpoints"] = array(api_endpoint())
    return obj(props, required=("ready",), description="Observed state of the MetalCluster.")


def metal_machine_template_spec(version: str) -> Schema:
    return obj({
        "template": obj({"spec": metal_machine_spec(version)}, required=("spec",),
                        description="The MetalMachine to create."),
    }, required=("template",), description="Template for MetalMachines; immutable.")


def server_binding_spec() -> Schema:
    return obj({
        "addresses": array(string(), "Node IPs seen in Talos events."),
        "hostname": string("Node hostname seen in Talos events."),
        "metalMachineRef": object_reference("The MetalMachine the server is allocated to."),
        "serverClassRef": object_reference("The ServerClass used for the allocation."),
        "siderolink": obj({
            "address": string("Node tunnel IPv6 address with /64."),
            "publicKey": string("Node WireGuard public key (base64)."),
        }, required=("address", "publicKey"), description="SideroLink tunnel of the node."),
    }, required=("metalMachineRef",), description="Server X is allocated to MetalMachine Y.")


def server_binding_status() -> Schema:
    return obj({
        "conditions": capi_conditions("Talos installation progress conditions."),
        "ready": boolean("True when a Server with the same name exists."),
    }, description="Observed state of the ServerBinding.")


# ---- per kind and version ---------------------------------------------------------------------

def _spec_status(kind: ResourceType, version: str) -> tuple[Schema | None, Schema | None]:
    if kind is registry.SERVER:
        return server_spec(version), server_status()
    if kind is registry.SERVER_CLASS:
        return server_class_spec(version), server_class_status()
    if kind is registry.ENVIRONMENT:
        return environment_spec(), environment_status()
    if kind is registry.METAL_CLUSTER:
        return metal_cluster_spec(version), metal_cluster_status(version)
    if kind is registry.METAL_MACHINE:
        return metal_machine_spec(version), metal_machine_status(version)
    if kind is registry.METAL_MACHINE_TEMPLATE:
        return metal_machine_template_spec(version), None
    if kind is registry.SERVER_BINDING:
        return server_binding_spec(), server_binding_status()
    raise KeyError(f"no schema for kind {kind.kind}")


_DESCRIPTIONS = {
    "Server": "A bare-metal machine known to Sidero; named by its SMBIOS UUID.",
    "ServerClass": "A group of servers selected by hardware qualifiers and labels.",
    "Environment": "A kernel and initrd (with arguments) that servers PXE boot.",
    "MetalCluster": "Cluster API infrastructure cluster for bare metal.",
    "MetalMachine": "Cluster API infrastructure machine backed by a Server.",
    "MetalMachineTemplate": "Template of MetalMachines for Cluster API machine sets.",
    "ServerBinding": "Allocation of a Server to a MetalMachine; named like the Server.",
}

_CACHE: dict[tuple[str, str, str], Schema] = {}


def schema_for(kind: ResourceType, version: str) -> Schema:
    """The C{openAPIV3Schema} of C{kind} at C{version} (a fresh copy each call).

    @raise KeyError: the kind is not custom or does not serve C{version}.
    """
    return copy.deepcopy(shared_schema(kind, version))


def shared_schema(kind: ResourceType, version: str) -> Schema:
    """Like L{schema_for} but the cached instance: callers must never modify it (admission
    reads it on every write, so copying it each time would be wasted work)."""
    if not kind.custom or version not in kind.served_versions:
        raise KeyError(f"{kind.kind} does not serve version {version!r}")
    key = (kind.group, kind.kind, version)
    if key not in _CACHE:
        spec, status = _spec_status(kind, version)
        props: dict[str, Schema] = {
            "apiVersion": string("Versioned schema of this representation of an object."),
            "kind": string("REST resource this object represents."),
            "metadata": {"type": "object"},
        }
        if spec is not None:
            props["spec"] = spec
        if status is not None:
            props["status"] = status
        _CACHE[key] = obj(props, description=_DESCRIPTIONS[kind.kind])
    return _CACHE[key]


def storage_schema(kind: ResourceType) -> Schema:
    """The schema objects of C{kind} are stored (and admitted) in."""
    return schema_for(kind, kind.storage_version)
