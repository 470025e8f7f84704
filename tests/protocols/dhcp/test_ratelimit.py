"""The per-MAC token bucket of the DHCP proxy, on a fake clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sidero.protocols.dhcp.ratelimit import PerClientLimiter

A, B = b"\x00\x16\x3e\x00\x00\x01", b"\x00\x16\x3e\x00\x00\x02"


class LimiterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.limiter = PerClientLimiter(2.0, 5, self.clock.seconds, max_clients=3)

    def test_burst_then_rate(self) -> None:
        """A client gets its burst at once, then one packet per 1/rate seconds."""
        self.assertEqual([self.limiter.allow(A) for _ in range(7)], [True] * 5 + [False] * 2)
        self.clock.advance(0.4)
        self.assertFalse(self.limiter.allow(A))
        self.clock.advance(0.1)
        self.assertTrue(self.limiter.allow(A))
        self.assertFalse(self.limiter.allow(A))
        self.clock.advance(100)
        self.assertEqual(sum(self.limiter.allow(A) for _ in range(10)), 5)

    def test_clients_are_independent(self) -> None:
        """One client's flood leaves another's bucket full."""
        for _ in range(50):
            self.limiter.allow(A)
        self.assertEqual(sum(self.limiter.allow(B) for _ in range(5)), 5)

    def test_bounded_memory(self) -> None:
        """At most max_clients buckets; the least recently seen goes first."""
        for i in range(10):
            self.limiter.allow(bytes([i]) * 6)
        self.assertEqual(len(self.limiter), 3)

    def test_zero_rate_is_unlimited(self) -> None:
        limiter = PerClientLimiter(0, 1, self.clock.seconds)
        self.assertTrue(all(limiter.allow(A) for _ in range(1000)))
        self.assertEqual(len(limiter), 0)


class ProtocolTests(SynchronousTestCase):
    def test_flood_from_one_mac_dropped_and_counted(self) -> None:
        """Twenty DISCOVERs from one MAC at once: the burst (5) answered, fifteen dropped as
        rate-limited before any reply; a second later one more is answered."""
        from twisted.internet.testing import FakeDatagramTransport

        from sidero.protocols.dhcp.policy import ProxyConfig
        from sidero.protocols.dhcp.protocol import DHCPProxyProtocol
        from sidero.protocols.dhcp.ratelimit import RATE_LIMITED
        from tests.protocols.dhcp import packets as p

        clock = Clock()
        proto = DHCPProxyProtocol(
            ProxyConfig(server_ip="10.213.0.2", endpoint="10.213.0.2", api_port=8081),
            proxy_port=False, clock=clock, limiter=PerClientLimiter(1.0, 5, clock.seconds))
        transport = FakeDatagramTransport()
        proto.makeConnection(transport)
        for _ in range(20):
            proto.datagramReceived(p.EDK2_UEFI_DISCOVER, ("0.0.0.0", 68))
        self.assertEqual((len(transport.written), proto.counters.offers), (5, 5))
        self.assertEqual(proto.counters.ignored[RATE_LIMITED], 15)
        clock.advance(1)
        proto.datagramReceived(p.EDK2_UEFI_DISCOVER, ("0.0.0.0", 68))
        self.assertEqual(proto.counters.offers, 6)
