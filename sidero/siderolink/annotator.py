# -*- test-case-name: tests.siderolink.test_annotator -*-
"""Which server a source address belongs to (spec §3.9), from informer caches.

The log receiver and the event sink know a node only by the tunnel address it connects from:
the ServerBinding whose C{spec.siderolink.address} holds it names the server (the binding's
name), its MetalMachine (C{spec.metalMachineRef}), the cluster (label
C{cluster.x-k8s.io/cluster-name}), and through the MetalMachine's owner reference the Cluster
API Machine.  Lookups read the caches at the moment of the lookup, so a renamed or deleted
binding is never answered from a stale map (the Go annotator's delete-by-prefixed-key quirk
cannot happen), and nothing waits on the store.

The syslog receiver also maps LAN addresses: the node addresses Talos reported into the
binding (C{spec.addresses}), a Server's C{status.addresses} (from its agent) and its BMC
endpoint.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from sidero.controllers.informer import Informer

Object = dict[str, Any]

CLUSTER_LABEL = "cluster.x-k8s.io/cluster-name"
CAPI_GROUP = "cluster.x-k8s.io"
TUNNEL_INDEX = "siderolink-address"
BINDING_ADDRESS_INDEX = "binding-address"
ADDRESS_INDEX = "server-address"


@dataclass(frozen=True)
class Annotation:
    server_uuid: str = ""
    namespace: str = ""
    metal_machine: str = ""
    cluster: str = ""
    machine: str = ""

    def fields(self) -> dict[str, str]:
        """The known fields, under the names the Go log receiver and events manager use."""
        return {k: v for k, v in (
            ("server_uuid", self.server_uuid), ("cluster", self.cluster),
            ("namespace", self.namespace), ("metal_machine", self.metal_machine),
            ("machine", self.machine)) if v}


def normalise_ip(text: str) -> str | None:
    """An address (optionally with a prefix length, or bracketed) in its canonical form;
    an IPv4-mapped IPv6 address is its IPv4 address."""
    text = text.strip().strip("[]")
    try:
        ip = ipaddress.ip_interface(text).ip
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.compressed  # an IPv4 peer of a dual-stack socket
    return ip.compressed


def tunnel_ips(binding: Object) -> list[str]:
    address = ((binding.get("spec") or {}).get("siderolink") or {}).get("address")
    ip = normalise_ip(str(address)) if address else None
    return [ip] if ip else []


def binding_ips(binding: Object) -> list[str]:
    """The node addresses Talos reported (C{spec.addresses}, from the event sink)."""
    out = []
    for text in (binding.get("spec") or {}).get("addresses") or []:
        ip = normalise_ip(str(text))
        if ip:
            out.append(ip)
    return out


def server_ips(server: Object) -> list[str]:
    """A Server's reported addresses and its BMC endpoint."""
    out = []
    for entry in (server.get("status") or {}).get("addresses") or []:
        if isinstance(entry, dict) and entry.get("address"):
            ip = normalise_ip(str(entry["address"]))
            if ip:
                out.append(ip)
    bmc = ((server.get("spec") or {}).get("bmc") or {}).get("endpoint")
    if bmc:
        ip = normalise_ip(str(bmc))
        if ip:
            out.append(ip)
    return out


def machine_name(metal_machine: Object | None) -> str:
    """The Cluster API Machine owning a MetalMachine (kind Machine, group cluster.x-k8s.io)."""
    for ref in ((metal_machine or {}).get("metadata") or {}).get("ownerReferences") or []:
        group = str(ref.get("apiVersion") or "").rpartition("/")[0]
        if ref.get("kind") == "Machine" and group == CAPI_GROUP:
            return str(ref.get("name") or "")
    return ""


def annotation_of(binding: Object, metal_machine: Object | None) -> Annotation:
    meta = binding.get("metadata") or {}
    ref = (binding.get("spec") or {}).get("metalMachineRef") or {}
    return Annotation(
        server_uuid=str(meta.get("name") or ""),
        namespace=str(ref.get("namespace") or ""),
        metal_machine=str(ref.get("name") or ""),
        cluster=str((meta.get("labels") or {}).get(CLUSTER_LABEL) or ""),
        machine=machine_name(metal_machine),
    )


class Annotator:
    """Source address -> L{Annotation}, over informers (see the module docstring).

    @param metal_machines: None when MetalMachines are not watched (no machine names then).
    @param servers: None when LAN addresses need not be mapped (only the syslog receiver).
    """

    def __init__(self, bindings: Informer, metal_machines: Informer | None = None,
                 servers: Informer | None = None) -> None:
        self.bindings = bindings
        self.metal_machines = metal_machines
        self.servers = servers
        bindings.add_index(TUNNEL_INDEX, tunnel_ips)
        if servers is not None:
            bindings.add_index(BINDING_ADDRESS_INDEX, binding_ips)
            servers.add_index(ADDRESS_INDEX, server_ips)

    def binding_for_tunnel_ip(self, ip: str) -> Object | None:
        key = normalise_ip(ip)
        found = self.bindings.by_index(TUNNEL_INDEX, key) if key else []
        return found[0] if found else None

    def _annotate(self, binding: Object) -> Annotation:
        ref = (binding.get("spec") or {}).get("metalMachineRef") or {}
        mm = None
        if self.metal_machines is not None and ref.get("name"):
            mm = self.metal_machines.get(str(ref["name"]), str(ref.get("namespace") or "") or None)
        return annotation_of(binding, mm)

    def for_tunnel_ip(self, ip: str) -> Annotation | None:
        """The node that owns tunnel address C{ip}, or None (Go: "no annotation")."""
        binding = self.binding_for_tunnel_ip(ip)
        return self._annotate(binding) if binding is not None else None

    def for_source_ip(self, ip: str) -> Annotation | None:
        """A tunnel address, else a node address Talos reported, else a Server's address as its
        agent reported it or its BMC endpoint (syslog sources)."""
        found = self.for_tunnel_ip(ip)
        if found is not None or self.servers is None:
            return found
        key = normalise_ip(ip)
        if key is None:
            return None
        bound = self.bindings.by_index(BINDING_ADDRESS_INDEX, key)
        if bound:
            return self._annotate(bound[0])
        servers = self.servers.by_index(ADDRESS_INDEX, key)
        if not servers:
            return None
        name = str((servers[0].get("metadata") or {}).get("name") or "")
        binding = self.bindings.get(name)
        return self._annotate(binding) if binding is not None else Annotation(server_uuid=name)
