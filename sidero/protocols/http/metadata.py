# -*- test-case-name: tests.protocols.http.test_metadata -*-
"""The Talos metadata server's decision, C{GET /configdata?uuid=} (spec §3.6), with no I/O.

Talos fetches its machine config here on every boot from PXE.  The chain is ServerBinding →
MetalMachine → its owner Machine (Cluster API) → the bootstrap Secret's C{value}, then the
ServerClass and Server patches, sidero's node label and the SideroLink documents.  Lookups go
through L{MetadataLookup} (informer caches in production), so this is a pure function of
them; every status and message is the spec's.

Privacy (beyond Sidero, L{access}): the config holds the cluster's secrets and the UUID that
names it is no secret (every PXE DISCOVER broadcasts it in option 97), so by default a config
is served only to a source address known to belong to its server.

Extension: a MetalMachine with no owner Machine but the annotation
C{metal.sidero.dev/bootstrap-data-secret: <name>} takes its bootstrap data from that Secret in
its own namespace, so a lab without Cluster API can boot a node.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from sidero.api.registry import (
    CAPI_GROUP,
    CAPI_MACHINE,
    METAL_MACHINE,
    SERVER,
    SERVER_BINDING,
    SERVER_CLASS,
    split_api_version,
)
from sidero.protocols.http.ipxe import BootLookup, BootSettings, LookupFailed
from sidero.siderolink.annotator import normalise_ip
from sidero.store.errors import not_found
from sidero.talos.configpatch import (
    ConfigPatchError,
    MachineConfig,
    Patch,
    add_node_label,
    add_siderolink_documents,
    apply_patch,
    load_patch,
    render,
    siderolink_documents,
)

#: The extension's annotation on a MetalMachine without an owner Machine.
BOOTSTRAP_SECRET_ANNOTATION = "metal.sidero.dev/bootstrap-data-secret"
#: Reason of the Warning Event recorded on the Server when a patch fails.
PATCH_EVENT_REASON = "Config Patch"
#: Reason of the Warning Event recorded on the Server when a stranger asked for its config.
REFUSED_EVENT_REASON = "ConfigDataRefused"
DEFAULT_NAMESPACE = "default"


class MetadataLookup(BootLookup, Protocol):
    """What the metadata server reads, besides the boot lookups; C{None} means not found and
    L{LookupFailed} means the answer is unknown (cache not synced, API down)."""

    def metal_machine(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def machine(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def secret(self, namespace: str, name: str) -> dict[str, Any] | None: ...


@dataclass(frozen=True)
class PatchEvent:
    """A Warning Event to record about C{obj} (the Server) because a config patch failed."""

    obj: dict[str, Any]
    reason: str
    message: str


class ConfigData(NamedTuple):
    """The answer to C{/configdata}: status, body (C{text/plain}) and an Event to record."""

    status: int
    body: bytes
    event: PatchEvent | None = None


class _Failed(Exception):
    def __init__(self, status: int, message: str, event_on: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.event_on = event_on


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _spec(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    spec = obj.get("spec")
    return spec if isinstance(spec, Mapping) else {}


def _get(lookup: Callable[[], dict[str, Any] | None], failure: str) -> dict[str, Any] | None:
    try:
        return lookup()
    except LookupFailed as e:
        raise _Failed(500, f"{failure}: {e}") from None


def owner_machine_name(metal_machine: Mapping[str, Any]) -> str | None:
    """The name of the MetalMachine's owner of kind Machine in group cluster.x-k8s.io (CAPI's
    GetOwnerMachine; any version of the group), or None."""
    for ref in _meta(metal_machine).get("ownerReferences") or []:
        if not isinstance(ref, Mapping) or ref.get("kind") != CAPI_MACHINE.kind:
            continue
        group, _ = split_api_version(str(ref.get("apiVersion") or ""))
        if group == CAPI_GROUP and ref.get("name"):
            return str(ref["name"])
    return None


def _secret_value(secret: Mapping[str, Any], where: str) -> bytes:
    data = secret.get("data")
    if isinstance(data, Mapping) and "value" in data:
        try:
            return base64.b64decode(str(data["value"]), validate=True)
        except (binascii.Error, ValueError):
            raise _Failed(500, f"failure fetching bootstrap secret data from secret {where}: "
                               "illegal base64 data in key value") from None
    string_data = secret.get("stringData")
    if isinstance(string_data, Mapping) and isinstance(string_data.get("value"), str):
        return str(string_data["value"]).encode()
    raise _Failed(404, f"value key not found in bootstrap data: {where}")


def _bootstrap_data(binding: dict[str, Any], lookup: MetadataLookup) -> bytes:
    """§3.6 steps 3–6: MetalMachine → owner Machine (or the annotation) → Secret C{value}."""
    ref = _spec(binding).get("metalMachineRef")
    ref = ref if isinstance(ref, Mapping) else {}
    namespace = str(ref.get("namespace") or DEFAULT_NAMESPACE)
    name = str(ref.get("name") or "")
    metal_machine = _get(lambda: lookup.metal_machine(namespace, name), "failure getting metalmachine")
    if metal_machine is None:
        raise _Failed(500, f"failure getting metalmachine: {not_found(METAL_MACHINE.resource, name)}")
    mm_namespace = str(_meta(metal_machine).get("namespace") or namespace)
    mm_name = str(_meta(metal_machine).get("name") or name)
    owner_failure = f"failure fetching owner machine from metal machine {mm_namespace}/{mm_name}"

    owner = owner_machine_name(metal_machine)
    if owner is None:
        annotations = _meta(metal_machine).get("annotations") or {}
        secret_name = annotations.get(BOOTSTRAP_SECRET_ANNOTATION) if isinstance(annotations, Mapping) else None
        if not isinstance(secret_name, str) or not secret_name:
            raise _Failed(500, f"{owner_failure}: no owner Machine (ownerReference of kind Machine "
                               f"in group {CAPI_GROUP}) and no {BOOTSTRAP_SECRET_ANNOTATION} annotation")
        secret_namespace = mm_namespace
    else:
        machine = _get(lambda: lookup.machine(mm_namespace, owner), owner_failure)
        if machine is None:
            raise _Failed(500, f"{owner_failure}: {not_found(CAPI_MACHINE.resource, owner)}")
        secret_namespace = str(_meta(machine).get("namespace") or mm_namespace)
        bootstrap = _spec(machine).get("bootstrap")
        secret_name = bootstrap.get("dataSecretName") if isinstance(bootstrap, Mapping) else None
        if secret_name is None:
            machine_name = _meta(machine).get("name") or owner
            raise _Failed(404, f"no dataSecretName present for machine {secret_namespace}/{machine_name}")
        secret_name = str(secret_name)

    where = f"{secret_namespace}/{secret_name}"
    secret = _get(lambda: lookup.secret(secret_namespace, secret_name),
                  f"failure fetching bootstrap secret data from secret {where}")
    if secret is None:
        raise _Failed(404, f"bootstrap secret {where} not found")
    return _secret_value(secret, where)


def _patch_sources(kind: str, name: str, spec: Mapping[str, Any]) -> Iterator[tuple[str, Callable[[], Patch]]]:
    """(label, loader) of each patch of a ServerClass or Server, in the spec's order."""
    operations = spec.get("configPatches") or []
    if operations:
        def load_operations() -> Patch:
            if not isinstance(operations, list):
                raise ConfigPatchError("configPatches must be a list")
            # As Go marshals []ConfigPatches: op, path and (when set) value, nothing else.
            marshalled = [
                {k: op[k] for k in ("op", "path", "value") if k in op} if isinstance(op, Mapping) else op
                for op in operations
            ]
            return load_patch(json.dumps(marshalled))

        yield f'{kind} "{name}" configPatches', load_operations
    for index, text in enumerate(spec.get("strategicPatches") or []):
        def load_strategic(text: Any = text) -> Patch:
            if not isinstance(text, str):
                raise ConfigPatchError("a strategic patch must be a string")
            return load_patch(text)

        yield f'{kind} "{name}" strategicPatches[{index}]', load_strategic


def _render(uuid: str, binding: dict[str, Any], lookup: MetadataLookup, settings: BootSettings) -> bytes:
    data = _bootstrap_data(binding, lookup)

    server = _get(lambda: lookup.server(uuid), f"failure fetching server {uuid}")
    if server is None:
        raise _Failed(500, f"failure fetching server {uuid}: {not_found(SERVER.resource, uuid)}")
    server_name = str(_meta(server).get("name") or uuid)
    server_class = None
    class_ref = _spec(binding).get("serverClassRef")
    if isinstance(class_ref, Mapping):
        class_name = str(class_ref.get("name") or "")
        server_class = _get(lambda: lookup.server_class(class_name), f"failure fetching serverclass {class_name}")
        if server_class is None:
            raise _Failed(500, f"failure fetching serverclass {class_name}: "
                               f"{not_found(SERVER_CLASS.resource, class_name)}")

    sources: list[tuple[str, Callable[[], Patch]]] = []
    if server_class is not None:
        sources += _patch_sources("serverclass", str(_meta(server_class).get("name") or ""), _spec(server_class))
    sources += _patch_sources("server", server_name, _spec(server))
    patches: list[tuple[str, Patch]] = []
    for label, load in sources:
        try:
            patches.append((label, load()))
        except ConfigPatchError as e:
            raise _Failed(500, f"failure loading patches from server: {label}: {e}", server) from None

    try:
        config = MachineConfig.from_text(data)
    except ConfigPatchError as e:
        raise _Failed(500, f"failure creating config struct: {e}") from None
    for label, patch in patches:
        try:
            config = apply_patch(config, patch)
        except ConfigPatchError as e:
            raise _Failed(500, f"failure applying patches {label} to machine config: {e}", server) from None
    try:
        text = config.text()
    except ConfigPatchError as e:
        raise _Failed(500, f"failure converting patched config to bytes: {e}") from None

    try:
        config = add_node_label(text, server_name)
    except ConfigPatchError as e:
        raise _Failed(500, str(e)) from None

    if not settings.siderolink_server_address:
        raise _Failed(500, "SideroLink is not configured yet: the tunnel server address is unknown")
    try:
        documents = siderolink_documents(
            settings.api_endpoint, settings.api_port, settings.siderolink_server_address)
    except ConfigPatchError as e:
        raise _Failed(500, f"failure creating SideroLink config: {e}") from None
    try:
        return render(add_siderolink_documents(config, documents).documents()).encode()
    except ConfigPatchError as e:
        raise _Failed(500, f"failure adding SideroLink config: {e}") from None


def configdata(uuid: str, lookup: MetadataLookup, settings: BootSettings) -> ConfigData:
    """Answer C{GET /configdata?uuid=<uuid>} (§3.6).  Never raises.

    A failing ServerClass or Server patch answers 500 with the patch's error and asks for a
    Warning Event on the Server (C{event}); nothing else is ever written.
    """
    try:
        if not uuid:
            raise _Failed(500, "received metadata request with empty uuid")
        binding = _get(lambda: lookup.server_binding(uuid), "failure getting server binding")
        if binding is None:
            raise _Failed(404, "server is not allocated (missing serverbinding): "
                               f"{not_found(SERVER_BINDING.resource, uuid)}")
        return ConfigData(200, _render(uuid, binding, lookup, settings))
    except _Failed as e:
        event = None
        if e.event_on is not None:
            event = PatchEvent(e.event_on, PATCH_EVENT_REASON, e.message)
        return ConfigData(e.status, (e.message + "\n").encode(), event)


def owner_addresses(uuid: str, lookup: MetadataLookup) -> set[str]:
    """The addresses that belong to server C{uuid}: its SideroLink tunnel address and the
    addresses Talos reported (the ServerBinding's C{spec.siderolink.address} and
    C{spec.addresses}, both learnt over the WireGuard tunnel), and the addresses its agent
    registered from the boot NIC (the Server's C{status.addresses}).  Not its BMC's.

    Raises L{LookupFailed} when a cache cannot answer (the caller answers 500)."""
    found: set[str] = set()
    binding = lookup.server_binding(uuid)
    if binding is not None:
        spec = _spec(binding)
        link = spec.get("siderolink")
        if isinstance(link, Mapping) and link.get("address"):
            found.add(normalise_ip(str(link["address"])) or "")
        for text in spec.get("addresses") or []:
            found.add(normalise_ip(str(text)) or "")
    server = lookup.server(uuid)
    if server is not None:
        status = server.get("status")
        for entry in (status.get("addresses") or []) if isinstance(status, Mapping) else []:
            if isinstance(entry, Mapping) and entry.get("address"):
                found.add(normalise_ip(str(entry["address"])) or "")
    found.discard("")
    return found


def access(uuid: str, source: str, lookup: MetadataLookup, settings: BootSettings) -> ConfigData | None:
    """None when C{source} may fetch the config of C{uuid}; else the answer to send: C{403}
    (with a Warning Event on the Server when it exists), or C{500} when a cache cannot say.

    The same 403 answers a stranger whether or not the server exists or is allocated, so a
    refusal discloses nothing; the check runs before any Secret is read.  Never raises.
    """
    if settings.configdata_access == "any":
        return None
    ip = normalise_ip(source)
    if ip is not None:
        address = ipaddress.ip_address(ip)
        if any(address in network for network in settings.configdata_trusted):
            return None
    try:
        owned = owner_addresses(uuid, lookup) if uuid else set()
        if ip is not None and ip in owned:
            return None
        server = lookup.server(uuid) if uuid else None
    except LookupFailed as e:
        return ConfigData(500, f"failure checking the addresses of server {uuid}: {e}\n".encode())
    message = (f"configdata of server {uuid} refused to {source}: not an address of that server"
               " (its SideroLink address, Talos-reported or agent-registered addresses)")
    event = PatchEvent(server, REFUSED_EVENT_REASON, message) if server is not None else None
    return ConfigData(403, b"forbidden: configdata is served only to its server\n", event)
