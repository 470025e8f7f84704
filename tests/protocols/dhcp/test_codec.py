"""Tests for the pure DHCPv4 codec: recorded-shape packets, RFC 3396, overload, errors."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sidero.protocols.dhcp import codec
from sidero.protocols.dhcp.codec import DHCPMessage, MalformedPacket
from tests.protocols.dhcp import packets as p


class DecodeRecordedTests(SynchronousTestCase):
    """Decoding packets shaped like the firmware we boot."""

    def test_ipxe_bios_fields(self) -> None:
        """The iPXE BIOS DISCOVER yields its header fields and PXE options."""
        m = codec.decode(p.IPXE_BIOS_DISCOVER)
        self.assertEqual(m.op, codec.BOOTREQUEST)
        self.assertEqual(m.xid, p.XID)
        self.assertEqual(m.mac, p.MAC)
        self.assertTrue(m.broadcast)
        self.assertEqual(m.message_type, codec.DHCPDISCOVER)
        self.assertEqual(m.get(codec.OPT_VENDOR_CLASS), b"PXEClient:Arch:00000:UNDI:002001")
        self.assertEqual(m.get(codec.OPT_USER_CLASS), b"iPXE")
        self.assertEqual(m.get(codec.OPT_CLIENT_UUID), p.GUID)
        self.assertEqual(codec.client_arches(m.get(codec.OPT_CLIENT_ARCH) or b""), (0,))

    def test_ipxe_encapsulated_suboptions(self) -> None:
        """Option 175 splits into iPXE's own sub-options."""
        m = codec.decode(p.IPXE_BIOS_DISCOVER)
        subs = dict(codec.decode_suboptions(m.get(codec.OPT_IPXE_ENCAP) or b""))
        self.assertEqual(subs[0xB1], bytes.fromhex("0180862e10"))
        self.assertEqual(subs[0xEB], b"\x01\x00\x00")
        self.assertEqual(subs[0x13], b"\x01")

    def test_edk2_proxy_request_boot_item(self) -> None:
        """The :4011 REQUEST carries ciaddr and a PXE boot item in option 43."""
        m = codec.decode(p.EDK2_PROXY_REQUEST)
        self.assertEqual(m.ciaddr, "10.213.0.120")
        subs = dict(codec.decode_suboptions(m.get(codec.OPT_VENDOR_SPECIFIC) or b""))
        self.assertEqual(subs[codec.PXE_BOOT_ITEM], b"\x80\x00\x00\x00")

    def test_unknown_options_preserved(self) -> None:
        """Options we know nothing about survive decode and re-encode."""
        raw = p.bootp(p.opt(224, b"secret") + p.opt(53, b"\x01") + p.opt(251, b""))
        m = codec.decode(raw)
        self.assertEqual(m.get(224), b"secret")
        self.assertEqual(m.get(251), b"")
        self.assertEqual(codec.decode(codec.encode(m)).options, m.options)

    def test_missing_end_tolerated(self) -> None:
        """A packet whose options stop without End still decodes."""
        raw = p.bootp(p.opt(53, b"\x01"))[:-1]
        self.assertEqual(codec.decode(raw).message_type, codec.DHCPDISCOVER)

    def test_pad_skipped(self) -> None:
        """Pad bytes between options are skipped."""
        raw = p.bootp(b"\x00\x00" + p.opt(53, b"\x01") + b"\x00" + p.opt(60, b"PXEClient"))
        m = codec.decode(raw)
        self.assertEqual([c for c, _ in m.options], [53, 60])

    def test_options_after_end_ignored(self) -> None:
        """Bytes after End are not options."""
        raw = p.bootp(p.opt(53, b"\x01") + b"\xff" + p.opt(60, b"PXEClient"))
        self.assertIsNone(codec.decode(raw).get(60))


class LongOptionTests(SynchronousTestCase):
    """RFC 3396 concatenation and option overload (option 52)."""

    def test_repeated_option_concatenated(self) -> None:
        """Two instances of one code are joined in order."""
        raw = p.bootp(p.opt(43, b"abc") + p.opt(53, b"\x01") + p.opt(43, b"def"))
        m = codec.decode(raw)
        self.assertEqual(m.get(43), b"abcdef")
        self.assertEqual([c for c, _ in m.options], [43, 53])

    def test_overload_file(self) -> None:
        """Overload 1 reads options from the file field and empties it."""
        raw = p.bootp(p.opt(52, b"\x01") + p.opt(53, b"\x01"),
                      file=p.opt(60, b"PXEClient") + b"\xff")
        m = codec.decode(raw)
        self.assertEqual(m.get(60), b"PXEClient")
        self.assertEqual(m.file, b"")

    def test_overload_both_order(self) -> None:
        """With overload 3, values continue options → file → sname (RFC 3396 order)."""
        raw = p.bootp(p.opt(52, b"\x03") + p.opt(43, b"1"),
                      file=p.opt(43, b"2") + b"\xff", sname=p.opt(43, b"3") + b"\xff")
        m = codec.decode(raw)
        self.assertEqual(m.get(43), b"123")
        self.assertEqual((m.file, m.sname), (b"", b""))

    def test_overload_inside_overloaded_field_ignored(self) -> None:
        """An option 52 inside file cannot pull in sname (no loops, RFC 2131 4.1)."""
        raw = p.bootp(p.opt(52, b"\x01"), file=p.opt(52, b"\x02") + b"\xff",
                      sname=p.opt(60, b"PXEClient") + b"\xff")
        m = codec.decode(raw)
        self.assertIsNone(m.get(60))
        self.assertNotEqual(m.sname, b"")

    def test_without_overload_file_is_a_name(self) -> None:
        """Without option 52 the file field is a file name, not options."""
        raw = p.bootp(p.opt(53, b"\x01"), file=p.opt(60, b"PXEClient"))
        m = codec.decode(raw)
        self.assertIsNone(m.get(60))
        self.assertTrue(m.file.startswith(bytes((60, 9))))

    def test_encode_splits_long_option(self) -> None:
        """A 600-byte value goes out as 255+255+90 and decodes back whole."""
        value = bytes(range(256)) * 2 + b"x" * 88
        data = codec.encode(DHCPMessage(options=((43, value),)))
        opts = data[codec.MIN_PACKET_LEN:]
        self.assertEqual((opts[0], opts[1]), (43, 255))
        self.assertEqual((opts[257], opts[258]), (43, 255))
        self.assertEqual((opts[514], opts[515]), (43, 90))
        self.assertEqual(codec.decode(data).get(43), value)


class MalformedTests(SynchronousTestCase):
    """Every parse failure is one MalformedPacket with a reason."""

    def assertMalformed(self, data: bytes, fragment: str) -> None:
        e = self.assertRaises(MalformedPacket, codec.decode, data)
        self.assertIn(fragment, e.reason)

    def test_truncated_header(self) -> None:
        """Fewer than 236 bytes is a truncated header."""
        self.assertMalformed(p.EDK2_UEFI_DISCOVER[:100], "truncated header")

    def test_truncated_cookie(self) -> None:
        """A header without the magic cookie is truncated."""
        self.assertMalformed(p.EDK2_UEFI_DISCOVER[:238], "magic cookie")

    def test_bad_cookie(self) -> None:
        """A wrong magic cookie (plain BOOTP) is refused."""
        raw = bytearray(p.EDK2_UEFI_DISCOVER)
        raw[236] = 0
        self.assertMalformed(bytes(raw), "bad magic cookie")

    def test_bad_op(self) -> None:
        """An op other than 1 or 2 is refused."""
        raw = bytearray(p.EDK2_UEFI_DISCOVER)
        raw[0] = 7
        self.assertMalformed(bytes(raw), "bad op")

    def test_option_runs_past_end(self) -> None:
        """An option whose length passes the end of the packet is refused."""
        raw = p.bootp(b"")[:-1] + bytes((60, 40)) + b"PXE"
        self.assertMalformed(raw, "runs past the end")

    def test_option_without_length(self) -> None:
        """A code byte as the very last byte is refused."""
        raw = p.bootp(b"")[:-1] + bytes((60,))
        self.assertMalformed(raw, "no length")

    def test_bad_overload_value(self) -> None:
        """Option 52 must be one byte of 1, 2 or 3."""
        self.assertMalformed(p.bootp(p.opt(52, b"\x04")), "overload")
        self.assertMalformed(p.bootp(p.opt(52, b"\x01\x01")), "overload")

    def test_overloaded_file_runs_past_end(self) -> None:
        """A broken option inside an overloaded file field is refused."""
        raw = p.bootp(p.opt(52, b"\x01"), file=b"\x3c\xf0abc".ljust(128, b"\x01"))
        self.assertMalformed(raw, "in file")

    def test_odd_client_arch(self) -> None:
        """Option 93 of odd length is malformed."""
        self.assertRaises(MalformedPacket, codec.client_arches, b"\x00\x00\x07")


class EncodeTests(SynchronousTestCase):
    """Encoding replies."""

    def test_minimum_size(self) -> None:
        """Replies are padded to the 300-byte BOOTP minimum."""
        self.assertEqual(len(codec.encode(DHCPMessage(op=2))), 300)

    def test_round_trip_fields(self) -> None:
        """Header fields survive encode then decode."""
        m = DHCPMessage(op=2, xid=7, flags=0x8000, siaddr="10.213.0.2", giaddr="10.0.0.1",
                        chaddr=p.MAC.ljust(16, b"\0"), file=b"undionly.kpxe".ljust(128, b"\0"),
                        sname=bytes(64), options=((53, b"\x02"), (54, bytes((10, 213, 0, 2)))))
        self.assertEqual(codec.decode(codec.encode(m)), m)

    def test_bad_field_refused(self) -> None:
        """Fields that cannot fit raise ValueError, not a corrupt packet."""
        self.assertRaises(ValueError, codec.encode, DHCPMessage(file=b"x" * 129))
        self.assertRaises(ValueError, codec.encode, DHCPMessage(siaddr="::1"))
        self.assertRaises(ValueError, codec.encode, DHCPMessage(options=((255, b""),)))

    def test_suboptions_end_marker(self) -> None:
        """Sub-options are encoded with a closing End byte."""
        self.assertEqual(codec.encode_suboptions([(6, b"\x08")]), b"\x06\x01\x08\xff")


_options = st.lists(
    st.tuples(st.integers(1, 254), st.binary(max_size=600)), max_size=12)


class CodecPropertyTests(SynchronousTestCase):
    """Property tests: the decoder raises only MalformedPacket, and round-trips."""

    @settings(max_examples=400, deadline=None)
    @given(st.binary(max_size=1500))
    def test_random_bytes(self, data: bytes) -> None:
        """Arbitrary bytes either decode or raise MalformedPacket."""
        try:
            codec.decode(data)
        except MalformedPacket:
            pass

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=600), st.binary(max_size=128), st.binary(max_size=64),
           st.integers(0, 255))
    def test_valid_header_random_options(self, opts: bytes, file: bytes, sname: bytes,
                                         overload: int) -> None:
        """Random option areas, overload values and overloaded fields never escape MalformedPacket."""
        raw = p.bootp(p.opt(52, bytes((overload,))) + opts, file=file, sname=sname)
        try:
            m = codec.decode(raw)
        except MalformedPacket:
            return
        # Whatever decoded must encode again (a decoded message is always sendable).
        codec.encode(m)

    @settings(max_examples=200, deadline=None)
    @given(_options, st.integers(0, 1500))
    def test_truncation(self, options: list[tuple[int, bytes]], cut: int) -> None:
        """Any prefix of a valid packet decodes or raises MalformedPacket."""
        data = codec.encode(DHCPMessage(options=tuple((c, v) for c, v in options if c != 52)))
        try:
            codec.decode(data[:cut])
        except MalformedPacket:
            pass

    @settings(max_examples=200, deadline=None)
    @given(_options)
    def test_round_trip(self, options: list[tuple[int, bytes]]) -> None:
        """encode→decode gives the RFC 3396-merged options back, long values included."""
        options = [(c, v) for c, v in options if c != 52]
        decoded = codec.decode(codec.encode(DHCPMessage(options=tuple(options))))
        merged: dict[int, bytes] = {}
        for c, v in options:
            merged[c] = merged.get(c, b"") + v
        self.assertEqual(dict(decoded.options), merged)
        self.assertEqual([c for c, _ in decoded.options], list(merged))
