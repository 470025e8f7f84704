"""The Agent API RPCs (spec §3.7) on the embedded store (SQLite inline, real admission, fake
clock), and the servicer's error mapping and reactor bridge."""

from __future__ import annotations

import base64
import threading
from collections.abc import Coroutine
from typing import Any

import grpc
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from sidero.api import conditions
from sidero.api.admission import Admission
from sidero.api.registry import SECRET, SERVER
from sidero.proto import agent_pb2 as pb
from sidero.protocols.grpc.server import (
    AgentAPI,
    AgentServicer,
    ReactorUnavailable,
    call_on_reactor,
    map_hardware,
    reconcile_addresses,
)
from sidero.store import errors
from sidero.store.embedded import EmbeddedStore
from tests.store.inline import FakeReactor, open_inline_store

Object = dict[str, Any]
UUID = "4c4c4544-0035-3910-8051-b4c04f4a4d32"


class FakeEvents:
    """Records the Normal events the API emits."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []

    def normal(self, obj: Object, reason: str, message: str) -> Deferred[Any]:
        self.events.append((obj["metadata"]["name"], reason, message))
        return succeed(None)


def hardware(uuid: str = UUID) -> pb.HardwareInformation:
    """A realistic agent report: one CPU, two DIMMs, one NVMe and one SSD, one NIC."""
    return pb.HardwareInformation(
        system=pb.SystemInformation(uuid=uuid, manufacturer="Dell Inc.", product_name="PowerEdge R630",
                                    serial_number="59QCJX2", sku_number="SKU=0600", family=""),
        compute=pb.ComputeInformation(
            total_core_count=8, total_thread_count=16, processor_count=1,
            processors=[pb.Processor(manufacturer="Intel", product_name="Xeon E5-2630",
                                     speed=2400, core_count=8, thread_count=16)]),
        memory=pb.MemoryInformation(
            total_size=32768, module_count=2,
            modules=[pb.MemoryModule(manufacturer="Samsung", product_name="M393", type="DDR4",
                                     size=16384, speed=2400)] * 2),
        storage=pb.StorageInformation(
            total_size=1200 * 1024 ** 3 + 5, device_count=2,
            devices=[pb.StorageDevice(type=pb.NVMe, size=1000 * 1024 ** 3, model="PM983",
                                      serial="S4", name="nvme0n1", device_name="/dev/nvme0n1",
                                      wwid="eui.1"),
                     pb.StorageDevice(type=pb.SSD, size=200 * 1024 ** 3, device_name="/dev/sda")]),
        network=pb.NetworkInformation(
            interface_count=1,
            interfaces=[pb.NetworkInterface(index=2, name="eth0", flags="up|broadcast|multicast",
                                            mtu=1500, mac="52:54:00:12:34:56",
                                            addresses=["192.0.2.10/24"])]),
    )


class Base(SynchronousTestCase):
    auto_accept = True
    auto_bmc = True

    def setUp(self) -> None:
        self.store: EmbeddedStore
        self.clock: FakeReactor
        self.store, self.clock = open_inline_store(self, admission=Admission())
        self.events = FakeEvents()
        self.api = AgentAPI(self.store, self.clock, auto_accept_servers=self.auto_accept,
                            auto_bmc_setup=self.auto_bmc, insecure_wipe=False,
                            server_reboot_timeout=1200.0, events=self.events)

    def ok(self, d: Any) -> Any:
        if isinstance(d, Coroutine):
            d = Deferred.fromCoroutine(d)
        return self.successResultOf(d)

    def fails(self, d: Any, *types: type[BaseException]) -> BaseException:
        if isinstance(d, Coroutine):
            d = Deferred.fromCoroutine(d)
        return self.failureResultOf(d, *types).value

    def get(self, name: str = UUID) -> Object:
        obj: Object = self.ok(self.store.get(SERVER, name))
        return obj

    def register(self, uuid: str = UUID, hostname: str = "talos-1") -> pb.CreateServerResponse:
        resp: pb.CreateServerResponse = self.ok(self.api.create_server(
            pb.CreateServerRequest(hardware=hardware(uuid), hostname=hostname)))
        return resp

    def set_status(self, **status: Any) -> None:
        self.ok(self.store.patch(SERVER, UUID, {"status": status}, subresource="status"))

    def set_spec(self, **spec: Any) -> None:
        self.ok(self.store.patch(SERVER, UUID, {"spec": spec}))


class MappingTests(SynchronousTestCase):
    def test_map_hardware(self) -> None:
        """Hardware maps field by field with Go's renamings and GB totals rounded down."""
        hw = map_hardware(hardware())
        self.assertEqual(hw["system"], {"uuid": UUID, "manufacturer": "Dell Inc.",
                                        "productName": "PowerEdge R630", "serialNumber": "59QCJX2",
                                        "skuNumber": "SKU=0600"})
        self.assertEqual(hw["compute"], {
            "totalCoreCount": 8, "totalThreadCount": 16, "processorCount": 1,
            "processors": [{"manufacturer": "Intel", "productName": "Xeon E5-2630", "speed": 2400,
                            "coreCount": 8, "threadCount": 16}]})
        self.assertEqual(hw["memory"]["totalSize"], "32 GB")
        self.assertEqual(hw["memory"]["moduleCount"], 2)
        self.assertEqual(hw["memory"]["modules"][0], {"manufacturer": "Samsung", "productName": "M393",
                                                      "type": "DDR4", "size": 16384, "speed": 2400})
        self.assertEqual(hw["storage"]["totalSize"], "1200 GB")
        self.assertEqual(hw["storage"]["devices"], [
            {"type": "NVMe", "size": 1000 * 1024 ** 3, "productName": "PM983", "serialNumber": "S4",
             "name": "nvme0n1", "deviceName": "/dev/nvme0n1", "wwid": "eui.1"},
            {"type": "SSD", "size": 200 * 1024 ** 3, "deviceName": "/dev/sda"}])
        self.assertEqual(hw["network"], {"interfaceCount": 1, "interfaces": [
            {"index": 2, "name": "eth0", "flags": "up|broadcast|multicast", "mtu": 1500,
             "mac": "52:54:00:12:34:56", "addresses": ["192.0.2.10/24"]}]})

    def test_map_empty_hardware(self) -> None:
        """An empty report (no SMBIOS) maps without error to empty sections and 0 GB totals."""
        hw = map_hardware(pb.HardwareInformation())
        self.assertEqual(hw, {"system": {}, "compute": {}, "memory": {"totalSize": "0 GB"},
                              "storage": {"totalSize": "0 GB"}, "network": {}})

    def test_more_processors_than_counted(self) -> None:
        """The actual processor list is kept when it is longer than processor_count (Go panics)."""
        hw = pb.HardwareInformation(compute=pb.ComputeInformation(
            processor_count=1, processors=[pb.Processor(manufacturer="A"), pb.Processor(manufacturer="B")]))
        self.assertEqual(len(map_hardware(hw)["compute"]["processors"]), 2)

    def test_reconcile_addresses(self) -> None:
        """Sent types replace, unsent types are kept, same sets per type mean no change."""
        old = [{"type": "InternalIP", "address": "10.0.0.1"}, {"type": "Hostname", "address": "h"}]
        self.assertIsNone(reconcile_addresses(old, [("InternalIP", "10.0.0.1")]))
        self.assertIsNone(reconcile_addresses(old, []))
        self.assertEqual(
            reconcile_addresses(old, [("InternalIP", "10.0.0.2"), ("InternalIP", "fd00::2"),
                                      ("InternalIP", "10.0.0.2")]),
            [{"type": "InternalIP", "address": "10.0.0.2"},
             {"type": "InternalIP", "address": "fd00::2"},
             {"type": "Hostname", "address": "h"}])
        self.assertEqual(reconcile_addresses([], [("ExternalIP", "1.2.3.4")]),
                         [{"type": "ExternalIP", "address": "1.2.3.4"}])


class CreateServerTests(Base):
    def test_creates_server(self) -> None:
        """A new machine becomes a Server named by its UUID, hardware mapped, accepted per option."""
        self.register()
        obj = self.get()
        self.assertEqual(obj["spec"]["hostname"], "talos-1")
        self.assertIs(obj["spec"]["accepted"], True)
        self.assertEqual(obj["spec"]["hardware"], map_hardware(hardware()))
        self.assertEqual(self.events.events,
                         [(UUID, "Server Registration", "Server auto-registered via API.")])

    def test_accepted_unclean_gets_wipe_and_bmc(self) -> None:
        """An accepted, unclean Server without BMC is told to wipe (with timeout) and set up BMC."""
        resp = self.register()
        self.assertEqual((resp.wipe, resp.insecure_wipe, resp.setup_bmc, resp.reboot_timeout),
                         (True, False, True, 1200.0))

    def test_clean_server_not_wiped(self) -> None:
        """A clean Server is not wiped again, but BMC setup is still asked for."""
        self.register()
        self.set_status(isClean=True)
        resp = self.register()
        self.assertEqual((resp.wipe, resp.setup_bmc, resp.reboot_timeout), (False, True, 0.0))

    def test_bmc_present_no_setup(self) -> None:
        """A Server with spec.bmc is not asked to set up its BMC."""
        self.register()
        self.set_spec(bmc={"endpoint": "192.0.2.99"})
        self.assertFalse(self.register().setup_bmc)

    def test_existing_server_not_updated(self) -> None:
        """Registering again changes nothing on an existing Server and records no event."""
        self.register()
        before = self.get()
        self.events.events.clear()
        self.register(hostname="other")
        self.assertEqual(self.get(), before)
        self.assertEqual(self.events.events, [])

    def test_empty_uuid(self) -> None:
        """A report without a UUID is refused and nothing is created."""
        err = self.fails(self.api.create_server(pb.CreateServerRequest()), errors.StoreError)
        self.assertIn("name may not be empty", str(err))
        self.assertEqual(self.ok(self.store.list(SERVER)).items, [])


class NotAcceptedTests(Base):
    auto_accept = False

    def test_not_accepted_gets_nothing(self) -> None:
        """Without auto-accept the Server is created unaccepted and the agent is told nothing."""
        resp = self.register()
        self.assertIs(self.get()["spec"]["accepted"], False)
        self.assertEqual((resp.wipe, resp.insecure_wipe, resp.setup_bmc, resp.reboot_timeout),
                         (False, False, False, 0.0))


class NoAutoBMCTests(Base):
    auto_bmc = False

    def test_no_bmc_setup_without_option(self) -> None:
        """Without auto-bmc-setup the agent is never asked to configure the BMC."""
        resp = self.register()
        self.assertEqual((resp.wipe, resp.setup_bmc), (True, False))


class WipeTests(Base):
    def test_mark_wiped(self) -> None:
        """MarkServerAsWiped sets isClean and PowerCycle=True and records an event."""
        self.register()
        self.ok(self.api.heartbeat(pb.HeartbeatRequest(uuid=UUID)))
        self.ok(self.api.mark_server_as_wiped(pb.MarkServerAsWipedRequest(uuid=UUID)))
        obj = self.get()
        self.assertIs(obj["status"]["isClean"], True)
        self.assertTrue(conditions.is_true(obj, "PowerCycle"))
        self.assertIn((UUID, "Server Wipe", "Server wiped via agent."), self.events.events)
        self.assertFalse(self.register().wipe)

    def test_heartbeat(self) -> None:
        """Heartbeat sets PowerCycle False/InProgress/Info and refreshes its transition time."""
        self.register()
        self.ok(self.api.heartbeat(pb.HeartbeatRequest(uuid=UUID)))
        c = conditions.get(self.get(), "PowerCycle")
        assert c is not None
        self.assertEqual((c["status"], c["reason"], c["severity"], c["message"]),
                         ("False", "InProgress", "Info", "Server wipe in progress."))
        first = c["lastTransitionTime"]
        self.clock.advance(60)
        self.ok(self.api.heartbeat(pb.HeartbeatRequest(uuid=UUID)))
        c2 = conditions.get(self.get(), "PowerCycle")
        assert c2 is not None
        self.assertNotEqual(c2["lastTransitionTime"], first)
        self.assertEqual(c2["lastTransitionTime"], conditions.rfc3339(self.clock.seconds()))

    def test_unknown_server(self) -> None:
        """Wipe calls for an unknown UUID fail with the Kubernetes NotFound text."""
        for call in (self.api.heartbeat(pb.HeartbeatRequest(uuid="nope")),
                     self.api.mark_server_as_wiped(pb.MarkServerAsWipedRequest(uuid="nope"))):
            err = self.fails(call, errors.NotFound)
            self.assertIn('"nope" not found', str(err))


class AddressTests(Base):
    def req(self, *pairs: tuple[str, str]) -> pb.ReconcileServerAddressesRequest:
        return pb.ReconcileServerAddressesRequest(
            uuid=UUID, address=[pb.Address(type=t, address=a) for t, a in pairs])

    def test_reconcile(self) -> None:
        """Reported addresses replace those of their type; other types stay."""
        self.register()
        self.set_status(addresses=[{"type": "Hostname", "address": "h"},
                                   {"type": "InternalIP", "address": "10.0.0.1"}])
        self.ok(self.api.reconcile_server_addresses(self.req(("InternalIP", "10.0.0.2"))))
        self.assertEqual(self.get()["status"]["addresses"],
                         [{"type": "InternalIP", "address": "10.0.0.2"},
                          {"type": "Hostname", "address": "h"}])

    def test_unchanged_no_write(self) -> None:
        """The same addresses in another order write nothing (resourceVersion unchanged)."""
        self.register()
        self.ok(self.api.reconcile_server_addresses(self.req(("InternalIP", "a"), ("InternalIP", "b"))))
        rv = self.get()["metadata"]["resourceVersion"]
        self.ok(self.api.reconcile_server_addresses(self.req(("InternalIP", "b"), ("InternalIP", "a"))))
        self.assertEqual(self.get()["metadata"]["resourceVersion"], rv)


class BMCTests(Base):
    def update(self, **info: Any) -> None:
        self.ok(self.api.update_bmc_info(pb.UpdateBMCInfoRequest(uuid=UUID, bmc_info=pb.BMCInfo(**info))))

    def test_address_only(self) -> None:
        """An address without credentials sets endpoint and port, and creates no Secret."""
        self.register()
        self.update(ip="192.0.2.50", port=1623)
        self.assertEqual(self.get()["spec"]["bmc"], {"endpoint": "192.0.2.50", "port": 1623})
        self.fails(self.store.get(SECRET, f"{UUID}-bmc", "default"), errors.NotFound)
        self.assertIn((UUID, "BMC Update", "BMC info updated via API."), self.events.events)

    def test_credentials_secret(self) -> None:
        """Credentials go to Secret default/<uuid>-bmc owned by the Server, with the move label,
        and spec.bmc points at it; the port resets to 623 when none is sent."""
        self.register()
        self.update(ip="192.0.2.50", port=1623)
        self.update(user="sidero", **{"pass": "s3cret"})
        server = self.get()
        self.assertEqual(server["spec"]["bmc"], {
            "endpoint": "192.0.2.50", "port": 623,
            "userFrom": {"secretKeyRef": {"namespace": "default", "name": f"{UUID}-bmc", "key": "user"}},
            "passFrom": {"secretKeyRef": {"namespace": "default", "name": f"{UUID}-bmc", "key": "pass"}},
        })
        secret = self.ok(self.store.get(SECRET, f"{UUID}-bmc", "default"))
        self.assertEqual({k: base64.b64decode(v).decode() for k, v in secret["data"].items()},
                         {"user": "sidero", "pass": "s3cret"})
        self.assertEqual(secret["metadata"]["labels"], {"clusterctl.cluster.x-k8s.io/move": ""})
        [owner] = secret["metadata"]["ownerReferences"]
        self.assertEqual((owner["kind"], owner["name"], owner["uid"], owner["controller"]),
                         ("Server", UUID, server["metadata"]["uid"], True))

    def test_credentials_update_existing_secret(self) -> None:
        """A second set of credentials updates the existing Secret in place."""
        self.register()
        self.update(ip="192.0.2.50", user="a", **{"pass": "1"})
        uid = self.ok(self.store.get(SECRET, f"{UUID}-bmc", "default"))["metadata"]["uid"]
        self.update(user="b", **{"pass": "2"})
        secret = self.ok(self.store.get(SECRET, f"{UUID}-bmc", "default"))
        self.assertEqual(secret["metadata"]["uid"], uid)
        self.assertEqual(base64.b64decode(secret["data"]["user"]), b"b")

    def test_secret_collected_with_server(self) -> None:
        """Deleting the Server garbage-collects its BMC Secret (ownerReference)."""
        self.register()
        self.update(ip="192.0.2.50", user="a", **{"pass": "1"})
        self.ok(self.store.delete(SERVER, UUID))
        self.ok(self.store.gc_idle())
        self.fails(self.store.get(SECRET, f"{UUID}-bmc", "default"), errors.NotFound)

    def test_unknown_server(self) -> None:
        """BMC info for an unknown Server fails NotFound and creates no Secret."""
        d = self.api.update_bmc_info(pb.UpdateBMCInfoRequest(
            uuid="nope", bmc_info=pb.BMCInfo(ip="1.1.1.1", user="u", **{"pass": "p"})))
        self.fails(d, errors.NotFound)
        self.assertEqual(self.ok(self.store.list(SECRET)).items, [])


class FakeContext:
    """Just enough of grpc.ServicerContext: abort raises, deadline is configurable."""

    def __init__(self, remaining: float | None = None) -> None:
        self.remaining = remaining
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def time_remaining(self) -> float | None:
        return self.remaining

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise RuntimeError("aborted")


class ServicerTests(Base):
    def servicer(self, **kw: Any) -> AgentServicer:
        s = AgentServicer(self.clock, self.store, auto_accept_servers=True, **kw)
        return s

    def test_success_through_bridge(self) -> None:
        """A call runs on the (fake) reactor and returns the response message."""
        resp = self.servicer().CreateServer(
            pb.CreateServerRequest(hardware=hardware()), FakeContext())  # type: ignore[arg-type]
        self.assertTrue(resp.wipe)
        self.get()

    def test_store_error_is_unknown(self) -> None:
        """A store error aborts with UNKNOWN and the Kubernetes text, like Go's gRPC server."""
        ctx = FakeContext()
        self.assertRaises(RuntimeError, self.servicer().Heartbeat,
                          pb.HeartbeatRequest(uuid="nope"), ctx)
        assert ctx.aborted is not None
        self.assertEqual(ctx.aborted[0], grpc.StatusCode.UNKNOWN)
        self.assertIn('"nope" not found', ctx.aborted[1])

    def test_closed_is_unavailable(self) -> None:
        """After close() calls are refused with UNAVAILABLE without touching the store."""
        s = self.servicer()
        s.close()
        ctx = FakeContext()
        self.assertRaises(RuntimeError, s.CreateServer, pb.CreateServerRequest(hardware=hardware()), ctx)
        assert ctx.aborted is not None
        self.assertEqual(ctx.aborted[0], grpc.StatusCode.UNAVAILABLE)
        self.assertEqual(self.ok(self.store.list(SERVER)).items, [])


class BridgeTests(SynchronousTestCase):
    def test_reactor_never_runs(self) -> None:
        """A reactor that never runs the call makes the waiting thread give up, not hang."""
        class Dead:
            def callFromThread(self, *a: Any) -> None:
                pass

        async def f() -> int:
            return 1

        self.assertRaises(ReactorUnavailable, call_on_reactor, Dead(), f, 0.01, grace=0.01)

    def test_reactor_side_timeout(self) -> None:
        """A call that never finishes fails with CallTimeout once the reactor's clock passes it,
        and is cancelled."""
        from sidero.threads import CallTimeout

        clock = FakeReactor()
        cancelled: list[Deferred[int]] = []
        never: Deferred[int] = Deferred(cancelled.append)

        async def f() -> int:
            return await never

        errors_seen: list[BaseException] = []

        def worker() -> None:
            try:
                call_on_reactor(clock, f, 5.0, grace=5.0)
            except BaseException as e:
                errors_seen.append(e)

        # FakeReactor runs callFromThread inline, so drive it from this thread: start, then
        # advance the clock past the timeout while the worker waits.
        t = threading.Thread(target=worker)
        t.start()
        for _ in range(200):
            if clock.getDelayedCalls():
                break
            threading.Event().wait(0.005)
        clock.advance(6)
        t.join(5)
        self.assertEqual([type(e) for e in errors_seen], [CallTimeout])
        # The call itself was cancelled, so what it still waited for never happens.
        self.assertTrue(cancelled, "the late call was not cancelled")
