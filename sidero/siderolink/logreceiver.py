# -*- test-case-name: tests.siderolink.test_logreceiver -*-
"""The kernel log receiver (spec §3.10): Talos' kmsg stream in, annotated JSON lines out.

Talos (C{talos.logging.kernel=tcp://[<server>]:4001}, or a KmsgLogConfig document) opens a
TCP connection through the tunnel and writes one JSON object per kernel message, one per
line.  Each object gets the node's L{Annotation} fields added (C{server_uuid}, C{cluster},
C{namespace}, C{metal_machine}, C{machine}, those known) and is written as one line, encoded
exactly as the Go log receiver's C{json.Encoder} writes a C{map[string]any}: keys sorted,
compact, numbers as float64, C{<>&} and U+2028/2029 escaped.

A line that is not a JSON object, or one longer than L{MAX_LINE} without a newline, is
dropped and counted and that connection is closed (the node reconnects); other connections
are unaffected.

A message from a known node is also kept, as one readable line, in the server's log buffer
(L{sidero.serverlogs}: C{sidero logs SERVER -f}, the dashboard), and a connection's first
message records the step C{siderolink-logs} on the boot timeline: the tunnel is up and
Talos' logging reached us.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from sidero.serverlogs import IServerLogs, kmsg_text
from sidero.siderolink.annotator import Annotation, normalise_ip
from sidero.siderolink.listen import TunnelListenerService
from sidero.siderolink.output import LineWriter
from sidero.timeline import ITimeline

#: The Go Sidero's LogReceiverPort (spec §0.3).
LOG_RECEIVER_PORT = 4001
#: Longest line accepted (Talos' kernel messages are a few hundred bytes).
MAX_LINE = 64 * 1024


class MalformedLog(ValueError):
    """A line that does not hold JSON objects."""


# --- Go's encoding/json, for map[string]any values -----------------------------------------------

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b",
            "\f": "\\f", "<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
            "\u2028": "\\u2028", "\u2029": "\\u2029"}


def _go_string(s: str) -> str:
    out = ['"']
    for ch in s:
        esc = _ESCAPES.get(ch)
        if esc is not None:
            out.append(esc)
        elif ch < " ":
            out.append(f"\\u00{ord(ch):02x}")
        elif "\ud800" <= ch <= "\udfff":  # a lone surrogate: Go writes U+FFFD
            out.append("\ufffd")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _go_float(f: float) -> str:
    """strconv.AppendFloat(f, 'f' or 'e', -1, 64) as encoding/json chooses and cleans it."""
    if math.isnan(f) or math.isinf(f):
        raise ValueError("json: unsupported value")
    a = abs(f)
    if a == 0 or 1e-6 <= a < 1e21:
        text = format(Decimal(repr(f)), "f")
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        return text
    # Python's repr and Go's 'e' agree (shortest digits, two exponent digits at least);
    # Go then turns e-07 into e-7.
    text = repr(f)
    if len(text) >= 4 and text[-4:-1] == "e-0":
        text = text[:-2] + text[-1]
    return text


def go_json(value: Any) -> str:
    """C{value} (from L{decode_line}: dicts, lists, str, float, bool, None) as Go encodes it."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _go_string(value)
    if isinstance(value, int | float):
        return _go_float(float(value))
    if isinstance(value, dict):
        return "{" + ",".join(f"{_go_string(str(k))}:{go_json(v)}"
                              for k, v in sorted(value.items())) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(go_json(v) for v in value) + "]"
    raise TypeError(f"cannot encode {type(value).__name__}")


def _no_constant(name: str) -> Any:
    raise ValueError(f"invalid character {name[0]!r} looking for beginning of value")


_DECODER = json.JSONDecoder(parse_int=float, parse_constant=_no_constant)


def decode_line(line: bytes) -> list[dict[str, Any]]:
    """The JSON objects on one line (Go's decoder reads concatenated values, so may we).

    @raise MalformedLog: not UTF-8 JSON, or a value that is not an object.
    """
    text = line.decode("utf-8", "replace")
    out: list[dict[str, Any]] = []
    pos, end = 0, len(text)
    while True:
        while pos < end and text[pos] in " \t\r\n":
            pos += 1
        if pos >= end:
            return out
        try:
            value, pos = _DECODER.raw_decode(text, pos)
        except ValueError as e:
            raise MalformedLog(str(e)) from None
        if not isinstance(value, dict):
            raise MalformedLog(f"json: cannot unmarshal {type(value).__name__} into a map")
        out.append(value)


def annotate(message: dict[str, Any], annotation: Annotation | None) -> dict[str, Any]:
    """C{message} with the node's known annotation fields set (overriding Talos' own)."""
    if annotation is not None:
        message.update(annotation.fields())
    return message


# --- the protocol ----------------------------------------------------------------------------------


class KmsgProtocol(Protocol):
    """One node's connection: lines in, annotated lines to the writer."""

    def __init__(self, factory: KmsgFactory, addr: IAddress | None) -> None:
        self.factory = factory
        self.peer_ip = normalise_ip(str(getattr(addr, "host", ""))) or ""
        self.buffer = b""
        self.closing = False
        self.first = True

    def connectionMade(self) -> None:
        self.factory.counters["connections"] += 1
        self.factory.writer.register(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        self.buffer += data
        while not self.closing:
            newline = self.buffer.find(b"\n")
            if newline < 0:
                if len(self.buffer) > MAX_LINE:
                    self._reject("too_long", f"a line longer than {MAX_LINE} bytes")
                return
            line, self.buffer = self.buffer[:newline], self.buffer[newline + 1:]
            if newline > MAX_LINE:
                self._reject("too_long", f"a line longer than {MAX_LINE} bytes")
                return
            self._line(line)

    def _line(self, line: bytes) -> None:
        try:
            messages = decode_line(line)
        except MalformedLog as e:
            self._reject("malformed", str(e))
            return
        for message in messages:
            self.factory.emit(self.peer_ip, message, first=self.first)
            self.first = False

    def _reject(self, counter: str, why: str) -> None:
        self.factory.counters[counter] += 1
        self.factory.log.warn("kernel logs from {peer}: {why}; line dropped, connection closed",
                              peer=self.peer_ip, why=why)
        self.closing = True
        self.buffer = b""
        assert self.transport is not None
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.factory.writer.unregister(self.transport)
        if not self.closing and self.buffer.strip():
            # The last message may come without its newline before EOF.
            line, self.buffer = self.buffer, b""
            try:
                messages = decode_line(line)
            except MalformedLog as e:
                self.factory.counters["malformed"] += 1
                self.factory.log.warn("kernel logs from {peer}: {why} at end of stream; dropped",
                                      peer=self.peer_ip, why=str(e))
                return
            for message in messages:
                self.factory.emit(self.peer_ip, message, first=self.first)
                self.first = False


class KmsgFactory(Factory):
    """Builds L{KmsgProtocol}s; C{annotate(ip)} answers the node of a tunnel address.

    @ivar counters: C{connections}, C{messages} written, C{malformed} and C{too_long} lines
        dropped.
    @ivar server_logs: where known nodes' lines are also kept (None: nowhere).
    @ivar timeline: where a connection's first message is recorded (None: not recorded).
    """

    log = Logger()

    def __init__(self, writer: LineWriter,
                 annotation_for: Callable[[str], Annotation | None],
                 server_logs: IServerLogs | None = None, timeline: ITimeline | None = None,
                 ) -> None:
        self.writer = writer
        self.annotation_for = annotation_for
        self.server_logs = server_logs
        self.timeline = timeline
        self.counters = {"connections": 0, "messages": 0, "malformed": 0, "too_long": 0}

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return KmsgProtocol(self, addr)

    def emit(self, peer_ip: str, message: dict[str, Any], first: bool = False) -> None:
        annotation = self.annotation_for(peer_ip)
        try:
            line = go_json(annotate(message, annotation)) + "\n"
        except (ValueError, TypeError) as e:
            self.counters["malformed"] += 1
            self.log.warn("kernel logs from {peer}: cannot encode a message: {error}",
                          peer=peer_ip, error=str(e))
            return
        self.counters["messages"] += 1
        self.writer.write(line)
        server = annotation.server_uuid if annotation is not None else ""
        if not server:
            return
        if self.server_logs is not None:
            self.server_logs.append(server, kmsg_text(message))
        if first and self.timeline is not None:
            self.timeline.record("siderolink-logs", source="siderolink", uuid=server,
                                 node=peer_ip)


def make_log_receiver_service(reactor: Any, factory: KmsgFactory,
                              host: Callable[[], Awaitable[str]], port: int = LOG_RECEIVER_PORT,
                              retry: float | None = None) -> TunnelListenerService:
    """The C{log-receiver} service: C{factory} on C{[host()]:port} (see L{sidero.siderolink.listen})."""
    listening: list[Any] = []

    def bind(address: str) -> None:
        try:
            listening.append(reactor.listenTCP(port, factory, interface=address))
        except CannotListenError as e:
            if isinstance(e.socketError, OSError):
                raise e.socketError from None
            raise OSError(str(e)) from None

    def unbind() -> Deferred[None] | None:
        result = None
        while listening:
            result = listening.pop().stopListening()
        return result

    kwargs = {} if retry is None else {"retry": retry}
    service = TunnelListenerService(reactor, "log-receiver", host, bind, unbind,
                                    "kernel log receiver", port, **kwargs)
    service.listening = listening  # type: ignore[attr-defined]
    return service
