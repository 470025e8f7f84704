"""What the Cluster API contract says about objects, shared by the provider's controllers.

Owner lookups go by kind, group and name (CAPI's C{GetOwnerMachine}/C{GetOwnerCluster}), pause
is the annotation on any object or C{spec.paused} on a Cluster, and a ServerBinding names its
MetalMachine by namespace and name.
"""

from __future__ import annotations

from typing import Any

from sidero.api.registry import CAPI_CLUSTER, CAPI_GROUP
from sidero.store.interfaces import Object

PAUSED_ANNOTATION = "cluster.x-k8s.io/paused"
CLUSTER_NAME_LABEL = "cluster.x-k8s.io/cluster-name"


def meta(obj: Object) -> dict[str, Any]:
    m = obj.get("metadata")
    return m if isinstance(m, dict) else {}


def name_of(obj: Object) -> str:
    return str(meta(obj).get("name") or "")


def namespace_of(obj: Object) -> str:
    return str(meta(obj).get("namespace") or "")


def is_paused(obj: Object | None) -> bool:
    """CAPI pause: the annotation on any object, or C{spec.paused} on a Cluster."""
    if obj is None:
        return False
    if PAUSED_ANNOTATION in (meta(obj).get("annotations") or {}):
        return True
    return obj.get("kind") == CAPI_CLUSTER.kind and bool((obj.get("spec") or {}).get("paused"))


def owner_name(obj: Object, kind: str) -> str | None:
    """The name of C{obj}'s owner of C{kind} in the C{cluster.x-k8s.io} group, if any."""
    for ref in meta(obj).get("ownerReferences") or []:
        if not isinstance(ref, dict) or ref.get("kind") != kind:
            continue
        group = str(ref.get("apiVersion") or "").partition("/")[0]
        if group == CAPI_GROUP and ref.get("name"):
            return str(ref["name"])
    return None


def metal_machine_key(binding: Object) -> str | None:
    """C{namespace/name} of the MetalMachine a ServerBinding names."""
    ref = (binding.get("spec") or {}).get("metalMachineRef") or {}
    if ref.get("name") and ref.get("namespace"):
        return f"{ref['namespace']}/{ref['name']}"
    return None


def binding_belongs_to(binding: Object, metal_machine: Object) -> bool:
    """Whether C{binding} names C{metal_machine} (by namespace and name: uids change when
    clusterctl move recreates objects, so they are not compared)."""
    return metal_machine_key(binding) == f"{namespace_of(metal_machine)}/{name_of(metal_machine)}"
