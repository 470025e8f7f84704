# -*- test-case-name: tests.management.test_cli -*-
"""A small synchronous client of the management API, for the C{sidero} command.

The CLI is a short-lived blocking program, so plain C{http.client} over C{AF_UNIX} is the
right tool here (the service side is Twisted).  Failures come back as the same
L{StoreError} classes the store raises, rebuilt from the server's C{Status}.
"""

from __future__ import annotations

import builtins
import errno
import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode

from sidero.api.registry import ResourceType, split_api_version
from sidero.store.errors import StoreError

Object = dict[str, Any]


class ServiceUnreachable(Exception):
    """Nothing serves the management socket (service stopped, wrong path, no permission)."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(why)
        self.path = path
        self.why = why


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def resource_path(
    kind: ResourceType, *, version: str | None = None, namespace: str | None = None,
    name: str | None = None, subresource: str | None = None,
) -> str:
    """The API path of a collection or an object; C{namespace} None lists every namespace."""
    v = version or kind.storage_version
    base = f"/apis/{kind.group}/{v}" if kind.group else f"/api/{v}"
    if kind.namespaced and namespace is not None:
        base += f"/namespaces/{quote(namespace, safe='')}"
    base += f"/{kind.plural}"
    if name is not None:
        base += f"/{quote(name, safe='')}"
        if subresource:
            base += f"/{subresource}"
    return base


class ManagementClient:
    """One request per call, each on a fresh connection (the CLI makes only a few)."""

    def __init__(self, socket_path: str, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json",
    ) -> Any:
        """Send one request; the decoded JSON answer (or text for non-JSON answers).

        @raise StoreError: the server answered with a failure C{Status}.
        @raise ServiceUnreachable: no connection could be made.
        """
        conn = _UnixConnection(self.socket_path, self.timeout)
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        try:
            try:
                conn.request(method, path, body=data, headers=headers)
                response = conn.getresponse()
                raw = response.read()
            except FileNotFoundError:
                raise ServiceUnreachable(self.socket_path, "no such socket") from None
            except ConnectionRefusedError:
                raise ServiceUnreachable(self.socket_path, "connection refused") from None
            except PermissionError:
                raise ServiceUnreachable(self.socket_path, "permission denied") from None
            except OSError as e:
                if e.errno in (errno.ENOTSOCK, errno.ECONNREFUSED, errno.ENOENT):
                    raise ServiceUnreachable(self.socket_path, e.strerror or str(e)) from None
                raise ServiceUnreachable(self.socket_path, str(e)) from None
            except http.client.HTTPException as e:
                raise ServiceUnreachable(self.socket_path, f"bad answer: {e!r}") from None
        finally:
            conn.close()
        ctype = response.getheader("content-type", "")
        decoded: Any = raw.decode("utf-8", "replace")
        if "json" in ctype:
            try:
                decoded = json.loads(decoded)
            except ValueError:
                pass
        if response.status >= 400:
            if isinstance(decoded, dict) and decoded.get("kind") == "Status":
                err = StoreError.from_status(decoded)
                if decoded.get("reason") and err.reason != decoded["reason"]:
                    err.reason = str(decoded["reason"])  # a reason the store has no class for
            else:
                err = StoreError(str(decoded).strip() or response.reason)
            err.code = response.status
            raise err
        return decoded

    # Typed helpers -------------------------------------------------------------------------

    def get(self, kind: ResourceType, name: str, namespace: str | None = None,
            version: str | None = None) -> Object:
        result: Object = self.request("GET", resource_path(kind, version=version, namespace=namespace, name=name))
        return result

    def list(self, kind: ResourceType, namespace: str | None = None, label_selector: str | None = None,
             field_selector: str | None = None, version: str | None = None) -> Object:
        query = {k: v for k, v in (("labelSelector", label_selector), ("fieldSelector", field_selector)) if v}
        path = resource_path(kind, version=version, namespace=namespace)
        if query:
            path += "?" + urlencode(query)
        result: Object = self.request("GET", path)
        return result

    def create(self, kind: ResourceType, obj: Object) -> Object:
        ns = (obj.get("metadata") or {}).get("namespace")
        result: Object = self.request("POST", resource_path(kind, version=_version_of(obj), namespace=ns), obj)
        return result

    def update(self, kind: ResourceType, obj: Object) -> Object:
        meta = obj.get("metadata") or {}
        path = resource_path(kind, version=_version_of(obj), namespace=meta.get("namespace"), name=meta.get("name"))
        result: Object = self.request("PUT", path, obj)
        return result

    def patch(self, kind: ResourceType, name: str, patch: Object, namespace: str | None = None,
              version: str | None = None) -> Object:
        path = resource_path(kind, version=version, namespace=namespace, name=name)
        result: Object = self.request("PATCH", path, patch, "application/merge-patch+json")
        return result

    def delete(self, kind: ResourceType, name: str, namespace: str | None = None) -> Object:
        result: Object = self.request("DELETE", resource_path(kind, namespace=namespace, name=name))
        return result

    # What only the service knows (not in any store) ---------------------------------------

    def timeline(self, server: str) -> builtins.list[Object] | None:
        """The service's boot timeline of C{server}; None when the service keeps none."""
        try:
            result = self.request("GET", f"/sidero/v1/servers/{quote(server, safe='')}/timeline")
        except StoreError as e:
            if e.code == 404:
                return None
            raise
        entries: builtins.list[Object] = result.get("entries", []) if isinstance(result, dict) else []
        return entries

    def logs(self, server: str, follow: bool = False, tail: int | None = None) -> Iterator[str]:
        """The server's log lines, then (with C{follow}) new ones as they arrive, until the
        service closes the stream or the caller stops iterating."""
        query = {"follow": "true" if follow else "false"}
        if tail is not None:
            query["tail"] = str(tail)
        path = f"/sidero/v1/servers/{quote(server, safe='')}/logs?{urlencode(query)}"
        conn = _UnixConnection(self.socket_path, None if follow else self.timeout)
        try:
            try:
                conn.request("GET", path, headers={"Accept": "text/plain"})
                response = conn.getresponse()
            except FileNotFoundError:
                raise ServiceUnreachable(self.socket_path, "no such socket") from None
            except ConnectionRefusedError:
                raise ServiceUnreachable(self.socket_path, "connection refused") from None
            except PermissionError:
                raise ServiceUnreachable(self.socket_path, "permission denied") from None
            if response.status >= 400:
                raw = response.read().decode("utf-8", "replace")
                try:
                    decoded = json.loads(raw)
                    err = StoreError.from_status(decoded)
                except (ValueError, AttributeError):
                    err = StoreError(raw.strip() or response.reason)
                err.code = response.status
                raise err
            while True:
                line = response.readline()
                if not line:
                    return
                yield line.decode("utf-8", "replace").rstrip("\n")
        finally:
            conn.close()


def _version_of(obj: Object) -> str | None:
    api_version = obj.get("apiVersion")
    return split_api_version(api_version)[1] if isinstance(api_version, str) else None
