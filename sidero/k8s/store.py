# -*- test-case-name: tests.k8s.test_store_contract,tests.k8s.test_faults -*-
"""L{IResourceStore} on a real Kubernetes API server (C{--store kubernetes}).

The API server implements the contract natively (resourceVersions, conflicts, finalizers,
selectors, status subresources, watch), so this backend is a thin translation: each call is
one HTTP request run in a dedicated thread pool with a time limit, and each watch is one
streaming GET read by its own thread, whose events reach the reactor with C{callFromThread}.

Garbage collection of ownerReferences is kube-controller-manager's job in a cluster; this
store does not imitate it.
"""

from __future__ import annotations

import copy
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import urllib3
from kubernetes import client as k8s_client
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from sidero.api import registry
from sidero.api.registry import ResourceType
from sidero.api.selectors import FieldSelector, LabelSelector, SelectorError
from sidero.k8s import client as kc
from sidero.k8s.errors import from_response, unreachable
from sidero.k8s.ratelimit import TokenBucket
from sidero.store import errors
from sidero.store.interfaces import (
    ADDED,
    BOOKMARK,
    ERROR,
    IResourceStore,
    IWatch,
    Object,
    ResourceList,
    WatchEvent,
)
from sidero.store.kinds import kind_of, namespace_for
from sidero.threads import CallTimeout, run_in_pool

INITIAL_EVENTS_END = "k8s.io/initial-events-end"
#: Seconds the API server keeps one watch request open; the store then resumes transparently.
DEFAULT_WATCH_TIMEOUT = 300
LIST_PAGE_SIZE = 500
#: Attempts of an unconditional update (read the resourceVersion, write; again on Conflict).
UNCONDITIONAL_ATTEMPTS = 5


def _namespace_for(kind: ResourceType, namespace: str | None) -> str | None:
    """The namespace of the URL: L{namespace_for}, but None (no C{/namespaces/} segment) for a
    cluster-scoped kind."""
    return namespace_for(kind, namespace) or None


def _typed(kind: ResourceType, obj: Object) -> Object:
    """The object in the embedded store's shape: list items of core kinds come without
    apiVersion/kind, which every object we return has; managedFields (server-side apply
    bookkeeping, which sidero does not use) are dropped.  An update without them leaves the
    server's unchanged."""
    obj.setdefault("apiVersion", kind.api_version)
    obj.setdefault("kind", kind.kind)
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        meta.pop("managedFields", None)
    return obj


@implementer(IResourceStore)
class KubernetesStore:
    """The resource store backed by a Kubernetes API server.

    @param api_client: from L{sidero.k8s.client.load_api_client}; the store closes it in
        L{close}.
    @param pool: the thread pool every blocking call runs in (a started
        C{ThreadPoolService(reactor, "kubernetes", ...).pool}).  Watches do not use it: each
        holds a thread of its own for as long as it runs, so they cannot starve calls.
    @param rate_limiter: the client-side token bucket every request takes a token from
        (C{--kube-api-qps}/C{--kube-api-burst}); None sends unthrottled.  A request waits for
        its token on the reactor (C{callLater}) before it enters the pool; follow-up pages of a
        list, the read of an unconditional update and watch (re)connections wait in their own
        thread.
    @param lease_rate_limiter: a bucket of its own for C{coordination.k8s.io} Leases, as
        controller-runtime's leader election has a client (and so a bucket) of its own: a
        renewal never queues behind a burst of reconciles.  None: Leases are unthrottled when
        C{rate_limiter} is None, else they get a bucket with the same QPS and burst.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        api_client: k8s_client.ApiClient,
        pool: ThreadPool,
        *,
        request_timeout: tuple[float, float] = kc.DEFAULT_REQUEST_TIMEOUT,
        watch_timeout: int = DEFAULT_WATCH_TIMEOUT,
        rate_limiter: TokenBucket | None = None,
        lease_rate_limiter: TokenBucket | None = None,
    ) -> None:
        self._reactor = reactor
        self.api_client = api_client
        self._pool = pool
        self._request_timeout = request_timeout
        self._call_limit = sum(request_timeout) + 10.0
        self.watch_timeout = watch_timeout
        self._watches: set[_Watch] = set()
        self._closed = False
        unlimited = TokenBucket(qps=0)
        self.rate_limiter = rate_limiter if rate_limiter is not None else unlimited
        if lease_rate_limiter is None:
            lease_rate_limiter = (unlimited if rate_limiter is None
                                  else TokenBucket(rate_limiter.qps, rate_limiter.burst))
        self.lease_rate_limiter = lease_rate_limiter

    @property
    def host(self) -> str:
        return kc.host_of(self.api_client)

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self, kinds: tuple[ResourceType, ...] = registry.CUSTOM_KINDS) -> None:
        """Check the server answers and serves C{kinds} (sidero's CRDs by default), so a
        wrong address or a cluster without the CRDs fails at start-up with one clear error.

        @raise errors.Unavailable: the server cannot be reached.
        @raise errors.NotFound: a kind is not served (CRDs not installed).
        """
        version = await self._call("GET", "/version")
        groups: dict[str, set[str]] = {}
        for kind in kinds:
            base = kc.api_base(kind)
            if base not in groups:
                try:
                    found = await self._call("GET", base)
                except errors.NotFound:
                    found = {}
                groups[base] = {r.get("name", "") for r in (found or {}).get("resources", [])}
            if kind.plural not in groups[base]:
                raise errors.NotFound(
                    f"the Kubernetes API server at {self.host} does not serve "
                    f"{kind.resource}/{kind.storage_version}: install sidero's CRDs (deploy/crds)"
                )
        self.log.info("Kubernetes store using {host} (Kubernetes {version})",
                      host=self.host, version=(version or {}).get("gitVersion", "?"))

    async def close(self) -> None:
        """Stop every watch and close the client's connections."""
        self._closed = True
        for w in list(self._watches):
            w.stop()
        await self._run(self.api_client.close)

    # -- plumbing ---------------------------------------------------------------------------

    def _run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        d = run_in_pool(self._reactor, self._pool, self._call_limit, "kubernetes call", f, *args, **kwargs)

        def timed_out(failure: Failure) -> Failure:
            if failure.check(CallTimeout):
                return Failure(errors.Timeout(
                    f"the Kubernetes API server at {self.host} did not answer within "
                    f"{self._call_limit:g}s"))
            return failure

        return d.addErrback(timed_out)

    def bucket_for(self, kind: ResourceType | None) -> TokenBucket:
        """The token bucket requests about C{kind} take from (Leases have their own)."""
        if kind is not None and kind.group == registry.LEASE.group and kind.kind == registry.LEASE.kind:
            return self.lease_rate_limiter
        return self.rate_limiter

    def _throttled(self, kind: ResourceType | None, send: Callable[[], Deferred[Any]]) -> Deferred[Any]:
        """C{send()} once this request's token is due: at once, or after a C{callLater} (the
        reactor never sleeps and no pool thread is held while waiting)."""
        bucket = self.bucket_for(kind)
        delay = bucket.reserve()
        if delay <= 0:
            return send()
        sent = False

        def later() -> Deferred[Any]:
            nonlocal sent
            sent = True
            if self._closed:
                return fail(errors.Unavailable("the Kubernetes store is closed"))
            return send()

        def cancelled(failure: Failure) -> Failure:
            # Cancelled while it waited for its token (its caller gave up): never sent, so the
            # token goes back to the requests queued behind it.
            if failure.check(CancelledError) and not sent:
                bucket.give_back()
            return failure

        return deferLater(self._reactor, delay, later).addErrback(cancelled)

    def _call(
        self, method: str, path: str, query: list[tuple[str, str]] | None = None,
        body: Any = None, content_type: str = kc.JSON, kind: ResourceType | None = None,
    ) -> Deferred[Any]:
        """One request in the pool (after its token); fires with the decoded body."""
        if self._closed:
            return fail(errors.Unavailable("the Kubernetes store is closed"))
        d = self._throttled(kind, lambda: self._run(
            kc.request, self.api_client, method, path, query, body, content_type,
            self._request_timeout))
        return d.addCallback(lambda result: result[1])

    # -- reads ------------------------------------------------------------------------------

    def get(self, kind: ResourceType, name: str, namespace: str | None = None) -> Deferred[Object]:
        path = kc.resource_path(kind, _namespace_for(kind, namespace), name)
        return self._call("GET", path, kind=kind).addCallback(lambda obj: _typed(kind, obj))

    def list(
        self,
        kind: ResourceType,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> Deferred[ResourceList]:
        if self._closed:
            return fail(errors.Unavailable("the Kubernetes store is closed"))
        return self._throttled(kind, lambda: self._run(
            self._list_blocking, kind, namespace, label_selector, field_selector, True))

    def _list_blocking(
        self, kind: ResourceType, namespace: str | None, label_selector: str | None,
        field_selector: str | None, first_token_taken: bool = False,
        stop: threading.Event | None = None,
    ) -> ResourceList:
        """Every page of a list (in a thread); the resourceVersion is the first page's,
        which the server keeps for the whole paginated list.  Each page takes a token (the
        first one's was taken on the reactor when C{first_token_taken})."""
        path = kc.resource_path(kind, namespace if kind.namespaced else None)
        query: list[tuple[str, str]] = [("limit", str(LIST_PAGE_SIZE))]
        if label_selector:
            query.append(("labelSelector", label_selector))
        if field_selector:
            query.append(("fieldSelector", field_selector))
        items: list[Object] = []
        rv = ""
        token = ""
        bucket = self.bucket_for(kind)
        first = True
        while True:
            if not (first and first_token_taken) and not bucket.wait(stop):
                break  # the watch listing is being stopped
            first = False
            page_query = query + ([("continue", token)] if token else [])
            _, page = kc.request(self.api_client, "GET", path, page_query,
                                 timeout=self._request_timeout)
            meta = page.get("metadata") or {}
            rv = rv or str(meta.get("resourceVersion") or "")
            items.extend(_typed(kind, item) for item in page.get("items") or [])
            token = meta.get("continue") or ""
            if not token:
                break
        return ResourceList(items=items, resource_version=rv, kind=kind)

    # -- writes -----------------------------------------------------------------------------

    def create(self, obj: Object) -> Deferred[Object]:
        try:
            kind = kind_of(obj)
        except errors.StoreError as e:
            return fail(e)
        meta = obj.get("metadata") or {}
        path = kc.resource_path(kind, _namespace_for(kind, meta.get("namespace")))
        return self._call("POST", path, body=obj, kind=kind).addCallback(lambda o: _typed(kind, o))

    def update(self, obj: Object) -> Deferred[Object]:
        return self._update(obj, None)

    def update_status(self, obj: Object) -> Deferred[Object]:
        return self._update(obj, "status")

    def _update(self, obj: Object, subresource: str | None) -> Deferred[Object]:
        try:
            kind = kind_of(obj)
            meta = obj.get("metadata")
            if not isinstance(meta, dict) or not meta.get("name"):
                raise errors.invalid(kind.kind, kind.group, "", [{
                    "field": "metadata.name", "message": "Required value: name is required",
                    "reason": "FieldValueRequired"}])
        except errors.StoreError as e:
            return fail(e)
        if self._closed:
            return fail(errors.Unavailable("the Kubernetes store is closed"))
        path = kc.resource_path(kind, _namespace_for(kind, meta.get("namespace")), meta["name"],
                                subresource)
        d = self._throttled(kind, lambda: self._run(self._put_blocking, kind, path, obj))
        return d.addCallback(lambda o: _typed(kind, o))

    def _put_blocking(self, kind: ResourceType, path: str, obj: Object) -> Object:
        """PUT; without a resourceVersion, read the current one first and retry on Conflict
        (custom resources refuse unconditional updates, the interface promises them)."""
        if (obj.get("metadata") or {}).get("resourceVersion"):
            return kc.request(self.api_client, "PUT", path, body=obj,
                              timeout=self._request_timeout)[1]
        object_path = path.removesuffix("/status")
        bucket = self.bucket_for(kind)
        for attempt in range(UNCONDITIONAL_ATTEMPTS):
            if attempt:
                bucket.wait()  # a retry's GET (the first used the token reserved on the reactor)
            _, current = kc.request(self.api_client, "GET", object_path, timeout=self._request_timeout)
            body = copy.deepcopy(obj)
            body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            bucket.wait()
            try:
                return kc.request(self.api_client, "PUT", path, body=body,
                                  timeout=self._request_timeout)[1]
            except errors.Conflict:
                if attempt == UNCONDITIONAL_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def patch(
        self,
        kind: ResourceType,
        name: str,
        patch: Object,
        namespace: str | None = None,
        subresource: str | None = None,
    ) -> Deferred[Object]:
        if not isinstance(patch, dict):
            return fail(errors.BadRequest("a merge patch must be a JSON object"))
        path = kc.resource_path(kind, _namespace_for(kind, namespace), name, subresource or None)
        d = self._call("PATCH", path, body=patch, content_type=kc.MERGE_PATCH, kind=kind)
        return d.addCallback(lambda o: _typed(kind, o))

    def delete(
        self,
        kind: ResourceType,
        name: str,
        namespace: str | None = None,
        resource_version: str | None = None,
    ) -> Deferred[Object | None]:
        if self._closed:
            return fail(errors.Unavailable("the Kubernetes store is closed"))
        path = kc.resource_path(kind, _namespace_for(kind, namespace), name)
        options: Object = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        if resource_version:
            options["preconditions"] = {"resourceVersion": resource_version}
        d = self._throttled(kind, lambda: self._run(
            kc.request, self.api_client, "DELETE", path, None, options, kc.JSON,
            self._request_timeout))
        return d.addCallback(self._deleted, kind)

    @staticmethod
    def _deleted(result: tuple[int, Any], kind: ResourceType) -> Object | None:
        """The object when finalizers hold it (marked with deletionTimestamp), else None.

        The server answers 200 with the object in both cases (202 for some built-in kinds), so
        the object itself tells: still has finalizers means still there."""
        status, body = result
        if not isinstance(body, dict) or body.get("kind") == "Status":
            return None
        meta = body.get("metadata") or {}
        if status == 202 or (meta.get("deletionTimestamp") and meta.get("finalizers")):
            return _typed(kind, body)
        return None

    # -- watch ------------------------------------------------------------------------------

    def watch(
        self,
        kind: ResourceType,
        callback: Callable[[WatchEvent], object],
        namespace: str | None = None,
        resource_version: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        bookmarks: bool = False,
    ) -> Deferred[IWatch]:
        if self._closed:
            return fail(errors.Unavailable("the Kubernetes store is closed"))
        try:  # refuse a bad selector now, as the embedded store does, not via done later
            LabelSelector.parse(label_selector)
            FieldSelector.parse(field_selector)
        except SelectorError as e:
            return fail(errors.BadRequest(str(e)))
        w = _Watch(self, kind, callback, namespace if kind.namespaced else None,
                   label_selector, field_selector, bookmarks)
        self._watches.add(w)
        w.done.addBoth(self._forget, w)
        w.start(resource_version or None)
        return succeed(w)

    def _forget(self, result: object, w: _Watch) -> object:
        self._watches.discard(w)
        return result

    def watch_count(self) -> int:
        """Running watches (for tests and metrics)."""
        return len(self._watches)


@implementer(IWatch)
class _Watch:
    """One watch: a thread reading a streaming GET (renewed every C{watch_timeout} seconds
    from the last resourceVersion seen), handing events to the reactor in order."""

    log = Logger()

    def __init__(
        self, store: KubernetesStore, kind: ResourceType, callback: Callable[[WatchEvent], object],
        namespace: str | None, label_selector: str | None, field_selector: str | None,
        bookmarks: bool,
    ) -> None:
        self.store = store
        self.kind = kind
        self.callback = callback
        self.namespace = namespace
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.bookmarks = bookmarks
        self.done: Deferred[None] = Deferred()
        self.resource_version = ""
        self._finished = False  # reactor thread: nothing is delivered once True
        self._stopping = threading.Event()  # read by the watch thread
        self._lock = threading.Lock()
        self._response: Any = None
        self._thread: threading.Thread | None = None

    # -- reactor side -------------------------------------------------------------------

    def start(self, resource_version: str | None) -> None:
        name = f"sidero-watch-{self.kind.plural}"
        self._thread = threading.Thread(target=self._run, args=(resource_version,), name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the watch now: close its connection so the reading thread wakes up."""
        self._stopping.set()
        self._abort_response()
        self._finish(None)

    def _finish(self, error: errors.StoreError | None) -> None:
        if self._finished:
            return
        self._finished = True
        if error is None:
            self.done.callback(None)
        else:
            self.done.errback(error)

    def _deliver(self, event: WatchEvent) -> None:
        if self._finished:
            return
        try:
            result = self.callback(event)
        except Exception:
            self.log.failure("watch callback for {kind} failed on a {event} event; the watch goes on",
                             kind=self.kind.resource, event=event.type)
            return
        if isinstance(result, Deferred):
            result.addErrback(lambda f: self.log.failure(
                "watch callback for {kind} failed later; the watch goes on", f, kind=self.kind.resource))

    # -- watch thread -------------------------------------------------------------------

    def _emit(self, type_: str, obj: Object) -> None:
        self.store._reactor.callFromThread(self._deliver, WatchEvent(type_, obj))

    def _abort_response(self) -> None:
        """Shut the socket down (wakes a blocked read in another thread), then close."""
        with self._lock:
            response, self._response = self._response, None
        if response is None:
            return
        conn = getattr(response, "connection", None) or getattr(response, "_connection", None)
        sock = getattr(conn, "sock", None)
        if sock is not None:
            try:
                # The plain-socket shutdown: SSLSocket.shutdown would also drop the TLS
                # object under the reading thread's feet.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            response.close()
        except Exception:
            pass

    def _run(self, resource_version: str | None) -> None:
        error: errors.StoreError | None = None
        try:
            rv = resource_version
            if rv in (None, "", "0"):
                rv = self._initial_list()
            self.resource_version = rv or ""
            self._stream_forever()
        except errors.StoreError as e:
            error = e
        except Exception as e:  # a bug or an unexpected client error: end the watch visibly
            if not self._stopping.is_set():
                self.log.failure("watch of {kind} failed", Failure(e), kind=self.kind.resource)
            error = errors.StoreError(f"watch of {self.kind.resource} failed: {e}")
        finally:
            self._abort_response()
        if self._stopping.is_set():
            return
        if error is None:
            error = errors.Unavailable(f"watch of {self.kind.resource} ended")
        self.store._reactor.callFromThread(self._finish, error)

    def _initial_list(self) -> str:
        listing = self.store._list_blocking(self.kind, self.namespace, self.label_selector,
                                            self.field_selector, stop=self._stopping)
        for obj in listing.items:
            if self._stopping.is_set():
                return listing.resource_version
            self._emit(ADDED, obj)
        if self.bookmarks:
            self._emit(BOOKMARK, {
                "apiVersion": self.kind.api_version, "kind": self.kind.kind,
                "metadata": {"resourceVersion": listing.resource_version,
                             "annotations": {INITIAL_EVENTS_END: "true"}}})
        return listing.resource_version

    def _stream_forever(self) -> None:
        """Renew the watch request each time the server ends it cleanly; give up (Unavailable)
        when it keeps ending at once, which is a server going away."""
        quick_ends = 0
        while not self._stopping.is_set():
            opened = time.monotonic()
            got_events = self._stream_once()
            if self._stopping.is_set():
                return
            if not got_events and time.monotonic() - opened < 1.0:
                quick_ends += 1
                if quick_ends >= 3:
                    raise errors.Unavailable(
                        f"the Kubernetes API server at {self.store.host} keeps closing the watch "
                        f"of {self.kind.resource}")
            else:
                quick_ends = 0

    def _stream_once(self) -> bool:
        """One streaming GET; returns whether any event arrived before the server ended it."""
        store = self.store
        query: list[tuple[str, str]] = [
            ("watch", "true"),
            ("resourceVersion", self.resource_version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(store.watch_timeout)),
        ]
        if self.label_selector:
            query.append(("labelSelector", self.label_selector))
        if self.field_selector:
            query.append(("fieldSelector", self.field_selector))
        path = kc.resource_path(self.kind, self.namespace)
        timeout = (store._request_timeout[0], store.watch_timeout + 30.0)
        if not store.bucket_for(self.kind).wait(self._stopping):
            return False
        response = kc.open_request(store.api_client, "GET", path, query, timeout=timeout)
        with self._lock:
            self._response = response
        if self._stopping.is_set():
            return False
        status = int(response.status)
        if status != 200:
            data = response.data
            raise from_response(status, data, f"watch {path}")
        got = False
        try:
            for line in _lines(response):
                if self._stopping.is_set():
                    return got
                got = True
                self._handle(line)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            if self._stopping.is_set():
                return got
            raise unreachable(store.host, e) from e
        finally:
            self._abort_response()
        return got

    def _handle(self, line: bytes) -> None:
        import json

        try:
            event = json.loads(line)
            type_ = event["type"]
            obj = event["object"]
        except (ValueError, KeyError, TypeError) as e:
            raise errors.StoreError(f"watch of {self.kind.resource}: malformed event: {e}") from None
        if type_ == ERROR:
            code = int(obj.get("code") or 500) if isinstance(obj, dict) else 500
            raise from_response(code, json.dumps(obj))
        rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        if rv:
            self.resource_version = rv
        if type_ == BOOKMARK:
            if self.bookmarks:
                self._emit(BOOKMARK, obj)
            return
        self._emit(type_, _typed(self.kind, obj))


def _lines(response: Any) -> Any:
    """Newline-separated JSON events from a chunked streaming response."""
    pending = b""
    for chunk in response.stream(amt=None, decode_content=False):
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            if line.strip():
                yield line
    if pending.strip():
        yield pending
