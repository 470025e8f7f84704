# -*- test-case-name: tests.api.test_matching -*-
"""ServerClass membership (spec §1.2, §1.4): which Servers a ServerClass contains.

Two deliberate oddities of Sidero are kept because users' classes depend on them:
hardware lists compare position by position (processor 0 of the filter against processor 0
of the server), and C{qualifiers.labelSelectors} is a logical OR of every key/value pair of
every map.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sidero.api.registry import SERVER_CLASS
from sidero.api.selectors import LabelSelector

Object = dict[str, Any]
ServerFilter = Callable[[Object], bool]

ANY_SERVER_CLASS = "any"


def any_server_class() -> Object:
    """The C{any} ServerClass as created when missing: an empty spec, so it holds every
    accepted, non-cordoned server."""
    return {
        "apiVersion": SERVER_CLASS.api_version,
        "kind": SERVER_CLASS.kind,
        "metadata": {"name": ANY_SERVER_CLASS},
        "spec": {},
    }


def reset_any_server_class(server_class: Object) -> Object:
    """The C{any} class with C{spec.qualifiers} emptied (selector and the rest are kept)."""
    out = dict(server_class)
    spec = dict(out.get("spec") or {})
    spec["qualifiers"] = {}
    out["spec"] = spec
    return out


# ---- PartialEqual -----------------------------------------------------------------------------

def is_zero(value: Any) -> bool:
    """Go's zero value in JSON form: absent, C{""}, 0, false, or an object whose fields are all
    zero.  A list is zero only when absent (Go: a nil slice), as in reflect.Value.IsZero."""
    if value is None or value is False or value == "" or (isinstance(value, int | float) and value == 0):
        return True
    if isinstance(value, Mapping):
        return all(is_zero(v) for v in value.values())
    return False


def partial_equal(filter_: Any, actual: Any) -> bool:
    """v1alpha2 PartialEqual: every non-zero part of C{filter_} is present and equal in C{actual}.

    Objects compare field by field; lists compare position by position (a longer filter list
    never matches); scalars compare exactly.  Zero values in the filter mean "not specified".
    """
    if is_zero(filter_):
        return True
    if isinstance(filter_, Mapping):
        if not isinstance(actual, Mapping):
            return False
        return all(partial_equal(v, actual.get(k)) for k, v in filter_.items())
    if isinstance(filter_, list):
        if not isinstance(actual, list):
            # Go: a nil slice in the actual struct is still a (zero-length) slice.
            actual = [] if actual is None else actual
            if not isinstance(actual, list):
                return False
        if len(filter_) > len(actual):
            return False
        return all(partial_equal(f, a) for f, a in zip(filter_, actual, strict=False))
    return (actual is not None and actual == filter_
            and isinstance(actual, bool) == isinstance(filter_, bool))


class _Always:
    """A pruned filter part that matches anything (it was a zero value)."""


ALWAYS = _Always()


def prune(filter_: Any) -> Any:
    """C{filter_} with its zero parts replaced by L{ALWAYS} and zero-valued keys dropped, so
    L{pruned_equal} never calls L{is_zero}: C{pruned_equal(prune(f), a) == partial_equal(f, a)}.
    Lists keep every position (a longer filter list never matches)."""
    if is_zero(filter_):
        return ALWAYS
    if isinstance(filter_, Mapping):
        return {k: p for k, v in filter_.items() if (p := prune(v)) is not ALWAYS}
    if isinstance(filter_, list):
        return [prune(v) for v in filter_]
    return filter_


def pruned_equal(pruned: Any, actual: Any) -> bool:
    """L{partial_equal} of a filter already L{prune}d (one class against many servers)."""
    if pruned is ALWAYS:
        return True
    if isinstance(pruned, dict):
        if not isinstance(actual, Mapping):
            return False
        for k, v in pruned.items():
            if not pruned_equal(v, actual.get(k)):
                return False
        return True
    if isinstance(pruned, list):
        if not isinstance(actual, list):
            if actual is not None:
                return False
            actual = []
        if len(pruned) > len(actual):
            return False
        for f, a in zip(pruned, actual, strict=False):
            if not pruned_equal(f, a):
                return False
        return True
    return (actual is not None and actual == pruned
            and isinstance(actual, bool) == isinstance(pruned, bool))


def partial_equal_v1alpha1(filter_: Mapping[str, Any] | None, actual: Mapping[str, Any] | None) -> bool:
    """v1alpha1 PartialEqual: flat comparison of one struct; zero filter fields are skipped."""
    actual = actual or {}
    for key, value in (filter_ or {}).items():
        if is_zero(value):
            continue
        if actual.get(key) != value:
            return False
    return True


# ---- filters ----------------------------------------------------------------------------------

def _spec(obj: Object) -> Object:
    return obj.get("spec") or {}


def _labels(obj: Object) -> dict[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


def accepted_filter(server: Object) -> bool:
    return bool(_spec(server).get("accepted"))


def not_cordoned_filter(server: Object) -> bool:
    return not _spec(server).get("cordoned")


def selector_filter(server_class: Object) -> ServerFilter:
    """Standard label-selector semantics; an empty or absent selector matches everything.

    @raise sidero.api.selectors.SelectorError: the selector is invalid (a reconcile error).
    """
    selector = LabelSelector.from_object(_spec(server_class).get("selector"))
    return lambda server: selector.matches(_labels(server))


def label_selectors_match(label_selectors: Iterable[Mapping[str, str]], server: Object) -> bool:
    """True when any key/value pair of any map equals a label of the server (OR semantics)."""
    labels = _labels(server)
    return any(key in labels and labels[key] == value
               for selector in label_selectors for key, value in (selector or {}).items())


def qualifiers_filter(server_class: Object) -> ServerFilter:
    """v1alpha2 qualifiers: any hardware entry PartialEqual the server's hardware, and any
    label pair matching; an empty list is not a constraint."""
    qualifiers = _spec(server_class).get("qualifiers") or {}
    hardware = [prune(f) for f in qualifiers.get("hardware") or []]
    label_selectors = qualifiers.get("labelSelectors") or []

    def match(server: Object) -> bool:
        # Both must hold; the label pairs are dict lookups, so they go first.
        if label_selectors and not label_selectors_match(label_selectors, server):
            return False
        if hardware:
            info = _spec(server).get("hardware")
            if info is None or not any(pruned_equal(f, info) for f in hardware):
                return False
        return True

    return match


def qualifiers_filter_v1alpha1(server_class: Object) -> ServerFilter:
    """v1alpha1 qualifiers: CPU list against C{spec.cpu}, SystemInformation list against
    C{spec.system}, then label selectors, each an OR over its list."""
    qualifiers = _spec(server_class).get("qualifiers") or {}
    cpus = qualifiers.get("cpu") or []
    systems = qualifiers.get("systemInformation") or []
    label_selectors = qualifiers.get("labelSelectors") or []

    def match(server: Object) -> bool:
        spec = _spec(server)
        if cpus and not any(partial_equal_v1alpha1(c, spec.get("cpu")) for c in cpus):
            return False
        if systems and not any(partial_equal_v1alpha1(s, spec.get("system")) for s in systems):
            return False
        if label_selectors and not label_selectors_match(label_selectors, server):
            return False
        return True

    return match


def filter_servers(servers: Iterable[Object], *filters: ServerFilter) -> list[Object]:
    """The servers passing every filter, sorted by name (stable)."""
    matched = [s for s in servers if all(f(s) for f in filters)]
    return sorted(matched, key=lambda s: (s.get("metadata") or {}).get("name") or "")


def servers_for_class(server_class: Object, servers: Iterable[Object]) -> list[Object]:
    """Members of a (v1alpha2) ServerClass: accepted, not cordoned, selected, qualified.

    @raise sidero.api.selectors.SelectorError: the class's selector is invalid.
    """
    return filter_servers(servers, accepted_filter, not_cordoned_filter,
                          selector_filter(server_class), qualifiers_filter(server_class))


def servers_for_class_v1alpha1(server_class: Object, servers: Iterable[Object]) -> list[Object]:
    """Members of a v1alpha1 ServerClass among v1alpha1 Servers."""
    return filter_servers(servers, accepted_filter, not_cordoned_filter,
                          selector_filter(server_class), qualifiers_filter_v1alpha1(server_class))
