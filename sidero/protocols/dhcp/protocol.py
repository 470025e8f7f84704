# -*- test-case-name: tests.protocols.dhcp.test_protocol -*-
"""Thin DatagramProtocols for :67 and :4011: decode, decide, encode, send.

A packet is handled entirely within one C{datagramReceived} call and no per-client state
is kept, so a flood costs CPU but never memory. Nothing escapes C{datagramReceived}: bad
packets are dropped, counted and logged at a bounded rate.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from sidero.protocols.dhcp import codec, policy
from sidero.protocols.dhcp.codec import MalformedPacket
from sidero.protocols.dhcp.policy import Ignore, ProxyConfig
from sidero.protocols.dhcp.ratelimit import RATE_LIMITED, PerClientLimiter
from sidero.timeline import uuid_from_pxe_guid

#: Largest datagram we look at; DHCP messages are rarely above 576 bytes and a jumbo
#: frame is 9000. Anything bigger is dropped before parsing (bounded work per packet).
MAX_PACKET = 9216


@dataclass
class DHCPCounters:
    """Packet counters shared by both ports; keys are a closed set (bounded memory)."""

    received: int = 0
    offers: int = 0
    acks: int = 0
    malformed: int = 0
    oversized: int = 0
    send_errors: int = 0
    errors: int = 0
    ignored: dict[str, int] = field(default_factory=lambda: dict.fromkeys(policy.IGNORE_REASONS, 0))
    #: (offer|ack, client firmware) -> replies sent; firmware values are a closed enum.
    replies_by_arch: dict[tuple[str, str], int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "received": self.received, "offers": self.offers, "acks": self.acks,
            "malformed": self.malformed, "oversized": self.oversized,
            "send_errors": self.send_errors, "errors": self.errors, "ignored": dict(self.ignored),
        }

    @property
    def dropped(self) -> int:
        return self.malformed + self.oversized + self.errors + self.send_errors


class DHCPCountersCollector:
    """prometheus-client custom collector exposing L{DHCPCounters} (register it yourself)."""

    def __init__(self, counters: DHCPCounters) -> None:
        self.counters = counters

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily

        c = self.counters
        packets = CounterMetricFamily(
            "sidero_dhcp_packets", "DHCP proxy packets by outcome", labels=["outcome"])
        for outcome, value in (
            ("received", c.received), ("offer", c.offers), ("ack", c.acks),
            ("malformed", c.malformed), ("oversized", c.oversized),
            ("send_error", c.send_errors), ("error", c.errors),
        ):
            packets.add_metric([outcome], value)
        yield packets
        ignored = CounterMetricFamily(
            "sidero_dhcp_ignored", "DHCP requests not answered, by reason", labels=["reason"])
        for reason, value in c.ignored.items():
            ignored.add_metric([reason], value)
        yield ignored


class RateLimitedLog:
    """Let through at most C{burst} log events per C{period} seconds; count the rest.

    A flood of garbage must not turn into a flood of log lines.
    """

    def __init__(self, clock: IReactorTime, burst: int = 10, period: float = 60.0) -> None:
        self.clock = clock
        self.burst = burst
        self.period = period
        self._window_start = clock.seconds()
        self._in_window = 0
        self.suppressed = 0

    def allow(self) -> bool:
        now = self.clock.seconds()
        if now - self._window_start >= self.period:
            self._window_start = now
            self._in_window = 0
        if self._in_window < self.burst:
            self._in_window += 1
            return True
        self.suppressed += 1
        return False


class DHCPProxyProtocol(DatagramProtocol):
    """One socket's worth of proxyDHCP: :67 (DISCOVER→OFFER) or :4011 (REQUEST→ACK)."""

    log = Logger()
    #: an L{sidero.timeline.ITimeline} told of each reply (set by the service), or None.
    timeline: Any = None
    #: log one debug line per reply (C{--log-level debug}). Off, the line is not even built:
    #: a filtered-out event still costs more than the rest of the reply at full rate.
    trace: bool = False

    def __init__(self, config: ProxyConfig, *, proxy_port: bool, clock: IReactorTime,
                 counters: DHCPCounters | None = None,
                 rate_limit: RateLimitedLog | None = None,
                 limiter: PerClientLimiter | None = None) -> None:
        self.config = config
        #: per-MAC token bucket shared by both ports (None: no limit).
        self.limiter = limiter
        self.proxy_port = proxy_port
        self.counters = counters if counters is not None else DHCPCounters()
        self.rate_limit = rate_limit if rate_limit is not None else RateLimitedLog(clock)
        self.port_name = "4011" if proxy_port else "67"
        self._send: Callable[[bytes, tuple[str, int]], object] = self._not_connected

    @staticmethod
    def _not_connected(data: bytes, address: tuple[str, int]) -> None:
        raise OSError("not connected to a transport")

    def makeConnection(self, transport: Any) -> None:
        # On a real UDP port, send with the socket's own sendto: Twisted's Port.write
        # re-validates the address as IPv4 and IPv6 text on every datagram (a tenth of the
        # reply's cost); ours are a relay's giaddr, the client's source or the broadcast
        # address, all valid. Errors still raise into _handle, which counts them.
        sock = getattr(transport, "socket", None)
        self._send = sock.sendto if isinstance(sock, socket.socket) else transport.write
        super().makeConnection(transport)

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        try:
            self._handle(datagram, addr)
        except Exception:
            self.counters.errors += 1
            if self.rate_limit.allow():
                self.log.failure("DHCP proxy: unexpected error handling a packet from {peer}",
                                 peer=addr)

    def _handle(self, datagram: bytes, addr: Any) -> None:
        self.counters.received += 1
        if len(datagram) > MAX_PACKET:
            self.counters.oversized += 1
            self._drop("oversized datagram ({size} bytes)", addr, size=len(datagram))
            return
        try:
            msg = codec.decode(datagram)
        except MalformedPacket as e:
            self.counters.malformed += 1
            self._drop("malformed packet: {reason}", addr, reason=e.reason)
            return
        if self.limiter is not None and not self.limiter.allow(msg.mac):
            self.counters.ignored[RATE_LIMITED] = self.counters.ignored.get(RATE_LIMITED, 0) + 1
            return
        decision = policy.decide(msg, self.config, proxy_port=self.proxy_port,
                                 source=(addr[0], addr[1]))
        if isinstance(decision, Ignore):
            self.counters.ignored[decision.reason] = self.counters.ignored.get(decision.reason, 0) + 1
            if decision.reason not in (policy.NOT_PXE, policy.FOR_SITE_SERVER):
                if self.rate_limit.allow():
                    self.log.debug("DHCP proxy :{port} ignored packet from {peer} ({reason})",
                                   port=self.port_name, peer=addr, reason=decision.reason)
            return
        try:
            self._send(decision.data, decision.address)
        except Exception as e:
            self.counters.send_errors += 1
            self._drop("could not send reply to {dest}: {error}", addr,
                       dest=decision.address, error=str(e))
            return
        if decision.ack:
            self.counters.acks += 1
            reply = "ack"
        else:
            self.counters.offers += 1
            reply = "offer"
        by_arch = self.counters.replies_by_arch
        by_arch[(reply, decision.firmware.value)] = by_arch.get((reply, decision.firmware.value), 0) + 1
        if self.timeline is not None:
            self.timeline.record(
                "dhcp-" + reply, source="dhcp", mac=msg.mac.hex(":"),
                uuid=uuid_from_pxe_guid(msg.get(codec.OPT_CLIENT_UUID)),
                ip=addr[0] if self.proxy_port and addr[0] != "0.0.0.0" else None,
                arch=decision.firmware.value, boot_file=decision.bootfile, ipxe=decision.ipxe)
        if self.trace:
            self.log.debug(
                "DHCP proxy :{port} {kind} to {mac} ({firmware}, ipxe={ipxe}): {bootfile} -> {dest}",
                port=self.port_name, kind="ACK" if self.proxy_port else "OFFER",
                mac=msg.mac.hex(":"), firmware=decision.firmware.value, ipxe=decision.ipxe,
                bootfile=decision.bootfile, dest=decision.address,
            )

    def _drop(self, fmt: str, addr: Any, **fields: Any) -> None:
        if self.rate_limit.allow():
            self.log.warn("DHCP proxy :{port} dropped packet from {peer}: " + fmt,
                          port=self.port_name, peer=addr, **fields)
