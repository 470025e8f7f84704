"""Store errors, shaped like Kubernetes API C{Status} failures.

Every backend raises these, with the same reasons, codes and message wording as the
Kubernetes API server, so a controller handles a conflict the same way on either backend and
an operator reads the same sentence that kubectl would print.
"""

from __future__ import annotations

from typing import Any


class StoreError(Exception):
    """A failed store call.  C{reason} and C{code} follow metav1.StatusReason."""

    reason = "InternalError"
    code = 500

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}

    def to_status(self) -> dict[str, Any]:
        """The Kubernetes C{Status} object for this failure."""
        status: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            status["details"] = self.details
        return status

    @classmethod
    def from_status(cls, status: dict[str, Any]) -> StoreError:
        """The error class matching a C{Status} object's reason (used by the clients of both APIs)."""
        reason = status.get("reason", "")
        for sub in _ALL:
            if sub.reason == reason:
                return sub(status.get("message", ""), status.get("details"))
        err = StoreError(status.get("message", ""), status.get("details"))
        err.code = int(status.get("code", 500))
        return err


class NotFound(StoreError):
    reason = "NotFound"
    code = 404


class AlreadyExists(StoreError):
    reason = "AlreadyExists"
    code = 409


class Conflict(StoreError):
    """The object was modified since it was read (resourceVersion mismatch)."""

    reason = "Conflict"
    code = 409


class Invalid(StoreError):
    """The object fails validation.  C{causes} lists C{{field, message}} entries."""

    reason = "Invalid"
    code = 422

    def __init__(
        self, message: str, details: dict[str, Any] | None = None,
        causes: list[dict[str, str]] | None = None,
    ) -> None:
        details = dict(details or {})
        if causes is not None:
            details["causes"] = causes
        super().__init__(message, details)

    @property
    def causes(self) -> list[dict[str, str]]:
        return list(self.details.get("causes", []))


class BadRequest(StoreError):
    reason = "BadRequest"
    code = 400


class Gone(StoreError):
    """A watch or list asked for a resourceVersion older than the store still remembers."""

    reason = "Expired"
    code = 410


class Forbidden(StoreError):
    reason = "Forbidden"
    code = 403


class Timeout(StoreError):
    reason = "Timeout"
    code = 504


class Unavailable(StoreError):
    """The backend cannot be reached (API server down, store closed)."""

    reason = "ServiceUnavailable"
    code = 503


_ALL: tuple[type[StoreError], ...] = (
    NotFound, AlreadyExists, Conflict, Invalid, BadRequest, Gone, Forbidden, Timeout, Unavailable,
)


def not_found(resource: str, name: str) -> NotFound:
    """C{servers.metal.sidero.dev "abc" not found}, the Kubernetes wording."""
    return NotFound(f'{resource} "{name}" not found', {"name": name, "kind": resource})


def already_exists(resource: str, name: str) -> AlreadyExists:
    return AlreadyExists(f'{resource} "{name}" already exists', {"name": name, "kind": resource})


def conflict(resource: str, name: str) -> Conflict:
    return Conflict(
        f'Operation cannot be fulfilled on {resource} "{name}": the object has been modified; '
        "please apply your changes to the latest version and try again",
        {"name": name, "kind": resource},
    )


def invalid(kind: str, group: str, name: str, causes: list[dict[str, str]]) -> Invalid:
    """A 422 aggregating field errors: C{Server.metal.sidero.dev "x" is invalid: [a, b]}."""
    qualified = f"{kind}.{group}" if group else kind
    rendered = [f"{c['field']}: {c['message']}" if c.get("field") else c["message"] for c in causes]
    summary = rendered[0] if len(rendered) == 1 else "[" + ", ".join(rendered) + "]"
    return Invalid(
        f'{qualified} "{name}" is invalid: {summary}',
        {"name": name, "group": group, "kind": kind},
        causes=[{"field": c.get("field", ""), "message": c["message"],
                 "reason": c.get("reason", "FieldValueInvalid")} for c in causes],
    )
