"""Write the hand-made seeds: ``python -m bench.fuzz.seeds``.

Packets and messages in the shapes the tests already hold (the firmware DHCP packets of
C{tests/protocols/dhcp/packets.py}: QEMU's iPXE ROM, OVMF's EDK2 PXE and HTTP boot; Talos'
kmsg lines of C{tests/siderolink/data/kmsg.jsonl}; the agent's hardware report of the gRPC
tests; the events Talos publishes), as C{corpus/<target>/seed-<name>}.  The real clients'
captures are L{bench.fuzz.capture}'s; the inputs the fuzzer found are C{found-*} or
C{crash-*} (those made a target fail once and are kept as regressions).
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.fuzz.targets import AGENT_UUID, PROVISION_UUIDS, join_frames

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def dhcp() -> dict[str, bytes]:
    from tests.protocols.dhcp import packets as p

    seeds = {name.lower(): getattr(p, name) for name in dir(p)
             if name.isupper() and name.endswith(("DISCOVER", "REQUEST"))}
    # Option overload (52 = both): options in file and sname too.
    base = bytearray(p.EDK2_UEFI_DISCOVER)
    base[108:108 + 6] = p.opt(77, b"iPXE")
    base[44:44 + 5] = p.opt(12, b"pxe")
    seeds["overload"] = bytes(base[:240]) + p.opt(52, b"\x03") + bytes(base[240:])
    return seeds


def tftp() -> dict[str, bytes]:
    from sidero.protocols.tftp import codec

    return {
        "ipxe-rrq": codec.encode_request(codec.RRQ, "undionly.kpxe", "octet",
                                         {"blksize": "1432", "tsize": "0"}),
        "rrq-all-options": codec.encode_request(codec.RRQ, "/boot/snp.efi", "netascii", {
            "blksize": "65464", "timeout": "5", "tsize": "0", "windowsize": "16"}),
        "wrq": codec.encode_request(codec.WRQ, "x", "octet"),
        "ack": codec.encode_ack(1),
        "data": codec.encode_data(2, b"x" * 16),
        "error": codec.encode_error(0, "Transfer cancelled"),
        "oack": codec.encode_oack({"blksize": "1428"}),
    }


def tftp_session() -> dict[str, bytes]:
    from sidero.protocols.tftp import codec

    def frame(choice: int, datagram: bytes) -> bytes:
        return bytes((choice,)) + datagram

    rrq = codec.encode_request(codec.RRQ, "undionly.kpxe", "octet",
                               {"blksize": "512", "windowsize": "4", "tsize": "0"})
    return {
        "transfer": join_frames([frame(0, rrq)] + [frame(0, codec.encode_ack(b))
                                                   for b in range(0, 12)]),
        "timeouts": join_frames([frame(0, rrq), frame(0x80 | 0x70, b""),
                                 frame(0, codec.encode_ack(0)), frame(0xF0, b"")]),
        "two-peers": join_frames([frame(0, rrq), frame(1, rrq), frame(1, codec.encode_ack(0)),
                                  frame(0, codec.encode_error(0, "stop")), frame(0, rrq)]),
        "missing": join_frames([frame(0, codec.encode_request(codec.RRQ, "../etc/passwd", "octet"))]),
        "empty-file": join_frames([frame(0, codec.encode_request(codec.RRQ, "empty", "octet")),
                                   frame(0, codec.encode_ack(1))]),
    }


def http() -> dict[str, bytes]:
    def get(path: str, *headers: str, method: str = "GET") -> bytes:
        lines = [f"{method} {path} HTTP/1.1", "Host: 192.0.2.1:8081", *headers, "", ""]
        return "\r\n".join(lines).encode()

    ipxe = "User-Agent: iPXE/1.21.1+ (g8e8a5)"
    return {
        "ipxe-known": get("/ipxe?uuid=6666-7777-8888&mac=52:54:00:12:34:56&domain=&hostname="
                          "&serial=&arch=arm64", ipxe),
        "ipxe-agent": get(f"/ipxe?uuid={AGENT_UUID}&mac=5254.0012.3456&arch=x86_64", ipxe),
        "configdata": get("/configdata?uuid=1111-2222-3333", "User-Agent: Talos/v1.10"),
        "configdata-strategic": get("/configdata?uuid=6666-7777-8888"),
        "pipelined": get("/boot.ipxe", ipxe) + get("/healthz") + get("/readyz", method="HEAD"),
        "post-chunked": b"POST /ipxe?uuid=x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked"
                        b"\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
        "tftp-chain": get("/tftp/snp.efi", ipxe),
        "env-range": get("/env/default/initramfs.xz", "Range: bytes=10-20,30-"),
        "http10": b"GET /configdata?uuid=4444-0000-0000&uuid=x HTTP/1.0\r\n\r\n",
    }


def agent() -> dict[str, bytes]:
    from sidero.proto import agent_pb2 as pb
    from tests.protocols.grpc.test_server import hardware

    def seed(index: int, message: object) -> bytes:
        return bytes((index | 0xC0,)) + message.SerializeToString()  # type: ignore[attr-defined]

    return {
        "create": seed(0, pb.CreateServerRequest(hardware=hardware(AGENT_UUID), hostname="talos-1")),
        "create-new": seed(0, pb.CreateServerRequest(hardware=hardware("11111111-2222-3333-4444-555555555555"))),
        "wiped": seed(1, pb.MarkServerAsWipedRequest(uuid=AGENT_UUID)),
        "addresses": seed(2, pb.ReconcileServerAddressesRequest(uuid=AGENT_UUID, address=[
            pb.Address(type="InternalIP", address="192.0.2.10"),
            pb.Address(type="Hostname", address="talos-1")])),
        "heartbeat": seed(3, pb.HeartbeatRequest(uuid=AGENT_UUID)),
        "bmc": seed(4, pb.UpdateBMCInfoRequest(uuid=AGENT_UUID, bmc_info=pb.BMCInfo(
            ip="192.0.2.200", port=623, user="sidero", **{"pass": "secret"}))),
    }


def provision() -> dict[str, bytes]:
    from sidero.proto import provision_pb2 as pb

    key = "kHRVlUTPnNkE/QvlphkkE1BZkZzFaL8PnH9Fl0tVpS4="
    return {
        "known": pb.ProvisionRequest(node_uuid=PROVISION_UUIDS[0], node_public_key=key,
                                     talos_version="v1.10.6").SerializeToString(),
        "new-address": pb.ProvisionRequest(node_uuid=PROVISION_UUIDS[1], node_public_key=key,
                                           join_token="t").SerializeToString(),
        "bad-key": pb.ProvisionRequest(node_uuid=PROVISION_UUIDS[1],
                                       node_public_key="abc").SerializeToString(),
    }


def eventsink() -> dict[str, bytes]:
    from google.protobuf import any_pb2

    from sidero.proto import common_pb2, events_pb2, machine_pb2

    def seed(message: object, name: str) -> bytes:
        data = any_pb2.Any()
        data.Pack(message)  # type: ignore[arg-type]
        return b"\x03" + events_pb2.EventRequest(data=data, id=name, actor_id="").SerializeToString()

    return {
        "address": seed(machine_pb2.AddressEvent(hostname="talos-1", addresses=[
            "192.0.2.10", "10.1.2.3", "fdae:41e4:649b:9303:7886:731d:1a34:9ba7", "2001:db8::1"]), "a"),
        "install-failed": seed(machine_pb2.SequenceEvent(
            sequence="install", action=machine_pb2.SequenceEvent.NOOP,
            error=common_pb2.Error(code=common_pb2.FATAL, message="disk not found")), "b"),
        "boot": seed(machine_pb2.SequenceEvent(sequence="boot",
                                               action=machine_pb2.SequenceEvent.START), "c"),
        "phase-install": seed(machine_pb2.PhaseEvent(phase="install",
                                                     action=machine_pb2.PhaseEvent.START), "d"),
        "save-config": seed(machine_pb2.PhaseEvent(phase="saveConfig",
                                                   action=machine_pb2.PhaseEvent.START), "e"),
        "config-load": seed(machine_pb2.ConfigLoadErrorEvent(error="yaml: line 3"), "f"),
        "config-invalid": seed(machine_pb2.ConfigValidationErrorEvent(error="bad"), "g"),
        "service": seed(machine_pb2.ServiceStateEvent(service="etcd", message="Running",
                                                      action=machine_pb2.ServiceStateEvent.RUNNING), "h"),
        "task": seed(machine_pb2.TaskEvent(task="x", action=machine_pb2.TaskEvent.STOP), "i"),
    }


def kmsg() -> dict[str, bytes]:
    lines = (REPO / "tests/siderolink/data/kmsg.jsonl").read_bytes().splitlines(keepends=True)
    return {
        "talos-boot": join_frames(lines[:4]),
        "split-line": join_frames([lines[0][:40], lines[0][40:]]),
        "concatenated": join_frames([b'{"a":1}{"b":[1.5e300,true,null,"\\u2028<>&"]}\n']),
        "no-newline": join_frames([b'{"msg":"last","clock":1e-7}']),
    }


def syslog() -> dict[str, bytes]:
    return {
        "ipxe": b"<14>ipxe: net0: 52:54:00:12:34:56 using virtio-net",
        "rfc5424-sd": b'<165>1 2003-10-11T22:14:15.003Z host evntslog - ID47 '
                      b'[exampleSDID@32473 iut="3" eventID="1011"][x@1 a="\\"]"] \xef\xbb\xbfmsg',
        "bsd": b"<34>Oct 11 22:14:15 mymachine su[230]: 'su root' failed for lonvick",
        "bmc": b"<11>idrac: link down",
        "tcp-newline": join_frames([b"<13>a: one\n<13>b: two\n", b"<13>c: three"]),
        "tcp-octets": join_frames([b"10 <13>a: one15 <14>1 - - - - - -"]),
    }


def management() -> dict[str, bytes]:
    server = {"apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Server",
              "metadata": {"name": AGENT_UUID}, "spec": {"accepted": True}}
    return {
        "json": b"\x00" + json.dumps(server).encode(),
        "yaml": b"\x01apiVersion: v1\nkind: Secret\nmetadata:\n  name: x\ndata:\n  a: Yg==\n",
        "list": b"\x02" + json.dumps({"kind": "List", "items": [server, server]}).encode(),
        "stream": b"\x02---\nkind: A\n---\n---\nkind: B\nx: [1, {y: z}]\n",
    }


def configpatch() -> dict[str, bytes]:
    ops = [{"op": "add", "path": "/machine/network/hostname", "value": "n1"},
           {"op": "replace", "path": "/machine/type", "value": "controlplane"},
           {"op": "remove", "path": "/cluster/controlPlane"},
           {"op": "test", "path": "/version", "value": "v1alpha1"}]
    return {
        "json6902": b"\x00" + json.dumps(ops).encode(),
        "strategic": b"\x00machine:\n  network:\n    hostname: n1\n    interfaces:\n"
                     b"      - interface: eth0\n        mtu: 9000\n",
        "delete": b"\x00machine:\n  kubelet:\n    $patch: delete\n---\napiVersion: v1alpha1\n"
                  b"kind: ExtensionServiceConfig\nname: frr\n$patch: delete\n",
        "config": b"\x01" + Path(__file__).with_name("targets.py").read_text()
                  .split('BASE_CONFIG = """', 1)[1].split('"""', 1)[0].encode(),
        "anchors": b"\x01a: &x [1, 2]\nb: *x\nc: !!binary aGk=\n",
    }


GENERATORS = {"dhcp": dhcp, "tftp": tftp, "tftp-session": tftp_session, "http": http,
              "agent": agent, "provision": provision, "eventsink": eventsink, "kmsg": kmsg,
              "syslog": syslog, "management": management, "configpatch": configpatch}


def main() -> None:
    for target, generate in GENERATORS.items():
        dest = HERE / "corpus" / target
        dest.mkdir(parents=True, exist_ok=True)
        for name, data in generate().items():
            (dest / f"seed-{name}").write_bytes(data)


if __name__ == "__main__":
    main()
