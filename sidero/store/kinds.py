# -*- test-case-name: tests.store.test_kinds -*-
"""Which registered kind, and which namespace, an object given to a store belongs to.

Every backend checks this before a write, with the API server's wording, so a client gets the
same C{BadRequest} whichever store answers.
"""

from __future__ import annotations

from typing import Any

from sidero.api import registry
from sidero.api.registry import ResourceType
from sidero.store import errors

DEFAULT_NAMESPACE = "default"


def kind_of(obj: Any) -> ResourceType:
    """The registered kind of an object in its storage version.

    @raise errors.BadRequest: not an object, an unknown kind, or a served but non-storage
        version (the caller must convert first).
    """
    if not isinstance(obj, dict):
        raise errors.BadRequest("the object to store must be a JSON object")
    api_version = obj.get("apiVersion")
    kind = obj.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str) or not api_version or not kind:
        raise errors.BadRequest("Object 'Kind' is missing in the object to store")
    try:
        rt = registry.by_api_version_kind(api_version, kind)
    except registry.UnknownKind as e:
        raise errors.BadRequest(str(e)) from None
    if api_version != rt.api_version:
        raise errors.BadRequest(
            f"the API version in the data ({api_version}) does not match the expected API "
            f"version ({rt.api_version})"
        )
    return rt


def namespace_for(rt: ResourceType, namespace: str | None) -> str:
    """Cluster-scoped kinds drop any namespace (C{""}); namespaced kinds default to C{default}."""
    if not rt.namespaced:
        return ""
    return namespace or DEFAULT_NAMESPACE
