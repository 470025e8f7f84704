# -*- test-case-name: tests.service.test_metrics -*-
"""Prometheus metrics of one service tree, on its own L{CollectorRegistry}.

Every metric lives on the registry of a L{Metrics} object that C{sidero.tap} makes once per
service tree and hands to what it instruments; nothing here touches prometheus-client's
global default registry, so two trees (or two tests) never see each other's numbers.

Two styles, chosen by where the numbers come from:

* protocols that already keep plain counters (DHCP, TFTP, the API port's connection split,
  informers, work queues) stay free of prometheus imports: a custom collector reads those
  counters at scrape time (L{Metrics.add_dhcp} and friends);
* timings (HTTP requests, gRPC calls, reconciles, power operations, store calls) are observed
  as they happen, by thin wrappers defined here (L{InstrumentedResource},
  L{GrpcMetricsInterceptor}, L{InstrumentedPowerManager}, L{TimedStore}) or by the controller
  runtime through L{Metrics.reconciled}.

Names follow controller-runtime where it has one (C{controller_runtime_reconcile_total},
C{workqueue_depth}), so existing dashboards for Go controllers read ours too. Label values
are closed sets (routes, outcomes, controller names), so the number of series is bounded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from zope.interface import implementer

from sidero.power.interfaces import IPowerManager
from sidero.store.interfaces import IResourceStore

#: Latency buckets for requests answered from memory (iPXE scripts, decisions, probes) up to
#: whole-file downloads of kernels and initrds, which take seconds.
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
#: controller-runtime's reconcile_time_seconds buckets.
RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5,
                     0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5,
                     6, 7, 8, 9, 10, 15, 20, 25, 30, 40, 50, 60)
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
POWER_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60)

#: HTTP routes of the API port (spec 3.1), the label of every request; anything else is
#: C{other}, so a scanner walking random paths cannot grow the series.
HTTP_ROUTES: tuple[tuple[str, bool], ...] = (
    ("/boot.ipxe", True), ("/ipxe", True), ("/configdata", True), ("/healthz", True),
    ("/readyz", True), ("/env/", False), ("/tftp/", False),
)

#: gRPC methods we serve by name; proxied SideroLink calls and unknown ones are grouped.
GRPC_METHOD_PREFIX = "/api.Agent/"


def http_route(path: bytes | str) -> str:
    """The route label of a request path: one of L{HTTP_ROUTES} (without slashes) or C{other}."""
    if isinstance(path, bytes):
        path = path.decode("latin-1")
    path = path.split("?", 1)[0]
    for route, exact in HTTP_ROUTES:
        if (exact and path == route) or (not exact and path.startswith(route)):
            return route.rstrip("/") or route
    return "other"


def grpc_method_label(method: str) -> str:
    """The method label of a gRPC call: C{/api.Agent/<Name>}, C{sidero.link} or C{other}."""
    if method.startswith(GRPC_METHOD_PREFIX) and method.count("/") == 2 and len(method) < 80:
        return method
    if method.startswith("/sidero.link."):
        return "sidero.link"
    return "other"


class Metrics:
    """Every metric of one service tree.

    @ivar registry: what C{/metrics} serves; give one to share it, else a new one is made.
    @ivar clock: a monotonic C{() -> float} for durations (injectable for tests).
    """

    def __init__(self, registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.clock = clock
        r = self.registry
        self.http_requests = Counter(
            "sidero_http_requests", "HTTP requests on the API port by route, method and status",
            ["route", "method", "code"], registry=r)
        self.http_duration = Histogram(
            "sidero_http_request_duration_seconds",
            "Time from request to the last byte of the response, by route",
            ["route"], buckets=HTTP_BUCKETS, registry=r)
        self._http_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self.grpc_handled = Counter(
            "sidero_grpc_server_handled", "gRPC calls completed on the API port by method and code",
            ["method", "code"], registry=r)
        self.grpc_duration = Histogram(
            "sidero_grpc_server_handling_seconds", "gRPC call duration by method",
            ["method"], buckets=HTTP_BUCKETS, registry=r)
        self.reconcile_total = Counter(
            "controller_runtime_reconcile", "Reconciles per controller and result",
            ["controller", "result"], registry=r)
        self.reconcile_errors = Counter(
            "controller_runtime_reconcile_errors", "Reconciles that failed, per controller",
            ["controller"], registry=r)
        self.reconcile_time = Histogram(
            "controller_runtime_reconcile_time_seconds", "Reconcile duration per controller",
            ["controller"], buckets=RECONCILE_BUCKETS, registry=r)
        self.power_operations = Counter(
            "sidero_power_operations", "Power operations by implementation, operation and result",
            ["kind", "operation", "result"], registry=r)
        self.power_duration = Histogram(
            "sidero_power_operation_duration_seconds", "Power operation duration",
            ["kind", "operation"], buckets=POWER_BUCKETS, registry=r)
        self.store_duration = Histogram(
            "sidero_store_request_duration_seconds", "Resource store call latency",
            ["operation", "resource"], buckets=STORE_BUCKETS, registry=r)
        self.store_errors = Counter(
            "sidero_store_request_errors", "Resource store calls that failed, by reason",
            ["operation", "resource", "reason"], registry=r)
        self._sources = _Sources()
        r.register(self._sources)

    # -- sources read at scrape time ---------------------------------------------------

    def add_dhcp(self, counters: Any) -> None:
        """Expose a L{sidero.protocols.dhcp.protocol.DHCPCounters}."""
        self._sources.dhcp.append(counters)

    def add_tftp(self, stats: Any) -> None:
        """Expose a L{sidero.protocols.tftp.protocol.TFTPStats}."""
        self._sources.tftp.append(stats)

    def add_api_port(self, counters: Callable[[], dict[str, int]],
                     refused: Callable[[], dict[str, int]] | None = None) -> None:
        """Expose the API port's connection classification (HTTP/1.1 vs gRPC) and what its
        limits refused (L{sidero.protocols.http.limits.REASONS})."""
        self._sources.api_port.append(counters)
        if refused is not None:
            self._sources.api_port_refused.append(refused)

    def add_limits(self, limits: Callable[[], Iterable[Any]]) -> None:
        """Expose concurrency limits (L{sidero.limits}: C{name} and C{stats()})."""
        self._sources.limits.append(limits)

    def add_dashboard(self, counters: Callable[[], dict[str, int]]) -> None:
        """Expose the dashboard's counters (C{open} streams, and event totals)."""
        self._sources.dashboard.append(counters)

    def add_informers(self, informers: Callable[[], Iterable[Any]]) -> None:
        """Expose informers (lists, relists, watch restarts, cache size, synced)."""
        self._sources.informers.append(informers)

    def add_controllers(self, controllers: Callable[[], Iterable[Any]]) -> None:
        """Expose the work queues of controllers (depth, in flight, delayed)."""
        self._sources.controllers.append(controllers)

    # -- observations ------------------------------------------------------------------

    def reconciled(self, controller: str, result: str, duration: float) -> None:
        """One reconcile ended: C{result} is success, error, requeue or requeue_after."""
        self.reconcile_total.labels(controller, result).inc()
        self.reconcile_time.labels(controller).observe(max(0.0, duration))
        if result == "error":
            self.reconcile_errors.labels(controller).inc()

    def http_request(self, path: bytes | str, method: bytes | str, code: int | str,
                     duration: float) -> None:
        route = http_route(path)
        if isinstance(method, bytes):
            method = method.decode("latin-1")
        if method not in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            method = "other"
        key = (route, method, str(code))
        children = self._http_children.get(key)
        if children is None:
            # labels() costs a lock and a dict build per call: once per (route, method, code).
            children = (self.http_requests.labels(*key), self.http_duration.labels(route))
            if len(self._http_children) < 4096:
                self._http_children[key] = children
        children[0].inc()
        children[1].observe(max(0.0, duration))

    def grpc_call(self, method: str, code: str, duration: float) -> None:
        label = grpc_method_label(method)
        self.grpc_handled.labels(label, code).inc()
        self.grpc_duration.labels(label).observe(max(0.0, duration))

    # -- wrappers ----------------------------------------------------------------------

    def instrument_resource(self, resource: IResource, timeline: Any = None) -> IResource:
        return InstrumentedResource(resource, self, timeline)

    def instrument_power(self, manager: IPowerManager) -> IPowerManager:
        return InstrumentedPowerManager(manager, self)

    def timed_store(self, store: Any) -> TimedStore:
        return TimedStore(store, self)

    def grpc_interceptor(self, record: Callable[..., None] | None = None) -> Any:
        return make_grpc_interceptor(self, record)

    def resource(self) -> IResource:
        """The C{/metrics} site root."""
        return MetricsRoot(self.registry)


class _Sources:
    """A custom collector over plain counters kept by protocols, informers and work queues."""

    def __init__(self) -> None:
        self.dhcp: list[Any] = []
        self.tftp: list[Any] = []
        self.api_port: list[Callable[[], dict[str, int]]] = []
        self.api_port_refused: list[Callable[[], dict[str, int]]] = []
        self.limits: list[Callable[[], Iterable[Any]]] = []
        self.informers: list[Callable[[], Iterable[Any]]] = []
        self.controllers: list[Callable[[], Iterable[Any]]] = []
        self.dashboard: list[Callable[[], dict[str, int]]] = []

    def describe(self) -> list[Metric]:
        return []  # families vary with what was added; no duplicate-name check needed

    def collect(self) -> Iterator[Metric]:
        if self.dhcp:
            yield from self._dhcp()
        if self.tftp:
            yield from self._tftp()
        if self.api_port:
            conns = CounterMetricFamily(
                "sidero_api_port_connections", "API port connections by what they turned out to be",
                labels=["kind"])
            totals: dict[str, int] = {}
            for counters in self.api_port:
                for k, v in counters().items():
                    totals[k] = totals.get(k, 0) + v
            for k, v in sorted(totals.items()):
                conns.add_metric([k], v)
            yield conns
        if self.api_port_refused:
            refused = CounterMetricFamily(
                "sidero_api_port_refused", "API port connections and requests refused by a limit,"
                " by reason", labels=["reason"])
            totals = {}
            for counters in self.api_port_refused:
                for k, v in counters().items():
                    totals[k] = totals.get(k, 0) + v
            for k, v in sorted(totals.items()):
                refused.add_metric([k], v)
            yield refused
        limits = [limit for source in self.limits for limit in source()]
        if limits:
            families = {
                key: GaugeMetricFamily(f"sidero_limit_{key}", doc, labels=["limit"])
                for key, doc in (
                    ("max", "Concurrency limit (wipe, power, download)"),
                    ("in_flight", "Operations holding a slot of the limit"),
                    ("queued", "Operations waiting for a slot (queued, never refused)"),
                )
            }
            for limit in limits:
                stats = limit.stats()
                families["max"].add_metric([limit.name], stats["limit"])
                families["in_flight"].add_metric([limit.name], stats["in_flight"])
                families["queued"].add_metric([limit.name], stats["queued"])
            yield from families.values()
        if self.dashboard:
            streams = GaugeMetricFamily("sidero_dashboard_streams", "Dashboard event streams open")
            events = CounterMetricFamily(
                "sidero_dashboard_events", "Dashboard streams opened and refused, slow streams"
                " closed, rows sent, logins and failed logins, requests refused for their Host",
                labels=["event"])
            totals = {}
            for counters in self.dashboard:
                for k, v in counters().items():
                    totals[k] = totals.get(k, 0) + v
            streams.add_metric([], totals.pop("open", 0))
            for k, v in sorted(totals.items()):
                events.add_metric([k], v)
            yield streams
            yield events
        informers = [i for source in self.informers for i in source()]
        if informers:
            yield from self._informers(informers)
        controllers = [c for source in self.controllers for c in source()]
        if controllers:
            yield from self._queues(controllers)

    def _dhcp(self) -> Iterator[Metric]:
        replies = CounterMetricFamily(
            "sidero_dhcp_replies", "PXE boot offers (port 67) and acks (port 4011) sent, by client"
            " architecture", labels=["type", "arch"])
        dropped = CounterMetricFamily(
            "sidero_dhcp_dropped", "DHCP packets not answered, by reason", labels=["reason"])
        received = CounterMetricFamily("sidero_dhcp_received", "DHCP packets received")
        by_reply: dict[tuple[str, str], int] = {}
        by_reason: dict[str, int] = {}
        total = 0
        for c in self.dhcp:
            total += c.received
            for (kind, arch), n in getattr(c, "replies_by_arch", {}).items():
                by_reply[(kind, arch)] = by_reply.get((kind, arch), 0) + n
            for reason, n in (("malformed", c.malformed), ("oversized", c.oversized),
                              ("send-error", c.send_errors), ("error", c.errors),
                              *c.ignored.items()):
                by_reason[reason] = by_reason.get(reason, 0) + n
        received.add_metric([], total)
        for (kind, arch), n in sorted(by_reply.items()):
            replies.add_metric([kind, arch], n)
        for reason, n in sorted(by_reason.items()):
            dropped.add_metric([reason], n)
        yield received
        yield replies
        yield dropped

    def _tftp(self) -> Iterator[Metric]:
        transfers = CounterMetricFamily(
            "sidero_tftp_transfers", "TFTP read transfers ended, by outcome", labels=["outcome"])
        sent = CounterMetricFamily("sidero_tftp_sent_bytes", "File bytes sent over TFTP")
        retransmits = CounterMetricFamily(
            "sidero_tftp_retransmits", "TFTP packets sent again after a client went silent")
        timeouts = CounterMetricFamily(
            "sidero_tftp_timeouts", "TFTP transfers abandoned after the client stopped answering")
        rejected = CounterMetricFamily(
            "sidero_tftp_rejected", "TFTP datagrams refused before a transfer, by reason",
            labels=["reason"])
        outcomes: dict[str, int] = {}
        reasons: dict[str, int] = {}
        nbytes = nretrans = 0
        for s in self.tftp:
            for outcome, n in s.outcomes.items():
                outcomes[outcome] = outcomes.get(outcome, 0) + n
            nbytes += s.bytes_sent
            nretrans += getattr(s, "retransmits", 0)
            for reason in ("write_requests", "bad_mode", "busy", "malformed", "stray",
                           "unknown_tid", "send_errors", "internal_errors"):
                key = reason.replace("_", "-")
                reasons[key] = reasons.get(key, 0) + getattr(s, reason, 0)
        for outcome, n in sorted(outcomes.items()):
            transfers.add_metric([outcome], n)
        sent.add_metric([], nbytes)
        retransmits.add_metric([], nretrans)
        timeouts.add_metric([], outcomes.get("timeout", 0))
        for reason, n in sorted(reasons.items()):
            rejected.add_metric([reason], n)
        yield from (transfers, sent, retransmits, timeouts, rejected)

    def _informers(self, informers: Sequence[Any]) -> Iterator[Metric]:
        families = {
            name: CounterMetricFamily(f"sidero_informer_{name}", doc, labels=["informer"])
            for name, doc in (
                ("lists", "Full lists of a kind (start-up and every relist)"),
                ("relists", "Relists after a watch expired (410 Gone)"),
                ("watch_restarts", "Watches started again after they ended"),
                ("errors", "List or watch failures (the cache keeps serving meanwhile)"),
            )
        }
        synced = GaugeMetricFamily("sidero_informer_synced", "1 once the first list is cached",
                                   labels=["informer"])
        objects = GaugeMetricFamily("sidero_informer_objects", "Objects in the cache",
                                    labels=["informer"])
        seen: set[str] = set()
        for informer in informers:
            name = str(informer.name)
            if name in seen:
                continue
            seen.add(name)
            stats = getattr(informer, "stats", None)
            if stats is not None:
                for key, family in families.items():
                    family.add_metric([name], getattr(stats, key, 0))
            synced.add_metric([name], 1 if informer.has_synced else 0)
            objects.add_metric([name], len(informer))
        yield from families.values()
        yield synced
        yield objects

    def _queues(self, controllers: Sequence[Any]) -> Iterator[Metric]:
        depth = GaugeMetricFamily("workqueue_depth", "Keys waiting in a controller's queue",
                                  labels=["name"])
        active = GaugeMetricFamily("controller_runtime_active_workers",
                                   "Reconciles in flight per controller", labels=["controller"])
        delayed = GaugeMetricFamily("sidero_workqueue_delayed", "Keys waiting for a retry or"
                                    " requeue-after timer", labels=["name"])
        workers = GaugeMetricFamily("controller_runtime_max_concurrent_reconciles",
                                    "Worker count per controller", labels=["controller"])
        for c in controllers:
            name = str(c.name)
            queue = c.queue
            depth.add_metric([name], len(queue) if queue is not None else 0)
            active.add_metric([name], len(queue.processing) if queue is not None else 0)
            delayed.add_metric([name], len(queue.pending_delayed) if queue is not None else 0)
            workers.add_metric([name], c.max_concurrent_reconciles)
        yield from (depth, active, delayed, workers)


# -- /metrics ------------------------------------------------------------------------------


class MetricsRoot(Resource):
    """C{/metrics} in the text format (or OpenMetrics when asked for); 404 elsewhere."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.putChild(b"metrics", _MetricsPage(registry))

    def render(self, request: IRequest) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"404 page not found\n"

    def getChild(self, path: bytes, request: IRequest) -> IResource:
        return self


class _MetricsPage(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: IRequest) -> bytes:
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        request.setHeader(b"content-type", content_type.encode("ascii"))
        body: bytes = encoder(self.registry)
        return body

    render_HEAD = render_GET


# -- HTTP ----------------------------------------------------------------------------------


@implementer(IResource)
class InstrumentedResource:
    """Wraps the API port's root resource: one count and one latency per request.

    The wrapped resource is a leaf (klein's), so every request passes through L{render}; the
    numbers are recorded when the response has been fully written (or the client went away).
    """

    isLeaf = True

    def __init__(self, wrapped: IResource, metrics: Metrics, timeline: Any = None) -> None:
        self.wrapped = wrapped
        self.metrics = metrics
        self.timeline = timeline

    def getChildWithDefault(self, name: bytes, request: IRequest) -> IResource:
        return self.wrapped.getChildWithDefault(name, request)

    def putChild(self, path: bytes, child: IResource) -> None:
        self.wrapped.putChild(path, child)

    def render(self, request: Any) -> Any:
        started = self.metrics.clock()
        path = request.path
        method = request.method

        def finished(result: object) -> None:
            code: int | str = request.code if not isinstance(result, Failure) else "aborted"
            seconds = self.metrics.clock() - started
            self.metrics.http_request(path, method, code, seconds)
            step = TIMELINE_STEPS.get(http_route(path))
            if self.timeline is not None and step is not None:
                args = request.args or {}

                def first(name: bytes) -> str | None:
                    values = args.get(name)
                    return values[0].decode("utf-8", "replace") if values else None

                peer = request.getClientAddress()
                self.timeline.record(
                    step, source="http", ip=getattr(peer, "host", None), uuid=first(b"uuid"),
                    mac=first(b"mac"), path=path.decode("utf-8", "replace"), status=code,
                    bytes=getattr(request, "sentLength", 0), seconds=round(seconds, 3))

        request.notifyFinish().addBoth(finished)
        return self.wrapped.render(request)


#: Boot timeline steps of the HTTP routes (C{/ipxe} is recorded by the site with its decision).
TIMELINE_STEPS = {"/boot.ipxe": "boot-script", "/env": "asset", "/tftp": "http-boot-file",
                  "/configdata": "configdata"}
#: Boot timeline steps of the agent's calls (heartbeats are left out: they repeat every
#: few seconds during a wipe).
GRPC_TIMELINE_STEPS = {"CreateServer": "agent-register", "MarkServerAsWiped": "agent-wiped",
                       "UpdateBMCInfo": "agent-bmc", "ReconcileServerAddresses": "agent-addresses"}


# -- gRPC ----------------------------------------------------------------------------------


def make_grpc_interceptor(metrics: Metrics, record: Callable[..., None] | None = None) -> Any:
    """A grpc.ServerInterceptor counting every call by method and status code, and (with
    C{record}, which must be safe to call from grpcio's threads) reporting the agent's calls
    to the boot timeline.

    grpcio runs handlers in its own threads; prometheus-client is thread-safe.
    """
    import grpc

    class Interceptor(grpc.ServerInterceptor):
        def intercept_service(self, continuation: Any, details: Any) -> Any:
            handler = continuation(details)
            if handler is None:
                method = details.method
                metrics.grpc_call(method, "UNIMPLEMENTED", 0.0)
                return None
            return _wrap_handler(grpc, handler, details.method, metrics, record)

    return Interceptor()


def _code_name(context: Any, error: BaseException | None) -> str:
    code = None
    try:
        code = context.code()
    except Exception:
        code = None
    if code is None:
        return "OK" if error is None else "UNKNOWN"
    name = getattr(code, "name", None)
    return str(name) if name else str(code)


def _agent_uuid(request: Any) -> str | None:
    uuid = getattr(request, "uuid", None)
    if not uuid:
        try:
            uuid = request.hardware.system.uuid
        except AttributeError:
            uuid = None
    return str(uuid) if uuid else None


def _wrap_handler(grpc: Any, handler: Any, method: str, metrics: Metrics,
                  record: Callable[..., None] | None = None) -> Any:
    step = GRPC_TIMELINE_STEPS.get(method.rpartition("/")[2]) \
        if method.startswith(GRPC_METHOD_PREFIX) else None

    def unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
        def call(request: Any, context: Any) -> Any:
            started = metrics.clock()
            error: BaseException | None = None
            try:
                return behavior(request, context)
            except BaseException as e:
                error = e
                raise
            finally:
                code = _code_name(context, error)
                seconds = metrics.clock() - started
                metrics.grpc_call(method, code, seconds)
                if record is not None and step is not None:
                    # No address: calls reach grpcio through the API port's loopback splice.
                    record(step, source="grpc", uuid=_agent_uuid(request), code=code,
                           seconds=round(seconds, 3))
        return call

    def streaming(behavior: Callable[..., Any]) -> Callable[..., Any]:
        def call(request: Any, context: Any) -> Any:
            started = metrics.clock()
            error: BaseException | None = None
            try:
                yield from behavior(request, context)
            except BaseException as e:
                error = e
                raise
            finally:
                metrics.grpc_call(method, _code_name(context, error), metrics.clock() - started)
        return call

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            unary(handler.stream_unary), handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            streaming(handler.unary_stream), handler.request_deserializer,
            handler.response_serializer)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            streaming(handler.stream_stream), handler.request_deserializer,
            handler.response_serializer)
    return handler


# -- power ---------------------------------------------------------------------------------


@implementer(IPowerManager)
class InstrumentedPowerManager:
    """An L{IPowerManager} that counts and times each operation of the one it wraps."""

    def __init__(self, wrapped: IPowerManager, metrics: Metrics) -> None:
        self.wrapped = wrapped
        self.metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)

    @property
    def kind(self) -> str:
        return str(self.wrapped.kind)

    @property
    def is_fake(self) -> bool:
        return bool(self.wrapped.is_fake)

    def _timed(self, operation: str, d: Deferred[Any]) -> Deferred[Any]:
        started = self.metrics.clock()
        kind = self.kind

        def done(result: Any) -> Any:
            outcome = "error" if isinstance(result, Failure) else "success"
            self.metrics.power_operations.labels(kind, operation, outcome).inc()
            self.metrics.power_duration.labels(kind, operation).observe(
                max(0.0, self.metrics.clock() - started))
            return result

        return d.addBoth(done)

    def power_on(self) -> Deferred[None]:
        return self._timed("power_on", self.wrapped.power_on())

    def power_off(self) -> Deferred[None]:
        return self._timed("power_off", self.wrapped.power_off())

    def power_cycle(self) -> Deferred[None]:
        return self._timed("power_cycle", self.wrapped.power_cycle())

    def is_powered_on(self) -> Deferred[bool]:
        return self._timed("is_powered_on", self.wrapped.is_powered_on())

    def set_pxe(self, mode: str) -> Deferred[None]:
        return self._timed("set_pxe", self.wrapped.set_pxe(mode))

    def close(self) -> Deferred[None]:
        return self.wrapped.close()


# -- store ---------------------------------------------------------------------------------

_TIMED_STORE_CALLS = ("get", "list", "create", "update", "update_status", "patch", "delete")


@implementer(IResourceStore)
class TimedStore:
    """An L{IResourceStore} that times each call of the store it wraps (watches excepted:
    they last as long as they are wanted). Everything else is passed through unchanged."""

    def __init__(self, wrapped: Any, metrics: Metrics) -> None:
        self.wrapped = wrapped
        self.metrics = metrics

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.wrapped, name)
        if name not in _TIMED_STORE_CALLS:
            return attr
        return lambda *args, **kwargs: self._timed(name, attr, args, kwargs)

    def _timed(self, operation: str, call: Callable[..., Deferred[Any]], args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> Deferred[Any]:
        resource = _resource_of(args[0] if args else kwargs.get("kind", kwargs.get("obj")))
        started = self.metrics.clock()
        d = call(*args, **kwargs)

        def done(result: Any) -> Any:
            self.metrics.store_duration.labels(operation, resource).observe(
                max(0.0, self.metrics.clock() - started))
            if isinstance(result, Failure):
                reason = str(getattr(result.value, "reason", "") or type(result.value).__name__)
                self.metrics.store_errors.labels(operation, resource, reason[:40]).inc()
            return result

        return d.addBoth(done)


def _resource_of(value: Any) -> str:
    """The plural resource name of a ResourceType or an object dict, for labels."""
    plural = getattr(value, "plural", None)
    if plural:
        return str(plural)
    if isinstance(value, dict):
        from sidero.api.registry import UnknownKind, by_api_version_kind

        try:
            return str(by_api_version_kind(str(value.get("apiVersion", "")),
                                           str(value.get("kind", ""))).plural)
        except (UnknownKind, ValueError):
            return "unknown"
    return "unknown"
