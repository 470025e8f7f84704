"""The SideroLink and Talos event protos are wire-compatible (spec §3.8, §3.11): packages,
message and field names, numbers, types and cardinality, type URLs; and every committed
generated module of sidero/proto matches its .proto (scripts/gen-proto)."""

from __future__ import annotations

import os
import tempfile

from google.protobuf import any_pb2, descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor as F
from twisted.trial.unittest import SynchronousTestCase

from sidero.proto import common_pb2, events_pb2, machine_pb2, provision_pb2

S, B, E, M = F.TYPE_STRING, F.TYPE_BOOL, F.TYPE_ENUM, F.TYPE_MESSAGE

#: message -> [(field, number, type, repeated?)] exactly as spec §3.8 / §3.11 list them.
PROVISION: dict[str, list[tuple[str, int, int, bool]]] = {
    "ProvisionRequest": [("node_uuid", 1, S, False), ("node_public_key", 2, S, False),
                         ("join_token", 3, S, False), ("node_unique_token", 4, S, False),
                         ("talos_version", 5, S, False), ("wireguard_over_grpc", 6, B, False)],
    "ProvisionResponse": [("server_endpoint", 1, S, True), ("server_public_key", 3, S, False),
                          ("node_address_prefix", 4, S, False), ("server_address", 5, S, False),
                          ("grpc_peer_addr_port", 6, S, False)],
}
EVENTS = {
    "EventRequest": [("data", 1, M, False), ("id", 2, S, False), ("actor_id", 3, S, False)],
    "EventResponse": [],
}
MACHINE = {
    "AddressEvent": [("hostname", 1, S, False), ("addresses", 2, S, True)],
    "ConfigValidationErrorEvent": [("error", 1, S, False)],
    "ConfigLoadErrorEvent": [("error", 1, S, False)],
    "PhaseEvent": [("phase", 1, S, False), ("action", 2, E, False)],
    "TaskEvent": [("task", 1, S, False), ("action", 2, E, False)],
    "ServiceStateEvent": [("service", 1, S, False), ("action", 2, E, False),
                          ("message", 3, S, False), ("health", 4, M, False)],
    "ServiceHealth": [("unknown", 1, B, False), ("healthy", 2, B, False),
                      ("last_message", 3, S, False), ("last_change", 4, M, False)],
    "SequenceEvent": [("sequence", 1, S, False), ("action", 2, E, False), ("error", 3, M, False)],
}
COMMON = {"Error": [("code", 1, E, False), ("message", 2, S, False), ("details", 3, M, True)]}


def fields_of(module: object, expected: dict[str, list[tuple[str, int, int, bool]]],
              test: SynchronousTestCase) -> None:
    descriptor = module.DESCRIPTOR  # type: ignore[attr-defined]
    test.assertEqual(set(descriptor.message_types_by_name), set(expected))
    for name, fields in expected.items():
        message = descriptor.message_types_by_name[name]
        got = [(f.name, f.number, f.type, f.is_repeated) for f in message.fields]
        test.assertEqual(sorted(got, key=lambda x: x[1]), fields, name)


class ProvisionProtoTests(SynchronousTestCase):
    def test_package_service_and_method(self) -> None:
        """Package sidero.link, one unary RPC: /sidero.link.ProvisionService/Provision."""
        self.assertEqual(provision_pb2.DESCRIPTOR.package, "sidero.link")
        service = provision_pb2.DESCRIPTOR.services_by_name["ProvisionService"]
        self.assertEqual(service.full_name, "sidero.link.ProvisionService")
        [method] = service.methods
        self.assertEqual((method.name, method.input_type.name, method.output_type.name,
                          method.client_streaming, method.server_streaming),
                         ("Provision", "ProvisionRequest", "ProvisionResponse", False, False))

    def test_fields(self) -> None:
        """Fields, numbers and types of §3.8; the request's 3..6 are proto3 optional."""
        fields_of(provision_pb2, PROVISION, self)
        request = provision_pb2.ProvisionRequest.DESCRIPTOR
        self.assertEqual([f.name for f in request.fields if f.has_presence],
                         ["join_token", "node_unique_token", "talos_version", "wireguard_over_grpc"])

    def test_known_encoding(self) -> None:
        """A response encodes to the bytes Talos' Go client decodes (hand-computed tags)."""
        resp = provision_pb2.ProvisionResponse(server_endpoint=["1.2.3.4:51821"],
                                               server_public_key="k", server_address="fd::1")
        self.assertEqual(resp.SerializeToString(),
                         b"\x0a\x0d1.2.3.4:51821" + b"\x1a\x01k" + b"\x2a\x05fd::1")
        req = provision_pb2.ProvisionRequest.FromString(b"\x0a\x01u\x12\x01p\x1a\x00")
        self.assertEqual((req.node_uuid, req.node_public_key, req.HasField("join_token")),
                         ("u", "p", True))


class EventProtoTests(SynchronousTestCase):
    def test_packages_and_service(self) -> None:
        """/events.EventSinkService/Publish; the event types are machine.* and common.Error."""
        self.assertEqual(events_pb2.DESCRIPTOR.package, "events")
        service = events_pb2.DESCRIPTOR.services_by_name["EventSinkService"]
        [method] = service.methods
        self.assertEqual((service.full_name, method.name, method.input_type.name,
                          method.output_type.name),
                         ("events.EventSinkService", "Publish", "EventRequest", "EventResponse"))
        self.assertEqual(machine_pb2.DESCRIPTOR.package, "machine")
        self.assertEqual(common_pb2.DESCRIPTOR.package, "common")

    def test_fields(self) -> None:
        """Fields, numbers and types of §3.11 (and ServiceHealth as Talos defines it)."""
        fields_of(events_pb2, EVENTS, self)
        fields_of(machine_pb2, MACHINE, self)
        fields_of(common_pb2, COMMON, self)
        msg = machine_pb2.DESCRIPTOR.message_types_by_name
        self.assertEqual(msg["SequenceEvent"].fields_by_name["error"].message_type.full_name,
                         "common.Error")
        self.assertEqual(msg["ServiceStateEvent"].fields_by_name["health"].message_type.full_name,
                         "machine.ServiceHealth")
        self.assertEqual(events_pb2.EventRequest.DESCRIPTOR.fields_by_name["data"].message_type
                         .full_name, "google.protobuf.Any")

    def test_enums(self) -> None:
        """Action and Code numbers as §3.11 gives them (FATAL is 0, so no error is FATAL)."""
        self.assertEqual(dict(machine_pb2.SequenceEvent.Action.items()),
                         {"NOOP": 0, "START": 1, "STOP": 2})
        self.assertEqual(dict(machine_pb2.PhaseEvent.Action.items()), {"START": 0, "STOP": 1})
        self.assertEqual(dict(machine_pb2.TaskEvent.Action.items()), {"START": 0, "STOP": 1})
        actions = dict(machine_pb2.ServiceStateEvent.Action.items())
        self.assertEqual((actions["INITIALIZED"], actions["SKIPPED"], actions["STARTING"]), (0, 7, 8))
        self.assertEqual(dict(common_pb2.Code.items()), {"FATAL": 0, "LOCKED": 1, "CANCELED": 2})

    def test_type_urls(self) -> None:
        """Packing an event gives the type URL Talos sends."""
        packed = any_pb2.Any()
        packed.Pack(machine_pb2.PhaseEvent(phase="install"))
        self.assertEqual(packed.type_url, "type.googleapis.com/machine.PhaseEvent")
        # Field 1 "install", field 2 omitted (START = 0).
        self.assertEqual(packed.value, b"\x0a\x07install")


def _repo_root() -> str:
    # sidero/proto/x_pb2.py: the directory holding the sidero package, 3 levels up.
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(provision_pb2.__file__))))


def compiled_descriptor(name: str) -> descriptor_pb2.FileDescriptorProto:
    """sidero/proto/<name>.proto compiled now by grpc_tools' protoc."""
    import grpc_tools
    from grpc_tools import protoc

    root = _repo_root()
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "set.pb")
        rc = protoc.main(["protoc", f"-I{root}", f"-I{include}", f"--descriptor_set_out={out}",
                          os.path.join(root, f"sidero/proto/{name}.proto")])
        if rc != 0:
            raise AssertionError(f"protoc failed on {name}.proto ({rc})")
        with open(out, "rb") as f:
            fds = descriptor_pb2.FileDescriptorSet.FromString(f.read())
    [compiled] = fds.file
    # protoc records json_name in descriptor sets but not in generated Python.
    def clear(messages: object) -> None:
        for message in messages:  # type: ignore[attr-defined]
            for field in message.field:
                field.ClearField("json_name")
            clear(message.nested_type)
    clear(compiled.message_type)
    return compiled


class GeneratedUpToDateTests(SynchronousTestCase):
    def test_every_generated_module_matches_its_proto(self) -> None:
        """Each sidero/proto/*.proto has a committed x_pb2 generated from exactly that file
        (run scripts/gen-proto after editing a .proto)."""
        import importlib

        root = _repo_root()
        names = sorted(f[:-len(".proto")] for f in os.listdir(os.path.join(root, "sidero", "proto"))
                       if f.endswith(".proto"))
        self.assertEqual(names, ["agent", "common", "events", "machine", "provision"])
        for name in names:
            module = importlib.import_module(f"sidero.proto.{name}_pb2")
            committed = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
            self.assertEqual(compiled_descriptor(name), committed, name)

    def test_services_have_grpc_modules(self) -> None:
        """Every proto with a service has its committed _pb2_grpc module, generated with it."""
        from sidero.proto import events_pb2_grpc, provision_pb2_grpc

        self.assertTrue(hasattr(provision_pb2_grpc, "add_ProvisionServiceServicer_to_server"))
        self.assertTrue(hasattr(events_pb2_grpc, "EventSinkServiceStub"))
