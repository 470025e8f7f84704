# -*- test-case-name: tests.protocols.dhcp.test_policy -*-
"""Pure proxyDHCP decision (spec 3.5): which requests get boot options, and which ones.

We never hand out addresses: the site DHCP server does that. We answer PXE/HTTP-boot
DISCOVERs on :67 with an OFFER carrying only boot options, and proxyDHCP REQUESTs on
:4011 with an ACK (the 3.5 [rec]; EDK2 uses 4011 when it was given a boot menu, and some
ROMs fail with PXE-E55 without it). Everything else gets an L{Ignore} with a reason, so the
protocol can count it; nothing here does I/O.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from ipaddress import IPv4Address

from sidero.protocols.dhcp import codec
from sidero.protocols.dhcp.codec import DHCPMessage, MalformedPacket

BROADCAST = "255.255.255.255"
CLIENT_PORT = 68
SERVER_PORT = 67


class Firmware(Enum):
    X86_BIOS = "x86-bios"
    X86_EFI = "x86-efi"
    ARM_EFI = "arm64-efi"
    X86_HTTP = "x86-http"
    ARM_HTTP = "arm64-http"


#: RFC 4578 / IANA processor architecture types we can boot (spec 3.5 table).
ARCH_FIRMWARE: dict[int, Firmware] = {
    0: Firmware.X86_BIOS,
    6: Firmware.X86_EFI,
    7: Firmware.X86_EFI,
    9: Firmware.X86_EFI,
    11: Firmware.ARM_EFI,
    15: Firmware.X86_HTTP,
    16: Firmware.X86_HTTP,
    19: Firmware.ARM_HTTP,
}

_HTTP_FIRMWARE = frozenset({Firmware.X86_HTTP, Firmware.ARM_HTTP})
_VENDOR_ARCH = re.compile(rb"^(?:PXEClient|HTTPClient):Arch:(\d{5})")


@dataclass(frozen=True)
class BootFiles:
    """File names served by our TFTP and C{/tftp/}: the Go Sidero's (spec 3.5).

    Our TFTP finds Debian's builds under these names too (C{snp.efi} is C{snponly.efi}
    there, L{sidero.protocols.bootfiles}); an iPXE client comes back to this proxy as iPXE
    and is sent to C{/boot.ipxe}.
    """

    bios: str = "undionly.kpxe"
    x86_efi: str = "snp.efi"
    arm64_efi: str = "snp-arm64.efi"
    ipxe_script: str = "boot.ipxe"


@dataclass(frozen=True)
class ProxyConfig:
    """What the decision needs: our IPv4 address (siaddr, 54, 66) and the API endpoint for URLs.

    C{endpoint} is used verbatim in URLs (spec 8: IPv6 literals are not bracketed for you).
    """

    server_ip: str
    endpoint: str
    api_port: int
    boot_files: BootFiles = field(default_factory=BootFiles)
    #: the reply parts, filled lazily by L{decide}: at most 2 x 5 x 2 entries.
    _parts: dict[tuple[int, Firmware, bool], _ReplyParts] = field(
        init=False, repr=False, compare=False, hash=False, default_factory=dict)

    def __post_init__(self) -> None:
        IPv4Address(self.server_ip)  # raises ValueError early, not per packet

    def http_url(self, path: str) -> str:
        return f"http://{self.endpoint}:{self.api_port}/{path}"



@dataclass(frozen=True)
class Reply:
    """A reply to send: its bytes (C{data}) and where to send them.

    C{data} is built from the reply's precomputed parts with the client's fields patched in
    (L{_ReplyParts}); C{message} is the same reply as a L{DHCPMessage}, built only when asked
    for (tests, tools), and C{codec.encode(message) == data} always (a property test checks).
    """

    data: bytes
    address: tuple[str, int]
    firmware: Firmware
    ipxe: bool
    bootfile: str
    ack: bool
    _request: DHCPMessage = field(repr=False, compare=False)
    _options: tuple[tuple[int, bytes], ...] = field(repr=False, compare=False)
    _file: bytes = field(repr=False, compare=False)
    _siaddr: str = field(repr=False, compare=False)

    @cached_property
    def message(self) -> DHCPMessage:
        msg = self._request
        return DHCPMessage(
            op=codec.BOOTREPLY, htype=msg.htype, hlen=msg.hlen, hops=0, xid=msg.xid, secs=0,
            flags=msg.flags, ciaddr="0.0.0.0", yiaddr="0.0.0.0", siaddr=self._siaddr,
            giaddr=msg.giaddr, chaddr=msg.chaddr, file=self._file, options=self._options,
        )


@dataclass(frozen=True)
class Ignore:
    """No reply; C{reason} is one of a small fixed set, safe to use as a counter label."""

    reason: str


Decision = Reply | Ignore

# Reasons (a closed set, so per-reason counters stay bounded).
NOT_REQUEST = "not-a-request"
NOT_PXE = "not-pxe"
WRONG_MESSAGE_TYPE = "message-type"
FOR_SITE_SERVER = "request-for-site-server"
UNSUPPORTED_ARCH = "unsupported-arch"
BAD_GUID = "malformed-client-guid"
BAD_OPTION = "malformed-option"
IGNORE_REASONS = (
    NOT_REQUEST, NOT_PXE, WRONG_MESSAGE_TYPE, FOR_SITE_SERVER, UNSUPPORTED_ARCH, BAD_GUID,
    BAD_OPTION,
)


def vendor_class(msg: DHCPMessage) -> bytes:
    return msg.get(codec.OPT_VENDOR_CLASS) or b""


def is_pxe(msg: DHCPMessage) -> bool:
    """A network-boot client: option 93 (client architecture), as the Go proxy takes it, or
    an option 60 starting with PXEClient/HTTPClient. Some NIC ROMs and HTTP-boot firmwares
    send 93 without an exact option 60."""
    if msg.has(codec.OPT_CLIENT_ARCH):
        return True
    vc = vendor_class(msg)
    return vc.startswith(b"PXEClient") or vc.startswith(b"HTTPClient")


def is_ipxe(msg: DHCPMessage) -> bool:
    """iPXE sends user class "iPXE" (raw, or as the first RFC 3004 entry) and option 175."""
    if msg.has(codec.OPT_IPXE_ENCAP):
        return True
    uc = msg.get(codec.OPT_USER_CLASS)
    if not uc:
        return False
    if uc == b"iPXE":
        return True
    return uc[1 : 1 + uc[0]] == b"iPXE"


def firmware_of(msg: DHCPMessage) -> Firmware | None:
    """The last recognised option-93 arch wins (as Sidero); without 93, the Arch in option 60."""
    raw = msg.get(codec.OPT_CLIENT_ARCH)
    arches: tuple[int, ...]
    if raw is not None:
        arches = codec.client_arches(raw)
    else:
        m = _VENDOR_ARCH.match(vendor_class(msg))
        arches = (int(m.group(1)),) if m else ()
    found: Firmware | None = None
    for arch in arches:
        found = ARCH_FIRMWARE.get(arch, found)
    return found


def reply_address(msg: DHCPMessage) -> tuple[str, int]:
    """Where a :67 reply goes (RFC 2131 4.1): relay, else broadcast, else the client's address."""
    if msg.giaddr != "0.0.0.0":
        return (msg.giaddr, SERVER_PORT)
    if msg.ciaddr == "0.0.0.0" or msg.broadcast:
        return (BROADCAST, CLIENT_PORT)
    return (msg.ciaddr, CLIENT_PORT)


def _bootfile(fw: Firmware, ipxe: bool, cfg: ProxyConfig) -> tuple[str, bool]:
    """(boot file, served over TFTP?) for a client."""
    files = cfg.boot_files
    if ipxe and fw not in _HTTP_FIRMWARE:
        # Already running iPXE: give it the script over HTTP, never the ROM again.
        return cfg.http_url(files.ipxe_script), False
    if fw is Firmware.X86_BIOS:
        return files.bios, True
    if fw is Firmware.X86_EFI:
        return files.x86_efi, True
    if fw is Firmware.ARM_EFI:
        return files.arm64_efi, True
    if fw is Firmware.X86_HTTP:
        return cfg.http_url(f"tftp/{files.x86_efi}"), False
    return cfg.http_url(f"tftp/{files.arm64_efi}"), False


@dataclass(frozen=True)
class _ReplyParts:
    """What a reply of one kind (message type, firmware, iPXE or not) always carries, worked
    out once per configuration instead of once per packet (the boot file, option 66...)."""

    head: tuple[tuple[int, bytes], ...]  # the options before 97 (the client's GUID)
    bootfile: str
    file: bytes  # the header's file field
    pxe: bool  # a PXE ROM (option 43 follows 97), not an HTTP-boot client
    siaddr: bytes
    #: the wire from sname on: sname, file, magic cookie, the head options encoded
    tail: bytes


#: PXE ROMs: discovery control 8 = "boot the file we name, no boot-server discovery".
_DISCOVERY_CONTROL = (
    (codec.OPT_VENDOR_SPECIFIC, codec.encode_suboptions([(codec.PXE_DISCOVERY_CONTROL, b"\x08")])),
)


def _reply_parts(reply_type: int, fw: Firmware, ipxe: bool, cfg: ProxyConfig) -> _ReplyParts:
    bootfile, via_tftp = _bootfile(fw, ipxe, cfg)
    http_client = fw in _HTTP_FIRMWARE
    head: list[tuple[int, bytes]] = [
        (codec.OPT_MESSAGE_TYPE, bytes((reply_type,))),
        (codec.OPT_SERVER_ID, IPv4Address(cfg.server_ip).packed),
        (codec.OPT_VENDOR_CLASS, b"HTTPClient" if http_client else b"PXEClient"),
    ]
    if via_tftp:
        head.append((codec.OPT_TFTP_SERVER, cfg.server_ip.encode()))
    raw_file = bootfile.encode()
    head.append((codec.OPT_BOOTFILE, raw_file))
    file = raw_file if len(raw_file) < 128 else b""
    tail = (bytes(64) + file.ljust(128, b"\x00") + codec.MAGIC_COOKIE
            + codec.encode_tlv(head, end=False))
    return _ReplyParts(head=tuple(head), bootfile=bootfile, file=file, pxe=not http_client,
                       siaddr=IPv4Address(cfg.server_ip).packed, tail=tail)


#: op .. chaddr of a reply: BOOTREPLY, the client's htype/hlen/xid/flags, secs 0, ciaddr and
#: yiaddr 0, our siaddr, the relay's giaddr, the client's chaddr (the fields patched per packet).
_REPLY_HEAD = struct.Struct("!BBBBIHH8s4s4s16s")
_ZERO8 = bytes(8)
_DISCOVERY_CONTROL_WIRE = codec.encode_tlv(_DISCOVERY_CONTROL, end=False)
_END = bytes((codec.OPT_END,))


_ECHOES: dict[bytes, tuple[tuple[tuple[int, bytes], ...], bytes]] = {}


def _boot_item_echo(item: bytes) -> tuple[tuple[tuple[int, bytes], ...], bytes]:
    """Option 43 echoing boot item C{item}, as an option and encoded (a ROM asks for one of
    a few items, so they are kept; the cache is bounded all the same)."""
    found = _ECHOES.get(item)
    if found is None:
        if len(_ECHOES) >= 256:
            _ECHOES.clear()
        echo = ((codec.OPT_VENDOR_SPECIFIC,
                 codec.encode_suboptions([(codec.PXE_BOOT_ITEM, item)])),)
        found = _ECHOES[item] = (echo, codec.encode_tlv(echo, end=False))
    return found


def decide(msg: DHCPMessage, cfg: ProxyConfig, *, proxy_port: bool,
           source: tuple[str, int] | None = None) -> Decision:
    """Decide the reply to C{msg}, received on :67 (C{proxy_port=False}) or :4011.

    C{source} is the UDP source address; :4011 replies go back to it.
    """
    if msg.op != codec.BOOTREQUEST:
        return Ignore(NOT_REQUEST)
    if not is_pxe(msg):
        return Ignore(NOT_PXE)
    mtype = msg.message_type
    if proxy_port:
        if mtype not in (codec.DHCPREQUEST, codec.DHCPINFORM):
            return Ignore(WRONG_MESSAGE_TYPE)
        reply_type = codec.DHCPACK
    else:
        if mtype == codec.DHCPREQUEST:
            # The client is taking the site server's lease; not ours to answer.
            return Ignore(FOR_SITE_SERVER)
        if mtype != codec.DHCPDISCOVER:
            return Ignore(WRONG_MESSAGE_TYPE)
        reply_type = codec.DHCPOFFER

    guid = msg.get(codec.OPT_CLIENT_UUID)
    if guid is not None and (len(guid) != 17 or guid[0] != 0):
        return Ignore(BAD_GUID)
    try:
        fw = firmware_of(msg)
        ipxe = is_ipxe(msg)
        client_43 = msg.get(codec.OPT_VENDOR_SPECIFIC)
        sub43 = codec.decode_suboptions(client_43, where="option 43") if client_43 else ()
    except MalformedPacket:
        return Ignore(BAD_OPTION)
    if fw is None:
        return Ignore(UNSUPPORTED_ARCH)

    parts = cfg._parts.get((reply_type, fw, ipxe))
    if parts is None:
        parts = cfg._parts[(reply_type, fw, ipxe)] = _reply_parts(reply_type, fw, ipxe, cfg)
    options = parts.head
    wire = parts.tail
    if guid is not None:
        options += ((codec.OPT_CLIENT_UUID, guid),)
        wire += b"\x61\x11" + guid
    if parts.pxe:
        # On :4011 the ROM asked for a boot item; echo it so it accepts the ACK.
        item = dict(sub43).get(codec.PXE_BOOT_ITEM) if proxy_port else None
        if item is not None and len(item) == 4:
            echo, echo_wire = _boot_item_echo(item)
            options += echo
            wire += echo_wire
        else:
            options += _DISCOVERY_CONTROL
            wire += _DISCOVERY_CONTROL_WIRE
    chaddr = msg.chaddr
    if len(chaddr) > 16:
        raise ValueError("chaddr longer than 16 bytes")  # as codec.encode (never from decode)
    data = _REPLY_HEAD.pack(codec.BOOTREPLY, msg.htype, msg.hlen, 0, msg.xid, 0, msg.flags,
                            _ZERO8, parts.siaddr, codec._ip_bytes(msg.giaddr), chaddr)
    data += wire + _END
    if len(data) < codec.BOOTP_MIN_LEN:
        data += bytes(codec.BOOTP_MIN_LEN - len(data))
    bootfile = parts.bootfile
    if proxy_port and source is not None and source[0] != "0.0.0.0":
        address = source
    elif proxy_port:
        address = (BROADCAST, source[1] if source else CLIENT_PORT)
    else:
        address = reply_address(msg)
    return Reply(data=data, address=address, firmware=fw, ipxe=ipxe, bootfile=bootfile,
                 ack=proxy_port, _request=msg, _options=options, _file=parts.file,
                 _siaddr=cfg.server_ip)
