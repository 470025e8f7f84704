# -*- test-case-name: tests.store.test_objects -*-
"""What the Kubernetes API server does to an object on each write, as pure functions.

The embedded store calls these inside its database transaction; keeping them free of I/O
makes every rule (status subresource, generation, finalizers, generateName, preconditions)
testable on plain dicts, and keeps the wording identical to the API server's so nobody can
tell which backend answered.
"""

from __future__ import annotations

import base64
import copy
import random
import re
import time
from collections.abc import Callable
from typing import Any

from sidero.api import registry
from sidero.api.registry import ResourceType
from sidero.store import errors
from sidero.store.kinds import namespace_for

Object = dict[str, Any]

# Fields of metadata that only the server sets; a client's values are ignored on update.
_SERVER_OWNED = ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds",
                 "generation")

# apimachinery's names.SimpleNameGenerator: 5 characters that cannot spell words.
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
_MAX_GENERATE_BASE = 63 - 5

_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SUBDOMAIN_HELP = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used "
    "for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
_LABEL_HELP = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and "
    "must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex "
    "used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)


def format_time(seconds: float) -> str:
    """RFC 3339 UTC with second precision, as Kubernetes serialises C{metav1.Time}."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(seconds)))


def tracks_generation(rt: ResourceType) -> bool:
    """Custom resources get C{metadata.generation}; core kinds such as Secret do not."""
    return rt.group not in (registry.CORE_GROUP, registry.COORDINATION_GROUP)


def metadata_of(obj: Object) -> Object:
    meta = obj.get("metadata")
    if meta is None:
        meta = obj["metadata"] = {}
    if not isinstance(meta, dict):
        raise errors.BadRequest("metadata must be a JSON object")
    return meta


def parse_resource_version(value: Any) -> int:
    """A resourceVersion string as the integer the store orders by.

    @raise errors.BadRequest: not a non-negative decimal integer.
    """
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise errors.BadRequest(f'invalid resource version "{value}"')


def _invalid(rt: ResourceType, name: str, field: str, message: str,
             reason: str = "FieldValueInvalid") -> errors.Invalid:
    return errors.invalid(rt.kind, rt.group, name, [{"field": field, "message": message, "reason": reason}])


def validate_identity(rt: ResourceType, name: Any, namespace: str) -> None:
    """Names are DNS subdomains and namespaces DNS labels, as the API server requires."""
    if not isinstance(name, str) or not name:
        raise _invalid(rt, "", "metadata.name", "Required value: name or generateName is required",
                       "FieldValueRequired")
    if len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
        raise _invalid(rt, name, "metadata.name", f'Invalid value: "{name}": {_SUBDOMAIN_HELP}')
    if namespace and (len(namespace) > 63 or not _DNS1123_LABEL.match(namespace)):
        raise _invalid(rt, name, "metadata.namespace", f'Invalid value: "{namespace}": {_LABEL_HELP}')


def generate_name(base: str, rand: Callable[[], float] = random.random) -> str:
    """C{base} plus five random characters, the apiserver's generateName rule."""
    base = base[:_MAX_GENERATE_BASE]
    return base + "".join(_NAME_ALPHABET[int(rand() * len(_NAME_ALPHABET))] for _ in range(5))


def _spec_part(rt: ResourceType, obj: Object) -> Object:
    """Everything whose change bumps C{generation}: all but metadata (and status with a subresource)."""
    skip = {"apiVersion", "kind", "metadata"}
    if rt.status_subresource:
        skip.add("status")
    return {k: v for k, v in obj.items() if k not in skip}


def _normalize_kind_fields(rt: ResourceType, obj: Object) -> None:
    """Per-kind server behaviour: Secret C{stringData} is merged into base64 C{data}."""
    if rt is registry.SECRET:
        string_data = obj.pop("stringData", None)
        if string_data:
            data = obj.get("data") or {}
            for key, value in string_data.items():
                data[key] = base64.b64encode(str(value).encode()).decode()
            obj["data"] = data
        obj.setdefault("type", "Opaque")


def prepare_create(rt: ResourceType, obj: Object, *, now: float, uid: str, name: str) -> Object:
    """The object as the API server stores it on create (before admission and resourceVersion).

    @raise errors.BadRequest: a resourceVersion was given.
    """
    obj = copy.deepcopy(obj)
    meta = metadata_of(obj)
    if meta.get("resourceVersion"):
        raise errors.BadRequest("resourceVersion should not be set on objects to be created")
    namespace = namespace_for(rt, meta.get("namespace"))
    validate_identity(rt, name, namespace)
    meta["name"] = name
    if namespace:
        meta["namespace"] = namespace
    else:
        meta.pop("namespace", None)
    for key in _SERVER_OWNED:
        meta.pop(key, None)
    meta["uid"] = uid
    meta["creationTimestamp"] = format_time(now)
    if tracks_generation(rt):
        meta["generation"] = 1
    if rt.status_subresource:
        obj.pop("status", None)
    _normalize_kind_fields(rt, obj)
    return obj


def reassert_identity(obj: Object, reference: Object) -> Object:
    """Put back the server-owned metadata of C{reference} (after admission may have touched it)."""
    meta = metadata_of(obj)
    ref_meta = reference["metadata"]
    for key in ("name", "namespace", *_SERVER_OWNED, "resourceVersion"):
        if key in ref_meta:
            meta[key] = ref_meta[key]
        else:
            meta.pop(key, None)
    return obj


def check_preconditions(rt: ResourceType, old: Object, obj_meta: Object) -> None:
    """A non-empty resourceVersion or uid in C{obj_meta} must equal the stored one."""
    name = old["metadata"]["name"]
    wanted = obj_meta.get("resourceVersion")
    if wanted:
        parse_resource_version(wanted)
        if wanted != old["metadata"]["resourceVersion"]:
            raise errors.conflict(rt.resource, name)
    uid = obj_meta.get("uid")
    if uid and uid != old["metadata"].get("uid"):
        err = errors.conflict(rt.resource, name)
        err.message = (f'Operation cannot be fulfilled on {rt.resource} "{name}": Precondition '
                       f"failed: UID in precondition: {uid}, UID in object meta: {old['metadata'].get('uid')}")
        err.args = (err.message,)
        raise err


def prepare_update(rt: ResourceType, old: Object, obj: Object) -> Object:
    """The object the API server would store for an update of C{old} by C{obj}.

    Server-owned metadata come from C{old}; status is kept as stored for kinds with a status
    subresource; no finalizer may be added to an object being deleted.  The result carries
    C{old}'s resourceVersion and generation (see L{bump_generation}, applied after admission).
    """
    new = copy.deepcopy(obj)
    meta = metadata_of(new)
    old_meta = old["metadata"]
    name = old_meta["name"]
    if meta.get("name") not in (None, name):
        raise errors.BadRequest(
            f"the name of the object ({meta.get('name')}) does not match the name on the URL ({name})")
    check_preconditions(rt, old, meta)
    for key in ("name", "namespace", *_SERVER_OWNED):
        if key in old_meta:
            meta[key] = copy.deepcopy(old_meta[key])
        else:
            meta.pop(key, None)
    meta["resourceVersion"] = old_meta["resourceVersion"]
    if rt.status_subresource:
        if "status" in old:
            new["status"] = copy.deepcopy(old["status"])
        else:
            new.pop("status", None)
    _normalize_kind_fields(rt, new)
    if old_meta.get("deletionTimestamp"):
        added = [f for f in (meta.get("finalizers") or []) if f not in (old_meta.get("finalizers") or [])]
        if added:
            quoted = ", ".join(f'"{f}"' for f in added)
            raise _invalid(
                rt, name, "metadata.finalizers",
                f"Forbidden: no new finalizers can be added if the object is being deleted, "
                f"found new finalizers []string{{{quoted}}}",
                "FieldValueForbidden",
            )
    return new


def bump_generation(rt: ResourceType, old: Object, new: Object) -> None:
    """C{generation} goes up by one when anything but metadata (and a subresource status) changed."""
    if tracks_generation(rt) and _spec_part(rt, new) != _spec_part(rt, old):
        new["metadata"]["generation"] = int(old["metadata"].get("generation") or 0) + 1


def prepare_status_update(rt: ResourceType, old: Object, obj: Object) -> Object:
    """The stored object with only C{status} taken from C{obj} (the status strategy).

    @raise errors.NotFound: the kind has no status subresource (the API server's 404).
    """
    if not rt.status_subresource:
        raise errors.NotFound("the server could not find the requested resource")
    meta = metadata_of(obj)
    name = old["metadata"]["name"]
    if meta.get("name") not in (None, name):
        raise errors.BadRequest(
            f"the name of the object ({meta.get('name')}) does not match the name on the URL ({name})")
    check_preconditions(rt, old, meta)
    new = copy.deepcopy(old)
    if "status" in obj:
        new["status"] = copy.deepcopy(obj["status"])
    else:
        new.pop("status", None)
    return new


def mark_deleting(rt: ResourceType, old: Object, now: float) -> Object | None:
    """The object with C{deletionTimestamp} set, or None when it is already being deleted."""
    if old["metadata"].get("deletionTimestamp"):
        return None
    new = copy.deepcopy(old)
    meta = new["metadata"]
    meta["deletionTimestamp"] = format_time(now)
    meta["deletionGracePeriodSeconds"] = 0
    if meta.get("generation"):
        meta["generation"] = int(meta["generation"]) + 1
    return new


def should_remove(obj: Object) -> bool:
    """Being deleted and no finalizer left: the object goes away."""
    meta = obj["metadata"]
    return bool(meta.get("deletionTimestamp")) and not meta.get("finalizers")


def same_object(a: Object, b: Object) -> bool:
    """Equal apart from resourceVersion: such an update is a no-op, as in Kubernetes."""
    if a.keys() != b.keys():
        return False
    for key in a:
        if key == "metadata":
            ma = {k: v for k, v in a[key].items() if k != "resourceVersion"}
            mb = {k: v for k, v in b[key].items() if k != "resourceVersion"}
            if ma != mb:
                return False
        elif a[key] != b[key]:
            return False
    return True


def owner_uids(obj: Object) -> list[str]:
    """The uids named by C{metadata.ownerReferences}, in order, without duplicates."""
    uids: list[str] = []
    for ref in obj["metadata"].get("ownerReferences") or []:
        uid = ref.get("uid") if isinstance(ref, dict) else None
        if isinstance(uid, str) and uid and uid not in uids:
            uids.append(uid)
    return uids
