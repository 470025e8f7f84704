"""Hypothesis: hostile traffic never raises out of the protocol, and sessions never leak."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sidero.protocols.tftp import codec
from sidero.protocols.tftp.session import SessionConfig

from .fakes import Harness

FILES = {"small": b"s" * 100, "multiple": b"m" * 1024, "big": bytes(range(256)) * 40}
peers = st.tuples(st.sampled_from(["192.0.2.1", "192.0.2.2", "2001:db8::1"]), st.integers(1, 4))

option_pairs = st.dictionaries(
    st.sampled_from(["blksize", "tsize", "timeout", "windowsize", "BLKSIZE", "foo"]),
    st.one_of(st.sampled_from(["0", "8", "512", "65464", "65465", "4", "x", ""]),
              st.text(alphabet="0123456789", max_size=6)),
    max_size=5,
)
requests = st.builds(
    lambda op, name, mode, opts: codec.encode_request(op, name, mode, opts),
    st.sampled_from([codec.RRQ, codec.RRQ, codec.RRQ, codec.WRQ]),
    st.sampled_from(list(FILES) + ["missing", "../small", "denied"]),
    st.sampled_from(["octet", "netascii", "mail", "OCTET"]),
    option_pairs,
)
acks = st.builds(codec.encode_ack, st.integers(0, 70000))
others = st.one_of(
    st.binary(max_size=40),
    st.builds(codec.encode_data, st.integers(0, 65535), st.binary(max_size=10)),
    st.builds(codec.encode_error, st.integers(0, 9), st.text(max_size=10)),
    st.builds(codec.encode_oack, st.dictionaries(st.sampled_from(["a", "blksize"]), st.just("1"))),
    st.builds(lambda b, n: b[:n], requests, st.integers(0, 40)),  # truncated requests
)
events = st.lists(
    st.one_of(
        st.tuples(st.just("packet"), st.one_of(requests, acks, acks, others), peers),
        st.tuples(st.just("advance"), st.floats(0.0, 20.0), st.just(None)),
    ),
    max_size=60,
)


def make(single_port: bool, max_sessions: int = 3) -> Harness:
    h = Harness(
        dict(FILES), single_port=single_port, max_sessions=max_sessions,
        config=SessionConfig(timeout=2.0, max_retries=2, read_ahead=512),
    )
    h.assets.denied.add("denied")
    return h


class ProtocolPropertyTests(SynchronousTestCase):
    """Random traffic against both modes."""

    def run_events(self, h: Harness, script: list[tuple[str, Any, Any]]) -> None:
        for kind, value, peer in script:
            if kind == "packet":
                if h.protocol.single_port or codec.decode_ack_fast(value) < 0:
                    h.protocol.datagramReceived(value, peer)
                else:
                    # standard mode: ACKs go to the newest transfer port, from any peer
                    h.send(value, peer)
            else:
                h.clock.advance(value)
            self.assertLessEqual(h.protocol.active, h.protocol.max_sessions)
            for packet, _ in h.sent():
                self.assertNotIsInstance(packet, codec.Request)  # the server never sends requests
        self.assertEqual(h.protocol.stats.internal_errors, 0)
        # Silence long enough for every session to give up (a client may have asked for a
        # 255 s timeout): nothing may remain.
        h.clock.pump([256.0] * 4)
        self.assertEqual(h.protocol.active, 0)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertTrue(all(r.closed for r in h.assets.readers))
        if not h.protocol.single_port:
            self.assertTrue(all(p.stopped for p in h.ports))

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(events)
    def test_single_port(self, script: list[tuple[str, Any, Any]]) -> None:
        """Single-port mode survives any sequence of packets and clock jumps without leaks."""
        self.run_events(make(True), script)

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(events)
    def test_standard(self, script: list[tuple[str, Any, Any]]) -> None:
        """Standard mode survives the same and closes every transfer port."""
        self.run_events(make(False), script)

    @settings(max_examples=30, deadline=None)
    @given(st.integers(1, 20), st.integers(5, 200))
    def test_rrq_flood(self, limit: int, count: int) -> None:
        """A flood of RRQs from distinct peers never exceeds the session limit."""
        h = make(True, max_sessions=limit)
        for i in range(count):
            h.rrq("big", {"blksize": "8"}, peer=("198.51.100.7", 1000 + i))
        self.assertEqual(h.protocol.active, min(limit, count))
        self.assertEqual(h.protocol.stats.busy, max(0, count - limit))
        h.clock.pump([2.0] * 5)
        self.assertEqual(h.protocol.active, 0)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    @settings(max_examples=50, deadline=None)
    @given(st.lists(st.integers(0, 65535), max_size=300))
    def test_random_acks_complete_or_time_out(self, blocks: list[int]) -> None:
        """Random ACKs during a transfer only ever advance it; it ends one way or another."""
        h = make(True)
        h.rrq("big", {"windowsize": "3"})
        h.ack(0)
        for block in blocks:
            h.ack(block)
        h.clock.pump([2.0] * 5)
        self.assertEqual(h.protocol.active, 0)
        self.assertEqual(sum(h.protocol.stats.outcomes.values()), 1)
