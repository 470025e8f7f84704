"""The siderolink service and the SideroLink settings in the real service tree.

The WireGuard device is a fake here (the tree runs in the test's own network namespace); the
real devices are in test_wireguard and the namespace end-to-end test.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Any

import grpc
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sidero import tap
from sidero.api.registry import SERVER_BINDING
from sidero.backoff import Backoff
from sidero.proto import machine_pb2
from sidero.proto import provision_pb2 as pb
from sidero.proto import provision_pb2_grpc as pb_grpc
from sidero.siderolink.config import SideroLinkConfig, generate_private_key, public_key
from sidero.siderolink.service import SideroLinkService
from sidero.siderolink.wireguard import WireGuardError
from tests.ports import free_tcp_port
from tests.service.test_tap import settings_for
from tests.siderolink.fakes import FakeDevice
from tests.siderolink.support import StoreTestCase, binding
from tests.siderolink.test_eventsink import request

IDENTITY = SideroLinkConfig("install-x", generate_private_key())
NODE_KEY = public_key(generate_private_key())


class Opener:
    """Hands out fake devices (or fails) and records how it was asked."""

    def __init__(self) -> None:
        self.devices: list[FakeDevice] = []
        self.calls: list[tuple[str, str]] = []
        self.error: Exception | None = None

    async def __call__(self, reactor: Any, mode: str, name: str, runner: Any, **kw: Any) -> FakeDevice:
        self.calls.append((mode, name))
        if self.error is not None:
            raise self.error
        device = FakeDevice(name)
        self.devices.append(device)
        return device


class Runner:
    def run(self, f: Any, *args: Any) -> Deferred[Any]:
        from twisted.internet.defer import succeed

        return succeed(f(*args))


class SideroLinkServiceTests(StoreTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.opener = Opener()

        async def identity() -> SideroLinkConfig:
            return IDENTITY

        self.service = SideroLinkService(
            self.clock, identity, self.informers["ServerBinding"], endpoint="sidero.example",
            port=51999, mode="userspace", interface="sl-test", opener=self.opener,
            resolve=lambda host: {"sidero.example": "2001:db8::7"}[host],
            restart_backoff=Backoff(initial=1.0, jitter=0.0))
        self.service.removeService(self.service.runner)
        self.service.runner = Runner()  # type: ignore[assignment]

    def start(self) -> None:
        self.successResultOf(Deferred.fromCoroutine(self.service._start()))

    def test_up_with_identity_port_and_endpoint(self) -> None:
        """The device gets the identity's key, the WireGuard port and <prefix>::1/64; a host
        name endpoint is resolved and bracketed; existing bindings become peers."""
        self.create(binding(key=NODE_KEY))
        self.assertEqual(self.service.unavailable, "starting")
        self.start()
        [device] = self.opener.devices
        self.assertEqual(self.opener.calls, [("userspace", "sl-test")])
        self.assertEqual(device.calls[0], ("up", IDENTITY.private_key, 51999,
                                           f"{IDENTITY.server_address}/64"))
        self.assertEqual(self.service.public_endpoint, "[2001:db8::7]:51999")
        self.assertIsNone(self.service.unavailable)
        self.assertEqual(list(device.state), [NODE_KEY])

    def test_failure_is_not_fatal(self) -> None:
        """A device that cannot be made leaves the reason for Provision, and starts fine."""
        self.opener.error = WireGuardError("wireguard-go is not installed")
        self.start()
        self.assertEqual(self.service.unavailable, "wireguard-go is not installed")
        self.assertIsNone(self.service.device)

    def test_lost_device_is_restarted_with_its_peers(self) -> None:
        """wireguard-go dying: after a backoff a new device is made and gets every peer."""
        self.create(binding(key=NODE_KEY))
        self.start()
        first = self.opener.devices[0]
        first.lose("exit status 2")
        self.assertIsNone(self.service.device)
        self.opener.error = WireGuardError("still broken")
        self.clock.advance(1.0)
        self.assertEqual(len(self.opener.calls), 2)
        self.assertEqual(self.service.unavailable, "still broken")
        self.opener.error = None
        self.clock.advance(2.0)
        second = self.opener.devices[-1]
        self.assertIsNot(second, first)
        self.assertEqual(list(second.state), [NODE_KEY])
        self.assertIsNone(self.service.unavailable)

    def test_stop_removes_the_device(self) -> None:
        self.start()
        device = self.opener.devices[0]
        self.successResultOf(Deferred.fromCoroutine(self.service._stop()))
        self.assertEqual(device.calls[-1], ("down",))


class TreeTests(TestCase):
    """The real tree (embedded store, API port on loopback) with a fake WireGuard device."""

    timeout = 60

    async def start_tree(self, *flags: str, **settings: str) -> Any:
        state_dir = os.path.abspath(self.mktemp())
        self.api_port = free_tcp_port()
        config = settings_for(state_dir, "disable_dhcp_proxy", "disable_tftp", "disable_syslog", *flags,
                              api_port=str(self.api_port), http_port=str(self.api_port), listen_address="127.0.0.1", **settings)
        self.opener = Opener()

        def siderolink(s: Any, context: Any) -> Any:
            context.siderolink_opener = self.opener
            return tap._make_siderolink(s, context)

        factories = [(n, siderolink if n == "siderolink" else f) for n, f in tap.FACTORIES]
        root = tap.build_service(config, global_reactor, factories=factories)
        root.exit_on_start_failure = False
        root.startService()
        self.addCleanup(root.stopService)
        await root.when_started()
        self.root = root
        return root

    async def provision(self, uuid: str) -> Any:
        channel = grpc.insecure_channel(f"127.0.0.1:{self.api_port}")
        self.addCleanup(channel.close)
        stub = pb_grpc.ProvisionServiceStub(channel)
        return await deferToThread(stub.Provision, pb.ProvisionRequest(
            node_uuid=uuid, node_public_key=NODE_KEY), timeout=10)

    async def test_endpoint_and_port_settings(self) -> None:
        """--siderolink-endpoint and --siderolink-port are what Provision announces and what
        the device listens on; the peer of the provisioned node reaches the device."""
        root = await self.start_tree(siderolink_endpoint="192.0.2.44", siderolink_port="51999")
        store = root.context.store
        await store.create(binding(address=None, key=NODE_KEY))
        response = await self.provision(binding()["metadata"]["name"])
        self.assertEqual(list(response.server_endpoint), ["192.0.2.44:51999"])
        [device] = self.opener.devices
        identity = root.context.siderolink_config
        self.assertEqual(device.calls[0][2:], (51999, f"{identity.server_address}/64"))
        self.assertEqual(response.server_public_key, identity.public_key)
        address = ipaddress.IPv6Interface(response.node_address_prefix)
        for _ in range(100):
            if device.state:
                break
            await deferLater(global_reactor, 0.02, lambda: None)
        self.assertEqual(device.state, {NODE_KEY: [f"{address.ip}/128"]})

    async def test_default_endpoint_is_the_api_endpoint(self) -> None:
        """Without --siderolink-endpoint, the API endpoint and port 51821 are announced."""
        root = await self.start_tree()
        await root.context.store.create(binding(address=None, key=NODE_KEY))
        response = await self.provision(binding()["metadata"]["name"])
        self.assertEqual(list(response.server_endpoint), ["127.0.0.1:51821"])

    async def test_disable_siderolink(self) -> None:
        """--disable-siderolink: no tunnel, and Provision is not served at all."""
        await self.start_tree("disable_siderolink")
        self.assertEqual(self.opener.calls, [])
        with self.assertRaises(grpc.RpcError) as caught:
            await self.provision("any")
        self.assertEqual(caught.exception.code(), grpc.StatusCode.UNIMPLEMENTED)  # type: ignore[attr-defined]

    async def test_sinks_listen_on_the_tunnel_address_only(self) -> None:
        """The log receiver and the event sink bind [tunnel address]:4001/4002, never all
        addresses: here (no real tunnel interface) they wait for the address, and nothing
        listens on loopback."""
        root = await self.start_tree()
        receiver = root.getServiceNamed("log-receiver").getServiceNamed("log-receiver")
        sink = root.getServiceNamed("event-sink").getServiceNamed("event-sink")
        self.assertIsNone(receiver.bound)
        self.assertIsNone(sink.bound)
        for port in (4001, 4002):
            with socket.socket() as s:
                s.settimeout(1)
                self.assertNotEqual(s.connect_ex(("127.0.0.1", port)), 0)

    async def test_disable_sinks(self) -> None:
        """--disable-log-receiver and --disable-event-sink leave those services out."""
        root = await self.start_tree("disable_log_receiver", "disable_event_sink")
        names = [c.name for c in root]
        self.assertNotIn("log-receiver", names)
        self.assertNotIn("event-sink", names)
        self.assertIn("siderolink", names)
        self.assertIsNone(root.context.log_receiver_factory)
        self.assertIsNone(root.context.event_sink)

    async def test_negative_address_filter(self) -> None:
        """--events-negative-address-filter reaches the sink: filtered addresses never get
        into the binding."""
        root = await self.start_tree(events_negative_address_filter="10.0.0.0/8,fd00::/8")
        store = root.context.store
        obj = binding()
        await store.create(obj)
        sink = root.context.event_sink
        tunnel = obj["spec"]["siderolink"]["address"].split("/")[0]
        for _ in range(100):  # the annotator reads the informer cache
            if sink.annotation_for(tunnel) is not None:
                break
            await deferLater(global_reactor, 0.02, lambda: None)
        await sink.publish(f"ipv6:[{tunnel}]:1", request(machine_pb2.AddressEvent(
            addresses=["10.1.1.1", "192.0.2.5", "fd12::5", "2001:db8::5"])))
        stored = await store.get(SERVER_BINDING, obj["metadata"]["name"])
        self.assertEqual(stored["spec"]["addresses"], ["192.0.2.5", "2001:db8::5"])


class ResolveTests(SynchronousTestCase):
    def test_resolve_host(self) -> None:
        """IP literals stay (normalised); names resolve (localhost is always there)."""
        from sidero.siderolink.service import resolve_host

        self.assertEqual(resolve_host("[2001:DB8::1]"), "2001:db8::1")
        self.assertEqual(resolve_host("192.0.2.1"), "192.0.2.1")
        self.assertIn(resolve_host("localhost"), ("127.0.0.1", "::1"))
        self.assertRaises(OSError, resolve_host, "no-such-host.invalid")


class SettingsTests(SynchronousTestCase):
    def resolve(self, **flags: str) -> Any:
        from sidero.config import Host, resolve

        host = Host(is_root=True, home="/nonexistent", addresses=lambda: [])
        return resolve({"api_endpoint": "192.0.2.9", **flags}, {}, host).settings

    def test_defaults(self) -> None:
        """auto WireGuard on "siderolink", logs to stdout, syslog on 514/601, the API
        endpoint as WireGuard endpoint on 51821."""
        s = self.resolve()
        self.assertEqual((s.siderolink_wireguard, s.siderolink_interface, s.server_log,
                          s.syslog_port, s.syslog_tcp_port, s.siderolink_endpoint, s.siderolink_port),
                         ("auto", "siderolink", "-", 514, 601, "192.0.2.9", 51821))

    def test_values_and_errors(self) -> None:
        """Choices are checked, paths made absolute, interface names limited to 15 bytes."""
        from sidero.config import ConfigError

        s = self.resolve(siderolink_wireguard="USERSPACE", server_log="logs/servers.jsonl")
        self.assertEqual(s.siderolink_wireguard, "userspace")
        self.assertEqual(s.server_log, os.path.abspath("logs/servers.jsonl"))
        self.assertRaises(ConfigError, self.resolve, siderolink_wireguard="boringtun")
        self.assertRaises(ConfigError, self.resolve, siderolink_interface="x" * 16)
        self.assertRaises(ConfigError, self.resolve, syslog_port="0")
