"""The Agent API proto is wire-compatible with Sidero's (spec §3.7): names, numbers, types."""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor as F
from twisted.trial.unittest import SynchronousTestCase

from sidero.proto import agent_pb2 as pb

S, U32, U64, B, D, E, M = (F.TYPE_STRING, F.TYPE_UINT32, F.TYPE_UINT64, F.TYPE_BOOL,
                           F.TYPE_DOUBLE, F.TYPE_ENUM, F.TYPE_MESSAGE)
REPEATED = "repeated"

#: message -> [(field, number, type, repeated?)] exactly as spec §3.7 lists them.
EXPECTED: dict[str, list[tuple[str, int, int, bool]]] = {
    "BMCInfo": [("ip", 1, S, False), ("port", 2, U32, False), ("user", 3, S, False),
                ("pass", 4, S, False)],
    "SystemInformation": [("uuid", 1, S, False), ("manufacturer", 2, S, False),
                          ("product_name", 3, S, False), ("version", 4, S, False),
                          ("serial_number", 5, S, False), ("sku_number", 6, S, False),
                          ("family", 7, S, False)],
    "Processor": [("manufacturer", 1, S, False), ("product_name", 2, S, False),
                  ("serial_number", 3, S, False), ("speed", 4, U32, False),
                  ("core_count", 5, U32, False), ("thread_count", 6, U32, False)],
    "ComputeInformation": [("total_core_count", 1, U32, False), ("total_thread_count", 2, U32, False),
                           ("processor_count", 3, U32, False), ("processors", 4, M, True)],
    "MemoryModule": [("manufacturer", 1, S, False), ("product_name", 2, S, False),
                     ("serial_number", 3, S, False), ("type", 4, S, False), ("size", 5, U32, False),
                     ("speed", 6, U32, False)],
    "MemoryInformation": [("total_size", 1, U32, False), ("module_count", 2, U32, False),
                          ("modules", 3, M, True)],
    "StorageDevice": [("type", 1, E, False), ("size", 2, U64, False), ("model", 3, S, False),
                      ("serial", 4, S, False), ("name", 5, S, False), ("device_name", 6, S, False),
                      ("uuid", 7, S, False), ("wwid", 8, S, False)],
    "StorageInformation": [("total_size", 1, U64, False), ("device_count", 2, U32, False),
                           ("devices", 3, M, True)],
    "NetworkInterface": [("index", 1, U32, False), ("name", 2, S, False), ("flags", 3, S, False),
                         ("mtu", 4, U32, False), ("mac", 5, S, False), ("addresses", 6, S, True)],
    "NetworkInformation": [("interface_count", 1, U32, False), ("interfaces", 2, M, True)],
    "HardwareInformation": [("system", 1, M, False), ("compute", 2, M, False),
                            ("memory", 3, M, False), ("storage", 4, M, False),
                            ("network", 5, M, False)],
    "CreateServerRequest": [("hardware", 1, M, False), ("hostname", 3, S, False)],
    "CreateServerResponse": [("wipe", 1, B, False), ("insecure_wipe", 2, B, False),
                             ("setup_bmc", 3, B, False), ("reboot_timeout", 4, D, False)],
    "Address": [("type", 1, S, False), ("address", 2, S, False)],
    "MarkServerAsWipedRequest": [("uuid", 1, S, False)],
    "HeartbeatRequest": [("uuid", 1, S, False)],
    "UpdateBMCInfoRequest": [("uuid", 1, S, False), ("bmc_info", 2, M, False)],
    "ReconcileServerAddressesRequest": [("uuid", 1, S, False), ("address", 2, M, True)],
    "MarkServerAsWipedResponse": [],
    "HeartbeatResponse": [],
    "UpdateBMCInfoResponse": [],
    "ReconcileServerAddressesResponse": [],
}


class ProtoTests(SynchronousTestCase):
    def test_package_and_go_package(self) -> None:
        """The proto package is C{api} (method paths /api.Agent/...) with a go_package option."""
        self.assertEqual(pb.DESCRIPTOR.package, "api")
        self.assertIn("sidero-controller-manager/internal/api", pb.DESCRIPTOR.GetOptions().go_package)

    def test_messages_fields(self) -> None:
        """Every message has exactly the fields, numbers, types and cardinality of §3.7."""
        self.assertEqual(set(pb.DESCRIPTOR.message_types_by_name), set(EXPECTED))
        for name, fields in EXPECTED.items():
            descriptor = pb.DESCRIPTOR.message_types_by_name[name]
            got = [(f.name, f.number, f.type, f.is_repeated) for f in descriptor.fields]
            self.assertEqual(sorted(got, key=lambda x: x[1]), fields, name)

    def test_message_types_of_nested_fields(self) -> None:
        """Message-typed fields point at the message types §3.7 names."""
        t = pb.DESCRIPTOR.message_types_by_name
        self.assertEqual(t["CreateServerRequest"].fields_by_name["hardware"].message_type.name,
                         "HardwareInformation")
        self.assertEqual(t["UpdateBMCInfoRequest"].fields_by_name["bmc_info"].message_type.name,
                         "BMCInfo")
        self.assertEqual(t["ComputeInformation"].fields_by_name["processors"].message_type.name,
                         "Processor")
        self.assertEqual(t["StorageDevice"].fields_by_name["type"].enum_type.name, "StorageType")
        self.assertEqual(
            t["ReconcileServerAddressesRequest"].fields_by_name["address"].message_type.name,
            "Address")

    def test_create_server_request_field_2_unused(self) -> None:
        """Field 2 of CreateServerRequest stays unused (reserved)."""
        fields = pb.CreateServerRequest.DESCRIPTOR.fields_by_number
        self.assertNotIn(2, fields)

    def test_storage_type_enum(self) -> None:
        """StorageType names and numbers match (they are written into Server specs by name)."""
        self.assertEqual(dict(pb.StorageType.items()),
                         {"Unknown": 0, "SSD": 1, "HDD": 2, "NVMe": 3, "SD": 4})

    def test_service_methods(self) -> None:
        """Service api.Agent has the five RPCs, unary, with the §3.7 request/response types."""
        service = pb.DESCRIPTOR.services_by_name["Agent"]
        self.assertEqual(service.full_name, "api.Agent")
        got = {m.name: (m.input_type.name, m.output_type.name, m.client_streaming,
                        m.server_streaming) for m in service.methods}
        self.assertEqual(got, {
            "CreateServer": ("CreateServerRequest", "CreateServerResponse", False, False),
            "MarkServerAsWiped": ("MarkServerAsWipedRequest", "MarkServerAsWipedResponse",
                                  False, False),
            "ReconcileServerAddresses": ("ReconcileServerAddressesRequest",
                                         "ReconcileServerAddressesResponse", False, False),
            "Heartbeat": ("HeartbeatRequest", "HeartbeatResponse", False, False),
            "UpdateBMCInfo": ("UpdateBMCInfoRequest", "UpdateBMCInfoResponse", False, False),
        })

    def test_known_encoding(self) -> None:
        """A request encodes to the bytes a Go agent sends (hand-computed tags and varints)."""
        req = pb.UpdateBMCInfoRequest(uuid="u", bmc_info=pb.BMCInfo(ip="1.2.3.4", port=624))
        self.assertEqual(req.SerializeToString(),
                         b"\x0a\x01u" + b"\x12\x0c" + b"\x0a\x071.2.3.4" + b"\x10\xf0\x04")
        resp = pb.CreateServerResponse(wipe=True, reboot_timeout=1200.0)
        self.assertEqual(resp.SerializeToString(),
                         b"\x08\x01" + b"\x21" + b"\x00\x00\x00\x00\x00\xc0\x92\x40")


class GeneratedUpToDateTests(SynchronousTestCase):
    def test_generated_matches_proto(self) -> None:
        """The committed agent_pb2 was generated from the committed agent.proto (run
        scripts/gen-proto after editing the .proto)."""
        import os
        import tempfile

        from google.protobuf import descriptor_pb2
        from grpc_tools import protoc

        # sidero/proto/agent_pb2.py: the directory holding the sidero package, 2 levels up.
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(pb.__file__))))
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "set.pb")
            rc = protoc.main(["protoc", f"-I{root}", f"--descriptor_set_out={out}",
                              os.path.join(root, "sidero/proto/agent.proto")])
            self.assertEqual(rc, 0)
            with open(out, "rb") as f:
                fds = descriptor_pb2.FileDescriptorSet.FromString(f.read())
        [compiled] = fds.file
        # protoc records json_name in descriptor sets but not in generated Python.
        for message in compiled.message_type:
            for field in message.field:
                field.ClearField("json_name")
        committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
        self.assertEqual(compiled, committed)
