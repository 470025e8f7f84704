"""The fuzz targets: one function of bytes per parser that reads bytes from the network.

Each target feeds the bytes to the parser and then to the code that acts on what it parsed
(the decision, the reply's encoding, the store write), and lets through only the error type
the module declares for bad input (L{Target.expected}); anything else escaping is a crash.
Protocol-level targets also fail on anything the protocol logged as a failure (it caught an
exception it did not expect: L{FailureWatch}).

Nothing in this module imports sidero at import time: the runner imports a target's modules
inside atheris' instrumentation (L{Target.setup}), so only they carry coverage hooks.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

OneInput = Callable[[bytes], None]


class Crash(AssertionError):
    """A property of a target did not hold (not a declared error; the fuzzer stops on it)."""


@dataclass(frozen=True)
class Target:
    name: str
    #: what the bytes are, for the README table
    what: str
    #: imports its modules and returns the function of one input
    setup: Callable[[], OneInput]
    #: the error types the module declares for bad input (informative: the target catches them)
    expected: str
    #: module prefixes atheris instruments for coverage
    instrument: tuple[str, ...] = ("sidero",)
    #: longest input libFuzzer generates
    max_len: int = 4096


class FailureWatch:
    """Twisted log events that carry a failure: a protocol caught something unexpected.

    Installed once as the only log observer (other events are dropped, so a million inputs do
    not keep a million log lines); L{check} raises the first failure seen since the last check.
    """

    _installed: FailureWatch | None = None

    def __init__(self) -> None:
        self.failures: list[Any] = []

    @classmethod
    def install(cls) -> FailureWatch:
        if cls._installed is None:
            from twisted.logger import globalLogBeginner

            watch = cls()
            globalLogBeginner.beginLoggingTo([cast(Any, watch)], discardBuffer=True,
                                             redirectStandardIO=False)
            cls._installed = watch
        return cls._installed

    def __call__(self, event: dict[str, Any]) -> None:
        failure = event.get("log_failure")
        if failure is not None and len(self.failures) < 10:
            self.failures.append(failure)

    def check(self) -> None:
        if self.failures:
            failure, self.failures = self.failures[0], []
            failure.raiseException()


def chunks(data: bytes) -> tuple[int, bytes]:
    """The first byte (a choice the input makes), and the rest."""
    return (data[0], data[1:]) if data else (0, b"")


def frames(data: bytes, limit: int = 16) -> list[bytes]:
    """Split an input into up to C{limit} frames: each a 2-byte big-endian length, then that
    many bytes (the last frame takes whatever is left)."""
    out: list[bytes] = []
    i = 0
    while i < len(data) and len(out) < limit:
        if i + 2 > len(data):
            out.append(data[i:])
            break
        (n,) = struct.unpack_from("!H", data, i)
        out.append(data[i + 2:i + 2 + n])
        i += 2 + n
    return out


def join_frames(parts: list[bytes]) -> bytes:
    """The inverse of L{frames} (for seeds)."""
    return b"".join(struct.pack("!H", len(p)) + p for p in parts)


# --- DHCP -----------------------------------------------------------------------------------------

def _dhcp() -> OneInput:
    from sidero.protocols.dhcp import codec, policy
    from sidero.timeline import uuid_from_pxe_guid

    cfg = policy.ProxyConfig(server_ip="192.0.2.1", endpoint="192.0.2.1", api_port=8081)

    def one(data: bytes) -> None:
        try:
            msg = codec.decode(data)
        except codec.MalformedPacket:
            return
        # What the protocol reads of every message it answers or logs.
        msg.mac.hex(":")
        uuid_from_pxe_guid(msg.get(codec.OPT_CLIENT_UUID))
        for proxy_port in (False, True):
            decision = policy.decide(msg, cfg, proxy_port=proxy_port, source=("192.0.2.7", 68))
            if isinstance(decision, policy.Reply):
                reply = codec.decode(codec.encode(decision.message))
                if reply.options != decision.message.options:
                    raise Crash("our reply does not decode to what we encoded")
        # A decoded message re-encodes to the same options (the agent's client encodes).
        again = codec.decode(codec.encode(msg))
        if again.options != msg.options:
            raise Crash("decode(encode(msg)) changed the options")

    return one


# --- TFTP -----------------------------------------------------------------------------------------

def _tftp() -> OneInput:
    from sidero.protocols import bootfiles
    from sidero.protocols.tftp import codec
    from sidero.protocols.tftp.backend import clean_path
    from sidero.protocols.tftp.session import SessionConfig, negotiate

    config = SessionConfig()

    def one(data: bytes) -> None:
        try:
            packet = codec.decode(data)
        except codec.MalformedDatagram:
            return
        if not isinstance(packet, codec.Request):
            return
        agreed = negotiate(packet.options, 123_456, config)
        if not 8 <= agreed.blksize <= config.max_blksize or agreed.windowsize < 1:
            raise Crash(f"negotiated out of range: {agreed}")
        codec.encode_oack(agreed.oack)
        clean_path(packet.filename)
        bootfiles.wants_chain_script(packet.filename, bootfiles.is_ipxe_tftp(packet.options))
        bootfiles.candidates(packet.filename)
        again = codec.decode(codec.encode_request(packet.opcode, packet.filename, packet.mode,
                                                  packet.options))
        if again != packet:
            raise Crash("decode(encode(request)) differs")

    return one


def _tftp_session() -> OneInput:
    """Datagrams from two peers into one single-port server with real sessions."""
    from twisted.internet.defer import Deferred, fail, succeed
    from twisted.internet.task import Clock
    from twisted.internet.testing import FakeDatagramTransport
    from zope.interface import implementer

    from sidero.protocols.tftp.backend import AssetNotFound, BytesReader, IAssetReader, IBootAssets
    from sidero.protocols.tftp.protocol import TFTPProtocol

    files = {"undionly.kpxe": bytes(range(256)) * 20, "boot.ipxe": b"#!ipxe\nexit\n", "empty": b""}

    @implementer(IBootAssets)
    class Assets:
        def open(self, name: str) -> Deferred[IAssetReader]:
            if name in files:
                return succeed(BytesReader(files[name], name))
            return fail(AssetNotFound(name))

    watch = FailureWatch.install()
    clock = Clock()
    peers = [("192.0.2.10", 2000), ("192.0.2.11", 3000)]

    def one(data: bytes) -> None:
        server = TFTPProtocol(Assets(), clock=clock, max_sessions=4)
        server.makeConnection(FakeDatagramTransport())
        for frame in frames(data):
            choice, datagram = chunks(frame)
            server.datagramReceived(datagram, peers[choice & 1])
            if choice & 0x80:
                clock.advance((choice & 0x70) >> 2)
        server.abort_all()
        clock.advance(3600)
        watch.check()
        if server.stats.internal_errors:
            raise Crash("TFTP internal error")

    return one


# --- HTTP -----------------------------------------------------------------------------------------

def _http() -> OneInput:
    """Raw HTTP/1.1 requests into the API port's HTTP site (twisted.web + the boot routes)."""
    import base64
    import os
    import tempfile

    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport
    from twisted.web.server import Site

    from sidero.protocols.http.ipxe import BootSettings
    from sidero.protocols.http.site import BootSite

    lookup = _metadata_lookup(base64)
    settings = BootSettings("192.0.2.1", 8081, siderolink_server_address="fdae:41e4:649b:9303::1")
    # One empty directory per user, reused (libFuzzer's exit would skip any clean-up).
    root = os.path.join(tempfile.gettempdir(), f"sidero-fuzz-{os.getuid()}", "http-root")
    os.makedirs(root, mode=0o700, exist_ok=True)
    site = Site(BootSite(lookup, settings, env_dir=root, tftp_roots=[root]).resource(),
                timeout=None)
    site.displayTracebacks = False
    clock = Clock()
    watch = FailureWatch.install()

    def one(data: bytes) -> None:
        channel = site.buildProtocol(None)
        channel.callLater = clock.callLater
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(data)
        channel.connectionLost(None)
        clock.advance(120)
        watch.check()  # the site logs a handler's exception as a failure (and answers 500)

    return one


def _metadata_lookup(base64: Any) -> Any:
    """A lookup holding the spec's /configdata fixtures and a ready default environment."""
    from bench.lookup import ObjectLookup

    lookup = ObjectLookup()
    ns = "default"
    kernel, initrd = "http://assets/default/vmlinuz", "http://assets/default/initramfs.xz"
    lookup.add("environment", {
        "metadata": {"name": "default"},
        "spec": {"kernel": {"url": kernel, "args": ["console=ttyS0"]}, "initrd": {"url": initrd}},
        "status": {"conditions": [{"type": "Ready", "status": "True", "url": kernel},
                                  {"type": "Ready", "status": "True", "url": initrd}]}})
    fixtures: list[tuple[str, str, dict[str, Any], dict[str, Any] | None]] = [
        ("0000-1111-2222", "version: v1alpha1\nmachine:\n  kubelet: {}\n", {}, None),
        ("1111-2222-3333", "version: v1alpha1\nmachine:\n  kubelet: {}\n",
         {"configPatches": [{"op": "add", "path": "/machine/network",
                             "value": {"hostname": "example2"}}]}, None),
        ("6666-7777-8888", "version: v1alpha1\nmachine:\n  kubelet: {}\n",
         {"strategicPatches": ["machine:\n  network:\n    hostname: example6\n"]},
         {"bootFromDiskMethod": "http-404"}),
        ("4444-0000-0000", "version: v1alpha1\nmachine:\n", {"pxeBootAlways": True}, {}),
    ]
    for index, (uuid, config, server_spec, server_class) in enumerate(fixtures):
        binding: dict[str, Any] = {"metadata": {"name": uuid}, "spec": {
            "metalMachineRef": {"namespace": ns, "name": f"mm-{index}"}}}
        if server_class is not None:
            binding["spec"]["serverClassRef"] = {"name": f"class-{index}"}
            lookup.add("class", {"metadata": {"name": f"class-{index}"}, "spec": server_class})
        lookup.add("binding", binding)
        lookup.add("metalmachine", {"metadata": {"namespace": ns, "name": f"mm-{index}",
                                                 "ownerReferences": [{
                                                     "apiVersion": "cluster.x-k8s.io/v1beta1",
                                                     "kind": "Machine", "name": f"m-{index}"}]}})
        lookup.add("machine", {"metadata": {"namespace": ns, "name": f"m-{index}"},
                               "spec": {"bootstrap": {"dataSecretName": f"bootstrap{index}"}}})
        lookup.add("secret", {"metadata": {"namespace": ns, "name": f"bootstrap{index}"},
                              "data": {"value": base64.b64encode(config.encode()).decode()}})
        conditions = [{"type": "PXEBooted", "status": "True"}] if index >= 2 else []
        lookup.add("server", {"apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Server",
                              "metadata": {"name": uuid}, "spec": {"accepted": True, **server_spec},
                              "status": {"conditions": conditions}})
    return lookup


# --- the stores behind the gRPC services -----------------------------------------------------------

class _InlineStore:
    """The real embedded store (SQLite in memory, real admission) run inline, renewed every
    C{renew} inputs so its size, and so memory, stays bounded."""

    def __init__(self, prepare: Callable[[Any], None], renew: int = 2000) -> None:
        self.prepare = prepare
        self.renew = renew
        self.used = renew
        self.store: Any = None
        self.clock: Any = None

    def get(self) -> tuple[Any, Any]:
        from sidero.api.admission import Admission
        from tests.store.inline import inline_store

        if self.used >= self.renew:
            if self.store is not None:
                run(self.store.close())
            self.store, self.clock = inline_store(admission=Admission())
            run(self.store.open())
            self.prepare(self.store)
            self.used = 0
        self.used += 1
        return self.store, self.clock


def run(coroutine: Any) -> Any:
    """Run a coroutine over the inline store to completion; its exception is raised."""
    from twisted.internet.defer import Deferred

    d = Deferred.fromCoroutine(coroutine) if not isinstance(coroutine, Deferred) else coroutine
    results: list[Any] = []
    d.addBoth(results.append)
    if not results:
        raise Crash("a call over the inline store did not complete")
    from twisted.python.failure import Failure

    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


AGENT_UUID = "4c4c4544-0032-3410-8058-b4c04f4d4e31"


def _agent() -> OneInput:
    """Agent API requests (first byte: which RPC), as grpcio hands them to the servicer."""
    from google.protobuf.message import DecodeError

    from sidero.proto import agent_pb2 as pb
    from sidero.protocols.grpc.server import AgentAPI
    from sidero.store.errors import StoreError

    def prepare(store: Any) -> None:
        api = AgentAPI(store, _clock(), auto_accept_servers=True, auto_bmc_setup=True,
                       insecure_wipe=False, server_reboot_timeout=1200.0)
        run(api.create_server(pb.CreateServerRequest(
            hardware=pb.HardwareInformation(system=pb.SystemInformation(uuid=AGENT_UUID)))))

    stores = _InlineStore(prepare)
    methods: list[tuple[Any, str]] = [
        (pb.CreateServerRequest, "create_server"),
        (pb.MarkServerAsWipedRequest, "mark_server_as_wiped"),
        (pb.ReconcileServerAddressesRequest, "reconcile_server_addresses"),
        (pb.HeartbeatRequest, "heartbeat"),
        (pb.UpdateBMCInfoRequest, "update_bmc_info"),
    ]

    def one(data: bytes) -> None:
        choice, payload = chunks(data)
        cls, method = methods[choice % len(methods)]
        try:
            request = cls.FromString(payload)
        except DecodeError:
            return
        store, clock = stores.get()
        api = AgentAPI(store, clock, auto_accept_servers=bool(choice & 0x80),
                       auto_bmc_setup=bool(choice & 0x40), insecure_wipe=False,
                       server_reboot_timeout=1200.0)
        try:
            run(getattr(api, method)(request))
        except StoreError:
            pass  # the servicer answers these as UNKNOWN with the store's message

    return one


def _clock() -> Any:
    from twisted.internet.task import Clock

    clock = Clock()
    clock.advance(1_700_000_000)
    return clock


PROVISION_UUIDS = ("0b7a3c1e-6c1f-4f0a-9c64-2d5f7a8b9c0d", "9f0e1d2c-3b4a-4958-8776-655443322110")


def _provision() -> OneInput:
    from google.protobuf.message import DecodeError

    from sidero.api.registry import SERVER_BINDING
    from sidero.proto import provision_pb2 as pb
    from sidero.siderolink.config import SideroLinkConfig
    from sidero.siderolink.provision import ProvisionAPI, ProvisionError
    from sidero.store.errors import StoreError

    identity = SideroLinkConfig("installation-1", "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=")

    class Link:
        unavailable = None
        public_endpoint = "192.0.2.1:51821"

        @property
        def identity(self) -> SideroLinkConfig:
            return identity

    def prepare(store: Any) -> None:
        for i, uuid in enumerate(PROVISION_UUIDS):
            spec: dict[str, Any] = {"metalMachineRef": {"kind": "MetalMachine",
                                                        "namespace": "default", "name": "mm"}}
            if i == 0:
                spec["siderolink"] = {"address": "fdae:41e4:649b:9303:7886:731d:1a34:9ba7/64",
                                     "publicKey": "x" * 43 + "="}
            run(store.create({"apiVersion": SERVER_BINDING.api_version, "kind": "ServerBinding",
                              "metadata": {"name": uuid}, "spec": spec}))

    stores = _InlineStore(prepare)

    def one(data: bytes) -> None:
        try:
            request = pb.ProvisionRequest.FromString(data)
        except DecodeError:
            return
        store, _ = stores.get()
        api = ProvisionAPI(store, Link(), random_bytes=lambda n: bytes(range(n)))
        try:
            response = run(api.provision(request))
        except (ProvisionError, StoreError):
            return
        response.SerializeToString()

    return one


def _eventsink() -> OneInput:
    """Talos' EventRequest (the Any-wrapped machine events) through the sink's Publish."""
    from google.protobuf.message import DecodeError

    from sidero.api.registry import SERVER_BINDING
    from sidero.proto import events_pb2
    from sidero.siderolink.annotator import Annotation
    from sidero.siderolink.eventsink import EventSinkAPI, SinkError
    from sidero.store.errors import StoreError

    uuid = PROVISION_UUIDS[0]
    tunnel = "fdae:41e4:649b:9303:7886:731d:1a34:9ba7"
    known = Annotation(server_uuid=uuid, namespace="default", metal_machine="mm")

    def prepare(store: Any) -> None:
        run(store.create({"apiVersion": SERVER_BINDING.api_version, "kind": "ServerBinding",
                          "metadata": {"name": uuid},
                          "spec": {"metalMachineRef": {"kind": "MetalMachine",
                                                       "namespace": "default", "name": "mm"}}}))

    stores = _InlineStore(prepare)
    import ipaddress

    negative = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]

    def one(data: bytes) -> None:
        choice, payload = chunks(data)
        try:
            request = events_pb2.EventRequest.FromString(payload)
        except DecodeError:
            return
        store, clock = stores.get()
        api = EventSinkAPI(store, clock, lambda ip: known if choice & 1 else None, negative)
        peer = f"ipv6:%5B{tunnel}%5D:41234" if choice & 2 else f"ipv4:10.5.0.{choice}:5000"
        try:
            run(api.publish(peer, request))
        except (SinkError, StoreError):
            return

    return one


# --- the log streams ------------------------------------------------------------------------------

def _kmsg() -> OneInput:
    """Talos' kmsg JSON lines, as TCP segments into one connection of the log receiver."""
    from twisted.internet.testing import StringTransport

    from sidero.siderolink.annotator import Annotation
    from sidero.siderolink.logreceiver import KmsgFactory, MalformedLog, decode_line, go_json

    class Writer:
        def __init__(self) -> None:
            self.lines = 0

        def register(self, transport: Any) -> None:
            pass

        def unregister(self, transport: Any) -> None:
            pass

        def write(self, line: str) -> None:
            self.lines += 1
            if not line.endswith("\n") or "\n" in line[:-1]:
                raise Crash(f"not one line: {line[:100]!r}")

    writer = Writer()
    annotation = Annotation(server_uuid="u", cluster="c", namespace="n", metal_machine="m")
    factory = KmsgFactory(writer, lambda ip: annotation)  # type: ignore[arg-type]
    watch = FailureWatch.install()

    def one(data: bytes) -> None:
        try:
            for message in decode_line(data):
                go_json(message)
        except (MalformedLog, ValueError, TypeError):
            pass  # what KmsgFactory.emit counts as an unencodable message
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        for segment in frames(data, limit=8):
            protocol.dataReceived(segment)
        protocol.connectionLost(None)  # type: ignore[arg-type]
        watch.check()

    return one


def _syslog() -> OneInput:
    """Syslog: one datagram (RFC 3164/5424), and the bytes as a TCP stream (RFC 6587 framing)."""
    import json

    from twisted.internet.testing import StringTransport

    from sidero.protocols.syslog.protocol import SyslogSink, SyslogTCP, SyslogUDP

    lines: list[str] = []

    def write(line: str) -> None:
        json.loads(line)  # every line we write is JSON
        if len(lines) < 64:
            lines.append(line)

    sink = SyslogSink(write, lambda source: None)
    udp = SyslogUDP(sink)
    watch = FailureWatch.install()

    class Address:
        host = "192.0.2.7"

    def one(data: bytes) -> None:
        lines.clear()
        # The datagram path parses, formats and writes; only SyslogError is caught there.
        udp.datagramReceived(data, ("192.0.2.7", 514))
        tcp = SyslogTCP(sink, Address())  # type: ignore[arg-type]
        tcp.makeConnection(StringTransport())
        for segment in frames(data, limit=8):
            tcp.dataReceived(segment)
        tcp.connectionLost(None)
        watch.check()

    return one


# --- YAML and JSON bodies -------------------------------------------------------------------------

def _management() -> OneInput:
    """Request bodies and manifests of the management API (JSON or YAML)."""
    from sidero.management.codec import DecodeError, load_body, load_documents

    def one(data: bytes) -> None:
        choice, body = chunks(data)
        try:
            if choice % 3 == 0:
                load_body(body, "application/json")
            elif choice % 3 == 1:
                load_body(body, "application/yaml")
            else:
                load_documents(body.decode("utf-8", "replace"))
        except DecodeError:
            pass

    return one


BASE_CONFIG = """version: v1alpha1
machine:
  type: worker
  kubelet:
    extraArgs:
      node-labels: a=b
  network:
    interfaces:
      - interface: eth0
        dhcp: true
cluster:
  controlPlane:
    endpoint: https://10.5.0.2:6443
---
apiVersion: v1alpha1
kind: ExtensionServiceConfig
name: frr
environment:
  - A=B
"""


def _configpatch() -> OneInput:
    """A Server/ServerClass config patch (RFC 6902 JSON or a strategic-merge YAML) applied to a
    machine config, and the bytes as a machine config themselves."""
    from sidero.talos import configpatch as cp

    base = cp.load_documents(BASE_CONFIG)
    single = cp.dump_yaml(base[:1])

    def one(data: bytes) -> None:
        choice, text = chunks(data)
        try:
            if choice & 1:
                docs = cp.load_documents(text)
                cp.render(docs)
                return
            patch = cp.load_patch(text)
            if isinstance(patch, cp.JSONPatch):
                cp.apply_json6902(single, patch)
            else:
                cp.render(cp.strategic_merge(base, patch))
        except cp.ConfigPatchError:
            pass

    return one


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("dhcp", "DHCPv4 packet: codec, proxy decision on :67 and :4011, reply encoding",
           _dhcp, "MalformedPacket", max_len=1500),
    Target("tftp", "TFTP datagram: codec, option negotiation, file-name handling",
           _tftp, "MalformedDatagram", max_len=1500),
    Target("tftp-session", "TFTP datagrams from two peers into a single-port server "
           "(sessions, ACK/ERROR handling, timeouts)", _tftp_session, "none (all counted)",
           max_len=4096),
    Target("http", "raw HTTP/1.1 request to the API port's site (/ipxe, /configdata, "
           "/boot.ipxe, /tftp/, /env/)", _http, "none (4xx answers)",
           # twisted.web's own parser is not instrumented: it doubled the cost of an input
           # (a pipelined request costs ~0.3 ms) and it is not this project's code.
           instrument=("sidero", "klein"), max_len=1024),
    Target("agent", "Agent API gRPC request messages through AgentAPI on the embedded store",
           _agent, "DecodeError, StoreError", max_len=4096),
    Target("provision", "SideroLink ProvisionRequest through ProvisionAPI on the embedded store",
           _provision, "DecodeError, ProvisionError, StoreError", max_len=1024),
    Target("eventsink", "Talos EventRequest (machine events in an Any) through Publish",
           _eventsink, "DecodeError, SinkError, StoreError", max_len=4096),
    Target("kmsg", "Talos kmsg JSON lines into a log-receiver connection", _kmsg,
           "MalformedLog (connection closed)", max_len=8192),
    Target("syslog", "syslog datagram and TCP stream (RFC 3164, 5424, 6587)", _syslog,
           "SyslogError (dropped, counted)", max_len=8192),
    Target("management", "management API request bodies and manifests (JSON/YAML)",
           _management, "DecodeError", max_len=8192),
    Target("configpatch", "Talos config patches and machine configs (bounded YAML reader)",
           _configpatch, "ConfigPatchError", max_len=8192),
)}
