"""The agent's gRPC client: retry rules on a fake clock, heartbeats, and real h2c to the API
port (grpcio backend spliced behind our one-port listener, embedded store)."""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource

from sidero.agent.client import AgentClient, Heartbeat, RequestTooLarge, RetriesExhausted, retry
from sidero.api.registry import SERVER
from sidero.proto import agent_pb2 as pb
from sidero.protocols.grpc.port import make_api_port_service
from sidero.protocols.grpc.server import AgentServicer, make_grpc_server
from sidero.store.embedded import EmbeddedStore
from tests.ports import free_tcp_port

UUID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class RetryTests(SynchronousTestCase):
    def test_retries_until_success(self) -> None:
        """Failures are retried every interval; the first success is returned."""
        clock = FakeClock()
        outcomes: list[Any] = [RuntimeError("down"), RuntimeError("down"), "ok"]

        def call() -> Any:
            item = outcomes.pop(0)
            if isinstance(item, Exception):
                raise item
            return item

        self.assertEqual(retry("X", call, sleep=clock.sleep, monotonic=clock.monotonic), "ok")
        self.assertEqual(clock.sleeps, [30.0, 30.0])

    def test_gives_up_after_timeout(self) -> None:
        """After five minutes of 30 s retries the last error is raised, naming the call."""
        clock = FakeClock()

        def call() -> None:
            raise RuntimeError("connection refused")

        with self.assertRaises(RetriesExhausted) as e:
            retry("CreateServer", call, sleep=clock.sleep, monotonic=clock.monotonic)
        self.assertEqual(len(clock.sleeps), 10)
        self.assertIn("CreateServer failed after 11 attempts: connection refused",
                      str(e.exception))


class RecordingStub:
    def __init__(self) -> None:
        self.heartbeats: list[tuple[str, float]] = []
        self.fail = False
        self.event = threading.Event()

    def Heartbeat(self, request: pb.HeartbeatRequest, timeout: float) -> pb.HeartbeatResponse:
        self.heartbeats.append((request.uuid, timeout))
        if len(self.heartbeats) >= 3:
            self.event.set()
        if self.fail:
            raise RuntimeError("unavailable")
        return pb.HeartbeatResponse()


class HeartbeatTests(SynchronousTestCase):
    def test_immediately_and_periodically(self) -> None:
        """One heartbeat at once, then one per interval, each bounded by the interval; errors
        are counted and do not stop it."""
        stub = RecordingStub()
        stub.fail = True
        hb = Heartbeat(AgentClient(stub), UUID, 0.1).start()  # type: ignore[arg-type]
        self.assertTrue(stub.event.wait(10))
        hb.stop()
        count = len(stub.heartbeats)
        self.assertGreaterEqual(count, 3)
        self.assertEqual(set(stub.heartbeats), {(UUID, 0.1)})
        self.assertEqual(hb.failed, count)
        stub.event.wait(0.3)
        self.assertEqual(len(stub.heartbeats), count, "heartbeats went on after stop()")


class RealPortTests(TestCase):
    """Every RPC over real h2c to the API port, retries short."""

    timeout = 60

    async def test_all_rpcs(self) -> None:
        """CreateServer registers, ReconcileServerAddresses, Heartbeat, MarkServerAsWiped and
        UpdateBMCInfo all land in the store; a refused endpoint exhausts the retries."""
        store = EmbeddedStore(reactor, ":memory:")
        await store.open()
        self.addCleanup(store.close)
        servicer = AgentServicer(reactor, store, auto_accept_servers=True,
                                 server_reboot_timeout=60)
        service = make_api_port_service(reactor, Resource(), lambda: make_grpc_server(servicer),
                                        0, interface="127.0.0.1")
        service.startService()
        self.addCleanup(service.stopService)
        port = service.getServiceNamed("listener")._port.getHost().port  # type: ignore[attr-defined]
        client = AgentClient.connect(f"127.0.0.1:{port}", retry_interval=0.2, retry_timeout=5)
        self.addCleanup(client.close)
        hw = pb.HardwareInformation(system=pb.SystemInformation(uuid=UUID, manufacturer="M"))

        def flow() -> pb.CreateServerResponse:
            response = client.create_server(hw, "node-1")
            client.reconcile_addresses(UUID, ["10.0.0.5", "fd00::5"])
            client.heartbeat(UUID, 5)
            client.mark_wiped(UUID)
            info = pb.BMCInfo(ip="10.9.9.9", user="sidero")
            setattr(info, "pass", "pw")
            client.update_bmc_info(UUID, info)
            return response

        response = await deferToThread(flow)
        self.assertEqual((response.wipe, response.insecure_wipe, response.setup_bmc,
                          response.reboot_timeout), (True, True, True, 60.0))
        server = await store.get(SERVER, UUID)
        self.assertEqual(server["spec"]["hostname"], "node-1")
        self.assertEqual(server["status"]["addresses"], [
            {"type": "InternalIP", "address": "10.0.0.5"},
            {"type": "InternalIP", "address": "fd00::5"}])
        self.assertIs(server["status"]["isClean"], True)
        self.assertEqual(server["spec"]["bmc"]["endpoint"], "10.9.9.9")

        # A 5 MiB inventory is past the server's 4 MiB limit (grpc-go's default): grpcio
        # answers RESOURCE_EXHAUSTED before the servicer runs, the client does not retry it
        # (a retry would sleep first: none did), and the port still serves the next call.
        big = pb.HardwareInformation(system=pb.SystemInformation(
            uuid=UUID, manufacturer="M" * (5 * 1024 * 1024)))
        sleeps: list[float] = []
        client.sleep = sleeps.append
        with self.assertRaises(RequestTooLarge) as too_large:
            await deferToThread(client.create_server, big, "node-1")
        self.assertIn(grpc.StatusCode.RESOURCE_EXHAUSTED.name, str(too_large.exception))
        self.assertIn("vs. 4194304", str(too_large.exception))
        self.assertEqual(sleeps, [])
        self.assertEqual((await store.get(SERVER, UUID))["spec"]["hostname"], "node-1")
        await deferToThread(client.heartbeat, UUID, 5)

        refused = AgentClient.connect("127.0.0.1:1", retry_interval=0.1, retry_timeout=0.5,
                                      call_timeout=0.5)
        self.addCleanup(refused.close)
        with self.assertRaises(RetriesExhausted) as e:
            await deferToThread(refused.mark_wiped, UUID)
        self.assertIn(grpc.StatusCode.UNAVAILABLE.name, str(e.exception))

    async def test_reaches_a_restarted_service_at_the_next_attempt(self) -> None:
        """After the service was away long enough for gRPC's reconnect backoff to grow past
        the retry interval (10 s: attempts at about 1, 2.6, 5.2, 9.3, 15.9 s without the cap), a call
        succeeds within about one retry interval of the service's return (a sidero restart
        after kill -9 must not leave agents waiting minutes)."""
        store = EmbeddedStore(reactor, ":memory:")
        await store.open()
        self.addCleanup(store.close)
        servicer = AgentServicer(reactor, store, server_reboot_timeout=60)
        port = free_tcp_port()
        client = AgentClient.connect(f"127.0.0.1:{port}", retry_interval=0.5, retry_timeout=40)
        self.addCleanup(client.close)
        hw = pb.HardwareInformation(system=pb.SystemInformation(uuid=UUID, manufacturer="M"))
        answered: list[float] = []

        def register() -> None:
            client.create_server(hw, "node-1")
            answered.append(time.monotonic())

        calling = deferToThread(register)
        await deferLater(reactor, 10.0, lambda: None)
        self.assertEqual(answered, [])
        service = make_api_port_service(reactor, Resource(), lambda: make_grpc_server(servicer),
                                        port, interface="127.0.0.1")
        service.startService()
        self.addCleanup(service.stopService)
        up = time.monotonic()
        await calling
        self.assertLess(answered[0] - up, 2.0, "the service was back but the agent did not try")
        server = await store.get(SERVER, UUID)
        self.assertEqual(server["spec"]["hostname"], "node-1")
