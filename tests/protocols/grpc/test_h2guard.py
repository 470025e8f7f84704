"""The control-frame flood guard of the h2c splice: frame headers found across any split of
the byte stream, payloads skipped, a kind past its limit in a window reported."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sidero.protocols.grpc.h2guard import PING, RST_STREAM, SETTINGS, FrameGuard
from sidero.protocols.grpc.port import PREFACE


def frame(kind: int, payload: bytes = b"", stream: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


LIMITS = {RST_STREAM: 3, SETTINGS: 2, PING: 2}


class FrameGuardTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.guard = FrameGuard(self.clock.seconds, LIMITS, window=10.0)

    def test_normal_connection(self) -> None:
        """Preface, SETTINGS, its ACK, HEADERS and a 100 KB DATA frame whose payload looks like
        RST_STREAM frames: nothing reported, five frames seen."""
        fake = frame(RST_STREAM, b"\x00" * 4, 1) * 8000
        data = (PREFACE + frame(SETTINGS, b"\x00\x03\x00\x00\x00\x64") + frame(SETTINGS, flags=1)
                + frame(0x1, b"h" * 30, 1) + frame(0x0, fake, 1) + frame(0x8, b"\x00\x00\x10\x00"))
        self.assertIsNone(self.guard.feed(data))
        self.assertEqual(self.guard.frames, 5)

    @given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30))
    def test_any_split(self, cuts: list[int]) -> None:
        """The same stream cut anywhere gives the same count and the same verdict."""
        guard = FrameGuard(self.clock.seconds, LIMITS)
        data = PREFACE + frame(SETTINGS) + b"".join(frame(RST_STREAM, b"\x00" * 4, i) for i in (1, 3, 5, 7))
        verdicts, pos = [], 0
        for cut in cuts * 20:
            if pos >= len(data):
                break
            verdicts.append(guard.feed(data[pos:pos + cut]))
            pos += cut
        if pos < len(data):
            verdicts.append(guard.feed(data[pos:]))
        self.assertEqual([v for v in verdicts if v], ["rst-stream"])
        self.assertEqual(guard.frames, 5)

    def test_window(self) -> None:
        """The limit is per window: the same frames spread out are fine."""
        self.guard.feed(PREFACE)
        for _ in range(5):
            self.assertIsNone(self.guard.feed(frame(PING, b"\x00" * 8) * 2))
            self.clock.advance(10)
        self.assertEqual(self.guard.feed(frame(PING, b"\x00" * 8) * 3), "ping")
