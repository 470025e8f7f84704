# -*- test-case-name: tests.service.test_web -*-
"""What the two Kubernetes-shaped HTTP servers (the webhook and the management API) share.

Both keep request bodies in memory, so both need a request that stops buffering past a size
limit (L{LimitedRequest}); and both answer every refusal with a Kubernetes C{Status} body, so
the HTTP failures that are not store failures are L{StoreError}s too (L{http_error}).
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from twisted.web import server

from sidero.store.errors import BadRequest, NotFound, StoreError


class MethodNotAllowed(StoreError):
    reason = "MethodNotAllowed"
    code = 405


class UnsupportedMediaType(StoreError):
    reason = "UnsupportedMediaType"
    code = 415


class RequestEntityTooLarge(StoreError):
    reason = "RequestEntityTooLarge"
    code = 413


class InternalError(StoreError):
    reason = "InternalError"
    code = 500


_BY_CODE: dict[int, type[StoreError]] = {
    e.code: e for e in (BadRequest, NotFound, MethodNotAllowed, RequestEntityTooLarge,
                        UnsupportedMediaType, InternalError)
}


def http_error(code: int, message: str) -> StoreError:
    """The failure for HTTP status C{code} (C{BadRequest} for a code with no type of its own)."""
    return _BY_CODE.get(code, BadRequest)(message)


def media_type(content_type: bytes | str | None) -> str:
    """The media type of a C{Content-Type} value, lower case and without parameters."""
    if content_type is None:
        return ""
    if isinstance(content_type, bytes):
        content_type = content_type.decode("latin-1")
    return content_type.split(";", 1)[0].strip().lower()


class LimitedRequest(server.Request):
    """A request that stops keeping its body once it exceeds C{max_body}, announced or not:
    memory stays bounded whatever a client sends, and the resource answers 413 when it sees
    C{too_large}."""

    max_body = 3 * 1024 * 1024
    too_large = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body:
            self.too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._received += len(data)
        if self._received > self.max_body:
            self.too_large = True
            self.content = BytesIO()
            return
        super().handleContentChunk(data)


def limited_request_factory(max_body: int) -> type[LimitedRequest]:
    """A L{LimitedRequest} class for a C{Site}'s C{requestFactory}, limited to C{max_body}."""
    attributes: dict[str, Any] = {"max_body": max_body}
    return type("LimitedRequest", (LimitedRequest,), attributes)

