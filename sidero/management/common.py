# -*- test-case-name: tests.management.test_server -*-
"""What the service and the CLI share, kept free of Twisted so the CLI starts quickly."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

DEFAULT_SOCKET_PATH = "/var/lib/sidero/sidero.sock"
SOCKET_ENV = "SIDERO_MANAGEMENT_SOCKET"


def default_socket_path(environ: Mapping[str, str] | None = None) -> str:
    """The socket both the service and the CLI use unless told otherwise."""
    env = os.environ if environ is None else environ
    return env.get(SOCKET_ENV) or DEFAULT_SOCKET_PATH


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: maps merge recursively, C{null} deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result
