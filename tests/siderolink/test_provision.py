"""SideroLink Provision (spec §3.8) on the embedded store (inline SQLite, real admission), and
over h2c on the real API port with a grpcio client."""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource

from sidero.api.admission import Admission
from sidero.api.registry import SERVER_BINDING
from sidero.proto import provision_pb2 as pb
from sidero.proto import provision_pb2_grpc as pb_grpc
from sidero.protocols.grpc.port import make_api_port_service
from sidero.protocols.grpc.server import AgentServicer, make_grpc_server
from sidero.siderolink.config import SideroLinkConfig, generate_private_key, public_key
from sidero.siderolink.provision import (
    ProvisionAPI,
    ProvisionError,
    ProvisionServicer,
    add_to_server,
    format_endpoint,
)
from sidero.store.embedded import EmbeddedStore
from sidero.store.errors import BadRequest
from tests.store.flaky import FlakyStore
from tests.store.inline import open_inline_store

UUID = "8d2ba7a4-5b6c-4e8a-9f00-1c2d3e4f5a6b"
IDENTITY = SideroLinkConfig("installation-a", generate_private_key())
NODE_KEY = public_key(generate_private_key())


@dataclass
class Link:
    identity: SideroLinkConfig | None = IDENTITY
    public_endpoint: str | None = "192.0.2.1:51821"
    unavailable: str | None = None


def binding(name: str = UUID, **siderolink: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"metalMachineRef": {"kind": "MetalMachine", "namespace": "default",
                                                "name": "mm-0"}}
    if siderolink:
        spec["siderolink"] = siderolink
    return {"apiVersion": SERVER_BINDING.api_version, "kind": "ServerBinding",
            "metadata": {"name": name, "labels": {"cluster.x-k8s.io/cluster-name": "c1"}},
            "spec": spec}


class ProvisionAPITests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store: EmbeddedStore
        self.store, self.clock = open_inline_store(self, admission=Admission())
        self.link = Link()
        self.salt = bytes(range(1, 9))
        self.api = ProvisionAPI(self.store, self.link, random_bytes=lambda n: self.salt[:n])

    def ok(self, d: Any) -> Any:
        if isinstance(d, Coroutine):
            d = Deferred.fromCoroutine(d)
        return self.successResultOf(d)

    def fails(self, d: Coroutine[Any, Any, Any], *types: type[BaseException]) -> BaseException:
        return self.failureResultOf(Deferred.fromCoroutine(d), *types).value

    def provision(self, key: str = NODE_KEY, uuid: str = UUID) -> pb.ProvisionResponse:
        response: pb.ProvisionResponse = self.ok(self.api.provision(
            pb.ProvisionRequest(node_uuid=uuid, node_public_key=key, talos_version="v1.13.0")))
        return response

    def stored(self) -> dict[str, Any]:
        obj: dict[str, Any] = self.ok(self.store.get(SERVER_BINDING, UUID))
        return obj

    def test_first_provision_allocates_in_the_subnet(self) -> None:
        """A new node gets the subnet's 8 bytes plus 8 random ones, /64, kept in its binding
        with its key; the answer carries the server's key, endpoint and bare address."""
        self.ok(self.store.create(binding()))
        response = self.provision()
        expected = ipaddress.IPv6Interface((IDENTITY.subnet.network_address.packed[:8] + self.salt, 64))
        self.assertEqual(response.node_address_prefix, expected.with_prefixlen)
        self.assertIn(expected.ip, IDENTITY.subnet)
        self.assertEqual(list(response.server_endpoint), ["192.0.2.1:51821"])
        self.assertEqual(response.server_public_key, IDENTITY.public_key)
        self.assertEqual(response.server_address, str(IDENTITY.server_address))
        self.assertNotIn("/", response.server_address)
        self.assertEqual(response.grpc_peer_addr_port, "")
        self.assertEqual(self.stored()["spec"]["siderolink"],
                         {"address": expected.with_prefixlen, "publicKey": NODE_KEY})

    def test_recorded_on_the_timeline(self) -> None:
        """Each answered Provision is a C{siderolink-provision} step of the node; a refused one
        is not."""
        from sidero.timeline import BootTimeline

        self.api.timeline = timeline = BootTimeline(self.clock.seconds)
        self.fails(self.api.provision(pb.ProvisionRequest(node_uuid=UUID, node_public_key=NODE_KEY)))
        self.assertEqual(timeline.for_machine(uuid=UUID), [])
        self.ok(self.store.create(binding()))
        response = self.provision()
        (entry,) = timeline.for_machine(uuid=UUID)
        self.assertEqual((entry.step, entry.source, entry.details),
                         ("siderolink-provision", "siderolink",
                          {"address": response.node_address_prefix, "endpoint": "192.0.2.1:51821"}))

    def test_address_is_kept_across_provisions(self) -> None:
        """A reboot (new key) or a node of the Go Sidero (address already in the binding)
        keeps its address; only the key changes."""
        kept = "fd12:3456:789a:bc03:1:2:3:4/64"
        self.ok(self.store.create(binding(address=kept, publicKey=NODE_KEY)))
        self.salt = bytes(8)
        new_key = public_key(generate_private_key())
        self.assertEqual(self.provision(new_key).node_address_prefix, kept)
        self.assertEqual(self.stored()["spec"]["siderolink"], {"address": kept, "publicKey": new_key})
        rv = self.stored()["metadata"]["resourceVersion"]
        self.assertEqual(self.provision(new_key).node_address_prefix, kept)
        self.assertEqual(self.stored()["metadata"]["resourceVersion"], rv, "nothing changed: no write")

    def test_key_is_normalised(self) -> None:
        """The key is stored in canonical base64 (Go's key.String()): non-zero unused bits in
        the last character, which both decoders accept, are dropped."""
        self.ok(self.store.create(binding()))
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        last = alphabet.index(NODE_KEY[-2])
        sloppy = NODE_KEY[:-2] + alphabet[last | 0b11] + "="
        self.assertNotEqual(sloppy, NODE_KEY)
        self.assertEqual(base64.b64decode(sloppy), base64.b64decode(NODE_KEY))
        self.provision(sloppy)
        self.assertEqual(self.stored()["spec"]["siderolink"]["publicKey"], NODE_KEY)

    def test_unknown_binding(self) -> None:
        """No ServerBinding of that name: NOT_FOUND with Go's text."""
        e = self.fails(self.api.provision(pb.ProvisionRequest(node_uuid="nobody",
                                                              node_public_key=NODE_KEY)),
                       ProvisionError)
        assert isinstance(e, ProvisionError)
        self.assertEqual((e.code, e.message),
                         (grpc.StatusCode.NOT_FOUND, 'server binding "nobody" not found'))

    def test_bad_keys_change_nothing(self) -> None:
        """A key that is not base64 of 32 bytes is INVALID_ARGUMENT and nothing is written."""
        self.ok(self.store.create(binding()))
        before = self.stored()
        for key, detail in [("not base64!", "illegal base64 data"),
                            (base64.b64encode(bytes(31)).decode(), "incorrect key size: 31"),
                            ("", "incorrect key size: 0")]:
            e = self.fails(self.api.provision(pb.ProvisionRequest(node_uuid=UUID, node_public_key=key)),
                           ProvisionError)
            assert isinstance(e, ProvisionError)
            self.assertEqual(e.code, grpc.StatusCode.INVALID_ARGUMENT)
            self.assertTrue(e.message.startswith("error parsing Wireguard key: "), e.message)
            self.assertIn(detail, e.message)
        self.assertEqual(self.stored(), before)

    def test_empty_uuid(self) -> None:
        """An empty UUID is refused as client-go refuses an empty name."""
        self.fails(self.api.provision(pb.ProvisionRequest(node_public_key=NODE_KEY)), BadRequest)

    def test_unavailable(self) -> None:
        """Before the identity is known, or when the tunnel failed: UNAVAILABLE, no write."""
        self.ok(self.store.create(binding()))
        self.link.unavailable = "wireguard-go is not installed"
        e = self.fails(self.api.provision(pb.ProvisionRequest(node_uuid=UUID, node_public_key=NODE_KEY)),
                       ProvisionError)
        assert isinstance(e, ProvisionError)
        self.assertEqual(e.code, grpc.StatusCode.UNAVAILABLE)
        self.assertIn("wireguard-go is not installed", e.message)
        self.link.unavailable, self.link.identity = None, None
        e = self.fails(self.api.provision(pb.ProvisionRequest(node_uuid=UUID, node_public_key=NODE_KEY)),
                       ProvisionError)
        self.assertIn("starting", str(e))
        self.assertNotIn("siderolink", self.stored()["spec"])

    def test_concurrent_provision_keeps_the_first_address(self) -> None:
        """Two nodes' calls racing on one binding: the loser re-reads and answers the address
        that was stored, never a second one."""
        flaky = FlakyStore(self.store)
        api = ProvisionAPI(flaky, self.link, random_bytes=lambda n: bytes([9]) * n)
        self.ok(self.store.create(binding()))
        first = self.provision()  # writes salt 1..8 (the winner)
        self.ok(self.store.patch(SERVER_BINDING, UUID, {"spec": {"siderolink": None}}))
        winner = first.node_address_prefix

        def race() -> None:
            self.ok(self.store.patch(SERVER_BINDING, UUID, {"spec": {"siderolink": {
                "address": winner, "publicKey": NODE_KEY}}}))

        flaky.before_update = race
        response: pb.ProvisionResponse = self.ok(api.provision(
            pb.ProvisionRequest(node_uuid=UUID, node_public_key=NODE_KEY)))
        self.assertEqual(response.node_address_prefix, winner)
        self.assertEqual(self.stored()["spec"]["siderolink"]["address"], winner)

    def test_format_endpoint(self) -> None:
        """IPv6 endpoints are bracketed, IPv4 and names are not."""
        self.assertEqual(format_endpoint("192.0.2.1", 51821), "192.0.2.1:51821")
        self.assertEqual(format_endpoint("2001:db8:0::1", 51821), "[2001:db8::1]:51821")
        self.assertEqual(format_endpoint("[2001:db8::1]", 1), "[2001:db8::1]:1")


class ProvisionOverAPIPortTests(TestCase):
    """grpcio's client against the real API port: h2c next to HTTP/1.1 and the agent API."""

    async def test_provision_over_h2c(self) -> None:
        """/sidero.link.ProvisionService/Provision answers on the API port and writes the
        binding; errors carry Go's codes."""
        store = EmbeddedStore(global_reactor, ":memory:", Admission())
        await store.open()
        self.addCleanup(lambda: Deferred.fromCoroutine(store.close()))
        await store.create(binding())
        servicer = ProvisionServicer(global_reactor, ProvisionAPI(store, Link()), call_timeout=10)

        def server() -> grpc.Server:
            s = make_grpc_server(AgentServicer(global_reactor, store))
            add_to_server(servicer, s)
            return s

        service = make_api_port_service(global_reactor, Resource(), server, 0, interface="127.0.0.1")
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        port = service.getServiceNamed("listener")._port.getHost().port  # type: ignore[attr-defined]
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.addCleanup(channel.close)
        stub = pb_grpc.ProvisionServiceStub(channel)

        response = await deferToThread(stub.Provision, pb.ProvisionRequest(
            node_uuid=UUID, node_public_key=NODE_KEY, join_token="ignored"), timeout=10)
        stored = await store.get(SERVER_BINDING, UUID)
        self.assertEqual(stored["spec"]["siderolink"]["address"], response.node_address_prefix)
        self.assertEqual(response.server_public_key, IDENTITY.public_key)

        with self.assertRaises(grpc.RpcError) as caught:
            await deferToThread(stub.Provision, pb.ProvisionRequest(
                node_uuid="missing", node_public_key=NODE_KEY), timeout=10)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.NOT_FOUND)  # type: ignore[attr-defined]
        self.assertEqual(caught.exception.details(), 'server binding "missing" not found')  # type: ignore[attr-defined]
        with self.assertRaises(grpc.RpcError) as caught:
            await deferToThread(stub.Provision, pb.ProvisionRequest(
                node_uuid=UUID, node_public_key="short"), timeout=10)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)  # type: ignore[attr-defined]
