# -*- test-case-name: tests.siderolink.test_eventsink -*-
"""The Talos event sink (spec §3.11): C{events.EventSinkService/Publish} on C{[server]:4002}.

Talos (C{talos.events.sink=[<server>]:4002}, or an EventSinkConfig document) publishes its
machine events through the tunnel, plaintext gRPC.  The node is known by the gRPC peer
address (its tunnel address, L{sidero.siderolink.annotator}); its ServerBinding gets:

  - C{AddressEvent}: C{spec.addresses} (addresses that parse, are not the tunnel address and
    are outside every C{--events-negative-address-filter} prefix) and C{spec.hostname};
  - config load/validation errors, install and boot progress: the C{TalosConfigLoaded},
    C{TalosConfigValidated} and C{TalosInstalled} conditions with their reasons (§1.5);

and the MetalMachine controller copies addresses and conditions onto the MetalMachine.
Each event is logged (C{incoming event}) with the node, id, type, annotation and
event-specific fields, as the Go events manager does.

Events that tell where a boot is (sequences, phase starts, config errors, addresses, services
running or failed) are also recorded on the boot timeline against the node's server
(L{timeline_step}); tasks and other service transitions are left out (dozens per boot).

Like the agent API this awaits the store (ARCHITECTURE.md says why): the binding is read,
changed and patched (a conflicting write starts over from a fresh read); a failed write is
returned to Talos, which retries.  Unknown event types are answered at once and change
nothing; an undecodable payload is an error.

L{EventSinkAPI} runs on the reactor; L{EventSinkServicer} is grpcio's side (worker threads
handing calls to the reactor, deadlines on both sides); L{make_event_sink_server} binds it.
"""

from __future__ import annotations

import copy
import ipaddress
import socket
import urllib.parse
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from concurrent import futures
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel

from sidero.api import conditions
from sidero.api.registry import SERVER_BINDING
from sidero.controllers.patch import patch_changes
from sidero.proto import common_pb2, events_pb2, events_pb2_grpc, machine_pb2
from sidero.protocols.grpc.server import (
    GRPC_OPTIONS,
    ReactorUnavailable,
    call_on_reactor,
    call_timeout,
)
from sidero.siderolink.annotator import Annotation, normalise_ip
from sidero.siderolink.listen import TunnelListenerService
from sidero.store.errors import Conflict, NotFound, StoreError
from sidero.store.interfaces import IResourceStore, Object
from sidero.threads import CallTimeout

T = TypeVar("T")

TYPE_PREFIX = "type.googleapis.com/"

#: The event messages handled, by type URL (the Go sink's list).
EVENT_TYPES: dict[str, type[Message]] = {
    TYPE_PREFIX + m.DESCRIPTOR.full_name: m for m in (
        machine_pb2.SequenceEvent, machine_pb2.PhaseEvent, machine_pb2.TaskEvent,
        machine_pb2.ServiceStateEvent, machine_pb2.ConfigLoadErrorEvent,
        machine_pb2.ConfigValidationErrorEvent, machine_pb2.AddressEvent)
}

# Conditions and reasons (spec §1.5).
TALOS_CONFIG_LOADED = "TalosConfigLoaded"
TALOS_CONFIG_VALIDATED = "TalosConfigValidated"
TALOS_INSTALLED = "TalosInstalled"
REASON_CONFIG_LOAD_FAILED = "TalosConfigLoadFailed"
REASON_CONFIG_VALIDATION_FAILED = "TalosConfigValidationFailed"
REASON_INSTALLATION_IN_PROGRESS = "TalosInstallationInProgress"
REASON_INSTALLATION_FAILED = "TalosInstallationFailed"

_CONFLICT_RETRIES = 5

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Mutation = Callable[[Object, float], None]


class SinkError(Exception):
    """An event the sink cannot take (Go returns a plain error: gRPC UNKNOWN)."""


@dataclass(frozen=True)
class Decoded:
    type_url: str
    message: Message


def decode(request: events_pb2.EventRequest) -> Decoded | None:
    """The event in C{request}, or None for a type the sink does not handle.

    @raise SinkError: a handled type whose payload does not decode.
    """
    cls = EVENT_TYPES.get(request.data.type_url)
    if cls is None:
        return None
    message = cls()
    try:
        message.ParseFromString(request.data.value)
    except DecodeError as e:
        raise SinkError(f"proto: cannot parse invalid wire-format data ({e})") from None
    return Decoded(request.data.type_url, message)


def parse_peer(peer: str) -> tuple[str, str]:
    """The IP and Go's C{peer.Addr.String()} (C{[fd00::2]:41234}) of a grpcio peer string
    (C{ipv6:[fd00::2]:41234}, which grpcio may percent-encode, or C{ipv4:10.0.0.1:5}).

    @raise SinkError: not an IP peer.
    """
    text = urllib.parse.unquote(peer)
    for prefix in ("ipv6:", "ipv4:"):
        if text.startswith(prefix):
            host, _, port = text[len(prefix):].rpartition(":")
            ip = normalise_ip(host)
            if ip is not None and port.isdigit():
                return ip, (f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
    raise SinkError(f"cannot tell the node from the peer address {peer!r}")


def filter_addresses(addresses: Iterable[str], tunnel_ip: str,
                     negative: Iterable[Network]) -> list[str]:
    """The addresses that parse as IPs, are not the tunnel address and are in no prefix of
    C{negative} (as given, unnormalised, like Go)."""
    nets = list(negative)
    out = []
    for text in addresses:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            continue
        if ip.compressed == tunnel_ip or any(ip.version == n.version and ip in n for n in nets):
            continue
        out.append(text)
    return out


def _enum_name(message: Message, field: str) -> str:
    value = getattr(message, field)
    enum = message.DESCRIPTOR.fields_by_name[field].enum_type
    item = enum.values_by_number.get(value) if enum is not None else None
    return item.name if item is not None else str(value)


def event_fields(message: Message) -> dict[str, Any]:
    """What the Go events manager logs for an event of this type."""
    if isinstance(message, machine_pb2.AddressEvent):
        return {"hostname": message.hostname, "addresses": list(message.addresses)}
    if isinstance(message, machine_pb2.ConfigValidationErrorEvent | machine_pb2.ConfigLoadErrorEvent):
        return {"error": message.error}
    if isinstance(message, machine_pb2.PhaseEvent):
        return {"phase": message.phase, "action": _enum_name(message, "action")}
    if isinstance(message, machine_pb2.TaskEvent):
        return {"task": message.task, "action": _enum_name(message, "action")}
    if isinstance(message, machine_pb2.ServiceStateEvent):
        return {"service": message.service, "action": _enum_name(message, "action")}
    if isinstance(message, machine_pb2.SequenceEvent):
        fields: dict[str, Any] = {"sequence": message.sequence,
                                  "action": _enum_name(message, "action")}
        if message.HasField("error"):
            fields["error"] = message.error.message
        return fields
    return {}


#: Service transitions worth a timeline step (the others repeat for every service).
_TIMELINE_SERVICE_ACTIONS = ("RUNNING", "FAILED")


def timeline_step(message: Message) -> tuple[str, dict[str, Any]] | None:
    """The boot timeline step (name, details) of an event, or None for one not recorded."""
    fields = event_fields(message)
    if isinstance(message, machine_pb2.SequenceEvent):
        return "talos-sequence", fields
    if isinstance(message, machine_pb2.PhaseEvent):
        return ("talos-phase", fields) if message.action == machine_pb2.PhaseEvent.START else None
    if isinstance(message, machine_pb2.ConfigLoadErrorEvent):
        return "talos-config-load-error", fields
    if isinstance(message, machine_pb2.ConfigValidationErrorEvent):
        return "talos-config-invalid", fields
    if isinstance(message, machine_pb2.AddressEvent):
        return "talos-addresses", {"hostname": fields["hostname"],
                                   "addresses": ",".join(fields["addresses"])}
    if isinstance(message, machine_pb2.ServiceStateEvent):
        if fields["action"] in _TIMELINE_SERVICE_ACTIONS:
            return "talos-service", fields
    return None


def mutation_for(message: Message, tunnel_ip: str,
                 negative: Iterable[Network]) -> Mutation | None:
    """How an event changes its node's ServerBinding (spec §3.11 "Mapping"), or None."""
    if isinstance(message, machine_pb2.AddressEvent):
        addresses = filter_addresses(message.addresses, tunnel_ip, negative)
        hostname = message.hostname

        def set_addresses(b: Object, now: float) -> None:
            spec = b.setdefault("spec", {})
            if addresses:
                spec["addresses"] = addresses
            else:
                spec.pop("addresses", None)
            if hostname:
                spec["hostname"] = hostname
            else:
                spec.pop("hostname", None)
        return set_addresses
    if isinstance(message, machine_pb2.ConfigValidationErrorEvent):
        error = message.error
        return lambda b, now: _false(b, TALOS_CONFIG_VALIDATED, REASON_CONFIG_VALIDATION_FAILED,
                                     conditions.SEVERITY_ERROR, error, now)
    if isinstance(message, machine_pb2.ConfigLoadErrorEvent):
        error = message.error
        return lambda b, now: _false(b, TALOS_CONFIG_LOADED, REASON_CONFIG_LOAD_FAILED,
                                     conditions.SEVERITY_ERROR, error, now)
    if isinstance(message, machine_pb2.PhaseEvent):
        if message.action != machine_pb2.PhaseEvent.START:
            return None  # STOP comes for failures and successes alike
        if message.phase == "install":
            return lambda b, now: _false(b, TALOS_INSTALLED, REASON_INSTALLATION_IN_PROGRESS,
                                         conditions.SEVERITY_INFO, "", now)
        if message.phase == "saveConfig":
            return lambda b, now: _true(b, now, TALOS_CONFIG_VALIDATED, TALOS_CONFIG_LOADED)
        return None
    if isinstance(message, machine_pb2.SequenceEvent):
        # FATAL is 0: an install NOOP without an error matches too (as in Go).
        if (message.sequence == "install" and message.action == machine_pb2.SequenceEvent.NOOP
                and message.error.code == common_pb2.FATAL):
            text = message.error.message
            if "unix.Reboot" in text:
                return lambda b, now: _true(b, now, TALOS_INSTALLED)
            return lambda b, now: _false(b, TALOS_INSTALLED, REASON_INSTALLATION_FAILED,
                                         conditions.SEVERITY_ERROR, text, now)
        if message.sequence == "boot" and message.action == machine_pb2.SequenceEvent.START:
            return lambda b, now: _true(b, now, TALOS_INSTALLED, TALOS_CONFIG_VALIDATED,
                                        TALOS_CONFIG_LOADED)
    return None


def _true(obj: Object, now: float, *types: str) -> None:
    for t in types:
        conditions.mark_true(obj, t, now)


def _false(obj: Object, type_: str, reason: str, severity: str, message: str, now: float) -> None:
    conditions.mark_false(obj, type_, reason, severity, message, now)


class EventSinkAPI:
    """Publish on the reactor thread (see the module docstring).

    @param annotation_for: tunnel IP -> the node's L{Annotation} (None: unknown node).
    @param negative_filter: C{--events-negative-address-filter}.
    """

    log = Logger()

    def __init__(self, store: IResourceStore, clock: IReactorTime,
                 annotation_for: Callable[[str], Annotation | None],
                 negative_filter: Iterable[Network] = ()) -> None:
        self.store = store
        self.clock = clock
        self.annotation_for = annotation_for
        self.negative_filter = tuple(negative_filter)
        self.counters = {"events": 0, "unknown_types": 0, "errors": 0}
        #: The boot timeline (L{sidero.timeline.ITimeline}), or None.
        self.timeline: Any = None

    async def publish(self, peer: str, request: events_pb2.EventRequest) -> events_pb2.EventResponse:
        decoded = decode(request)
        if decoded is None:
            self.counters["unknown_types"] += 1
            return events_pb2.EventResponse()
        self.counters["events"] += 1
        ip, node = parse_peer(peer)
        annotation = self.annotation_for(ip)
        message = decoded.message
        fields: dict[str, Any] = {"node": node, "id": request.id, "type": decoded.type_url}
        fields.update(annotation.fields() if annotation is not None else {})
        fields.update(event_fields(message))
        text = "incoming event"
        if isinstance(message, machine_pb2.ServiceStateEvent):
            text = "service " + message.message
        mutation = mutation_for(message, ip, self.negative_filter)
        if mutation is not None:
            try:
                await self._patch(ip, annotation, mutation)
            except Exception:
                self.counters["errors"] += 1
                raise
        step = timeline_step(message) if self.timeline is not None else None
        if step is not None and annotation is not None and annotation.server_uuid:
            self.timeline.record(step[0], source="talos", uuid=annotation.server_uuid, **step[1])
        failed = isinstance(message, machine_pb2.SequenceEvent) and message.HasField("error")
        self.log.emit(LogLevel.error if failed else LogLevel.info, text.replace("{", "{{")
                      .replace("}", "}}"), **fields)
        return events_pb2.EventResponse()

    async def _patch(self, ip: str, annotation: Annotation | None, mutation: Mutation) -> None:
        if annotation is None or not annotation.server_uuid:
            raise SinkError(f"failed to find ServerBindings for ip {ip}")
        for attempt in range(_CONFLICT_RETRIES):
            binding = await self.store.get(SERVER_BINDING, annotation.server_uuid)
            edited = copy.deepcopy(binding)
            mutation(edited, self.clock.seconds())
            if edited == binding:
                return
            try:
                await patch_changes(self.store, SERVER_BINDING, binding, edited)
                return
            except Conflict:
                if attempt == _CONFLICT_RETRIES - 1:
                    raise
        raise AssertionError("not reached")


class EventSinkServicer(events_pb2_grpc.EventSinkServiceServicer):
    """grpcio's side of the sink; the peer address names the node."""

    log = Logger()

    def __init__(self, reactor: Any, api: EventSinkAPI, call_timeout: float = 30.0) -> None:
        self.reactor = reactor
        self.api = api
        self.call_timeout = call_timeout

    def _call(self, context: grpc.ServicerContext,
              f: Callable[[], Coroutine[Any, Any, T]]) -> T:
        timeout = call_timeout(context, self.call_timeout)
        code: grpc.StatusCode
        try:
            return call_on_reactor(self.reactor, f, timeout)
        except (SinkError, NotFound) as e:
            code, detail = grpc.StatusCode.UNKNOWN, str(e)
        except StoreError as e:
            code, detail = grpc.StatusCode.UNKNOWN, e.message
        except CallTimeout:
            code, detail = grpc.StatusCode.DEADLINE_EXCEEDED, f"Publish took longer than {timeout:g}s"
        except ReactorUnavailable as e:
            code, detail = grpc.StatusCode.UNAVAILABLE, str(e)
        except Exception as e:
            self.log.failure("event sink: Publish failed")
            code, detail = grpc.StatusCode.INTERNAL, str(e) or type(e).__name__
        self.log.info("event sink: Publish failed: {code} {detail}", code=code.name, detail=detail)
        context.abort(code, detail)
        raise AssertionError("not reached")

    def Publish(self, request: events_pb2.EventRequest,
                context: grpc.ServicerContext) -> events_pb2.EventResponse:
        peer = context.peer()
        return self._call(context, lambda: self.api.publish(peer, request))


def make_event_sink_server(servicer: EventSinkServicer, max_workers: int = 4) -> grpc.Server:
    """An unstarted grpcio server carrying the sink (the service binds and starts it)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc-events"),
        options=list(GRPC_OPTIONS),
    )
    events_pb2_grpc.add_EventSinkServiceServicer_to_server(servicer, server)
    return server


#: The Go Sidero's EventsSinkPort (spec §0.3).
EVENT_SINK_PORT = 4002


def make_event_sink_service(
    reactor: Any, servicer: EventSinkServicer, host: Callable[[], Awaitable[str]],
    port: int = EVENT_SINK_PORT, stop_grace: float = 5.0, retry: float | None = None,
) -> TunnelListenerService:
    """The C{event-sink} service: a grpcio server for C{servicer} on C{[host()]:port}."""
    servers: list[grpc.Server] = []

    def bind(address: str) -> None:
        # Probe first: grpcio would print its own error line on every retry.
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address, port))
        server = make_event_sink_server(servicer)
        try:
            bound = server.add_insecure_port(f"[{address}]:{port}" if ":" in address
                                             else f"{address}:{port}")
        except RuntimeError as e:  # grpcio's "Failed to bind to address"
            raise OSError(str(e)) from None
        if bound == 0:
            raise OSError(f"cannot bind {address}:{port}")
        server.start()
        servers.append(server)
        service.port_bound = bound  # type: ignore[attr-defined]

    def unbind() -> Deferred[None] | None:
        if not servers:
            return None
        stopped = servers.pop().stop(stop_grace)
        done: Deferred[None] = Deferred()
        deadline = reactor.seconds() + stop_grace + 5.0

        def poll() -> None:  # never wait on the reactor thread: in-flight calls need it
            if stopped.is_set() or reactor.seconds() >= deadline:
                done.callback(None)
            else:
                reactor.callLater(0.02, poll)

        poll()
        return done

    kwargs = {} if retry is None else {"retry": retry}
    service = TunnelListenerService(reactor, "event-sink", host, bind, unbind, "event sink",
                                    port, **kwargs)
    return service
