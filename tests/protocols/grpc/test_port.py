"""The API port: sniffing HTTP/1.1 from h2c (spec §3.1, §8), unit-level on fakes and end to end
on loopback with a klein site, the real grpcio backend and the embedded store."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any

import grpc
import treq
from klein import Klein
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from sidero.api import conditions
from sidero.api.admission import Admission
from sidero.api.registry import SECRET, SERVER
from sidero.proto import agent_pb2 as pb
from sidero.proto import agent_pb2_grpc as pb_grpc
from sidero.protocols.grpc.port import (
    CONNECTING,
    GRPC,
    HTTP,
    PREFACE,
    ApiPortFactory,
    classify,
    make_api_port_service,
)
from sidero.protocols.grpc.server import AgentServicer, make_grpc_server
from sidero.store.embedded import EmbeddedStore

UUID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
#: An empty client SETTINGS frame: length 0, type 4, flags 0, stream 0.
SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return b"hello " + request.path


class FakeEndpoint:
    """A client endpoint whose connections land in StringTransports, at once or when released."""

    def __init__(self) -> None:
        self.transports: list[StringTransport] = []
        self.protocols: list[Protocol] = []
        self.pending: Deferred[Protocol] | None = None
        self.hold = False

    def connect(self, factory: IProtocolFactory) -> Deferred[Protocol]:
        proto = factory.buildProtocol(None)
        assert isinstance(proto, Protocol)
        t = StringTransport()
        self.transports.append(t)
        self.protocols.append(proto)

        def go() -> Protocol:
            proto.makeConnection(t)
            return proto

        if self.hold:
            self.pending = Deferred(lambda d: None)
            self.pending.addCallback(lambda _: go())
            return self.pending
        return succeed(go())


class FailingEndpoint:
    def connect(self, factory: IProtocolFactory) -> Deferred[Protocol]:
        d: Deferred[Protocol] = Deferred()
        d.errback(ConnectionRefusedError("refused"))
        return d


class SplitUnitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.endpoint = FakeEndpoint()
        self.site = Site(Hello(), reactor=self.clock)
        self.factory = ApiPortFactory(self.clock, self.site, lambda: self.endpoint,  # type: ignore[arg-type,return-value]
                                      sniff_timeout=10)

    def connect(self) -> tuple[Any, StringTransport]:
        proto = self.factory.buildProtocol(None)
        t = StringTransport()
        proto.makeConnection(t)
        return proto, t

    def test_classify(self) -> None:
        """Only the full preface is gRPC; any divergent byte is HTTP; a prefix waits."""
        self.assertEqual(classify(PREFACE), GRPC)
        self.assertEqual(classify(PREFACE + b"junk"), GRPC)
        self.assertIsNone(classify(PREFACE[:10]))
        self.assertIsNone(classify(b""))
        self.assertEqual(classify(b"GET / HTTP/1.1\r\n"), HTTP)
        self.assertEqual(classify(b"PRI * HTTP/1.1\r\n\r\n"), HTTP)

    def test_http_replayed(self) -> None:
        """A request split across reads is replayed into the HTTP channel and answered."""
        proto, t = self.connect()
        proto.dataReceived(b"GE")
        self.assertEqual(t.value(), b"")
        proto.dataReceived(b"T /x HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertIn(b"200 OK", t.value())
        self.assertTrue(t.value().endswith(b"hello /x"))
        self.assertEqual(self.endpoint.transports, [])

    def test_preface_prefix_then_http(self) -> None:
        """Bytes that start like the preface but diverge go to HTTP, all of them."""
        proto, t = self.connect()
        proto.dataReceived(b"PRI * HTTP/")
        proto.dataReceived(b"1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(proto.state, HTTP)
        self.assertTrue(t.value().startswith(b"HTTP/1.1 "))

    def test_sniff_timeout(self) -> None:
        """A client that never sends enough to decide is dropped after the sniff timeout."""
        proto, t = self.connect()
        proto.dataReceived(PREFACE[:5])
        self.clock.advance(9)
        self.assertFalse(t.disconnecting)
        self.clock.advance(2)
        self.assertTrue(t.disconnected or t.disconnecting)
        self.assertEqual(self.factory.counters["sniff_timeouts"], 1)

    def test_no_timeout_after_decision(self) -> None:
        """The sniff timer is cancelled once the connection is classified."""
        proto, t = self.connect()
        proto.dataReceived(b"GET /")
        self.clock.advance(11)
        self.assertFalse(t.disconnecting)
        self.assertEqual(self.factory.counters["sniff_timeouts"], 0)

    def test_grpc_spliced(self) -> None:
        """After the preface, bytes go to the backend verbatim both ways, with producers set."""
        proto, t = self.connect()
        proto.dataReceived(PREFACE[:7])
        proto.dataReceived(PREFACE[7:] + SETTINGS)
        [back] = self.endpoint.transports
        self.assertEqual(back.value(), PREFACE + SETTINGS)
        self.assertIs(t.producer, back)
        self.assertIs(back.producer, t)
        self.assertTrue(t.streaming and back.streaming)
        self.assertEqual(t.producerState, "producing")
        proto.dataReceived(b"more")
        self.assertEqual(back.value(), PREFACE + SETTINGS + b"more")
        self.endpoint.protocols[0].dataReceived(b"reply")
        self.assertEqual(t.value(), b"reply")

    def test_paused_while_connecting(self) -> None:
        """The client is not read while the backend connection is being made; bytes that
        arrived meanwhile are delivered first, in order."""
        self.endpoint.hold = True
        proto, t = self.connect()
        proto.dataReceived(PREFACE)
        self.assertEqual(proto.state, CONNECTING)
        self.assertEqual(t.producerState, "paused")
        proto.dataReceived(b"late")
        assert self.endpoint.pending is not None
        self.endpoint.pending.callback(None)
        [back] = self.endpoint.transports
        self.assertEqual(back.value(), PREFACE + b"late")
        self.assertEqual(t.producerState, "producing")

    def test_client_leaves_while_connecting(self) -> None:
        """A client gone before the backend answered cancels the connection attempt."""
        self.endpoint.hold = True
        proto, t = self.connect()
        proto.dataReceived(PREFACE)
        assert self.endpoint.pending is not None
        proto.connectionLost(Failure(ConnectionError()))
        self.assertEqual(self.endpoint.transports[0].value(), b"")
        self.assertEqual(self.factory.connections, set())

    def test_client_lost_closes_backend(self) -> None:
        """When the client goes away, the backend connection is closed."""
        proto, t = self.connect()
        proto.dataReceived(PREFACE)
        [back] = self.endpoint.transports
        proto.connectionLost(Failure(ConnectionError()))
        self.assertTrue(back.disconnecting)

    def test_backend_lost_closes_client(self) -> None:
        """When grpcio closes its side, the client connection is closed too."""
        proto, t = self.connect()
        proto.dataReceived(PREFACE)
        self.assertEqual(len(self.factory.backends), 1)
        self.endpoint.protocols[0].connectionLost(Failure(ConnectionError()))
        self.assertTrue(t.disconnecting)
        self.assertEqual(self.factory.backends, set())

    def test_backend_unreachable(self) -> None:
        """An unreachable backend closes the client and is counted, nothing raised."""
        factory = ApiPortFactory(self.clock, self.site, FailingEndpoint, sniff_timeout=10)  # type: ignore[arg-type]
        proto = factory.buildProtocol(None)
        t = StringTransport()
        proto.makeConnection(t)
        proto.dataReceived(PREFACE)
        self.assertTrue(t.disconnecting)
        self.assertEqual(factory.counters["backend_failures"], 1)
        self.flushLoggedErrors()


# --- end to end on loopback ------------------------------------------------------------------------

class RawClient(Protocol):
    """Collects what the server sends; C{closed} fires when the connection ends."""

    def __init__(self) -> None:
        self.data = b""
        self.closed: Deferred[None] = Deferred()
        self.waiters: list[tuple[Callable[[bytes], bool], Deferred[bytes]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        for pred, d in list(self.waiters):
            if pred(self.data):
                self.waiters.remove((pred, d))
                d.callback(self.data)

    def until(self, pred: Callable[[bytes], bool]) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        if pred(self.data):
            d.callback(self.data)
        else:
            self.waiters.append((pred, d))
        return d.addTimeout(10, global_reactor)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed.callback(None)


class ApiPortTestsMixin:
    """Starts the real port (klein + grpcio + embedded store) on 127.0.0.1, ephemeral port."""

    backend_address = "127.0.0.1:0"

    async def start(self: Any) -> None:
        self.store = EmbeddedStore(global_reactor, ":memory:", Admission())
        await self.store.open()
        self.addCleanup(lambda: Deferred.fromCoroutine(self.store.close()))
        app = Klein()

        @app.route("/boot.ipxe")
        def boot(request: Any) -> str:
            return "#!ipxe\n"

        @app.route("/echo/<word>")
        def echo(request: Any, word: str) -> str:
            return word

        self.servicer = AgentServicer(global_reactor, self.store, auto_accept_servers=True,
                                      server_reboot_timeout=600.0, call_timeout=10.0)
        self.service = make_api_port_service(
            global_reactor, app.resource(), lambda: make_grpc_server(self.servicer), 0,
            interface="127.0.0.1", backend_address=self.backend_address)
        self.service.privilegedStartService()
        self.service.startService()
        self.addCleanup(self.service.stopService)
        listener = self.service.getServiceNamed("listener")
        self.factory = listener.factory
        self.port = listener._port.getHost().port
        self.url = f"http://127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.addCleanup(self.channel.close)
        self.stub = pb_grpc.AgentStub(self.channel)

    def rpc(self: Any, method: str, request: Any) -> Deferred[Any]:
        """Call a unary RPC from a thread (grpcio blocks; the reactor must keep running)."""
        return deferToThread(getattr(self.stub, method), request, timeout=10)

    async def get(self: Any, path: str) -> tuple[int, bytes]:
        response = await treq.get(self.url + path, persistent=False)
        body = await response.content()
        return response.code, body

    async def raw(self: Any) -> RawClient:
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(global_reactor, "127.0.0.1", self.port), client)
        return client

    async def settled(self: Any) -> None:
        """Wait until no client or backend connection of the port is left open."""
        for _ in range(250):
            if not self.factory.backends and not self.factory.connections:
                return
            await deferLater(global_reactor, 0.02, lambda: None)
        self.fail(f"leaked: {len(self.factory.connections)} client, "
                  f"{len(self.factory.backends)} backend connections")


class ApiPortTests(ApiPortTestsMixin, TestCase):
    async def test_every_rpc_and_http_on_one_port(self) -> None:
        """All five Agent RPCs over h2c and HTTP/1.1 GETs are served on the same TCP port."""
        await self.start()
        code, body = await self.get("/boot.ipxe")
        self.assertEqual((code, body), (200, b"#!ipxe\n"))

        hw = pb.HardwareInformation(system=pb.SystemInformation(uuid=UUID, manufacturer="QEMU"))
        resp = await self.rpc("CreateServer", pb.CreateServerRequest(hardware=hw, hostname="n1"))
        self.assertEqual((resp.wipe, resp.setup_bmc, resp.reboot_timeout), (True, True, 600.0))
        await self.rpc("ReconcileServerAddresses", pb.ReconcileServerAddressesRequest(
            uuid=UUID, address=[pb.Address(type="InternalIP", address="192.0.2.7")]))
        await self.rpc("Heartbeat", pb.HeartbeatRequest(uuid=UUID))
        obj = await self.store.get(SERVER, UUID)
        self.assertEqual(conditions.reason(obj, "PowerCycle"), "InProgress")
        await self.rpc("MarkServerAsWiped", pb.MarkServerAsWipedRequest(uuid=UUID))
        await self.rpc("UpdateBMCInfo", pb.UpdateBMCInfoRequest(
            uuid=UUID, bmc_info=pb.BMCInfo(ip="192.0.2.8", user="sidero", **{"pass": "pw"})))

        code, body = await self.get("/echo/still-here")
        self.assertEqual((code, body), (200, b"still-here"))
        obj = await self.store.get(SERVER, UUID)
        self.assertEqual(obj["spec"]["hostname"], "n1")
        self.assertEqual(obj["status"]["addresses"], [{"type": "InternalIP", "address": "192.0.2.7"}])
        self.assertIs(obj["status"]["isClean"], True)
        self.assertTrue(conditions.is_true(obj, "PowerCycle"))
        self.assertEqual(obj["spec"]["bmc"]["endpoint"], "192.0.2.8")
        secret = await self.store.get(SECRET, f"{UUID}-bmc", "default")
        self.assertEqual(secret["metadata"]["ownerReferences"][0]["uid"], obj["metadata"]["uid"])
        resp = await self.rpc("CreateServer", pb.CreateServerRequest(hardware=hw))
        self.assertEqual((resp.wipe, resp.setup_bmc), (False, False))
        self.assertGreaterEqual(self.factory.counters["grpc"], 1)
        self.assertGreaterEqual(self.factory.counters["http"], 2)

    async def test_grpc_errors(self) -> None:
        """A store error is UNKNOWN with the Kubernetes text; an unknown method is UNIMPLEMENTED."""
        await self.start()
        with self.assertRaises(grpc.RpcError) as caught:
            await self.rpc("Heartbeat", pb.HeartbeatRequest(uuid="missing"))
        self.assertEqual(caught.exception.code(), grpc.StatusCode.UNKNOWN)
        self.assertIn('"missing" not found', caught.exception.details())

        other = self.channel.unary_unary("/sidero.link.ProvisionService/Provision",
                                         request_serializer=lambda b: b,
                                         response_deserializer=lambda b: b)
        with self.assertRaises(grpc.RpcError) as caught:
            await deferToThread(other, b"", timeout=10)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.UNIMPLEMENTED)

    async def test_http_keepalive_and_pipelining(self) -> None:
        """Two pipelined HTTP/1.1 requests in one write, then a third on the same connection,
        are all answered in order."""
        await self.start()
        client = await self.raw()
        client.transport.write(  # type: ignore[union-attr]
            b"GET /echo/one HTTP/1.1\r\nHost: x\r\n\r\nGET /echo/two HTTP/1.1\r\nHost: x\r\n\r\n")
        data = await client.until(lambda d: b"two" in d and d.endswith(b"0\r\n\r\n"))
        self.assertEqual(data.count(b"HTTP/1.1 200 OK"), 2)
        self.assertLess(data.index(b"one"), data.index(b"two"))
        client.transport.write(b"GET /echo/three HTTP/1.1\r\nHost: x\r\n\r\n")  # type: ignore[union-attr]
        data = await client.until(lambda d: b"three" in d and d.endswith(b"0\r\n\r\n"))
        self.assertEqual(data.count(b"HTTP/1.1 200 OK"), 3)
        self.assertEqual(self.factory.counters["http"], 1)
        client.transport.loseConnection()  # type: ignore[union-attr]
        await client.closed
        await self.settled()

    async def test_preface_split_across_segments(self) -> None:
        """A preface sent in three TCP segments still reaches grpcio, which answers SETTINGS."""
        await self.start()
        client = await self.raw()
        sock = client.transport.getHandle()  # type: ignore[union-attr]
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for chunk in (PREFACE[:3], PREFACE[3:17], PREFACE[17:] + SETTINGS):
            client.transport.write(chunk)  # type: ignore[union-attr]
            await deferLater(global_reactor, 0.05, lambda: None)
        data = await client.until(lambda d: len(d) >= 9)
        self.assertEqual(data[3], 0x04)  # the server's first frame is its SETTINGS
        self.assertEqual(len(self.factory.backends), 1)
        client.transport.loseConnection()  # type: ignore[union-attr]
        await client.closed
        await self.settled()

    async def test_garbage_after_preface(self) -> None:
        """Garbage after a valid preface: grpcio gives up, both connections close, and the
        port keeps serving gRPC and HTTP."""
        await self.start()
        client = await self.raw()
        client.transport.write(PREFACE + b"\xff" * 64 + b"this is not HTTP/2\r\n" * 4)  # type: ignore[union-attr]
        await client.closed.addTimeout(10, global_reactor)
        await self.settled()
        hw = pb.HardwareInformation(system=pb.SystemInformation(uuid=UUID))
        resp = await self.rpc("CreateServer", pb.CreateServerRequest(hardware=hw))
        self.assertTrue(resp.wipe)
        self.assertEqual((await self.get("/boot.ipxe"))[0], 200)

    async def test_client_disconnects_mid_stream(self) -> None:
        """A client that aborts mid-stream (headers sent, body never) leaves no connection
        behind, and the port keeps serving."""
        await self.start()
        client = await self.raw()
        # Preface, SETTINGS, then a HEADERS frame (stream 1, END_HEADERS, no END_STREAM)
        # announcing a body that never comes.
        headers = b"\x82\x86\x84\x41\x01x"  # :method POST, :scheme http, :path /, :authority x
        frame = len(headers).to_bytes(3, "big") + b"\x01\x04" + b"\x00\x00\x00\x01" + headers
        client.transport.write(PREFACE + SETTINGS + frame)  # type: ignore[union-attr]
        await client.until(lambda d: len(d) >= 9)
        self.assertEqual(len(self.factory.backends), 1)
        client.transport.abortConnection()  # type: ignore[union-attr]
        await client.closed
        await self.settled()
        self.assertEqual((await self.get("/echo/ok")), (200, b"ok"))
        await self.rpc("CreateServer", pb.CreateServerRequest(
            hardware=pb.HardwareInformation(system=pb.SystemInformation(uuid=UUID))))

    async def test_many_connections_no_leak(self) -> None:
        """A burst of gRPC channels and HTTP requests leaves no connection open once done."""
        await self.start()
        hw = pb.HardwareInformation(system=pb.SystemInformation(uuid=UUID))

        def burst() -> None:
            for _ in range(10):
                # A private subchannel pool, so each channel is its own TCP connection.
                with grpc.insecure_channel(f"127.0.0.1:{self.port}",
                                           options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                    pb_grpc.AgentStub(channel).CreateServer(
                        pb.CreateServerRequest(hardware=hw), timeout=10)

        await deferToThread(burst)
        for i in range(10):
            self.assertEqual(await self.get(f"/echo/{i}"), (200, str(i).encode()))
        await self.settled()
        self.assertGreaterEqual(self.factory.counters["grpc"], 10)


class StopTests(ApiPortTestsMixin, TestCase):
    async def test_stop_lets_inflight_rpc_finish(self) -> None:
        """Stopping while an RPC waits on the store does not deadlock: the reactor keeps
        serving the RPC's store call, the RPC succeeds, and the stop completes."""
        await self.start()
        real_get = self.store.get
        gate: Deferred[None] = Deferred()
        entered: Deferred[None] = Deferred()

        def slow_get(*a: Any, **kw: Any) -> Deferred[Any]:
            if not entered.called:
                entered.callback(None)
            return gate.addCallback(lambda _: None).addCallback(lambda _: real_get(*a, **kw))

        self.store.get = slow_get  # type: ignore[method-assign]
        hw = pb.HardwareInformation(system=pb.SystemInformation(uuid=UUID))
        call = self.rpc("CreateServer", pb.CreateServerRequest(hardware=hw))
        await entered
        stopped = self.service.stopService()
        global_reactor.callLater(0.2, gate.callback, None)
        resp = await call
        self.assertTrue(resp.wipe)
        await stopped
        self.assertEqual(self.factory.connections, set())


class UnixBackendTests(ApiPortTestsMixin, TestCase):
    """The same port with grpcio on a UNIX socket instead of a loopback TCP port."""

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="sidero-grpc-")
        self.backend_address = f"unix:{self.tmp}/agent.sock"
        self.addCleanup(os.rmdir, self.tmp)

    async def test_rpc_over_unix_backend(self) -> None:
        """RPCs work with a UNIX-socket backend, and the socket file is removed on stop."""
        await self.start()
        hw = pb.HardwareInformation(system=pb.SystemInformation(uuid=UUID))
        resp = await self.rpc("CreateServer", pb.CreateServerRequest(hardware=hw))
        self.assertTrue(resp.wipe)
        self.assertTrue(os.path.exists(f"{self.tmp}/agent.sock"))
        await self.service.stopService()
        self.assertFalse(os.path.exists(f"{self.tmp}/agent.sock"))

