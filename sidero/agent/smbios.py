# -*- test-case-name: tests.agent.test_smbios -*-
"""Pure SMBIOS parser for what the agent reports (spec §4 step 7): types 0, 1, 2, 4 and 17.

Input is what Linux exposes under C{/sys/firmware/dmi/tables}: the entry point
(C{smbios_entry_point}, a 2.x C{_SM_} or 3.x C{_SM3_} anchor, which gives the version) and the
structure table (C{DMI}).  Firmware tables are often sloppy, so every malformed byte string is
an L{SMBIOSParseError} and nothing else; the scan advances on every step, so it always ends.

When the raw table cannot be read, L{from_dmi_id} builds what it can (system and BIOS only)
from the kernel's already-decoded C{/sys/class/dmi/id} files.
"""

from __future__ import annotations

import os
import struct
import uuid as uuidlib
from dataclasses import dataclass, field

#: Structure types we read.
BIOS, SYSTEM, BASEBOARD, PROCESSOR, MEMORY_DEVICE, END_OF_TABLE = 0, 1, 2, 4, 17, 127
#: Processor status bit 6: CPU socket populated.
SOCKET_POPULATED = 0x40
#: Type 17 size word meanings.
SIZE_UNKNOWN = 0xFFFF
SIZE_USE_EXTENDED = 0x7FFF
SIZE_IN_KB = 0x8000

#: SMBIOS type 17 "Memory Type" names (DSP0134 7.18.2), as dmidecode and go-smbios spell them.
MEMORY_TYPES = {
    0x01: "Other", 0x02: "Unknown", 0x03: "DRAM", 0x04: "EDRAM", 0x05: "VRAM", 0x06: "SRAM",
    0x07: "RAM", 0x08: "ROM", 0x09: "Flash", 0x0A: "EEPROM", 0x0B: "FEPROM", 0x0C: "EPROM",
    0x0D: "CDRAM", 0x0E: "3DRAM", 0x0F: "SDRAM", 0x10: "SGRAM", 0x11: "RDRAM", 0x12: "DDR",
    0x13: "DDR2", 0x14: "DDR2 FB-DIMM", 0x18: "DDR3", 0x19: "FBD2", 0x1A: "DDR4",
    0x1B: "LPDDR", 0x1C: "LPDDR2", 0x1D: "LPDDR3", 0x1E: "LPDDR4",
    0x1F: "Logical non-volatile device", 0x20: "HBM", 0x21: "HBM2", 0x22: "DDR5",
    0x23: "LPDDR5", 0x24: "HBM3",
}


class SMBIOSParseError(ValueError):
    """The entry point or structure table is malformed; the message says where."""


@dataclass(frozen=True)
class Version:
    major: int
    minor: int

    def at_least(self, major: int, minor: int) -> bool:
        return (self.major, self.minor) >= (major, minor)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


@dataclass(frozen=True)
class Structure:
    """One raw structure: C{formatted} includes the 4-byte header; C{strings} are 1-based."""

    type: int
    handle: int
    formatted: bytes
    strings: tuple[str, ...]

    def byte(self, offset: int) -> int | None:
        return self.formatted[offset] if offset < len(self.formatted) else None

    def word(self, offset: int) -> int | None:
        if offset + 2 > len(self.formatted):
            return None
        value: int = struct.unpack_from("<H", self.formatted, offset)[0]
        return value

    def dword(self, offset: int) -> int | None:
        if offset + 4 > len(self.formatted):
            return None
        value: int = struct.unpack_from("<I", self.formatted, offset)[0]
        return value

    def string(self, offset: int) -> str:
        """The string the byte at C{offset} points to; "" when absent or out of range."""
        index = self.byte(offset)
        if not index or index > len(self.strings):
            return ""
        return self.strings[index - 1].strip()


@dataclass(frozen=True)
class BIOSInfo:
    vendor: str = ""
    version: str = ""
    release_date: str = ""


@dataclass(frozen=True)
class SystemInfo:
    manufacturer: str = ""
    product_name: str = ""
    version: str = ""
    serial_number: str = ""
    uuid: str = ""
    sku_number: str = ""
    family: str = ""


@dataclass(frozen=True)
class BaseboardInfo:
    manufacturer: str = ""
    product: str = ""
    version: str = ""
    serial_number: str = ""
    asset_tag: str = ""


@dataclass(frozen=True)
class ProcessorInfo:
    socket: str = ""
    manufacturer: str = ""
    version: str = ""
    serial_number: str = ""
    max_speed: int = 0
    current_speed: int = 0
    status: int = 0
    core_count: int = 0
    thread_count: int = 0

    @property
    def populated(self) -> bool:
        return bool(self.status & SOCKET_POPULATED)


@dataclass(frozen=True)
class MemoryDeviceInfo:
    locator: str = ""
    bank: str = ""
    #: The raw size word (0: empty slot, 0xFFFF: unknown, 0x7FFF: see extended_size,
    #: bit 15: the rest is in KB).
    size: int = 0
    extended_size: int = 0
    memory_type: int = 0
    speed: int = 0
    manufacturer: str = ""
    serial_number: str = ""
    part_number: str = ""

    @property
    def type_name(self) -> str:
        return MEMORY_TYPES.get(self.memory_type, "Unknown" if self.memory_type else "")

    @property
    def installed(self) -> bool:
        return self.size not in (0, SIZE_UNKNOWN)

    @property
    def module_size(self) -> int:
        """The module size the agent reports: the raw word, or the extended size in MB."""
        return self.extended_size if self.size == SIZE_USE_EXTENDED else self.size

    @property
    def size_mb(self) -> int:
        """What the module adds to the total, in MB (KB granularity honoured, rounded down)."""
        if self.size == SIZE_USE_EXTENDED:
            return self.extended_size
        if self.size & SIZE_IN_KB:
            return (self.size & 0x7FFF) // 1024
        return self.size


@dataclass(frozen=True)
class SMBIOS:
    version: Version
    bios: BIOSInfo = field(default_factory=BIOSInfo)
    system: SystemInfo | None = None
    baseboard: BaseboardInfo | None = None
    processors: tuple[ProcessorInfo, ...] = ()
    memory_devices: tuple[MemoryDeviceInfo, ...] = ()


# --- parsing ------------------------------------------------------------------------------------

def parse_entry_point(data: bytes) -> tuple[Version, int | None]:
    """The SMBIOS version and (for 2.x) the number of structures from an entry point."""
    if data[:5] == b"_SM3_":
        if len(data) < 0x18:
            raise SMBIOSParseError(f"truncated SMBIOS 3 entry point ({len(data)} bytes)")
        return Version(data[7], data[8]), None
    if data[:4] == b"_SM_":
        if len(data) < 0x1F:
            raise SMBIOSParseError(f"truncated SMBIOS 2 entry point ({len(data)} bytes)")
        count: int = struct.unpack_from("<H", data, 0x1C)[0]
        return Version(data[6], data[7]), count
    if data[:5] == b"_DMI_":
        if len(data) < 0x0F:
            raise SMBIOSParseError("truncated legacy DMI entry point")
        return Version(data[0x0E] >> 4, data[0x0E] & 0x0F), struct.unpack_from("<H", data, 0x0C)[0]
    raise SMBIOSParseError("no SMBIOS anchor (_SM_, _SM3_ or _DMI_) in the entry point")


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def iter_structures(table: bytes, limit: int | None = None) -> list[Structure]:
    """Split the table into structures, stopping at End-of-Table, the end or C{limit}."""
    out: list[Structure] = []
    i, n = 0, len(table)
    while i < n and (limit is None or len(out) < limit):
        if i + 4 > n:
            raise SMBIOSParseError(f"truncated structure header at offset {i}")
        stype, length, handle = struct.unpack_from("<BBH", table, i)
        if length < 4:
            raise SMBIOSParseError(f"structure at offset {i} has length {length} < 4")
        if i + length > n:
            raise SMBIOSParseError(f"structure type {stype} at offset {i} runs past the end")
        formatted = table[i : i + length]
        end = table.find(b"\x00\x00", i + length)
        if end < 0:
            raise SMBIOSParseError(f"strings of structure type {stype} at offset {i} "
                                   "are not terminated")
        area = table[i + length : end]
        strings = tuple(_decode(s) for s in area.split(b"\x00")) if area else ()
        out.append(Structure(stype, handle, formatted, strings))
        i = end + 2
        if stype == END_OF_TABLE:
            break
    return out


def _uuid(raw: bytes, version: Version) -> str:
    """Canonical lowercase UUID; SMBIOS ≥ 2.6 stores the first three fields little-endian."""
    if version.at_least(2, 6):
        return str(uuidlib.UUID(bytes_le=raw))
    return str(uuidlib.UUID(bytes=raw))


def _system(s: Structure, version: Version) -> SystemInfo:
    raw = s.formatted[8:24]
    return SystemInfo(
        manufacturer=s.string(4), product_name=s.string(5), version=s.string(6),
        serial_number=s.string(7), uuid=_uuid(raw, version) if len(raw) == 16 else "",
        sku_number=s.string(0x19), family=s.string(0x1A),
    )


def _processor(s: Structure) -> ProcessorInfo:
    cores = s.byte(0x23) or 0
    threads = s.byte(0x25) or 0
    # 0xFF means "see the 16-bit field" (SMBIOS 3.0) when the structure has it.
    if cores == 0xFF:
        cores = s.word(0x2A) or cores
    if threads == 0xFF:
        threads = s.word(0x2E) or threads
    return ProcessorInfo(
        socket=s.string(4), manufacturer=s.string(7), version=s.string(0x10),
        serial_number=s.string(0x20), max_speed=s.word(0x14) or 0,
        current_speed=s.word(0x16) or 0, status=s.byte(0x18) or 0,
        core_count=cores, thread_count=threads,
    )


def _memory(s: Structure) -> MemoryDeviceInfo:
    return MemoryDeviceInfo(
        locator=s.string(0x10), bank=s.string(0x11), size=s.word(0x0C) or 0,
        extended_size=(s.dword(0x1C) or 0) & 0x7FFFFFFF, memory_type=s.byte(0x12) or 0,
        speed=s.word(0x15) or 0, manufacturer=s.string(0x17), serial_number=s.string(0x18),
        part_number=s.string(0x1A),
    )


def parse(entry_point: bytes, table: bytes) -> SMBIOS:
    """Decode the structures the agent reports; raise L{SMBIOSParseError} on malformed input."""
    version, count = parse_entry_point(entry_point)
    bios = BIOSInfo()
    system: SystemInfo | None = None
    baseboard: BaseboardInfo | None = None
    processors: list[ProcessorInfo] = []
    memory: list[MemoryDeviceInfo] = []
    for s in iter_structures(table, count):
        if s.type == BIOS:
            bios = BIOSInfo(vendor=s.string(4), version=s.string(5), release_date=s.string(8))
        elif s.type == SYSTEM and system is None:
            system = _system(s, version)
        elif s.type == BASEBOARD and baseboard is None:
            baseboard = BaseboardInfo(
                manufacturer=s.string(4), product=s.string(5), version=s.string(6),
                serial_number=s.string(7), asset_tag=s.string(8),
            )
        elif s.type == PROCESSOR:
            processors.append(_processor(s))
        elif s.type == MEMORY_DEVICE:
            memory.append(_memory(s))
    return SMBIOS(version, bios, system, baseboard, tuple(processors), tuple(memory))


# --- reading from sysfs -------------------------------------------------------------------------

def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def from_dmi_id(directory: str) -> SMBIOS | None:
    """What the kernel's decoded C{class/dmi/id} files give (no processors or memory)."""
    if not os.path.isdir(directory):
        return None

    def get(name: str) -> str:
        return _read(os.path.join(directory, name))

    system = SystemInfo(
        manufacturer=get("sys_vendor"), product_name=get("product_name"),
        version=get("product_version"), serial_number=get("product_serial"),
        uuid=get("product_uuid").lower(), sku_number=get("product_sku"),
        family=get("product_family"),
    )
    baseboard = BaseboardInfo(
        manufacturer=get("board_vendor"), product=get("board_name"), version=get("board_version"),
        serial_number=get("board_serial"), asset_tag=get("board_asset_tag"),
    )
    bios = BIOSInfo(vendor=get("bios_vendor"), version=get("bios_version"),
                    release_date=get("bios_date"))
    return SMBIOS(Version(0, 0), bios, system, baseboard)


def read(sysfs: str = "/sys") -> SMBIOS | None:
    """SMBIOS from C{<sysfs>/firmware/dmi/tables}, else C{<sysfs>/class/dmi/id}, else None.

    @raise SMBIOSParseError: the raw table is there but malformed (the caller decides whether
        to fall back; L{read_with_fallback} does).
    """
    tables = os.path.join(sysfs, "firmware", "dmi", "tables")
    try:
        with open(os.path.join(tables, "smbios_entry_point"), "rb") as f:
            entry = f.read()
        with open(os.path.join(tables, "DMI"), "rb") as f:
            table = f.read()
    except OSError:
        return from_dmi_id(os.path.join(sysfs, "class", "dmi", "id"))
    return parse(entry, table)


def read_with_fallback(sysfs: str = "/sys") -> tuple[SMBIOS | None, str | None]:
    """Like L{read}, but a malformed raw table falls back to C{class/dmi/id}; the second value
    is the parse error's text (for the log) or None."""
    try:
        return read(sysfs), None
    except SMBIOSParseError as e:
        return from_dmi_id(os.path.join(sysfs, "class", "dmi", "id")), str(e)
