"""Reading what tcpdump captured in a namespace test: the UDP/IPv4 packets of a pcap file."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Packet:
    src: str
    sport: int
    dst: str
    dport: int
    payload: bytes


def read_pcap(path: Path) -> list[Packet]:
    """UDP/IPv4 packets from a classic pcap file with Ethernet frames (tcpdump -w)."""
    data = path.read_bytes()
    if len(data) < 24:
        return []
    magic = data[:4]
    endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    out: list[Packet] = []
    i = 24
    while i + 16 <= len(data):
        incl = struct.unpack(endian + "I", data[i + 8 : i + 12])[0]
        frame = data[i + 16 : i + 16 + incl]
        i += 16 + incl
        if linktype == 1:
            if len(frame) < 14 or frame[12:14] != b"\x08\x00":
                continue
            ip = frame[14:]
        elif linktype == 113:  # Linux cooked capture
            if len(frame) < 16 or frame[14:16] != b"\x08\x00":
                continue
            ip = frame[16:]
        else:
            continue
        if len(ip) < 20 or ip[9] != 17:
            continue
        ihl = (ip[0] & 0x0F) * 4
        udp = ip[ihl:]
        if len(udp) < 8:
            continue
        sport, dport, length = struct.unpack("!HHH", udp[:6])
        out.append(Packet(".".join(map(str, ip[12:16])), sport, ".".join(map(str, ip[16:20])),
                          dport, udp[8:length]))
    return out
