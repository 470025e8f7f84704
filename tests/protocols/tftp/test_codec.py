"""The pure TFTP codec: captured packets, round trips, and hostile input."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sidero.protocols.tftp import codec
from sidero.protocols.tftp.codec import (
    Ack,
    Data,
    Error,
    MalformedDatagram,
    OptionAck,
    Request,
    RequestedOptions,
    decode,
    parse_options,
)

# An RRQ as iPXE sends it (blksize from the link MTU, tsize 0).
IPXE_RRQ = b"\x00\x01undionly.kpxe\x00octet\x00blksize\x001432\x00tsize\x000\x00"
# tftp-hpa's client in netascii mode, no options.
TFTP_HPA_RRQ = b"\x00\x01ipxe.efi\x00netascii\x00"


class DecodeTests(SynchronousTestCase):
    """Decoding known packets."""

    def test_ipxe_rrq(self) -> None:
        """An iPXE RRQ decodes to filename, mode and its options."""
        self.assertEqual(
            decode(IPXE_RRQ),
            Request(codec.RRQ, "undionly.kpxe", "octet", {"blksize": "1432", "tsize": "0"}),
        )

    def test_plain_rrq(self) -> None:
        """An RRQ without options has an empty option dict."""
        self.assertEqual(decode(TFTP_HPA_RRQ), Request(codec.RRQ, "ipxe.efi", "netascii", {}))

    def test_case_insensitive_names_and_mode(self) -> None:
        """Option names and the mode are lower-cased; values are kept as sent."""
        packet = b"\x00\x01f\x00OCTET\x00BlkSize\x001024\x00WINDOWSIZE\x004\x00"
        self.assertEqual(
            decode(packet),
            Request(codec.RRQ, "f", "octet", {"blksize": "1024", "windowsize": "4"}),
        )

    def test_duplicate_option_first_wins(self) -> None:
        """The first of duplicated options is kept."""
        packet = b"\x00\x01f\x00octet\x00blksize\x00100\x00BLKSIZE\x00200\x00"
        self.assertEqual(decode(packet).options, {"blksize": "100"})  # type: ignore[union-attr]

    def test_trailing_padding_ignored(self) -> None:
        """NUL padding after the options is tolerated."""
        packet = IPXE_RRQ + b"\x00\x00\x00"
        self.assertEqual(decode(packet), decode(IPXE_RRQ))

    def test_wrq(self) -> None:
        """A WRQ decodes with its opcode."""
        self.assertEqual(decode(b"\x00\x02up\x00octet\x00").opcode, codec.WRQ)  # type: ignore[union-attr]

    def test_data_ack_error_oack(self) -> None:
        """DATA, ACK, ERROR and OACK decode to their values."""
        self.assertEqual(decode(b"\x00\x03\xff\xffabc"), Data(65535, b"abc"))
        self.assertEqual(decode(b"\x00\x04\x00\x07"), Ack(7))
        self.assertEqual(decode(b"\x00\x04\x00\x07pad"), Ack(7))
        self.assertEqual(decode(b"\x00\x05\x00\x01File not found\x00"), Error(1, "File not found"))
        self.assertEqual(decode(b"\x00\x05\x00\x02no nul"), Error(2, "no nul"))
        self.assertEqual(
            decode(b"\x00\x06blksize\x001428\x00"), OptionAck({"blksize": "1428"})
        )

    def test_malformed(self) -> None:
        """Broken packets raise MalformedDatagram with a reason."""
        cases = [
            b"",
            b"\x00",
            b"\x00\x09",
            b"\x00\x01file",
            b"\x00\x01file\x00",
            b"\x00\x01\x00octet\x00",
            b"\x00\x01f\x00\x00",
            b"\x00\x01f\x00octet\x00blksize\x00",
            b"\x00\x01f\x00octet\x00\x00512\x00",
            b"\x00\x01\xff\xfe\x00octet\x00",
            b"\x00\x03\x00",
            b"\x00\x04\x00",
            b"\x00\x05\x00",
            b"\x00\x06blksize",
        ]
        for packet in cases:
            with self.assertRaises(MalformedDatagram, msg=repr(packet)) as caught:
                decode(packet)
            self.assertTrue(caught.exception.reason)


class EncodeTests(SynchronousTestCase):
    """Encoding what the server sends."""

    def test_bytes(self) -> None:
        """Encoders produce the RFC wire format, block numbers modulo 65536."""
        self.assertEqual(codec.encode_data(65536 + 2, b"xy"), b"\x00\x03\x00\x02xy")
        self.assertEqual(codec.encode_ack(65535), b"\x00\x04\xff\xff")
        self.assertEqual(codec.encode_error(1, "File not found"), b"\x00\x05\x00\x01File not found\x00")
        self.assertEqual(
            codec.encode_oack({"tsize": "5", "blksize": "8"}),
            b"\x00\x06tsize\x005\x00blksize\x008\x00",
        )
        self.assertEqual(codec.encode_request(codec.RRQ, "f", "octet"), b"\x00\x01f\x00octet\x00")
        self.assertRaises(ValueError, codec.encode_request, codec.DATA, "f")


class OptionTests(SynchronousTestCase):
    """Option values judged against their RFC ranges."""

    def test_ranges(self) -> None:
        """Values in range are taken, out-of-range or non-decimal ones dropped."""
        self.assertEqual(
            parse_options({"blksize": "8", "timeout": "255", "tsize": "0", "windowsize": "65535"}),
            RequestedOptions(blksize=8, timeout=255, tsize=0, windowsize=65535),
        )
        self.assertEqual(
            parse_options({"blksize": "65465", "timeout": "256", "tsize": "-1", "windowsize": "0"}),
            RequestedOptions(),
        )
        self.assertEqual(
            parse_options({"blksize": " 512", "timeout": "+3", "tsize": "1_000", "windowsize": "٣"}),
            RequestedOptions(),
        )
        self.assertEqual(parse_options({"blksize": "65464"}).blksize, 65464)
        self.assertEqual(parse_options({"multicast": ""}), RequestedOptions())


option_names = st.sampled_from(["blksize", "BLKSIZE", "timeout", "tsize", "windowsize", "x"])
text = st.text(
    alphabet=st.characters(exclude_characters="\0", exclude_categories=["Cs"]),
    min_size=1, max_size=30,
)


class PropertyTests(SynchronousTestCase):
    """Hypothesis: the codec never fails any other way, and round-trips."""

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=600))
    def test_random_bytes(self, data: bytes) -> None:
        """Arbitrary bytes decode or raise MalformedDatagram, nothing else."""
        try:
            decode(data)
        except MalformedDatagram:
            pass

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from([1, 2, 3, 4, 5, 6]), st.binary(max_size=100), st.integers(0, 200))
    def test_known_opcodes_truncated(self, opcode: int, body: bytes, cut: int) -> None:
        """Known opcodes with random, truncated bodies only raise MalformedDatagram."""
        packet = opcode.to_bytes(2, "big") + body
        try:
            decode(packet[:cut])
        except MalformedDatagram:
            pass

    @settings(max_examples=50, deadline=None)
    @given(st.binary(min_size=1, max_size=40), st.integers(1700, 3000))
    def test_oversized(self, pattern: bytes, repeat: int) -> None:
        """Oversized datagrams (past 64 KiB) are handled like any others."""
        data = pattern * (70_000 // len(pattern) + 1)
        data = data[: 40 * repeat]
        for opcode in (b"\x00\x01", b"\x00\x03", b"\x00\x06"):
            try:
                decode(opcode + data)
            except MalformedDatagram:
                pass

    @settings(max_examples=300, deadline=None)
    @given(
        st.sampled_from([codec.RRQ, codec.WRQ]),
        text,
        st.sampled_from(["octet", "netascii"]),
        st.lists(st.tuples(option_names, st.text(alphabet="0123456789ab", max_size=8))),
    )
    def test_request_round_trip(
        self, opcode: int, filename: str, mode: str, pairs: list[tuple[str, str]]
    ) -> None:
        """Encoded requests decode to the same values, first duplicate winning."""
        raw = (
            codec.encode_request(opcode, filename, mode)
            + b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in pairs)
        )
        expected: dict[str, str] = {}
        for k, v in pairs:
            expected.setdefault(k.lower(), v)
        self.assertEqual(decode(raw), Request(opcode, filename, mode, expected))
        parsed = parse_options(expected)
        if parsed.blksize is not None:
            self.assertTrue(codec.BLKSIZE_MIN <= parsed.blksize <= codec.BLKSIZE_MAX)

    @given(st.integers(0, 2**20), st.binary(max_size=100))
    def test_data_round_trip(self, block: int, payload: bytes) -> None:
        """DATA round-trips with the block number modulo 65536."""
        self.assertEqual(decode(codec.encode_data(block, payload)), Data(block % 65536, payload))

    @given(st.dictionaries(st.text(max_size=12), st.text(max_size=12)))
    def test_parse_options_total(self, options: dict[str, str]) -> None:
        """parse_options accepts any strings and returns only in-range values."""
        parsed = parse_options(options)
        if parsed.windowsize is not None:
            self.assertTrue(1 <= parsed.windowsize <= 65535)
        if parsed.timeout is not None:
            self.assertTrue(1 <= parsed.timeout <= 255)
