# -*- test-case-name: tests.api.test_conditions -*-
"""Cluster API v1beta1 conditions on plain object dicts (spec §0.4).

Conditions live in C{status.conditions}.  Setting one keeps its C{lastTransitionTime} when
nothing about it changed, so controllers can set conditions on every reconcile without
making the object look modified; the list is kept sorted (C{Ready} first, then by type) so
two writers produce identical lists.  Time comes from an injected C{now} (a datetime or
epoch seconds), never from the wall clock.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable
from typing import Any

Object = dict[str, Any]
Condition = dict[str, str]

TRUE = "True"
FALSE = "False"
UNKNOWN = "Unknown"

SEVERITY_ERROR = "Error"
SEVERITY_WARNING = "Warning"
SEVERITY_INFO = "Info"
SEVERITY_NONE = ""

READY = "Ready"

Now = datetime.datetime | float | int | Callable[[], "datetime.datetime | float | int"]


def rfc3339(now: Now) -> str:
    """C{2024-05-01T10:20:30Z}: second precision, UTC, like metav1.Time."""
    if callable(now):
        now = now()
    if isinstance(now, datetime.datetime):
        moment = now.astimezone(datetime.UTC) if now.tzinfo else now
    else:
        moment = datetime.datetime.fromtimestamp(float(now), datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(value: str) -> float | None:
    """Epoch seconds of a C{metav1.Time} string (C{2024-05-01T10:20:30Z}), None if unreadable."""
    try:
        moment = datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ")
    except (TypeError, ValueError):
        return None
    return moment.replace(tzinfo=datetime.UTC).timestamp()


def condition(type_: str, status: str, now: Now, reason: str = "", severity: str = "",
              message: str = "") -> Condition:
    """A complete condition dict (empty optional fields omitted, as Go's omitempty does)."""
    c: Condition = {"type": type_, "status": status, "lastTransitionTime": rfc3339(now)}
    if severity:
        c["severity"] = severity
    if reason:
        c["reason"] = reason
    if message:
        c["message"] = message
    return c


def _sort_key(c: Condition) -> tuple[int, str]:
    return (0 if c.get("type") == READY else 1, c.get("type", ""))


def sort_conditions(conditions: Iterable[Condition]) -> list[Condition]:
    return sorted(conditions, key=_sort_key)


def get_conditions(obj: Object) -> list[Condition]:
    return list((obj.get("status") or {}).get("conditions") or [])


def _store(obj: Object, conditions: list[Condition]) -> None:
    status = obj.get("status")
    if not isinstance(status, dict):
        status = obj["status"] = {}
    if conditions:
        status["conditions"] = sort_conditions(conditions)
    else:
        status.pop("conditions", None)


def get(obj: Object, type_: str) -> Condition | None:
    for c in get_conditions(obj):
        if c.get("type") == type_:
            return c
    return None


def _same(a: Condition, b: Condition) -> bool:
    return all(a.get(k, "") == b.get(k, "") for k in ("status", "severity", "reason", "message"))


def set(obj: Object, new: Condition) -> Object:
    """Set C{new} on C{obj} in place (and return C{obj}), keeping the old transition time when
    status, severity, reason and message are all unchanged."""
    conditions = get_conditions(obj)
    new = dict(new)
    for i, old in enumerate(conditions):
        if old.get("type") == new.get("type"):
            if _same(old, new) and old.get("lastTransitionTime"):
                new["lastTransitionTime"] = old["lastTransitionTime"]
            conditions[i] = new
            break
    else:
        conditions.append(new)
    _store(obj, conditions)
    return obj


def mark_true(obj: Object, type_: str, now: Now) -> Object:
    return set(obj, condition(type_, TRUE, now))


def mark_false(obj: Object, type_: str, reason: str, severity: str, message: str, now: Now) -> Object:
    return set(obj, condition(type_, FALSE, now, reason=reason, severity=severity, message=message))


def mark_unknown(obj: Object, type_: str, reason: str, message: str, now: Now) -> Object:
    return set(obj, condition(type_, UNKNOWN, now, reason=reason, message=message))


def delete(obj: Object, type_: str) -> Object:
    conditions = [c for c in get_conditions(obj) if c.get("type") != type_]
    if isinstance(obj.get("status"), dict):
        _store(obj, conditions)
    return obj


def has(obj: Object, type_: str) -> bool:
    return get(obj, type_) is not None


def is_true(obj: Object, type_: str) -> bool:
    c = get(obj, type_)
    return c is not None and c.get("status") == TRUE


def is_false(obj: Object, type_: str) -> bool:
    c = get(obj, type_)
    return c is not None and c.get("status") == FALSE


def reason(obj: Object, type_: str) -> str:
    c = get(obj, type_)
    return c.get("reason", "") if c else ""


def severity(obj: Object, type_: str) -> str:
    c = get(obj, type_)
    return c.get("severity", "") if c else ""


def message(obj: Object, type_: str) -> str:
    c = get(obj, type_)
    return c.get("message", "") if c else ""


# ---- Environment asset conditions (§1.3) ------------------------------------------------------

def asset_conditions(env: Object) -> list[dict[str, str]]:
    return list((env.get("status") or {}).get("conditions") or [])


def set_asset_condition(env: Object, url: str, sha512: str, ready: bool) -> Object:
    """Record whether the asset at C{url} is downloaded: one C{type: Ready} entry per URL,
    replaced in place so the list order stays stable."""
    entry = {"type": READY, "status": TRUE if ready else FALSE, "url": url}
    if sha512:
        entry["sha512"] = sha512
    conditions = asset_conditions(env)
    for i, c in enumerate(conditions):
        if c.get("url") == url:
            conditions[i] = entry
            break
    else:
        conditions.append(entry)
    status = env.get("status")
    if not isinstance(status, dict):
        status = env["status"] = {}
    status["conditions"] = conditions
    return env
