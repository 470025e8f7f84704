"""The boot NIC's DHCP client: lease decoding, option 121, and the exchange on a fake socket.
(The real exchange against dnsmasq runs in tests.integration.test_agent_netns.)"""

from __future__ import annotations

from ipaddress import IPv4Address

from twisted.trial.unittest import SynchronousTestCase

from sidero.agent import network
from sidero.protocols.dhcp import codec

MAC = "52:54:00:aa:bb:cc"


def reply(request: codec.DHCPMessage, mtype: int, *extra: tuple[int, bytes],
          xid: int | None = None) -> bytes:
    return codec.encode(codec.DHCPMessage(
        op=codec.BOOTREPLY, xid=request.xid if xid is None else xid, chaddr=request.chaddr,
        yiaddr="10.1.2.3", options=((codec.OPT_MESSAGE_TYPE, bytes((mtype,))),
                                    (codec.OPT_SERVER_ID, IPv4Address("10.1.2.1").packed),
                                    *extra)))


class FakeSocket:
    """Answers each sent packet through C{script(msg)}; the clock moves on silent waits."""

    def __init__(self, clock: list[float], script: object) -> None:
        self.clock = clock
        self.script = script
        self.sent: list[codec.DHCPMessage] = []
        self.queue: list[bytes] = []

    def send(self, data: bytes) -> None:
        msg = codec.decode(data)
        self.sent.append(msg)
        self.queue.extend(self.script(msg))  # type: ignore[operator]

    def receive(self, timeout: float) -> bytes | None:
        if self.queue:
            return self.queue.pop(0)
        self.clock[0] += timeout
        return None


class LeaseTests(SynchronousTestCase):
    def test_classless_routes(self) -> None:
        """RFC 3442 entries decode, including a default and an on-link route."""
        data = bytes((0, 10, 0, 0, 1, 24, 192, 168, 5, 10, 0, 0, 1, 32, 10, 9, 9, 9, 0, 0, 0, 0))
        self.assertEqual(network.parse_classless_routes(data), [
            network.Route("0.0.0.0/0", "10.0.0.1"), network.Route("192.168.5.0/24", "10.0.0.1"),
            network.Route("10.9.9.9/32", "0.0.0.0")])
        self.assertRaises(ValueError, network.parse_classless_routes, bytes((33, 1, 2, 3, 4)))
        self.assertRaises(ValueError, network.parse_classless_routes, bytes((24, 10, 0)))

    def test_from_ack(self) -> None:
        """Mask, routers, DNS, MTU, hostname and routes come from the ACK's options."""
        ack = codec.decode(reply(codec.DHCPMessage(xid=1, chaddr=b"\x52" * 6), codec.DHCPACK,
                                 (1, bytes((255, 255, 254, 0))), (3, bytes((10, 1, 2, 1))),
                                 (6, bytes((10, 1, 2, 1, 10, 1, 2, 2))), (26, b"\x05\xdc"),
                                 (12, b"node-9"), (121, bytes((8, 10, 10, 1, 2, 1)))))
        lease = network.Lease.from_ack(ack)
        self.assertEqual(lease, network.Lease(
            "10.1.2.3", 23, "10.1.2.1", ("10.1.2.1",), ("10.1.2.1", "10.1.2.2"), 1500, "node-9",
            (network.Route("10.0.0.0/8", "10.1.2.1"),)))

    def test_from_ack_malformed_options(self) -> None:
        """Bad option values are ignored instead of failing the lease."""
        ack = codec.decode(reply(codec.DHCPMessage(xid=1, chaddr=b"\x52" * 6), codec.DHCPACK,
                                 (1, b"\xff"), (3, b"\x01\x02"), (26, b"\x00\x10"), (121, b"\x40")))
        lease = network.Lease.from_ack(ack)
        self.assertEqual((lease.prefixlen, lease.routers, lease.mtu, lease.classless_routes),
                         (32, (), None, ()))


class ExchangeTests(SynchronousTestCase):
    def client(self, script: object, **kw: float) -> tuple[network.DHCPClient, FakeSocket]:
        clock = [0.0]
        sock = FakeSocket(clock, script)

        def sleep(s: float) -> None:
            clock[0] += s

        c = network.DHCPClient(MAC, sock, monotonic=lambda: clock[0], sleep=sleep,  # type: ignore[arg-type]
                               **kw)
        return c, sock

    def test_discover_request(self) -> None:
        """DISCOVER (broadcast flag, options 121/6/26/12 requested), then REQUEST for the
        offered address from that server; stray and malformed replies are skipped."""
        def script(msg: codec.DHCPMessage) -> list[bytes]:
            if msg.message_type == codec.DHCPDISCOVER:
                return [b"garbage", reply(msg, codec.DHCPOFFER, xid=msg.xid + 1),
                        reply(msg, codec.DHCPOFFER)]
            return [reply(msg, codec.DHCPACK, (1, bytes((255, 255, 255, 0))))]

        client, sock = self.client(script)
        lease = client.obtain()
        self.assertEqual((lease.address, lease.prefixlen, lease.server), ("10.1.2.3", 24, "10.1.2.1"))
        discover, request = sock.sent
        self.assertTrue(discover.broadcast)
        self.assertEqual(discover.mac, bytes.fromhex(MAC.replace(":", "")))
        for code in (121, 6, 26, 12):
            self.assertIn(code, discover.get(codec.OPT_PARAMETER_REQUEST_LIST) or b"")
        self.assertEqual(request.message_type, codec.DHCPREQUEST)
        self.assertEqual(request.get(codec.OPT_REQUESTED_IP), IPv4Address("10.1.2.3").packed)
        self.assertEqual(request.get(codec.OPT_SERVER_ID), IPv4Address("10.1.2.1").packed)
        self.assertEqual(client.dropped, 1)

    def test_retransmits_and_retries(self) -> None:
        """Silence: DISCOVER is resent every retransmit period, attempts are separated by the
        retry interval, and the overall timeout ends it with DHCPError."""
        client, sock = self.client(lambda msg: [], attempt_timeout=30, retry_interval=10,
                                   overall_timeout=300, retransmit=4)
        with self.assertRaises(network.DHCPError):
            client.obtain()
        self.assertEqual({m.message_type for m in sock.sent}, {codec.DHCPDISCOVER})
        self.assertEqual(len({m.xid for m in sock.sent}), 8)  # 8 attempts of 30 + 10 s in 300 s
        self.assertEqual(len(sock.sent), 8 * 8)  # 0, 4, ... 28 s in each attempt

    def test_nak_restarts(self) -> None:
        """A NAK fails the attempt; the next attempt starts over with a new DISCOVER."""
        naks = [True]

        def script(msg: codec.DHCPMessage) -> list[bytes]:
            if msg.message_type == codec.DHCPDISCOVER:
                return [reply(msg, codec.DHCPOFFER)]
            nak = naks.pop(0) if naks else False
            return [reply(msg, codec.DHCPNAK if nak else codec.DHCPACK)]

        client, sock = self.client(script, retry_interval=1)
        self.assertEqual(client.obtain().address, "10.1.2.3")
        self.assertEqual([m.message_type for m in sock.sent], [1, 3, 1, 3])
