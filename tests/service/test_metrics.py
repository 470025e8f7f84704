"""sidero.metrics: per-tree registries, the collectors over protocol counters, the wrappers,
and /metrics served by the real service tree and scraped by a real Prometheus."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from typing import Any

import treq
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from sidero import tap
from sidero.api.registry import SERVER
from sidero.metrics import Metrics, TimedStore, grpc_method_label, http_route
from sidero.power.fake import FakePowerManager
from sidero.power.interfaces import PowerError
from sidero.protocols.dhcp.protocol import DHCPCounters
from sidero.protocols.tftp.protocol import TFTPStats
from sidero.store.errors import NotFound
from tests.ports import free_tcp_port, free_udp_port
from tests.service.test_tap import settings_for

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the registry as {(name, sorted labels): value}, via the text format."""
    from prometheus_client import generate_latest

    found = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(metrics: Metrics, metric: str, /, **labels: str) -> float | None:
    return samples(metrics).get((metric, tuple(sorted(labels.items()))))


class RegistryTests(SynchronousTestCase):
    """Each Metrics has its own registry; nothing reaches the global default one."""

    def test_registries_are_separate(self) -> None:
        """Counting in one tree's Metrics leaves another's and the global registry alone."""
        a, b = Metrics(), Metrics()
        a.reconciled("server", "success", 0.2)
        self.assertEqual(value(a, "controller_runtime_reconcile_total",
                               controller="server", result="success"), 1.0)
        self.assertIsNone(value(b, "controller_runtime_reconcile_total",
                                controller="server", result="success"))
        self.assertIsNone(REGISTRY.get_sample_value(
            "controller_runtime_reconcile_total", {"controller": "server", "result": "success"}))

    def test_reconcile_errors_and_histogram(self) -> None:
        """An error counts in the result counter, the error counter and the duration histogram."""
        m = Metrics()
        m.reconciled("environment", "error", 0.03)
        m.reconciled("environment", "success", 2.0)
        self.assertEqual(value(m, "controller_runtime_reconcile_errors_total",
                               controller="environment"), 1.0)
        self.assertEqual(value(m, "controller_runtime_reconcile_time_seconds_count",
                               controller="environment"), 2.0)
        self.assertEqual(value(m, "controller_runtime_reconcile_time_seconds_bucket",
                               controller="environment", le="0.05"), 1.0)

    def test_route_labels_are_bounded(self) -> None:
        """Known routes keep their name; anything else is 'other'."""
        self.assertEqual(http_route(b"/boot.ipxe"), "/boot.ipxe")
        self.assertEqual(http_route(b"/ipxe?uuid=x"), "/ipxe")
        self.assertEqual(http_route(b"/env/default/vmlinuz-amd64"), "/env")
        self.assertEqual(http_route(b"/tftp/ipxe.efi"), "/tftp")
        self.assertEqual(http_route(b"/ipxe/extra"), "other")
        self.assertEqual(http_route(b"/random/scanner/path"), "other")
        self.assertEqual(grpc_method_label("/api.Agent/CreateServer"), "/api.Agent/CreateServer")
        self.assertEqual(grpc_method_label("/sidero.link.ProvisionService/Provision"), "sidero.link")
        self.assertEqual(grpc_method_label("/x/" + "y" * 100), "other")


class CollectorTests(SynchronousTestCase):
    """Collectors read the plain counters protocols keep, at scrape time."""

    def test_dhcp(self) -> None:
        """Replies by type and architecture; drops by reason, including ignored requests."""
        m = Metrics()
        counters = DHCPCounters()
        m.add_dhcp(counters)
        counters.received = 5
        counters.malformed = 2
        counters.replies_by_arch[("offer", "x86-64-efi")] = 3
        counters.ignored["not-pxe"] = counters.ignored.get("not-pxe", 0) + 4
        self.assertEqual(value(m, "sidero_dhcp_received_total"), 5.0)
        self.assertEqual(value(m, "sidero_dhcp_replies_total", type="offer", arch="x86-64-efi"), 3.0)
        self.assertEqual(value(m, "sidero_dhcp_dropped_total", reason="malformed"), 2.0)
        self.assertEqual(value(m, "sidero_dhcp_dropped_total", reason="not-pxe"), 4.0)
        counters.malformed += 1
        self.assertEqual(value(m, "sidero_dhcp_dropped_total", reason="malformed"), 3.0)

    def test_tftp(self) -> None:
        """Transfers by outcome, bytes, retransmits and timeouts."""
        m = Metrics()
        stats = TFTPStats()
        m.add_tftp(stats)
        stats.outcomes["complete"] += 2
        stats.outcomes["timeout"] += 1
        stats.bytes_sent = 1 << 20
        stats.retransmits = 7
        stats.busy = 1
        self.assertEqual(value(m, "sidero_tftp_transfers_total", outcome="complete"), 2.0)
        self.assertEqual(value(m, "sidero_tftp_timeouts_total"), 1.0)
        self.assertEqual(value(m, "sidero_tftp_sent_bytes_total"), float(1 << 20))
        self.assertEqual(value(m, "sidero_tftp_retransmits_total"), 7.0)
        self.assertEqual(value(m, "sidero_tftp_rejected_total", reason="busy"), 1.0)

    def test_informers_and_queues(self) -> None:
        """Informer counters and synced state; work queue depth per controller."""
        from twisted.internet.task import Clock

        from sidero.controllers.informer import InformerStats
        from sidero.controllers.workqueue import WorkQueue

        class FakeInformer:
            name = "informer-servers"
            has_synced = True
            stats = InformerStats(lists=2, relists=1, watch_restarts=3, errors=1)

            def __len__(self) -> int:
                return 4

        class FakeController:
            name = "server"
            max_concurrent_reconciles = 10
            queue: WorkQueue[str] = WorkQueue(Clock())

        FakeController.queue.add("a")
        FakeController.queue.add("b")
        m = Metrics()
        m.add_informers(lambda: [FakeInformer()])
        m.add_controllers(lambda: [FakeController()])
        self.assertEqual(value(m, "sidero_informer_relists_total", informer="informer-servers"), 1.0)
        self.assertEqual(value(m, "sidero_informer_watch_restarts_total",
                               informer="informer-servers"), 3.0)
        self.assertEqual(value(m, "sidero_informer_synced", informer="informer-servers"), 1.0)
        self.assertEqual(value(m, "sidero_informer_objects", informer="informer-servers"), 4.0)
        self.assertEqual(value(m, "workqueue_depth", name="server"), 2.0)


class FailingPower(FakePowerManager):
    def power_on(self) -> Deferred[None]:
        return fail(PowerError("BMC away"))


class WrapperTests(SynchronousTestCase):
    """Power and store wrappers count and time what they pass through."""

    def test_power(self) -> None:
        """Successes and failures per operation; the failure still reaches the caller."""
        m = Metrics()
        ok = m.instrument_power(FakePowerManager())
        bad = m.instrument_power(FailingPower())
        self.assertIsNone(self.successResultOf(ok.power_on()))
        self.failureResultOf(bad.power_on(), PowerError)
        self.assertTrue(ok.is_fake)
        self.assertEqual(value(m, "sidero_power_operations_total", kind="fake",
                               operation="power_on", result="success"), 1.0)
        self.assertEqual(value(m, "sidero_power_operations_total", kind="fake",
                               operation="power_on", result="error"), 1.0)

    def test_store(self) -> None:
        """Store calls are timed per operation and resource; failures counted by reason."""
        clock = iter([0.0, 0.004, 1.0, 1.5]).__next__

        class Store:
            api_client = "client"

            def get(self, kind: Any, name: str, namespace: str | None = None) -> Deferred[Any]:
                if name == "missing":
                    return fail(NotFound("servers", name))
                return succeed({"metadata": {"name": name}})

        m = Metrics(clock=clock)
        store = TimedStore(Store(), m)
        self.assertEqual(self.successResultOf(store.get(SERVER, "a"))["metadata"]["name"], "a")
        self.failureResultOf(store.get(SERVER, "missing"), NotFound)
        self.assertEqual(store.api_client, "client")
        self.assertEqual(value(m, "sidero_store_request_duration_seconds_count",
                               operation="get", resource="servers"), 2.0)
        self.assertEqual(value(m, "sidero_store_request_duration_seconds_bucket",
                               operation="get", resource="servers", le="0.005"), 1.0)
        self.assertEqual(value(m, "sidero_store_request_errors_total", operation="get",
                               resource="servers", reason="NotFound"), 1.0)


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        if request.path == b"/ipxe":
            request.setResponseCode(404)
        return b"hi"


class HTTPAndGrpcTests(TestCase):
    """The HTTP wrapper on a real loopback site; the gRPC interceptor on a real grpcio server."""

    timeout = 30

    async def test_http_requests(self) -> None:
        """Requests are counted by route, method and status code, with a latency each."""
        m = Metrics()
        port = global_reactor.listenTCP(0, Site(m.instrument_resource(Hello())),
                                        interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        base = f"http://127.0.0.1:{port.getHost().port}"
        for path in ("/boot.ipxe", "/boot.ipxe", "/ipxe", "/nope"):
            response = await treq.get(base + path, persistent=False)
            await response.content()
        self.assertEqual(value(m, "sidero_http_requests_total", route="/boot.ipxe", method="GET",
                               code="200"), 2.0)
        self.assertEqual(value(m, "sidero_http_requests_total", route="/ipxe", method="GET",
                               code="404"), 1.0)
        self.assertEqual(value(m, "sidero_http_requests_total", route="other", method="GET",
                               code="200"), 1.0)
        self.assertEqual(value(m, "sidero_http_request_duration_seconds_count",
                               route="/boot.ipxe"), 2.0)

    async def test_grpc_calls(self) -> None:
        """Calls are counted by method and final status code (OK and an abort)."""
        from concurrent import futures

        import grpc

        m = Metrics()

        def echo(request: bytes, context: Any) -> bytes:
            if request == b"bad":
                context.abort(grpc.StatusCode.NOT_FOUND, "no such server")
            return request

        handler = grpc.method_handlers_generic_handler("api.Agent", {
            "Echo": grpc.unary_unary_rpc_method_handler(echo)})
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                             interceptors=[m.grpc_interceptor()], handlers=[handler])
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.addCleanup(server.stop, None)

        def calls() -> None:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                echo_call = channel.unary_unary("/api.Agent/Echo")
                assert echo_call(b"x", timeout=10) == b"x"
                try:
                    echo_call(b"bad", timeout=10)
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.NOT_FOUND
                try:
                    channel.unary_unary("/api.Agent/Missing")(b"", timeout=10)
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNIMPLEMENTED

        from twisted.internet.threads import deferToThread

        await deferToThread(calls)
        self.assertEqual(value(m, "sidero_grpc_server_handled_total", method="/api.Agent/Echo",
                               code="OK"), 1.0)
        self.assertEqual(value(m, "sidero_grpc_server_handled_total", method="/api.Agent/Echo",
                               code="NOT_FOUND"), 1.0)
        self.assertEqual(value(m, "sidero_grpc_server_handled_total", method="/api.Agent/Missing",
                               code="UNIMPLEMENTED"), 1.0)


async def wait_for(predicate: Any, what: str, timeout: float = 30.0, step: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(global_reactor, step, lambda: None)


class ServiceTreeMetricsTests(TestCase):
    """The real service tree serves /metrics on --metrics-port; --disable-metrics does not."""

    timeout = 120

    def start_tree(self, *flags: str) -> tuple[tap.SideroService, int, int]:
        state_dir = os.path.abspath(self.mktemp())
        api_port, metrics_port = free_tcp_port(), free_tcp_port()
        settings = settings_for(
            state_dir, "disable_dhcp_proxy", *flags, api_port=str(api_port), http_port=str(api_port),
            metrics_port=str(metrics_port), health_port=str(free_tcp_port()),
            tftp_port=str(free_udp_port()), listen_address="127.0.0.1",
        )
        root = tap.build_service(settings, global_reactor)
        root.exit_on_start_failure = False
        root.startService()
        self.addCleanup(root.stopService)
        return root, api_port, metrics_port

    async def test_tree_metrics(self) -> None:
        """HTTP requests, reconciles, store calls and informers of the tree are on /metrics."""
        root, api_port, metrics_port = self.start_tree()
        await root.when_started()
        response = await treq.get(f"http://127.0.0.1:{api_port}/boot.ipxe", persistent=False)
        await response.content()
        metrics = root.context.metrics

        async def reconciled() -> bool:
            return bool(value(metrics, "controller_runtime_reconcile_total",
                              controller="serverclass", result="success"))

        await wait_for(reconciled, "a serverclass reconcile")
        response = await treq.get(f"http://127.0.0.1:{metrics_port}/metrics", persistent=False)
        self.assertEqual(response.code, 200)
        text = (await response.content()).decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        for name in ("sidero_http_requests", "controller_runtime_reconcile",
                     "sidero_store_request_duration_seconds", "sidero_informer_lists",
                     "workqueue_depth", "sidero_tftp_transfers", "sidero_api_port_connections"):
            self.assertIn(name, families)
        self.assertIn('sidero_http_requests_total{code="200",method="GET",route="/boot.ipxe"} 1.0',
                      text)
        response = await treq.get(f"http://127.0.0.1:{metrics_port}/other", persistent=False)
        await response.content()
        self.assertEqual(response.code, 404)

    async def test_disable_metrics(self) -> None:
        """--disable-metrics: no metrics child and nothing listens on the port."""
        root, api_port, metrics_port = self.start_tree("disable_metrics")
        await root.when_started()
        self.assertNotIn("metrics", [c.name for c in root])
        with self.assertRaises(ConnectionRefusedError):
            await treq.get(f"http://127.0.0.1:{metrics_port}/metrics", persistent=False)
        # The API port still works: only the exposition is off.
        response = await treq.get(f"http://127.0.0.1:{api_port}/boot.ipxe", persistent=False)
        self.assertEqual(response.code, 200)
        await response.content()


class PrometheusScrapeTests(TestCase):
    """A real Prometheus (Debian's) scrapes the tree and can query what it exposes."""

    timeout = 180

    def setUp(self) -> None:
        if not os.access(PROMETHEUS, os.X_OK):
            raise self.skipException(f"LOUD SKIP: {PROMETHEUS} is not installed (Debian package"
                                     " prometheus, in scripts/install-test-deps)")

    async def query(self, base: str, promql: str) -> list[dict[str, Any]]:
        response = await treq.get(base + "/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}), persistent=False)
        body = json.loads(await response.content())
        self.assertEqual(body["status"], "success", body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def test_real_prometheus_scrape(self) -> None:
        """Prometheus's target is up with no scrape error, and our series are queryable."""
        state_dir = os.path.abspath(self.mktemp())
        api_port, metrics_port, prom_port = free_tcp_port(), free_tcp_port(), free_tcp_port()
        settings = settings_for(
            state_dir, "disable_dhcp_proxy", api_port=str(api_port), http_port=str(api_port),
            metrics_port=str(metrics_port), health_port=str(free_tcp_port()),
            tftp_port=str(free_udp_port()), listen_address="127.0.0.1",
        )
        root = tap.build_service(settings, global_reactor)
        root.exit_on_start_failure = False
        root.startService()
        self.addCleanup(root.stopService)
        await root.when_started()
        for _ in range(3):
            response = await treq.get(f"http://127.0.0.1:{api_port}/boot.ipxe", persistent=False)
            await response.content()

        work = tempfile.mkdtemp(prefix="sidero-prom-")
        self.addCleanup(shutil.rmtree, work, True)
        config = os.path.join(work, "prometheus.yml")
        with open(config, "w") as f:
            f.write(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                "scrape_configs:\n  - job_name: sidero\n    static_configs:\n"
                f"      - targets: ['127.0.0.1:{metrics_port}']\n"
            )
        log = open(os.path.join(work, "prometheus.log"), "wb")
        self.addCleanup(log.close)
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={work}/data",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--storage.tsdb.retention.time=1h"],
            stdout=log, stderr=subprocess.STDOUT,
        )

        def stop() -> None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

        self.addCleanup(stop)
        base = f"http://127.0.0.1:{prom_port}"

        async def target_up() -> Any:
            if proc.poll() is not None:
                with open(os.path.join(work, "prometheus.log")) as f:
                    raise AssertionError("prometheus exited: " + f.read()[-2000:])
            try:
                response = await treq.get(base + "/api/v1/targets", persistent=False)
                body = json.loads(await response.content())
            except (OSError, ConnectionRefusedError, ValueError):
                return None
            active = body.get("data", {}).get("activeTargets", [])
            if active and active[0]["health"] == "up":
                return active[0]
            return None

        target = await wait_for(target_up, "prometheus to scrape sidero", timeout=90, step=0.5)
        self.assertEqual(target["lastError"], "")
        self.assertEqual(target["labels"]["job"], "sidero")

        async def boot_requests() -> Any:
            result = await self.query(
                base, 'sidero_http_requests_total{route="/boot.ipxe",code="200"}')
            return result if result and float(result[0]["value"][1]) >= 3 else None

        result = await wait_for(boot_requests, "the boot.ipxe requests in prometheus", timeout=60)
        self.assertEqual(result[0]["metric"]["job"], "sidero")
        hist = await self.query(
            base, 'sidero_http_request_duration_seconds_bucket{route="/boot.ipxe",le="+Inf"}')
        self.assertGreaterEqual(float(hist[0]["value"][1]), 3)
        up = await self.query(base, 'up{job="sidero"}')
        self.assertEqual(up[0]["value"][1], "1")
        # Names Prometheus saw: every family of the tree, so none was rejected at parse time.
        response = await treq.get(base + "/api/v1/label/__name__/values", persistent=False)
        names = set(json.loads(await response.content())["data"])
        for name in ("controller_runtime_reconcile_total", "sidero_store_request_duration_seconds_bucket",
                     "workqueue_depth", "sidero_informer_synced", "sidero_tftp_sent_bytes_total"):
            self.assertIn(name, names)
