# -*- test-case-name: tests.protocols.dhcp.test_codec -*-
"""Pure DHCPv4 wire codec (RFC 2131/2132, RFC 3396 long options, option overload).

Bytes in, frozen values out, and back. No I/O, no clock: the DatagramProtocols in
L{sidero.protocols.dhcp.protocol} are the only code that touches sockets. Every parse
failure is a L{MalformedPacket}, so callers need exactly one ``except``.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from ipaddress import IPv4Address

MAGIC_COOKIE = b"\x63\x82\x53\x63"
HEADER_LEN = 236
MIN_PACKET_LEN = HEADER_LEN + len(MAGIC_COOKIE)
#: RFC 2131 says a client must accept 576 bytes; BOOTP relays and old ROMs expect at least 300.
BOOTP_MIN_LEN = 300

BOOTREQUEST = 1
BOOTREPLY = 2
FLAG_BROADCAST = 0x8000

# Option codes used by the proxy.
OPT_PAD = 0
OPT_END = 255
OPT_VENDOR_SPECIFIC = 43
OPT_REQUESTED_IP = 50
OPT_OVERLOAD = 52
OPT_MESSAGE_TYPE = 53
OPT_SERVER_ID = 54
OPT_PARAMETER_REQUEST_LIST = 55
OPT_MAX_MESSAGE_SIZE = 57
OPT_VENDOR_CLASS = 60
OPT_CLIENT_ID = 61
OPT_TFTP_SERVER = 66
OPT_BOOTFILE = 67
OPT_USER_CLASS = 77
OPT_CLIENT_ARCH = 93
OPT_CLIENT_NDI = 94
OPT_CLIENT_UUID = 97
OPT_IPXE_ENCAP = 175

# Message types (option 53).
DHCPDISCOVER = 1
DHCPOFFER = 2
DHCPREQUEST = 3
DHCPDECLINE = 4
DHCPACK = 5
DHCPNAK = 6
DHCPRELEASE = 7
DHCPINFORM = 8

# PXE vendor sub-options (option 43, PXE spec 2.1 table 2-1).
PXE_DISCOVERY_CONTROL = 6
PXE_BOOT_SERVERS = 8
PXE_BOOT_MENU = 9
PXE_MENU_PROMPT = 10
PXE_BOOT_ITEM = 71

_HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")
_ZERO_IP = "0.0.0.0"


class MalformedPacket(ValueError):
    """The bytes are not a well-formed DHCPv4 message; C{reason} says what is wrong."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DHCPMessage:
    """One DHCPv4 message.

    C{options} keeps every option in order of first appearance as (code, value); repeated
    instances of a code were concatenated (RFC 3396) by the decoder. C{sname} and C{file}
    hold the header fields as sent (NUL-padded) unless they were overloaded with options,
    in which case they are empty.
    """

    op: int = BOOTREQUEST
    htype: int = 1
    hlen: int = 6
    hops: int = 0
    xid: int = 0
    secs: int = 0
    flags: int = 0
    ciaddr: str = _ZERO_IP
    yiaddr: str = _ZERO_IP
    siaddr: str = _ZERO_IP
    giaddr: str = _ZERO_IP
    chaddr: bytes = b"\x00" * 16
    sname: bytes = b""
    file: bytes = b""
    options: tuple[tuple[int, bytes], ...] = field(default_factory=tuple)
    # code -> value (the first, for a message built by hand with a repeat): C{get} is called
    # a dozen times per packet. Not a cached_property: that takes a lock on every access.
    _by_code: dict[int, bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[int, bytes] = {}
        for code, value in self.options:
            index.setdefault(code, value)
        object.__setattr__(self, "_by_code", index)

    def get(self, code: int) -> bytes | None:
        """The value of option C{code}, or None when absent."""
        return self._by_code.get(code)

    def has(self, code: int) -> bool:
        return self.get(code) is not None

    @property
    def message_type(self) -> int | None:
        """Option 53 as an int, or None when absent or not exactly one byte."""
        value = self.get(OPT_MESSAGE_TYPE)
        if value is None or len(value) != 1:
            return None
        return value[0]

    @property
    def mac(self) -> bytes:
        """The hardware address as far as C{hlen} says (at most the 16 bytes of chaddr)."""
        return self.chaddr[: min(self.hlen, 16)]

    @property
    def broadcast(self) -> bool:
        return bool(self.flags & FLAG_BROADCAST)

    def with_options(self, options: Iterable[tuple[int, bytes]]) -> DHCPMessage:
        return replace(self, options=tuple(options))


#: Four raw bytes as a dotted quad (C, a tenth of C{str(IPv4Address(raw))}'s cost per packet).
_ip = socket.inet_ntoa


@lru_cache(maxsize=1024)
def _ip_bytes(text: str) -> bytes:
    """A dotted quad as 4 bytes, strictly (C{IPv4Address}'s rules); cached, since a proxy
    encodes the same few addresses (its own, 0.0.0.0, a handful of relays) over and over."""
    try:
        return IPv4Address(text).packed
    except ValueError as e:
        raise ValueError(f"not an IPv4 address: {text!r}") from e


def parse_tlv(data: bytes, *, where: str = "options") -> list[tuple[int, bytes]]:
    """Split a TLV area into (code, value) pairs, without merging repeats.

    Pad (0) is skipped and End (255) stops the scan; a missing End is tolerated (many
    ROMs pad with zeros instead). A length that runs past the area is malformed.
    The loop advances by at least one byte per step, so the work is linear in the input.
    """
    out: list[tuple[int, bytes]] = []
    i = 0
    n = len(data)
    while i < n:
        code = data[i]
        if code == OPT_PAD:
            i += 1
            continue
        if code == OPT_END:
            break
        if i + 1 >= n:
            raise MalformedPacket(f"option {code} in {where} has no length byte")
        length = data[i + 1]
        start = i + 2
        end = start + length
        if end > n:
            raise MalformedPacket(f"option {code} in {where} runs past the end")
        out.append((code, data[start:end]))
        i = end
    return out


def _merge(pairs: list[tuple[int, bytes]]) -> tuple[tuple[int, bytes], ...]:
    """RFC 3396: concatenate repeated instances of a code, keeping first-appearance order."""
    if len({code for code, _ in pairs}) == len(pairs):
        return tuple(pairs)  # no repeats (nearly every packet): nothing to merge
    order: list[int] = []
    parts: dict[int, list[bytes]] = {}
    for code, value in pairs:
        if code not in parts:
            order.append(code)
            parts[code] = []
        parts[code].append(value)
    return tuple((code, b"".join(parts[code])) for code in order)


def decode(data: bytes) -> DHCPMessage:
    """Parse one DHCPv4 message; raise L{MalformedPacket} on anything unparseable."""
    if len(data) < HEADER_LEN:
        raise MalformedPacket(f"truncated header ({len(data)} bytes)")
    if len(data) < MIN_PACKET_LEN:
        raise MalformedPacket("truncated before the magic cookie")
    (op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr, sname,
     bootfile) = _HEADER.unpack_from(data)
    if op not in (BOOTREQUEST, BOOTREPLY):
        raise MalformedPacket(f"bad op {op}")
    if data[HEADER_LEN:MIN_PACKET_LEN] != MAGIC_COOKIE:
        raise MalformedPacket("bad magic cookie")

    pairs = parse_tlv(data[MIN_PACKET_LEN:], where="options")
    # Overload is only honoured in the main options area (RFC 2131 4.1), so it cannot
    # loop: file and sname are each scanned at most once.
    overload_values = [v for c, v in pairs if c == OPT_OVERLOAD]
    overload = 0
    if overload_values:
        value = b"".join(overload_values)
        if len(value) != 1 or value[0] not in (1, 2, 3):
            raise MalformedPacket(f"bad option overload value {value.hex()}")
        overload = value[0]
    if overload & 1:
        pairs.extend(c for c in parse_tlv(bootfile, where="file") if c[0] != OPT_OVERLOAD)
        bootfile = b""
    if overload & 2:
        pairs.extend(c for c in parse_tlv(sname, where="sname") if c[0] != OPT_OVERLOAD)
        sname = b""
    return DHCPMessage(
        op=op, htype=htype, hlen=hlen, hops=hops, xid=xid, secs=secs, flags=flags,
        ciaddr=_ip(ciaddr), yiaddr=_ip(yiaddr), siaddr=_ip(siaddr), giaddr=_ip(giaddr),
        chaddr=chaddr, sname=sname, file=bootfile, options=_merge(pairs),
    )


def encode_tlv(options: Iterable[tuple[int, bytes]], *, end: bool = True) -> bytes:
    """Encode (code, value) pairs; values longer than 255 bytes are split (RFC 3396)."""
    out = bytearray()
    for code, value in options:
        if not 0 < code < 255:
            raise ValueError(f"option code {code} cannot be encoded")
        if not value:
            out += bytes((code, 0))
            continue
        for i in range(0, len(value), 255):
            chunk = value[i : i + 255]
            out += bytes((code, len(chunk)))
            out += chunk
    if end:
        out.append(OPT_END)
    return bytes(out)


def _fixed(value: bytes, size: int, name: str) -> bytes:
    if len(value) > size:
        raise ValueError(f"{name} longer than {size} bytes")
    return value.ljust(size, b"\x00")


def encode(msg: DHCPMessage) -> bytes:
    """Serialise C{msg}; the result is padded to the 300-byte BOOTP minimum."""
    header = _HEADER.pack(
        msg.op, msg.htype, msg.hlen, msg.hops, msg.xid, msg.secs, msg.flags,
        _ip_bytes(msg.ciaddr), _ip_bytes(msg.yiaddr), _ip_bytes(msg.siaddr), _ip_bytes(msg.giaddr),
        _fixed(msg.chaddr, 16, "chaddr"), _fixed(msg.sname, 64, "sname"),
        _fixed(msg.file, 128, "file"),
    )
    body = header + MAGIC_COOKIE + encode_tlv(msg.options)
    if len(body) < BOOTP_MIN_LEN:
        body += b"\x00" * (BOOTP_MIN_LEN - len(body))
    return body


def decode_suboptions(data: bytes, *, where: str = "sub-options") -> tuple[tuple[int, bytes], ...]:
    """Sub-options of an encapsulating option (43 PXE, 175 iPXE): same TLV rules, merged."""
    return _merge(parse_tlv(data, where=where))


def encode_suboptions(options: Sequence[tuple[int, bytes]]) -> bytes:
    """Encode sub-options followed by End, as PXE ROMs expect for option 43."""
    for code, value in options:
        if len(value) > 255:
            raise ValueError(f"sub-option {code} longer than 255 bytes")
    return encode_tlv(options)


def client_arches(value: bytes) -> tuple[int, ...]:
    """Option 93: a list of 16-bit architecture types (RFC 4578)."""
    if len(value) % 2:
        raise MalformedPacket("client architecture option has an odd length")
    return tuple(struct.unpack(f"!{len(value) // 2}H", value))
