"""Request packets in the shape real firmware sends them (see shared/REAL-CLIENTS.md 2-3).

Built byte by byte here, independently of the codec under test, so a codec bug cannot
cancel itself out. Field order, option order and contents follow what dnsmasq logged
for QEMU's iPXE ROM, OVMF's EDK2 PXE client and EDK2 HTTP boot.
"""

from __future__ import annotations

import struct

MAC = bytes.fromhex("525400123456")
GUID = b"\x00" + bytes.fromhex("11111111222233334444555555555555")
XID = 0x5EED1234


def opt(code: int, value: bytes) -> bytes:
    return bytes((code, len(value))) + value


def bootp(options: bytes, *, xid: int = XID, flags: int = 0x8000, ciaddr: bytes = bytes(4),
          giaddr: bytes = bytes(4), secs: int = 4, sname: bytes = b"", file: bytes = b"",
          pad_to: int = 0) -> bytes:
    header = struct.pack("!BBBBIHH", 1, 1, 6, 0, xid, secs, flags)
    header += ciaddr + bytes(4) + bytes(4) + giaddr
    header += MAC.ljust(16, b"\0") + sname.ljust(64, b"\0") + file.ljust(128, b"\0")
    body = header + b"\x63\x82\x53\x63" + options + b"\xff"
    return body.ljust(pad_to, b"\0")


def discover_common(vendor: bytes, arch: int, ndi: bytes) -> bytes:
    return (opt(53, b"\x01") + opt(57, b"\x05\xc0") + opt(93, struct.pack("!H", arch))
            + opt(94, ndi) + opt(97, GUID) + opt(60, vendor))


#: QEMU e1000 iPXE ROM (BIOS): user class iPXE and the 175 encapsulation.
IPXE_BIOS_DISCOVER = bootp(
    discover_common(b"PXEClient:Arch:00000:UNDI:002001", 0, b"\x01\x02\x01")
    + opt(77, b"iPXE")
    + opt(55, bytes((1, 3, 6, 7, 12, 15, 17, 26, 43, 60, 66, 67, 119, 128, 129, 130, 131, 132,
                     133, 134, 135, 175, 203)))
    + opt(175, bytes.fromhex("b1050180862e10") + bytes.fromhex("eb03010000") + bytes.fromhex("130101")),
    pad_to=400,
)

#: OVMF native EDK2 PXE (virtio-net, no option ROM): arch 7, no user class.
EDK2_UEFI_DISCOVER = bootp(
    discover_common(b"PXEClient:Arch:00007:UNDI:003000", 7, b"\x01\x03\x00")
    + opt(55, bytes((1, 2, 3, 4, 5, 6, 12, 13, 15, 17, 18, 22, 23, 28, 40, 41, 42, 43, 50, 51,
                     54, 58, 59, 60, 66, 67, 97, 128, 129, 130, 131, 132, 133, 134, 135))),
)

#: EDK2 HTTP boot (x86-64, arch 16).
UEFI_HTTP_DISCOVER = bootp(
    discover_common(b"HTTPClient:Arch:00016:UNDI:003000", 16, b"\x01\x03\x00")
    + opt(55, bytes((1, 3, 6, 15, 60, 67, 97))),
)

#: EDK2 PXE on arm64 (arch 11).
ARM64_DISCOVER = bootp(
    discover_common(b"PXEClient:Arch:00011:UNDI:003000", 11, b"\x01\x03\x00")
    + opt(55, bytes((1, 3, 6, 43, 60, 66, 67))),
)

#: iPXE EFI (snp.efi) after chain-loading: arch 7, user class iPXE.
IPXE_EFI_DISCOVER = bootp(
    discover_common(b"PXEClient:Arch:00007:UNDI:003010", 7, b"\x01\x03\x10")
    + opt(77, b"iPXE") + opt(175, bytes.fromhex("eb03010000")),
)

#: The DHCPREQUEST for the site server's lease, broadcast on :67 (must be ignored).
EDK2_SITE_REQUEST = bootp(
    opt(53, b"\x03") + opt(50, bytes((10, 213, 0, 120))) + opt(54, bytes((10, 213, 0, 1)))
    + opt(93, b"\x00\x07") + opt(97, GUID) + opt(60, b"PXEClient:Arch:00007:UNDI:003000"),
)

#: EDK2 proxyDHCP REQUEST to :4011 after a boot menu: asks for boot item type 0x8000 layer 0.
EDK2_PROXY_REQUEST = bootp(
    opt(53, b"\x03") + opt(93, b"\x00\x07") + opt(97, GUID)
    + opt(60, b"PXEClient:Arch:00007:UNDI:003000")
    + opt(43, opt(71, b"\x80\x00\x00\x00") + b"\xff"),
    ciaddr=bytes((10, 213, 0, 120)), flags=0,
)

#: An ordinary (non-PXE) client: udhcpc without -V.
PLAIN_DISCOVER = bootp(opt(53, b"\x01") + opt(60, b"udhcp 1.35.0") + opt(55, b"\x01\x03\x06"))
