# -*- test-case-name: tests.k8s.test_client -*-
"""Turning what the Kubernetes API server (or the path to it) says into store errors.

The API server already speaks C{Status}: its reasons and messages are the ones the embedded
store imitates, so they are passed through unchanged.  Only failures below HTTP (refused
connections, TLS, timeouts) need wording of our own.
"""

from __future__ import annotations

import json
import re
from typing import Any

from sidero.store import errors


class KubeconfigError(Exception):
    """No usable Kubernetes client configuration (missing or malformed kubeconfig, no
    in-cluster service account).  The message is meant for an operator, in one line."""


def from_response(status: int, body: bytes | str | None, what: str = "") -> errors.StoreError:
    """The store error for a non-2xx answer: the body's C{Status} when there is one, else an
    error of the class matching the HTTP code."""
    parsed: Any = None
    if body:
        try:
            parsed = json.loads(body)
        except (TypeError, ValueError):
            parsed = None
    if isinstance(parsed, dict) and parsed.get("kind") == "Status":
        err = errors.StoreError.from_status(parsed)
        if int(parsed.get("code") or status) == 410 and not isinstance(err, errors.Gone):
            err = errors.Gone(err.message, err.details)
        return err
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else (body or "")
    message = text.strip()[:300] or f"HTTP {status}"
    if what:
        message = f"{what}: {message}"
    for cls in (errors.NotFound, errors.Conflict, errors.Invalid, errors.BadRequest, errors.Gone,
                errors.Forbidden, errors.Timeout, errors.Unavailable):
        if cls.code == status:
            return cls(message)
    if status == 401:
        return errors.Forbidden(f"Unauthorized: {message}")
    err = errors.StoreError(message)
    err.code = status
    return err


def unreachable(host: str, error: BaseException) -> errors.Unavailable:
    """One sentence for a transport failure: which server, and why."""
    reason = _root_reason(error)
    return errors.Unavailable(f"cannot reach the Kubernetes API server at {host}: {reason}")


def _root_reason(error: BaseException) -> str:
    """The innermost useful message of a urllib3 error chain (MaxRetryError wraps the cause)."""
    seen: set[int] = set()
    current: BaseException | None = error
    best = str(error) or type(error).__name__
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException):
            current = reason
            best = str(reason) or type(reason).__name__
            continue
        if current.__cause__ is not None:
            current = current.__cause__
            best = str(current) or type(current).__name__
            continue
        break
    # urllib3 prefixes the connection ("HTTPSConnection(host=..., port=...): " or
    # "<... object at 0x...>: "); the caller names the server already.
    return _CONNECTION_PREFIX.sub("", best)


_CONNECTION_PREFIX = re.compile(r"^(?:<[^>]*>|\w+\([^)]*\)|None): ")
