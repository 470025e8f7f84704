# -*- test-case-name: tests.protocols.syslog.test_protocol -*-
"""Thin syslog protocols: a UDP datagram is one message; a TCP stream is framed per RFC 6587
(octet counting, C{<length> SP <message>}, when a frame starts with a digit; else
newline-terminated).  Each message becomes one JSON line, annotated when its source address
belongs to a known server (L{sidero.siderolink.annotator}).

A message that cannot be read is dropped and counted (rate-limited log); on TCP a broken
frame (a bad length, a frame longer than L{MAX_MESSAGE}) also closes that connection.  A
message from a known server is also kept, as one readable line, in that server's log buffer
(L{sidero.serverlogs}).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from sidero.protocols.syslog.codec import MAX_MESSAGE, SyslogError, parse
from sidero.serverlogs import IServerLogs, syslog_text
from sidero.siderolink.annotator import Annotation, normalise_ip
from sidero.siderolink.logreceiver import go_json

Emit = Callable[[str], None]


class SyslogSink:
    """Message bytes from a source address -> one annotated JSON line for C{write}.

    @ivar counters: C{messages} written, C{malformed} dropped, C{connections} (TCP),
        C{overload}: datagrams dropped while the writer is far behind.
    @ivar server_logs: where known servers' messages are also kept (None: nowhere).
    """

    log = Logger()

    def __init__(self, write: Emit, annotation_for: Callable[[str], Annotation | None],
                 overloaded: Callable[[], bool] = lambda: False,
                 server_logs: IServerLogs | None = None) -> None:
        self.write = write
        self.annotation_for = annotation_for
        self.overloaded = overloaded
        self.server_logs = server_logs
        self.counters = {"messages": 0, "malformed": 0, "connections": 0, "overload": 0}

    def message(self, data: bytes, source: str, transport: str) -> None:
        if transport == "udp" and self.overloaded():
            # TCP senders are paused by the writer; UDP ones cannot be, so drop and count.
            self.counters["overload"] += 1
            return
        try:
            parsed = parse(data)
        except SyslogError as e:
            self.dropped(source, str(e))
            return
        record: dict[str, Any] = dict(parsed.fields())
        record["source"] = source
        record["transport"] = transport
        annotation = self.annotation_for(source)
        if annotation is not None:
            record.update(annotation.fields())
        self.counters["messages"] += 1
        self.write(go_json(record) + "\n")
        if self.server_logs is not None and annotation is not None and annotation.server_uuid:
            self.server_logs.append(annotation.server_uuid, syslog_text(record))

    def dropped(self, source: str, why: str) -> None:
        self.counters["malformed"] += 1
        # One line for the first few, then every hundredth: a chatty broken sender must not
        # flood our own log.
        if self.counters["malformed"] <= 5 or self.counters["malformed"] % 100 == 0:
            self.log.warn("syslog from {source}: {why}; dropped ({count} so far)", source=source,
                          why=why, count=self.counters["malformed"])


class SyslogUDP(DatagramProtocol):
    def __init__(self, sink: SyslogSink) -> None:
        self.sink = sink

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.sink.message(datagram, normalise_ip(str(addr[0])) or str(addr[0]), "udp")


class SyslogTCP(Protocol):
    def __init__(self, sink: SyslogSink, addr: IAddress | None,
                 register: Callable[[Any], None] | None = None,
                 unregister: Callable[[Any], None] | None = None) -> None:
        self.sink = sink
        host = str(getattr(addr, "host", ""))
        self.source = normalise_ip(host) or host
        self.buffer = b""
        self.closed = False
        self._register, self._unregister = register, unregister

    def connectionMade(self) -> None:
        self.sink.counters["connections"] += 1
        if self._register is not None:
            self._register(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        self.buffer += data
        while self.buffer and not self.closed:
            if self.buffer[:1].isdigit():
                space = self.buffer.find(b" ")
                if space < 0:
                    if len(self.buffer) > 10:
                        self._broken("octet count without a space")
                    return
                count = self.buffer[:space]
                if not count.isdigit() or len(count) > 10 or int(count) > MAX_MESSAGE:
                    self._broken(f"bad octet count {count[:12]!r}")
                    return
                end = space + 1 + int(count)
                if len(self.buffer) < end:
                    return
                frame, self.buffer = self.buffer[space + 1:end], self.buffer[end:]
            else:
                newline = self.buffer.find(b"\n")
                if newline < 0:
                    if len(self.buffer) > MAX_MESSAGE:
                        self._broken(f"a frame longer than {MAX_MESSAGE} bytes")
                    return
                frame, self.buffer = self.buffer[:newline], self.buffer[newline + 1:]
                if not frame.strip():
                    continue
            self.sink.message(frame, self.source, "tcp")

    def _broken(self, why: str) -> None:
        self.sink.dropped(self.source, why + "; connection closed")
        self.closed = True
        self.buffer = b""
        assert self.transport is not None
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._unregister is not None:
            self._unregister(self.transport)
        if not self.closed and self.buffer.strip() and not self.buffer[:1].isdigit():
            frame, self.buffer = self.buffer, b""
            self.sink.message(frame, self.source, "tcp")


class SyslogTCPFactory(Factory):
    def __init__(self, sink: SyslogSink, register: Callable[[Any], None] | None = None,
                 unregister: Callable[[Any], None] | None = None) -> None:
        self.sink = sink
        self.register = register
        self.unregister = unregister

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return SyslogTCP(self.sink, addr, self.register, self.unregister)
