# -*- test-case-name: tests.controllers.test_patch -*-
"""Cluster API's patch helper, on plain dicts (spec §0.4 "patch").

A reconcile reads an object, changes a deep copy, and ends with L{patch_changes}: one JSON merge
patch (RFC 7386) of what changed in metadata and spec, then one of status through the status
subresource.  Lists cannot be merged by a merge patch, so a patch that replaces one (finalizers,
conditions) carries the read resourceVersion as a precondition: a concurrent writer turns into a
Conflict and a retry, never a lost update.
"""

from __future__ import annotations

from typing import Any

from sidero.api.registry import ResourceType
from sidero.store.errors import NotFound
from sidero.store.interfaces import IResourceStore, Object

#: metadata fields a controller may change (everything else there belongs to the API server).
METADATA_FIELDS = ("labels", "annotations", "finalizers", "ownerReferences")


def merge_diff(old: Any, new: Any) -> tuple[Any, bool]:
    """The RFC 7386 merge patch turning C{old} into C{new}, and whether it replaces a list.

    Equal mappings give C{{}}; keys missing from C{new} become C{None} (delete).
    """
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new, isinstance(new, list) or isinstance(old, list)
    out: dict[str, Any] = {}
    replaces_list = False
    for key in old.keys() - new.keys():
        out[key] = None
        replaces_list = replaces_list or isinstance(old[key], list)
    for key, value in new.items():
        if key in old and old[key] == value:
            continue
        if key in old and isinstance(old[key], dict) and isinstance(value, dict):
            sub, lists = merge_diff(old[key], value)
            out[key] = sub
            replaces_list = replaces_list or lists
        else:
            out[key] = value
            replaces_list = replaces_list or isinstance(value, list) or isinstance(old.get(key), list)
    return out, replaces_list


def _resource_version(obj: Object) -> str | None:
    rv = (obj.get("metadata") or {}).get("resourceVersion")
    return str(rv) if rv else None


async def patch_changes(
    store: IResourceStore, kind: ResourceType, orig: Object, obj: Object,
    *, status: bool = True,
) -> Object | None:
    """Write what changed from C{orig} to C{obj}; return the object as last written.

    Returns C{orig}'s successor, or None when the object is gone (deleted meanwhile, or its last
    finalizer was just removed).  Raises the store's Conflict when a precondition fails.
    """
    meta = obj.get("metadata") or {}
    name = str(meta.get("name") or "")
    namespace = meta.get("namespace") if kind.namespaced else None
    rv = _resource_version(orig)
    current: Object | None = orig

    body: dict[str, Any] = {}
    needs_precondition = False
    old_meta = {k: v for k, v in (orig.get("metadata") or {}).items() if k in METADATA_FIELDS}
    new_meta = {k: v for k, v in meta.items() if k in METADATA_FIELDS}
    meta_patch, lists = merge_diff(old_meta, new_meta)
    if meta_patch:
        body["metadata"] = meta_patch
        needs_precondition = needs_precondition or lists
    if orig.get("spec") != obj.get("spec"):
        spec_patch, lists = merge_diff(orig.get("spec") or {}, obj.get("spec") or {})
        body["spec"] = spec_patch
        needs_precondition = needs_precondition or lists
    if body:
        if needs_precondition and rv:
            body.setdefault("metadata", {})["resourceVersion"] = rv
        try:
            current = await store.patch(kind, name, body, namespace=namespace)
        except NotFound:
            return None
        if current is None:
            return None
        rv = _resource_version(current)

    if status and kind.status_subresource and (orig.get("status") or {}) != (obj.get("status") or {}):
        status_patch, lists = merge_diff(orig.get("status") or {}, obj.get("status") or {})
        body = {"status": status_patch}
        if lists and rv:
            body["metadata"] = {"resourceVersion": rv}
        try:
            current = await store.patch(kind, name, body, namespace=namespace, subresource="status")
        except NotFound:
            return None
    return current
