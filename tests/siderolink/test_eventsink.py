"""The event sink (spec §3.11): each Talos event's effect on the ServerBinding, the negative
address filter, logging, errors; and Publish over plaintext gRPC on loopback."""

from __future__ import annotations

import ipaddress
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sidero.api import conditions
from sidero.api.admission import Admission
from sidero.api.registry import SERVER_BINDING
from sidero.proto import common_pb2, events_pb2, events_pb2_grpc, machine_pb2
from sidero.siderolink.annotator import Annotator
from sidero.siderolink.eventsink import (
    EventSinkAPI,
    EventSinkServicer,
    SinkError,
    filter_addresses,
    make_event_sink_server,
    parse_peer,
)
from sidero.store.embedded import EmbeddedStore
from tests.siderolink.support import TUNNEL, UUID, StoreTestCase, binding

PEER = f"ipv6:%5B{TUNNEL}%5D:43210"


def request(message: Message, event_id: str = "01J0000000000000000000000") -> events_pb2.EventRequest:
    data = any_pb2.Any()
    data.Pack(message)
    return events_pb2.EventRequest(data=data, id=event_id, actor_id="")


def sequence(name: str, action: int, code: int | None = None, text: str = "") -> machine_pb2.SequenceEvent:
    event = machine_pb2.SequenceEvent(sequence=name, action=action)  # type: ignore[arg-type]
    if code is not None:
        event.error.CopyFrom(common_pb2.Error(code=code, message=text))  # type: ignore[arg-type]
    return event


class PureTests(SynchronousTestCase):
    def test_parse_peer(self) -> None:
        """grpcio's peer strings (percent-encoded or not) give the IP and Go's Addr.String()."""
        self.assertEqual(parse_peer(PEER), (TUNNEL, f"[{TUNNEL}]:43210"))
        self.assertEqual(parse_peer("ipv6:[FDAE::2]:1"), ("fdae::2", "[fdae::2]:1"))
        self.assertEqual(parse_peer("ipv4:10.0.0.1:5"), ("10.0.0.1", "10.0.0.1:5"))
        self.assertRaises(SinkError, parse_peer, "unix:/run/x.sock")

    def test_filter_addresses(self) -> None:
        """Unparsable addresses, the tunnel address and negative prefixes are dropped."""
        negative = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]
        got = filter_addresses(["192.0.2.10", "10.1.2.3", "nonsense", TUNNEL, "fd01::1",
                                "2001:db8::1", "172.20.0.2"], TUNNEL, negative)
        self.assertEqual(got, ["192.0.2.10", "2001:db8::1", "172.20.0.2"])
        self.assertEqual(filter_addresses(["10.1.2.3", TUNNEL], TUNNEL, []), ["10.1.2.3"])


class EventSinkAPITests(StoreTestCase):
    negative = (ipaddress.ip_network("10.0.0.0/8"),)

    def setUp(self) -> None:
        super().setUp()
        self.create_owned_metal_machine()
        self.create(binding())
        annotator = Annotator(self.informers["ServerBinding"], self.informers["MetalMachine"])
        self.api = EventSinkAPI(self.store, self.clock, annotator.for_tunnel_ip, self.negative)

    def publish(self, message: Message, peer: str = PEER) -> Any:
        return Deferred.fromCoroutine(self.api.publish(peer, request(message)))

    def stored(self) -> dict[str, Any]:
        obj: dict[str, Any] = self.ok(self.store.get(SERVER_BINDING, UUID))
        return obj

    def condition(self, type_: str) -> dict[str, str] | None:
        return conditions.get(self.stored(), type_)

    def test_address_event(self) -> None:
        """Addresses (filtered) and hostname go into the binding's spec; a later event with
        fewer addresses replaces them."""
        self.ok(self.publish(machine_pb2.AddressEvent(
            hostname="talos-abc", addresses=["172.20.0.5", TUNNEL, "10.5.0.1", "fe80::1"])))
        spec = self.stored()["spec"]
        self.assertEqual((spec["addresses"], spec["hostname"]), (["172.20.0.5", "fe80::1"], "talos-abc"))
        self.ok(self.publish(machine_pb2.AddressEvent(hostname="talos-abc", addresses=["172.20.0.6"])))
        self.assertEqual(self.stored()["spec"]["addresses"], ["172.20.0.6"])

    def test_config_errors(self) -> None:
        """Load and validation errors are False conditions with the error as message."""
        self.ok(self.publish(machine_pb2.ConfigLoadErrorEvent(error="failed to fetch config")))
        self.ok(self.publish(machine_pb2.ConfigValidationErrorEvent(error="nodeLabels: bad key")))
        loaded = self.condition("TalosConfigLoaded")
        validated = self.condition("TalosConfigValidated")
        assert loaded is not None and validated is not None
        self.assertEqual((loaded["status"], loaded["reason"], loaded["severity"], loaded["message"]),
                         ("False", "TalosConfigLoadFailed", "Error", "failed to fetch config"))
        self.assertEqual((validated["status"], validated["reason"], validated["severity"],
                          validated["message"]),
                         ("False", "TalosConfigValidationFailed", "Error", "nodeLabels: bad key"))
        self.assertIsNone(self.condition("TalosInstalled"))

    def test_install_progress(self) -> None:
        """install START: in progress (Info, no message); saveConfig START: config loaded and
        validated; boot START: all three True; STOP events change nothing."""
        self.ok(self.publish(machine_pb2.PhaseEvent(phase="install", action=machine_pb2.PhaseEvent.START)))
        installed = self.condition("TalosInstalled")
        assert installed is not None
        self.assertEqual((installed["status"], installed["reason"], installed["severity"]),
                         ("False", "TalosInstallationInProgress", "Info"))
        self.assertNotIn("message", installed)
        rv = self.stored()["metadata"]["resourceVersion"]
        self.ok(self.publish(machine_pb2.PhaseEvent(phase="install", action=machine_pb2.PhaseEvent.STOP)))
        self.assertEqual(self.stored()["metadata"]["resourceVersion"], rv)
        self.ok(self.publish(machine_pb2.PhaseEvent(phase="saveConfig", action=machine_pb2.PhaseEvent.START)))
        self.assertTrue(conditions.is_true(self.stored(), "TalosConfigLoaded"))
        self.assertTrue(conditions.is_true(self.stored(), "TalosConfigValidated"))
        self.assertFalse(conditions.is_true(self.stored(), "TalosInstalled"))
        self.ok(self.publish(sequence("boot", machine_pb2.SequenceEvent.START)))
        for type_ in ("TalosInstalled", "TalosConfigLoaded", "TalosConfigValidated"):
            self.assertTrue(conditions.is_true(self.stored(), type_), type_)

    def test_timeline_steps(self) -> None:
        """Sequences, phase starts, config errors, addresses and services running are boot
        steps of the node's server; tasks, phase stops and other service states are not."""
        from sidero.timeline import BootTimeline

        self.api.timeline = timeline = BootTimeline(self.clock.seconds)
        for message in (
            machine_pb2.ConfigLoadErrorEvent(error="failed to fetch config"),
            machine_pb2.PhaseEvent(phase="install", action=machine_pb2.PhaseEvent.START),
            machine_pb2.PhaseEvent(phase="install", action=machine_pb2.PhaseEvent.STOP),
            machine_pb2.TaskEvent(task="installer", action=machine_pb2.TaskEvent.START),
            machine_pb2.ServiceStateEvent(service="apid", action=machine_pb2.ServiceStateEvent.PREPARING),
            machine_pb2.ServiceStateEvent(service="apid", action=machine_pb2.ServiceStateEvent.RUNNING),
            machine_pb2.AddressEvent(hostname="talos-abc", addresses=["172.20.0.5", "fe80::1"]),
            sequence("boot", machine_pb2.SequenceEvent.START),
        ):
            self.ok(self.publish(message))
        steps = [(e.step, e.source, e.details) for e in timeline.for_machine(uuid=UUID)]
        self.assertEqual(steps, [
            ("talos-config-load-error", "talos", {"error": "failed to fetch config"}),
            ("talos-phase", "talos", {"phase": "install", "action": "START"}),
            ("talos-service", "talos", {"service": "apid", "action": "RUNNING"}),
            ("talos-addresses", "talos", {"hostname": "talos-abc", "addresses": "172.20.0.5,fe80::1"}),
            ("talos-sequence", "talos", {"sequence": "boot", "action": "START"}),
        ])
        # An unknown node's events are nobody's steps.
        self.failureResultOf(self.publish(machine_pb2.AddressEvent(hostname="x"),
                                          peer="ipv6:%5Bfdae::99%5D:1"))
        self.publish(sequence("boot", machine_pb2.SequenceEvent.STOP), peer="ipv6:%5Bfdae::99%5D:1")
        self.assertEqual(len(list(timeline.machines_known())), 1)

    def test_install_sequence_outcomes(self) -> None:
        """install NOOP with a FATAL error: installed when the error is the reboot, failed
        otherwise; no error at all counts as FATAL (code 0), as in Go."""
        self.ok(self.publish(sequence("install", machine_pb2.SequenceEvent.NOOP, common_pb2.FATAL,
                                      "disk /dev/vda not found")))
        installed = self.condition("TalosInstalled")
        assert installed is not None
        self.assertEqual((installed["status"], installed["reason"], installed["severity"],
                          installed["message"]),
                         ("False", "TalosInstallationFailed", "Error", "disk /dev/vda not found"))
        self.ok(self.publish(sequence("install", machine_pb2.SequenceEvent.NOOP, common_pb2.FATAL,
                                      "error rebooting: unix.Reboot: operation not permitted")))
        self.assertTrue(conditions.is_true(self.stored(), "TalosInstalled"))
        self.ok(self.publish(sequence("install", machine_pb2.SequenceEvent.NOOP)))
        installed = self.condition("TalosInstalled")
        assert installed is not None
        self.assertEqual((installed["status"], installed["reason"]), ("False", "TalosInstallationFailed"))
        self.ok(self.publish(sequence("install", machine_pb2.SequenceEvent.NOOP, common_pb2.CANCELED, "x")))
        self.assertEqual(self.condition("TalosInstalled"), installed, "CANCELED changes nothing")

    def test_log_lines(self) -> None:
        """One "incoming event" line per event with node, id, type, annotation and event
        fields; a service event says "service <message>"; a sequence error logs at error."""
        with capturedLogs() as events:
            self.ok(self.publish(machine_pb2.PhaseEvent(phase="install", action=machine_pb2.PhaseEvent.STOP)))
            self.ok(self.publish(machine_pb2.ServiceStateEvent(
                service="etcd", action=machine_pb2.ServiceStateEvent.RUNNING, message="Health check successful")))
            self.ok(self.publish(sequence("install", machine_pb2.SequenceEvent.NOOP, common_pb2.FATAL, "boom")))
        mine = [e for e in events if e.get("log_namespace") == "sidero.siderolink.eventsink.EventSinkAPI"]
        self.assertEqual(len(mine), 3)
        first = mine[0]
        self.assertEqual(first["log_format"], "incoming event")
        self.assertEqual({k: first[k] for k in ("node", "id", "type", "server_uuid", "cluster",
                                                "namespace", "metal_machine", "machine", "phase",
                                                "action")},
                         {"node": f"[{TUNNEL}]:43210", "id": "01J0000000000000000000000",
                          "type": "type.googleapis.com/machine.PhaseEvent", "server_uuid": UUID,
                          "cluster": "cluster-a", "namespace": "cluster-a", "metal_machine": "mm-0",
                          "machine": "machine-0", "phase": "install", "action": "STOP"})
        self.assertEqual(mine[1]["log_format"], "service Health check successful")
        self.assertEqual((mine[1]["service"], mine[1]["action"]), ("etcd", "RUNNING"))
        self.assertEqual((mine[2]["log_level"], mine[2]["error"], mine[2]["sequence"]),
                         (LogLevel.error, "boom", "install"))

    def test_unknown_node_and_types(self) -> None:
        """An event that changes a binding from an unknown address fails with Go's text;
        one that changes nothing is only logged; unknown types are answered and ignored."""
        e = self.failureResultOf(self.publish(machine_pb2.AddressEvent(addresses=["1.2.3.4"]),
                                              peer="ipv6:[fdae::77]:1"), SinkError).value
        self.assertEqual(str(e), "failed to find ServerBindings for ip fdae::77")
        self.ok(self.publish(machine_pb2.TaskEvent(task="t"), peer="ipv6:[fdae::77]:1"))
        data = any_pb2.Any(type_url="type.googleapis.com/machine.MachineStatusEvent", value=b"\xff")
        self.ok(Deferred.fromCoroutine(self.api.publish(PEER, events_pb2.EventRequest(data=data))))
        bad = any_pb2.Any(type_url="type.googleapis.com/machine.PhaseEvent", value=b"\x0a\xff")
        self.failureResultOf(Deferred.fromCoroutine(self.api.publish(PEER, events_pb2.EventRequest(data=bad))),
                             SinkError)
        self.assertEqual(self.api.counters["unknown_types"], 1)
        self.assertNotIn("addresses", self.stored()["spec"])


class NoFilterTests(EventSinkAPITests):
    """Without --events-negative-address-filter only the tunnel address is dropped."""

    negative = ()

    def test_address_event(self) -> None:
        self.ok(self.publish(machine_pb2.AddressEvent(addresses=["172.20.0.5", TUNNEL, "10.5.0.1"])))
        self.assertEqual(self.stored()["spec"]["addresses"], ["172.20.0.5", "10.5.0.1"])


class PublishOverGrpcTests(TestCase):
    """grpcio client -> plaintext gRPC -> the sink; the peer address (::1) names the node."""

    async def test_publish(self) -> None:
        store = EmbeddedStore(global_reactor, ":memory:", Admission())
        await store.open()
        self.addCleanup(lambda: Deferred.fromCoroutine(store.close()))
        await store.create(binding(address="::1/128"))
        from sidero.siderolink.annotator import Annotation

        def annotate(ip: str) -> Annotation | None:
            return Annotation(server_uuid=UUID) if ip == "::1" else None

        api = EventSinkAPI(store, global_reactor, annotate)
        server = make_event_sink_server(EventSinkServicer(global_reactor, api, call_timeout=10))
        port = server.add_insecure_port("[::1]:0")
        server.start()
        self.addCleanup(lambda: server.stop(0))
        channel = grpc.insecure_channel(f"[::1]:{port}")
        self.addCleanup(channel.close)
        stub = events_pb2_grpc.EventSinkServiceStub(channel)
        await deferToThread(stub.Publish, request(machine_pb2.AddressEvent(
            hostname="n1", addresses=["192.0.2.9"])), timeout=10)
        stored = await store.get(SERVER_BINDING, UUID)
        self.assertEqual((stored["spec"]["addresses"], stored["spec"]["hostname"]), (["192.0.2.9"], "n1"))
        bad = events_pb2.EventRequest(data=any_pb2.Any(
            type_url="type.googleapis.com/machine.PhaseEvent", value=b"\x0a\xff"))
        with self.assertRaises(grpc.RpcError) as caught:
            await deferToThread(stub.Publish, bad, timeout=10)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.UNKNOWN)  # type: ignore[attr-defined]
