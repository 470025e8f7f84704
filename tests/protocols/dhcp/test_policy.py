"""Tests for the pure proxyDHCP decision (spec 3.5 with its [rec]s, REAL-CLIENTS 3)."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sidero.protocols.dhcp import codec, policy
from sidero.protocols.dhcp.codec import DHCPMessage
from sidero.protocols.dhcp.policy import Firmware, Ignore, ProxyConfig, Reply
from tests.protocols.dhcp import packets as p

CFG = ProxyConfig(server_ip="10.213.0.2", endpoint="10.213.0.2", api_port=8081)
SERVER = bytes((10, 213, 0, 2))


def offer(raw: bytes, cfg: ProxyConfig = CFG) -> Reply:
    d = policy.decide(codec.decode(raw), cfg, proxy_port=False, source=("0.0.0.0", 68))
    assert isinstance(d, Reply), d
    return d


def sub43(m: DHCPMessage) -> dict[int, bytes]:
    return dict(codec.decode_suboptions(m.get(codec.OPT_VENDOR_SPECIFIC) or b""))


class FirmwareTests(SynchronousTestCase):
    """Boot file per client kind."""

    def test_ipxe_bios_gets_script_url(self) -> None:
        """iPXE (user class + 175) is chained to /boot.ipxe over HTTP, without 66."""
        r = offer(p.IPXE_BIOS_DISCOVER)
        self.assertEqual(r.firmware, Firmware.X86_BIOS)
        self.assertTrue(r.ipxe)
        self.assertEqual(r.message.get(codec.OPT_BOOTFILE), b"http://10.213.0.2:8081/boot.ipxe")
        self.assertIsNone(r.message.get(codec.OPT_TFTP_SERVER))

    def test_plain_bios_gets_undionly(self) -> None:
        """A BIOS PXE ROM that is not iPXE gets undionly.kpxe over TFTP from us."""
        raw = p.bootp(p.discover_common(b"PXEClient:Arch:00000:UNDI:002001", 0, b"\x01\x02\x01"))
        r = offer(raw)
        self.assertEqual(r.message.get(codec.OPT_BOOTFILE), b"undionly.kpxe")
        self.assertEqual(r.message.get(codec.OPT_TFTP_SERVER), b"10.213.0.2")
        self.assertEqual(r.message.file, b"undionly.kpxe")
        self.assertEqual(r.message.siaddr, "10.213.0.2")

    def test_edk2_uefi_gets_efi_binary(self) -> None:
        """EDK2 UEFI x64 PXE gets the x86-64 EFI iPXE over TFTP."""
        r = offer(p.EDK2_UEFI_DISCOVER)
        self.assertEqual(r.firmware, Firmware.X86_EFI)
        self.assertEqual(r.message.get(codec.OPT_BOOTFILE), b"snp.efi")
        self.assertEqual(r.message.get(codec.OPT_VENDOR_CLASS), b"PXEClient")

    def test_boot_files_configurable(self) -> None:
        """The EFI file name follows the configuration (e.g. ipxe.efi from Debian)."""
        cfg = ProxyConfig(server_ip="10.213.0.2", endpoint="boot.lab", api_port=80,
                          boot_files=policy.BootFiles(x86_efi="ipxe.efi"))
        self.assertEqual(offer(p.EDK2_UEFI_DISCOVER, cfg).message.get(67), b"ipxe.efi")

    def test_uefi_http_boot(self) -> None:
        """Arch 16 gets an HTTP URL under /tftp/ and option 60 HTTPClient, no 43/66."""
        r = offer(p.UEFI_HTTP_DISCOVER)
        self.assertEqual(r.firmware, Firmware.X86_HTTP)
        self.assertEqual(r.message.get(codec.OPT_BOOTFILE), b"http://10.213.0.2:8081/tftp/snp.efi")
        self.assertEqual(r.message.get(codec.OPT_VENDOR_CLASS), b"HTTPClient")
        self.assertIsNone(r.message.get(codec.OPT_VENDOR_SPECIFIC))
        self.assertIsNone(r.message.get(codec.OPT_TFTP_SERVER))

    def test_arm64_http_boot(self) -> None:
        """Arch 19 gets the arm64 binary over HTTP; the endpoint is used verbatim."""
        cfg = ProxyConfig(server_ip="10.213.0.2", endpoint="sidero.lab", api_port=9000)
        raw = p.bootp(p.discover_common(b"HTTPClient:Arch:00019:UNDI:003000", 19, b"\x01\x03\x00"))
        r = offer(raw, cfg)
        self.assertEqual(r.message.get(67), b"http://sidero.lab:9000/tftp/snp-arm64.efi")

    def test_arm64_pxe(self) -> None:
        """Arch 11 gets the arm64 EFI binary over TFTP."""
        r = offer(p.ARM64_DISCOVER)
        self.assertEqual(r.firmware, Firmware.ARM_EFI)
        self.assertEqual(r.message.get(67), b"snp-arm64.efi")

    def test_ipxe_efi_gets_script(self) -> None:
        """iPXE running as an EFI app (arch 7 + iPXE) is chained to /boot.ipxe too."""
        self.assertEqual(offer(p.IPXE_EFI_DISCOVER).message.get(67),
                         b"http://10.213.0.2:8081/boot.ipxe")

    def test_user_class_rfc3004_form(self) -> None:
        """A length-prefixed RFC 3004 user class with iPXE first counts as iPXE."""
        raw = p.bootp(p.discover_common(b"PXEClient:Arch:00000:UNDI:002001", 0, b"\x01\x02\x01")
                      + p.opt(77, b"\x04iPXE\x03foo"))
        self.assertTrue(offer(raw).ipxe)

    def test_last_recognised_arch_wins(self) -> None:
        """Several 93 values: the last recognised one decides (as Sidero)."""
        raw = p.bootp(p.opt(53, b"\x01") + p.opt(60, b"PXEClient")
                      + p.opt(93, b"\x00\x07\x00\x63\x00\x0b\x00\x64"))
        self.assertEqual(offer(raw).firmware, Firmware.ARM_EFI)

    def test_arch_from_vendor_class(self) -> None:
        """Without option 93, the Arch field of option 60 is used."""
        raw = p.bootp(p.opt(53, b"\x01") + p.opt(60, b"PXEClient:Arch:00009:UNDI:003000"))
        self.assertEqual(offer(raw).firmware, Firmware.X86_EFI)

    def test_unsupported_arch(self) -> None:
        """An arch outside the table is dropped with a reason."""
        raw = p.bootp(p.opt(53, b"\x01") + p.opt(60, b"PXEClient") + p.opt(93, b"\x00\x02"))
        d = policy.decide(codec.decode(raw), CFG, proxy_port=False)
        self.assertEqual(d, Ignore(policy.UNSUPPORTED_ARCH))


class ReplyShapeTests(SynchronousTestCase):
    """Options and header of the OFFER (REAL-CLIENTS 3: what iPXE and EDK2 accept)."""

    def test_offer_options(self) -> None:
        """53=OFFER, 54=us, 60=PXEClient, 97 echoed, 43 = discovery control 8."""
        m = offer(p.EDK2_UEFI_DISCOVER).message
        self.assertEqual(m.op, codec.BOOTREPLY)
        self.assertEqual(m.message_type, codec.DHCPOFFER)
        self.assertEqual(m.get(codec.OPT_SERVER_ID), SERVER)
        self.assertEqual(m.get(codec.OPT_CLIENT_UUID), p.GUID)
        self.assertEqual(m.get(codec.OPT_VENDOR_SPECIFIC), b"\x06\x01\x08\xff")
        self.assertEqual(sub43(m), {codec.PXE_DISCOVERY_CONTROL: b"\x08"})

    def test_header_copied(self) -> None:
        """xid, flags, chaddr, htype/hlen and giaddr come from the request; no address offered."""
        req = codec.decode(p.EDK2_UEFI_DISCOVER)
        m = offer(p.EDK2_UEFI_DISCOVER).message
        self.assertEqual((m.xid, m.flags, m.chaddr, m.htype, m.hlen, m.giaddr),
                         (req.xid, req.flags, req.chaddr, req.htype, req.hlen, req.giaddr))
        self.assertEqual((m.yiaddr, m.ciaddr), ("0.0.0.0", "0.0.0.0"))

    def test_no_guid_no_97(self) -> None:
        """Option 97 is only echoed when the client sent it."""
        raw = p.bootp(p.opt(53, b"\x01") + p.opt(60, b"PXEClient") + p.opt(93, b"\x00\x00"))
        self.assertIsNone(offer(raw).message.get(97))

    def test_bad_guid_dropped(self) -> None:
        """A GUID not of 17 bytes starting with 0 is dropped (as Sidero)."""
        for guid in (b"\x01" + bytes(16), bytes(16)):
            raw = p.bootp(p.opt(53, b"\x01") + p.opt(60, b"PXEClient") + p.opt(93, b"\x00\x00")
                          + p.opt(97, guid))
            d = policy.decide(codec.decode(raw), CFG, proxy_port=False)
            self.assertEqual(d, Ignore(policy.BAD_GUID))

    def test_long_url_not_in_header(self) -> None:
        """A boot URL too long for the 128-byte file field goes only in option 67."""
        cfg = ProxyConfig(server_ip="10.213.0.2", endpoint="x" * 130, api_port=1)
        r = offer(p.IPXE_BIOS_DISCOVER, cfg)
        self.assertEqual(r.message.file, b"")
        self.assertTrue((r.message.get(67) or b"").endswith(b"/boot.ipxe"))
        codec.encode(r.message)


class ScopeTests(SynchronousTestCase):
    """What is answered, and what is silently ignored."""

    def test_non_pxe_ignored(self) -> None:
        """An ordinary DHCP client gets nothing from us."""
        d = policy.decide(codec.decode(p.PLAIN_DISCOVER), CFG, proxy_port=False)
        self.assertEqual(d, Ignore(policy.NOT_PXE))

    def test_option_93_without_option_60_answered(self) -> None:
        """As the Go proxy: option 93 is enough, whatever option 60 says (or without it)."""
        import struct

        base = (p.opt(53, b"\x01") + p.opt(93, struct.pack("!H", 7)) + p.opt(97, p.GUID))
        for vendor in (b"", b"pxeclient", b"Broadcom-ROM"):
            raw = p.bootp(base + (p.opt(60, vendor) if vendor else b""))
            r = offer(raw)
            self.assertEqual((r.firmware, r.message.get(codec.OPT_BOOTFILE)),
                             (Firmware.X86_EFI, b"snp.efi"), vendor)
            self.assertEqual(r.message.get(codec.OPT_VENDOR_CLASS), b"PXEClient")
        http = p.bootp(p.opt(53, b"\x01") + p.opt(93, struct.pack("!H", 16)))
        self.assertEqual(offer(http).message.get(codec.OPT_BOOTFILE),
                         b"http://10.213.0.2:8081/tftp/snp.efi")

    def test_site_request_ignored(self) -> None:
        """The REQUEST on :67 for the site server's lease is not ours."""
        d = policy.decide(codec.decode(p.EDK2_SITE_REQUEST), CFG, proxy_port=False)
        self.assertEqual(d, Ignore(policy.FOR_SITE_SERVER))

    def test_replies_ignored(self) -> None:
        """BOOTREPLY packets (another server's offers) are ignored."""
        m = offer(p.EDK2_UEFI_DISCOVER).message
        self.assertEqual(policy.decide(m, CFG, proxy_port=False), Ignore(policy.NOT_REQUEST))

    def test_discover_on_4011_ignored(self) -> None:
        """:4011 answers REQUEST/INFORM only."""
        d = policy.decide(codec.decode(p.EDK2_UEFI_DISCOVER), CFG, proxy_port=True)
        self.assertEqual(d, Ignore(policy.WRONG_MESSAGE_TYPE))

    def test_release_ignored(self) -> None:
        """Other message types on :67 are ignored."""
        raw = p.bootp(p.opt(53, b"\x07") + p.opt(60, b"PXEClient") + p.opt(93, b"\x00\x00"))
        d = policy.decide(codec.decode(raw), CFG, proxy_port=False)
        self.assertEqual(d, Ignore(policy.WRONG_MESSAGE_TYPE))

    def test_malformed_43_ignored(self) -> None:
        """A broken option 43 from the client is a reason, not an exception."""
        raw = p.bootp(p.opt(53, b"\x01") + p.opt(60, b"PXEClient") + p.opt(93, b"\x00\x00")
                      + p.opt(43, b"\x47\x09\x80"))
        d = policy.decide(codec.decode(raw), CFG, proxy_port=False)
        self.assertEqual(d, Ignore(policy.BAD_OPTION))

    def test_odd_arch_ignored(self) -> None:
        """An odd-length option 93 is a reason, not an exception."""
        raw = p.bootp(p.opt(53, b"\x01") + p.opt(60, b"PXEClient") + p.opt(93, b"\x00"))
        d = policy.decide(codec.decode(raw), CFG, proxy_port=False)
        self.assertEqual(d, Ignore(policy.BAD_OPTION))


class ProxyPortTests(SynchronousTestCase):
    """:4011 proxyDHCP REQUEST → ACK."""

    def test_ack_echoes_boot_item(self) -> None:
        """The ACK names the file and echoes the requested boot item (as EDK2 accepted)."""
        d = policy.decide(codec.decode(p.EDK2_PROXY_REQUEST), CFG, proxy_port=True,
                          source=("10.213.0.120", 4011))
        assert isinstance(d, Reply)
        self.assertEqual(d.message.message_type, codec.DHCPACK)
        self.assertEqual(d.message.get(67), b"snp.efi")
        self.assertEqual(d.message.get(43), b"\x47\x04\x80\x00\x00\x00\xff")
        self.assertEqual(d.address, ("10.213.0.120", 4011))

    def test_ack_without_item(self) -> None:
        """Without a boot item the ACK carries discovery control like the OFFER."""
        raw = p.bootp(p.opt(53, b"\x03") + p.opt(60, b"PXEClient") + p.opt(93, b"\x00\x07"),
                      ciaddr=bytes((10, 213, 0, 9)))
        d = policy.decide(codec.decode(raw), CFG, proxy_port=True, source=("10.213.0.9", 68))
        assert isinstance(d, Reply)
        self.assertEqual(d.message.get(43), b"\x06\x01\x08\xff")
        self.assertEqual(d.address, ("10.213.0.9", 68))


class DestinationTests(SynchronousTestCase):
    """Where :67 replies go (RFC 2131 4.1)."""

    def msg(self, **kw: object) -> DHCPMessage:
        return DHCPMessage(**kw)  # type: ignore[arg-type]

    def test_broadcast_when_no_ciaddr(self) -> None:
        """A client without an address gets a broadcast to :68."""
        self.assertEqual(policy.reply_address(self.msg()), ("255.255.255.255", 68))

    def test_broadcast_flag(self) -> None:
        """The broadcast flag forces a broadcast even with ciaddr."""
        m = self.msg(ciaddr="10.213.0.5", flags=0x8000)
        self.assertEqual(policy.reply_address(m), ("255.255.255.255", 68))

    def test_unicast_to_ciaddr(self) -> None:
        """A client with ciaddr and no broadcast flag gets a unicast."""
        self.assertEqual(policy.reply_address(self.msg(ciaddr="10.213.0.5")), ("10.213.0.5", 68))

    def test_relayed(self) -> None:
        """A relayed request is answered to the relay on :67."""
        m = self.msg(giaddr="10.9.0.1", ciaddr="10.213.0.5", flags=0x8000)
        self.assertEqual(policy.reply_address(m), ("10.9.0.1", 67))

    def test_config_validates_ip(self) -> None:
        """The server IP must be IPv4 (it goes into siaddr and option 54)."""
        self.assertRaises(ValueError, ProxyConfig, server_ip="fd00::1", endpoint="x", api_port=1)


_BASES = (p.IPXE_BIOS_DISCOVER, p.EDK2_UEFI_DISCOVER, p.UEFI_HTTP_DISCOVER, p.ARM64_DISCOVER,
          p.IPXE_EFI_DISCOVER, p.EDK2_PROXY_REQUEST)
_CONFIGS = (
    CFG,
    ProxyConfig(server_ip="192.168.7.1", endpoint="sidero.example", api_port=9000,
                boot_files=policy.BootFiles(bios="b" * 140, ipxe_script="s" * 300)),
)


class PrecomputedReplyTests(SynchronousTestCase):
    """The reply bytes come from precomputed parts with the client's fields patched in; they
    must be exactly what the generic encoder makes of the reply message."""

    @given(base=st.sampled_from(_BASES), xid=st.integers(0, 2**32 - 1),
           flags=st.integers(0, 0xFFFF), htype=st.integers(0, 255), hlen=st.integers(0, 255),
           giaddr=st.binary(min_size=4, max_size=4), chaddr=st.binary(min_size=16, max_size=16),
           guid=st.none() | st.binary(min_size=16, max_size=16),
           item=st.none() | st.binary(min_size=4, max_size=4),
           cfg=st.sampled_from(_CONFIGS), proxy_port=st.booleans())
    @settings(max_examples=300, deadline=None)
    def test_bytes_equal_generic_encoding(self, base: bytes, xid: int, flags: int, htype: int,
                                          hlen: int, giaddr: bytes, chaddr: bytes,
                                          guid: bytes | None, item: bytes | None,
                                          cfg: ProxyConfig, proxy_port: bool) -> None:
        msg = codec.decode(base)
        options = [(c, v) for c, v in msg.options if c not in (53, 97, 43)]
        options.insert(0, (53, b"\x03" if proxy_port else b"\x01"))
        if guid is not None:
            options.append((97, b"\x00" + guid))
        if item is not None:
            options.append((43, codec.encode_suboptions([(71, item)])))
        request = replace(msg, xid=xid, flags=flags, htype=htype, hlen=hlen,
                          giaddr=codec._ip(giaddr), chaddr=chaddr, options=tuple(options))
        d = policy.decide(request, cfg, proxy_port=proxy_port, source=("10.1.2.3", 68))
        assert isinstance(d, Reply), d
        self.assertEqual(d.data, codec.encode(d.message))
        back = codec.decode(d.data)
        self.assertEqual((back.xid, back.flags, back.htype, back.hlen, back.chaddr, back.giaddr),
                         (xid, flags, htype, hlen, chaddr, codec._ip(giaddr)))
        self.assertEqual(back.message_type, codec.DHCPACK if proxy_port else codec.DHCPOFFER)
        self.assertEqual(back.get(97), None if guid is None else b"\x00" + guid)
        self.assertEqual(d.ack, proxy_port)
