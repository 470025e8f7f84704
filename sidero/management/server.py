# -*- test-case-name: tests.management.test_server -*-
"""The management API of the embedded mode: Kubernetes-shaped REST over a local UNIX socket.

Operators of the embedded store have no API server and no kubectl, yet need to apply, get,
edit and delete the same manifests.  This service gives the C{sidero} command exactly that,
and nothing on the network: the socket file's owner, group and mode are the whole access
control (0600 for the service user, or 0660 with an operators' group), so the checks made
before listening matter (L{prepare_socket_path}).

Routes follow the Kubernetes API so the same URLs and bodies work:
C{/apis/{group}/{version}[/namespaces/{ns}]/{plural}[/{name}[/status]]} and C{/api/v1/...}
for core kinds, plus C{/version} and C{/healthz}.  Objects are accepted in any served version
and returned in the version of the URL; the store only ever sees its storage version.
"""

from __future__ import annotations

import errno
import grp
import json
import os
import socket
import stat
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

import sidero
from sidero.api import registry
from sidero.api.registry import ResourceType
from sidero.api.selectors import FieldSelector, LabelSelector, SelectorError
from sidero.management.codec import DecodeError, load_body
from sidero.management.common import (  # noqa: F401 - re-exported for callers of the service
    DEFAULT_SOCKET_PATH,
    SOCKET_ENV,
    default_socket_path,
    merge_patch,
)
from sidero.store.errors import BadRequest, NotFound, StoreError
from sidero.store.interfaces import IResourceStore, Object
from sidero.web import (
    InternalError,
    LimitedRequest,
    MethodNotAllowed,
    RequestEntityTooLarge,
    UnsupportedMediaType,
    limited_request_factory,
    media_type,
)

MAX_BODY_BYTES = 3 * 1024 * 1024  # the Kubernetes API server's request body limit
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"

log = Logger()


def _resource_not_found() -> NotFound:
    return NotFound("the server could not find the requested resource", {})


# --- routing (pure) -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """What a request path names.  C{kind} None means the group/version discovery document."""

    group: str
    version: str
    kind: ResourceType | None = None
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None

    @property
    def api_version(self) -> str:
        return registry.api_version(self.group, self.version)


def parse_path(path: str) -> Route:
    """Resolve a Kubernetes API path.

    @raise NotFound: the path names no served group, version, kind or subresource.
    """
    segments = [unquote(s) for s in path.split("?", 1)[0].strip("/").split("/")]
    if len(segments) >= 2 and segments[0] == "api":
        group, version, rest = "", segments[1], segments[2:]
    elif len(segments) >= 3 and segments[0] == "apis":
        group, version, rest = segments[1], segments[2], segments[3:]
    else:
        raise _resource_not_found()
    if not any(rt.group == group and version in rt.served_versions for rt in registry.ALL_KINDS):
        raise _resource_not_found()
    if not rest:
        return Route(group, version)
    namespace: str | None = None
    namespaced_path = (
        rest[0] == "namespaces" and len(rest) >= 3
        and not (group == "" and len(rest) == 3 and rest[2] in ("status", "finalize"))
    )
    if namespaced_path:
        namespace, plural, tail = rest[1], rest[2], rest[3:]
    else:
        plural, tail = rest[0], rest[1:]
    kind = next(
        (rt for rt in registry.ALL_KINDS
         if rt.group == group and rt.plural == plural and version in rt.served_versions),
        None,
    )
    if kind is None or any(not s for s in tail):
        raise _resource_not_found()
    if namespace is not None and not kind.namespaced:
        raise _resource_not_found()
    if len(tail) > 2 or (len(tail) == 2 and tail[1] != "status"):
        raise _resource_not_found()
    if len(tail) == 2 and not kind.status_subresource:
        raise _resource_not_found()
    name = tail[0] if tail else None
    if name is not None and kind.namespaced and namespace is None:
        raise _resource_not_found()
    return Route(group, version, kind, namespace, name, tail[1] if len(tail) == 2 else None)


# --- conversion at the edge -------------------------------------------------------------------


def to_version(obj: Object, api_version: str) -> Object:
    """C{obj} in C{api_version} (the store hands out its storage version)."""
    if obj.get("apiVersion") == api_version:
        return obj
    try:
        from sidero.api.conversion import convert
    except ImportError:
        raise InternalError(f"conversion to {api_version} is not available") from None
    return convert(obj, api_version)


def incoming(route: Route, body: Object, *, name: str | None = None) -> Object:
    """Check a request object against its URL and convert it to the storage version.

    @raise BadRequest: missing or mismatched apiVersion, kind, name or namespace.
    """
    kind = route.kind
    assert kind is not None
    api_version = body.get("apiVersion")
    if not isinstance(api_version, str) or not api_version:
        raise BadRequest("Object 'apiVersion' is missing in the request body")
    if not isinstance(body.get("kind"), str) or not body["kind"]:
        raise BadRequest("Object 'Kind' is missing in the request body")
    group, version = registry.split_api_version(api_version)
    if group != kind.group or body["kind"] != kind.kind or version not in kind.served_versions:
        raise BadRequest(
            f"the API version in the data ({api_version}) and kind ({body['kind']}) do not "
            f"match the expected {route.api_version} {kind.kind}"
        )
    meta = body.get("metadata")
    if meta is None:
        meta = body["metadata"] = {}
    if not isinstance(meta, dict):
        raise BadRequest("metadata must be an object")
    if name is not None:
        if meta.get("name") in (None, ""):
            meta["name"] = name
        elif meta["name"] != name:
            raise BadRequest(
                f"the name of the object ({meta['name']}) does not match the name on the URL ({name})"
            )
    if kind.namespaced:
        if meta.get("namespace") in (None, ""):
            meta["namespace"] = route.namespace
        elif meta["namespace"] != route.namespace:
            raise BadRequest(
                "the namespace of the provided object does not match the namespace sent on the request"
            )
    else:
        meta.pop("namespace", None)
    try:
        return to_version(body, kind.api_version)
    except StoreError:
        raise
    except Exception as e:
        raise BadRequest(f"cannot convert {api_version} {kind.kind} to {kind.api_version}: {e}") from None


# --- the HTTP side ---------------------------------------------------------------------------


class ManagementAPI(Resource):
    """Every route, dispatched by hand: one leaf resource that parses the Kubernetes path."""

    isLeaf = True
    log = Logger()

    def __init__(self, store: IResourceStore, timeline: Any = None, server_logs: Any = None) -> None:
        super().__init__()
        self.store = store
        self.timeline = timeline
        self.server_logs = server_logs

    def render(self, request: server.Request) -> Any:
        sidero_path = _sidero_server_path(request.path.decode("utf-8", "replace"))
        if sidero_path is not None and sidero_path[1] == "logs" and request.method == b"GET" \
                and self.server_logs is not None:
            return self._stream_logs(request, sidero_path[0])
        finished = {"gone": False}
        request.notifyFinish().addErrback(lambda _: finished.__setitem__("gone", True))
        d = ensureDeferred(self._handle(request))

        def respond(result: tuple[int, Any, str]) -> None:
            if finished["gone"]:
                return
            code, body, content_type = result
            data = body if isinstance(body, bytes) else (json.dumps(body) + "\n").encode("utf-8")
            request.setResponseCode(code)
            request.setHeader(b"content-type", content_type.encode("ascii"))
            request.setHeader(b"content-length", str(len(data)).encode("ascii"))
            request.write(data)
            request.finish()

        d.addCallback(respond)
        d.addErrback(lambda f: self.log.failure("management response failed", f))
        return server.NOT_DONE_YET

    async def _handle(self, request: server.Request) -> tuple[int, Any, str]:
        method = request.method.decode("ascii", "replace")
        path = request.path.decode("utf-8", "replace")
        try:
            code, body = await self._dispatch(request, method, path)
            self.log.debug("{method} {path} -> {code}", method=method, path=path, code=code)
            if isinstance(body, bytes):
                return code, body, "text/plain; charset=utf-8"
            return code, body, "application/json"
        except StoreError as e:
            self.log.debug("{method} {path} -> {code} {reason}: {message}", method=method,
                           path=path, code=e.code, reason=e.reason, message=e.message)
            return e.code, e.to_status(), "application/json"
        except Exception:
            self.log.failure("management request {method} {path} failed", method=method, path=path)
            err = InternalError("Internal error occurred: see the service log")
            return err.code, err.to_status(), "application/json"

    async def _dispatch(self, request: server.Request, method: str, path: str) -> tuple[int, Any]:
        if path in ("/healthz", "/livez", "/readyz"):
            if method not in ("GET", "HEAD"):
                raise MethodNotAllowed(f"the server does not allow this method on {path}")
            return 200, b"ok"
        if path == "/version":
            return 200, {"major": "1", "minor": "0", "gitVersion": f"v{sidero.__version__}",
                         "platform": "sidero-embedded"}
        if path in ("/api", "/api/"):
            return 200, {"kind": "APIVersions", "versions": ["v1"]}
        sidero_path = _sidero_server_path(path)
        if sidero_path is not None:
            return self._sidero(method, *sidero_path)
        if path in ("/apis", "/apis/"):
            return 200, _group_list()
        route = parse_path(path)
        if route.kind is None:
            if method != "GET":
                raise MethodNotAllowed(f"the server does not allow this method on {path}")
            return 200, _resource_list(route)
        if isinstance(request, LimitedRequest) and request.too_large:
            raise RequestEntityTooLarge(
                f"the request body exceeds the limit of {MAX_BODY_BYTES} bytes"
            )
        kind = route.kind
        args = {k.decode("utf-8", "replace"): v[-1].decode("utf-8", "replace")
                for k, v in (request.args or {}).items() if v}
        if route.name is None:
            if method == "GET":
                return 200, await self._list(route, kind, args)
            if method == "POST":
                if kind.namespaced and route.namespace is None:
                    raise MethodNotAllowed(f"POST is not allowed on {path}: name a namespace")
                obj = incoming(route, _body(request))
                if route.namespace is not None:
                    obj.setdefault("metadata", {}).setdefault("namespace", route.namespace)
                created = await self.store.create(obj)
                return 201, to_version(created, route.api_version)
            raise MethodNotAllowed(f"the server does not allow this method on {path}")
        name = route.name
        if route.subresource == "status":
            if method == "GET":
                return 200, to_version(await self.store.get(kind, name, route.namespace), route.api_version)
            if method == "PUT":
                obj = incoming(route, _body(request), name=name)
                return 200, to_version(await self.store.update_status(obj), route.api_version)
            if method == "PATCH":
                return 200, await self._patch(request, route, kind, name, "status")
            raise MethodNotAllowed(f"the server does not allow this method on {path}")
        if method == "GET":
            return 200, to_version(await self.store.get(kind, name, route.namespace), route.api_version)
        if method == "PUT":
            obj = incoming(route, _body(request), name=name)
            return 200, to_version(await self.store.update(obj), route.api_version)
        if method == "PATCH":
            return 200, await self._patch(request, route, kind, name, None)
        if method == "DELETE":
            return await self._delete(request, route, kind, name)
        raise MethodNotAllowed(f"the server does not allow this method on {path}")

    async def _list(self, route: Route, kind: ResourceType, args: dict[str, str]) -> Object:
        if args.get("watch") in ("true", "1"):
            raise BadRequest("watch is not supported by the management API")
        label_selector = args.get("labelSelector") or None
        field_selector = args.get("fieldSelector") or None
        try:
            LabelSelector.parse(label_selector)
            FieldSelector.parse(field_selector)
        except SelectorError as e:
            raise BadRequest(f"unable to parse requirement: {e}") from None
        result = await self.store.list(kind, route.namespace, label_selector, field_selector)
        return {
            "apiVersion": route.api_version,
            "kind": f"{kind.kind}List",
            "metadata": {"resourceVersion": result.resource_version},
            "items": [to_version(item, route.api_version) for item in result.items],
        }

    async def _patch(
        self, request: server.Request, route: Route, kind: ResourceType, name: str,
        subresource: str | None,
    ) -> Object:
        media = media_type(request.getHeader("content-type"))
        if media not in (MERGE_PATCH, JSON_PATCH):
            raise UnsupportedMediaType(
                f'the body of the request was in an unknown format - accepted media types '
                f'include: {MERGE_PATCH}, {JSON_PATCH}'
            )
        raw = request.content.read() if request.content is not None else b""
        try:
            patch_doc: Any = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"error decoding patch: {e}") from None
        if media == MERGE_PATCH and not isinstance(patch_doc, dict):
            raise BadRequest("a merge patch must be a JSON object")
        if media == MERGE_PATCH and route.version == kind.storage_version:
            # The store applies it atomically.
            patched = await self.store.patch(kind, name, patch_doc, route.namespace, subresource)
            return to_version(patched, route.api_version)
        # A JSON patch, or a merge patch written against another served version: apply it to
        # the object as the client sees it, then write back guarded by its resourceVersion.
        current = to_version(await self.store.get(kind, name, route.namespace), route.api_version)
        if media == MERGE_PATCH:
            new = merge_patch(current, patch_doc)
        else:
            import jsonpatch

            try:
                new = jsonpatch.apply_patch(current, patch_doc)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError) as e:
                raise BadRequest(f"the JSON patch cannot be applied: {e}") from None
        if not isinstance(new, dict):
            raise BadRequest("the patch does not leave an object")
        new.setdefault("metadata", {}).setdefault(
            "resourceVersion", current["metadata"].get("resourceVersion"))
        obj = incoming(route, new, name=name)
        if subresource == "status":
            return to_version(await self.store.update_status(obj), route.api_version)
        return to_version(await self.store.update(obj), route.api_version)

    async def _delete(
        self, request: server.Request, route: Route, kind: ResourceType, name: str,
    ) -> tuple[int, Any]:
        raw = request.content.read() if request.content is not None else b""
        resource_version: str | None = None
        if raw.strip():
            try:
                options = load_body(raw, "application/json")
            except DecodeError as e:
                raise BadRequest(str(e)) from None
            pre = options.get("preconditions") or {}
            if isinstance(pre, dict) and pre.get("resourceVersion"):
                resource_version = str(pre["resourceVersion"])
        result = await self.store.delete(kind, name, route.namespace, resource_version)
        if result is None:
            return 200, {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                "details": {"name": name, "group": kind.group, "kind": kind.plural},
            }
        return 200, to_version(result, route.api_version)

    def _sidero(self, method: str, name: str, what: str) -> tuple[int, Any]:
        """C{/sidero/v1/servers/<name>/timeline}: what the service knows beyond the store."""
        if method not in ("GET", "HEAD"):
            raise MethodNotAllowed(f"the server does not allow this method on {what}")
        if what == "timeline":
            if self.timeline is None:
                raise NotFound(f"this service keeps no boot timeline (server {name!r})")
            entries = [e.as_dict() for e in self.timeline.for_machine(uuid=name)]
            return 200, {"kind": "BootTimeline", "apiVersion": "sidero.dev/v1", "server": name,
                         "entries": entries}
        if what == "logs":  # only reached without a log buffer
            raise NotFound(f"this service keeps no server logs (server {name!r})")
        raise NotFound(f"the server could not find the requested resource ({what})")

    def _stream_logs(self, request: server.Request, name: str) -> Any:
        """C{/sidero/v1/servers/<name>/logs[?tail=N][&follow=true]}: text lines, and with
        C{follow} the connection stays open and each new line is written as it arrives."""
        args = request.args or {}

        def arg(key: bytes) -> str:
            values = args.get(key)
            return values[0].decode("utf-8", "replace") if values else ""

        tail_text = arg(b"tail")
        try:
            tail = int(tail_text) if tail_text else None
        except ValueError:
            err = BadRequest(f"tail must be an integer, not {tail_text!r}")
            request.setResponseCode(err.code)
            request.setHeader(b"content-type", b"application/json")
            return (json.dumps(err.to_status()) + "\n").encode()
        follow = arg(b"follow") in ("true", "1", "yes")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        for line in self.server_logs.lines(name, tail):
            request.write(line.text.encode("utf-8", "replace") + b"\n")
        if not follow:
            request.finish()
            return server.NOT_DONE_YET
        unsubscribe = self.server_logs.follow(
            name, lambda line: request.write(line.text.encode("utf-8", "replace") + b"\n"))
        request.notifyFinish().addBoth(lambda _: unsubscribe())
        return server.NOT_DONE_YET


def _body(request: server.Request) -> Object:
    raw = request.content.read() if request.content is not None else b""
    try:
        return load_body(raw, request.getHeader("content-type") or "application/json")
    except DecodeError as e:
        raise BadRequest(str(e)) from None


def _group_list() -> Object:
    groups: dict[str, list[str]] = {}
    for rt in registry.ALL_KINDS:
        if rt.group:
            versions = groups.setdefault(rt.group, [])
            versions.extend(v for v in rt.served_versions if v not in versions)
    out = []
    for group, versions in sorted(groups.items()):
        storage = next(rt.storage_version for rt in registry.ALL_KINDS if rt.group == group)
        out.append({
            "name": group,
            "versions": [{"groupVersion": f"{group}/{v}", "version": v} for v in versions],
            "preferredVersion": {"groupVersion": f"{group}/{storage}", "version": storage},
        })
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": out}


def _resource_list(route: Route) -> Object:
    resources: list[dict[str, Any]] = []
    for rt in registry.ALL_KINDS:
        if rt.group != route.group or route.version not in rt.served_versions:
            continue
        verbs = ["create", "delete", "get", "list", "patch", "update"]
        resources.append({"name": rt.plural, "singularName": rt.singular, "namespaced": rt.namespaced,
                          "kind": rt.kind, "verbs": verbs, "shortNames": list(rt.short_names)})
        if rt.status_subresource:
            resources.append({"name": f"{rt.plural}/status", "singularName": "", "namespaced": rt.namespaced,
                              "kind": rt.kind, "verbs": ["get", "patch", "update"]})
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": route.api_version,
            "resources": resources}


def _sidero_server_path(path: str) -> tuple[str, str] | None:
    """(server, subresource) of C{/sidero/v1/servers/<name>/<timeline|logs>}, else None."""
    parts = path.strip("/").split("/")
    if len(parts) == 5 and parts[:3] == ["sidero", "v1", "servers"] and parts[3]:
        return unquote(parts[3]), parts[4]
    return None


def make_site(store: IResourceStore, timeline: Any = None, server_logs: Any = None) -> server.Site:
    site = server.Site(ManagementAPI(store, timeline, server_logs))
    site.requestFactory = limited_request_factory(MAX_BODY_BYTES)
    site.displayTracebacks = False
    return site


# --- the socket file ----------------------------------------------------------------------------


class UnsafeSocketPath(Exception):
    """The management socket cannot be created safely at the configured path."""


def prepare_socket_path(path: str) -> None:
    """Make C{path} ready for C{bind}, or refuse.

    The parent directory is created (0700) when missing and must not be world-writable (a
    world-writable directory lets anyone swap the socket for their own).  An existing
    non-socket is never touched; an existing socket is removed only when nothing answers on
    it (a process that died without cleaning up), and a live one is an error.

    @raise UnsafeSocketPath: with an operator-readable reason.
    """
    if len(os.fsencode(path)) > 107:
        raise UnsafeSocketPath(f"management socket path {path!r} is longer than the 107 bytes a UNIX socket allows")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        try:
            os.makedirs(parent, mode=0o700, exist_ok=True)
        except OSError as e:
            raise UnsafeSocketPath(f"cannot create {parent}: {e.strerror}") from None
    info = os.stat(parent)
    if info.st_mode & stat.S_IWOTH:
        raise UnsafeSocketPath(
            f"refusing to create the management socket in {parent}: the directory is world-writable"
        )
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(existing.st_mode):
        raise UnsafeSocketPath(
            f"refusing to start: {path} exists and is not a socket; remove it or choose another path"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            log.info("removing stale management socket {path}", path=path)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            return
        raise UnsafeSocketPath(f"cannot check the existing socket {path}: {e.strerror}") from None
    finally:
        probe.close()
    raise UnsafeSocketPath(f"another process is already serving the management socket {path}")


class ManagementService(Service):
    """Listens on the socket while running; the socket file goes away when it stops."""

    log = Logger()

    def __init__(
        self, reactor: Any, store: IResourceStore, socket_path: str, mode: int = 0o600,
        group: str | int | None = None, timeline: Any = None, server_logs: Any = None,
    ) -> None:
        self.timeline = timeline
        self.server_logs = server_logs
        if mode & 0o007:
            raise ValueError(f"management socket mode {mode:#o} would let every local user in")
        self.reactor = reactor
        self.store = store
        self.socket_path = socket_path
        self.mode = mode
        self.group = group
        self.port: IListeningPort | None = None
        self.setName("management")

    def startService(self) -> None:
        prepare_socket_path(self.socket_path)
        # Twisted chmods between bind() and listen(), so nobody can connect before the mode
        # is right; a group is set while the mode is still owner-only, then widened.
        initial = self.mode if self.group is None else self.mode & 0o700
        self.port = self.reactor.listenUNIX(self.socket_path, make_site(self.store, self.timeline, self.server_logs),
                                          mode=initial)
        if self.group is not None:
            gid = self.group if isinstance(self.group, int) else grp.getgrnam(self.group).gr_gid
            os.chown(self.socket_path, -1, gid)
            os.chmod(self.socket_path, self.mode)
        self.log.info("management API listening on {path} (mode {mode})", path=self.socket_path,
                      mode=f"{self.mode:#o}")
        super().startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        stopped = port.stopListening()
        return stopped if isinstance(stopped, Deferred) else succeed(None)


def make_management_service(
    reactor: Any, store: IResourceStore, socket_path: str, mode: int = 0o600,
    group: str | int | None = None, timeline: Any = None, server_logs: Any = None,
) -> IService:
    """The C{management} service: the management API on a UNIX socket, never on the network."""
    return ManagementService(reactor, store, socket_path, mode, group, timeline, server_logs)
