"""Tests for the thin DatagramProtocols: replies written, drops counted, nothing raised."""

from __future__ import annotations

import gc
import random
import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import FakeDatagramTransport
from twisted.logger import Logger, LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from sidero.protocols.dhcp import codec, policy
from sidero.protocols.dhcp.policy import ProxyConfig
from sidero.protocols.dhcp.protocol import (
    MAX_PACKET,
    DHCPCounters,
    DHCPCountersCollector,
    DHCPProxyProtocol,
    RateLimitedLog,
)
from tests.protocols.dhcp import packets as p

CFG = ProxyConfig(server_ip="10.213.0.2", endpoint="10.213.0.2", api_port=8081)


class FailingTransport:
    """A transport whose sends fail, as a socket without a route does."""

    def write(self, data: bytes, addr: object) -> None:
        raise OSError(101, "Network is unreachable")


def make(proxy_port: bool = False) -> tuple[DHCPProxyProtocol, FakeDatagramTransport, Clock]:
    clock = Clock()
    proto = DHCPProxyProtocol(CFG, proxy_port=proxy_port, clock=clock)
    transport = FakeDatagramTransport()
    proto.makeConnection(transport)
    return proto, transport, clock


class ReplyTests(SynchronousTestCase):
    """Well-formed PXE traffic gets answered on the wire."""

    def test_discover_answered_with_broadcast_offer(self) -> None:
        """An EDK2 DISCOVER produces one OFFER broadcast to :68."""
        proto, transport, _ = make()
        proto.datagramReceived(p.EDK2_UEFI_DISCOVER, ("0.0.0.0", 68))
        self.assertEqual(len(transport.written), 1)
        data, addr = transport.written[0]
        self.assertEqual(addr, ("255.255.255.255", 68))
        m = codec.decode(data)
        self.assertEqual(m.message_type, codec.DHCPOFFER)
        self.assertEqual(m.xid, p.XID)
        self.assertEqual(proto.counters.offers, 1)
        ((reply, arch), count), = proto.counters.replies_by_arch.items()
        self.assertEqual((reply, count), ("offer", 1))
        self.assertIn("efi", arch)

    def test_proxy_request_acked_to_source(self) -> None:
        """A :4011 REQUEST is ACKed back to its source address and port."""
        proto, transport, _ = make(proxy_port=True)
        proto.datagramReceived(p.EDK2_PROXY_REQUEST, ("10.213.0.120", 4011))
        data, addr = transport.written[0]
        self.assertEqual(addr, ("10.213.0.120", 4011))
        self.assertEqual(codec.decode(data).message_type, codec.DHCPACK)
        self.assertEqual(proto.counters.acks, 1)

    def test_non_pxe_silent(self) -> None:
        """Ordinary DHCP traffic produces no reply and no log line."""
        proto, transport, _ = make()
        with capturedLogs() as events:
            proto.datagramReceived(p.PLAIN_DISCOVER, ("0.0.0.0", 68))
        self.assertEqual(transport.written, [])
        self.assertEqual(events, [])
        self.assertEqual(proto.counters.ignored[policy.NOT_PXE], 1)


class DropTests(SynchronousTestCase):
    """Bad input is dropped, counted and logged at a bounded rate."""

    def test_malformed_counted_and_logged(self) -> None:
        """A truncated packet is counted and logged with its reason."""
        proto, transport, _ = make()
        with capturedLogs() as events:
            proto.datagramReceived(p.EDK2_UEFI_DISCOVER[:50], ("10.0.0.1", 68))
        self.assertEqual(transport.written, [])
        self.assertEqual(proto.counters.malformed, 1)
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["log_level"], LogLevel.warn)
        self.assertIn("truncated", events[0]["reason"])

    def test_oversized_dropped_unparsed(self) -> None:
        """A datagram above MAX_PACKET is dropped before parsing."""
        proto, transport, _ = make()
        proto.datagramReceived(p.EDK2_UEFI_DISCOVER.ljust(MAX_PACKET + 1, b"\0"), ("1.2.3.4", 68))
        self.assertEqual((proto.counters.oversized, proto.counters.malformed), (1, 0))
        self.assertEqual(transport.written, [])

    def test_send_error_counted(self) -> None:
        """A failing send is counted, not raised."""
        proto = DHCPProxyProtocol(CFG, proxy_port=False, clock=Clock())
        proto.makeConnection(FailingTransport())  # type: ignore[arg-type]
        proto.datagramReceived(p.EDK2_UEFI_DISCOVER, ("0.0.0.0", 68))
        self.assertEqual((proto.counters.send_errors, proto.counters.offers), (1, 0))

    def test_internal_error_contained(self) -> None:
        """A bug in the decision is logged as a failure and counted, never raised."""
        proto, _, _ = make()
        proto.config = None  # type: ignore[assignment]
        with capturedLogs() as events:
            proto.datagramReceived(p.EDK2_UEFI_DISCOVER, ("0.0.0.0", 68))
        self.assertEqual(proto.counters.errors, 1)
        self.assertIn("log_failure", events[0])
        self.flushLoggedErrors()

    def test_log_rate_limited(self) -> None:
        """A flood of garbage logs at most the burst per period, then resumes."""
        proto, _, clock = make()
        with capturedLogs() as events:
            for _ in range(100):
                proto.datagramReceived(b"junk", ("10.0.0.1", 68))
        self.assertEqual(len(events), proto.rate_limit.burst)
        self.assertEqual(proto.counters.malformed, 100)
        self.assertEqual(proto.rate_limit.suppressed, 100 - proto.rate_limit.burst)
        clock.advance(proto.rate_limit.period)
        with capturedLogs() as events:
            proto.datagramReceived(b"junk", ("10.0.0.1", 68))
        self.assertEqual(len(events), 1)

    def test_rate_limiter_window(self) -> None:
        """RateLimitedLog allows burst events per window."""
        clock = Clock()
        rl = RateLimitedLog(clock, burst=2, period=10)
        self.assertEqual([rl.allow() for _ in range(3)], [True, True, False])
        clock.advance(10)
        self.assertTrue(rl.allow())


def _mutate(data: bytes, rnd: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rnd.randint(1, 8)):
        b[rnd.randrange(len(b))] = rnd.randrange(256)
    return bytes(b[: rnd.randint(0, len(b))]) if rnd.random() < 0.3 else bytes(b)


_seeds = st.sampled_from([p.IPXE_BIOS_DISCOVER, p.EDK2_UEFI_DISCOVER, p.UEFI_HTTP_DISCOVER,
                          p.ARM64_DISCOVER, p.EDK2_PROXY_REQUEST, p.EDK2_SITE_REQUEST])
_pxe_prefix = p.opt(53, b"\x01") + p.opt(60, b"PXEClient:Arch:00000:UNDI:002001")


class ProtocolPropertyTests(SynchronousTestCase):
    """The protocol never raises, whatever arrives."""

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=2000), st.booleans())
    def test_random_datagrams(self, data: bytes, proxy_port: bool) -> None:
        """Random bytes never raise; every packet is accounted for."""
        proto, transport, _ = make(proxy_port)
        proto.datagramReceived(data, ("10.0.0.1", 68))
        c = proto.counters
        self.assertEqual(c.received, 1)
        self.assertEqual(c.malformed + c.oversized + sum(c.ignored.values()) + c.offers + c.acks
                         + c.errors + c.send_errors, 1)
        self.assertEqual(c.errors, 0)

    @settings(max_examples=300, deadline=None)
    @given(_seeds, st.integers(0, 2**32 - 1), st.booleans())
    def test_mutated_real_packets(self, seed: bytes, rseed: int, proxy_port: bool) -> None:
        """Bit-flipped and truncated real packets never cause an internal error."""
        proto, transport, _ = make(proxy_port)
        proto.datagramReceived(_mutate(seed, random.Random(rseed)), ("10.0.0.1", 68))
        self.assertEqual(proto.counters.errors, 0)
        for data, _addr in transport.written:
            codec.decode(data)  # whatever we send is well-formed

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=20),
           st.sampled_from([b"", b"\x01", b"\x02", b"\x03", b"\x07"]), st.binary(max_size=128),
           st.binary(max_size=64))
    def test_option_tricks(self, extra: list[tuple[int, bytes]], overload: bytes,
                           file: bytes, sname: bytes) -> None:
        """Duplicated, oversized, unknown and overloaded options never cause an internal error."""
        opts = _pxe_prefix + b"".join(bytes((c, min(len(v), 255))) + v[:255] for c, v in extra)
        if overload:
            opts = p.opt(52, overload) + opts
        raw = p.bootp(opts, file=file, sname=sname)
        proto, transport, _ = make()
        proto.datagramReceived(raw, ("0.0.0.0", 68))
        self.assertEqual(proto.counters.errors, 0)


class FloodTests(SynchronousTestCase):
    """A flood of requests from many clients keeps no per-client state."""

    def test_flood_bounded_state(self) -> None:
        """20000 requests from distinct MACs leave the protocol's state the same size."""
        proto, transport, _ = make()
        transport.written = _Discard()
        # Log events are the observers' business (bounded there); measure the protocol alone.
        proto.log = Logger(observer=lambda event: None)  # type: ignore[arg-type]
        before = (len(vars(proto)), len(proto.counters.ignored))
        rnd = random.Random(7)
        kinds = [p.EDK2_UEFI_DISCOVER, p.PLAIN_DISCOVER, b"junk", p.EDK2_SITE_REQUEST]

        def flood(start: int, count: int) -> None:
            for i in range(start, start + count):
                raw = bytearray(kinds[i % 4])
                if len(raw) > 40:
                    raw[28:34] = rnd.randbytes(6)  # chaddr
                    raw[4:8] = i.to_bytes(4, "big")  # xid
                proto.datagramReceived(bytes(raw), (f"10.0.{i % 250}.{i % 200}", 68))

        flood(0, 2000)
        tracemalloc.start()
        try:
            flood(2000, 18000)
            gc.collect()  # exception tracebacks form cycles; count only what really stays
            current, _peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertLess(current, 64 * 1024)  # 18000 packets, well under 4 bytes each retained
        self.assertEqual((len(vars(proto)), len(proto.counters.ignored)), before)
        self.assertEqual(proto.counters.offers, 5000)
        self.assertEqual(proto.counters.received, 20000)


class _Discard(list):
    """A written-list that forgets, so the test itself holds no per-packet state."""

    def append(self, item: object) -> None:
        pass


class CollectorTests(SynchronousTestCase):
    """Prometheus exposition of the counters."""

    def test_collector_values(self) -> None:
        """The collector reports the current counter values by outcome and reason."""
        from prometheus_client import CollectorRegistry, generate_latest

        counters = DHCPCounters(offers=3, malformed=2)
        counters.ignored[policy.NOT_PXE] = 5
        registry = CollectorRegistry()
        registry.register(DHCPCountersCollector(counters))
        text = generate_latest(registry).decode()
        self.assertIn('sidero_dhcp_packets_total{outcome="offer"} 3.0', text)
        self.assertIn('sidero_dhcp_packets_total{outcome="malformed"} 2.0', text)
        self.assertIn('sidero_dhcp_ignored_total{reason="not-pxe"} 5.0', text)
