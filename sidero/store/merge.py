# -*- test-case-name: tests.store.test_merge -*-
"""RFC 7386 JSON merge patch, the C{application/merge-patch+json} of the Kubernetes API.

Pure functions over JSON values: the store applies them inside its database thread, the
Kubernetes backend never needs them (the API server applies the patch), and controllers use
L{merge_diff} to compute the smallest patch between what they read and what they want.
"""

from __future__ import annotations

import copy
from typing import Any


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply C{patch} to C{target} and return the result; neither argument is modified.

    A C{null} member of an object patch removes that member; a non-object patch replaces the
    target wholesale (so lists are replaced, never merged), exactly as RFC 7386 section 2.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result: dict[str, Any] = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def merge_diff(original: Any, modified: Any) -> Any:
    """The merge patch that turns C{original} into C{modified} (C{{}} when they are equal).

    Members missing from C{modified} become C{null}; lists and scalars that differ are sent
    whole.  A C{None} value inside C{modified} cannot be expressed by a merge patch (it would
    mean "delete") and is sent as C{null} as well.
    """
    if not isinstance(original, dict) or not isinstance(modified, dict):
        return copy.deepcopy(modified)
    patch: dict[str, Any] = {}
    for key in original:
        if key not in modified:
            patch[key] = None
    for key, value in modified.items():
        if key not in original:
            patch[key] = copy.deepcopy(value)
        elif original[key] != value:
            if isinstance(original[key], dict) and isinstance(value, dict):
                patch[key] = merge_diff(original[key], value)
            else:
                patch[key] = copy.deepcopy(value)
    return patch
