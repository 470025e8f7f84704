"""SMBIOS parsing: recorded QEMU tables (SeaBIOS 2.8, OVMF 3.0), hand-built edge cases, fuzz."""

from __future__ import annotations

import os
import struct
import uuid as uuidlib

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sidero.agent import smbios
from tests.agent.trees import DATA

UUID_BYTES = bytes(range(1, 17))


def structure(stype: int, formatted: bytes, *strings: str, handle: int = 0) -> bytes:
    """One structure: header + formatted area + string set."""
    body = struct.pack("<BBH", stype, 4 + len(formatted), handle) + formatted
    if strings:
        return body + b"".join(s.encode() + b"\x00" for s in strings) + b"\x00"
    return body + b"\x00\x00"


def ep2(major: int = 2, minor: int = 8, count: int = 0xFFFF) -> bytes:
    ep = bytearray(31)
    ep[0:4] = b"_SM_"
    ep[6], ep[7] = major, minor
    struct.pack_into("<H", ep, 0x1C, count)
    return bytes(ep)


def ep3(major: int = 3, minor: int = 2) -> bytes:
    ep = bytearray(24)
    ep[0:5] = b"_SM3_"
    ep[7], ep[8] = major, minor
    return bytes(ep)


def system(uuid: bytes = UUID_BYTES) -> bytes:
    # manufacturer 1, product 2, version 3, serial 4, uuid, wake-up, sku 5, family 6
    return structure(1, bytes((1, 2, 3, 4)) + uuid + bytes((6, 5, 6)),
                     "Maker", "Box", "v9", "SN1", "SKU", "Fam")


def processor(status: int, cores: int = 8, threads: int = 16, cores2: int = 0,
              threads2: int = 0) -> bytes:
    f = bytearray(0x30 - 4)

    def put(off: int, fmt: str, v: int) -> None:
        struct.pack_into(fmt, f, off - 4, v)

    put(4, "<B", 1)  # socket
    put(7, "<B", 2)  # manufacturer
    put(0x10, "<B", 3)  # version
    put(0x16, "<H", 3100)
    put(0x18, "<B", status)
    put(0x20, "<B", 4)  # serial
    put(0x23, "<B", cores)
    put(0x25, "<B", threads)
    put(0x2A, "<H", cores2)
    put(0x2E, "<H", threads2)
    return structure(4, bytes(f), "CPU0", "Intel", "Xeon Gold", "PSN")


def memory(size: int, extended: int = 0, mtype: int = 0x1A, speed: int = 3200) -> bytes:
    f = bytearray(0x22 - 4)
    struct.pack_into("<H", f, 0x0C - 4, size)
    struct.pack_into("<B", f, 0x10 - 4, 1)  # locator
    struct.pack_into("<B", f, 0x12 - 4, mtype)
    struct.pack_into("<H", f, 0x15 - 4, speed)
    struct.pack_into("<B", f, 0x17 - 4, 2)  # manufacturer
    struct.pack_into("<B", f, 0x18 - 4, 3)  # serial
    struct.pack_into("<B", f, 0x1A - 4, 4)  # part
    struct.pack_into("<I", f, 0x1C - 4, extended)
    return structure(17, bytes(f), "DIMM_A1", "Samsung", "MSN", "M393A4K40")


END = structure(127, b"")


class RecordedTablesTests(SynchronousTestCase):
    def test_seabios_smbios_28(self) -> None:
        """The SeaBIOS VM's table gives type 1 with the UUID QEMU was given, baseboard, two
        populated sockets and the one DIMM."""
        info = smbios.read(os.path.join(DATA, "qemu-pc"))
        assert info is not None and info.system is not None and info.baseboard is not None
        self.assertEqual(str(info.version), "2.8")
        self.assertEqual(info.system.uuid, "11223344-5566-7788-99aa-bbccddeeff00")
        self.assertEqual((info.system.sku_number, info.system.family), ("SKU-R1", "Rack"))
        self.assertEqual(info.baseboard, smbios.BaseboardInfo(
            "Acme Boards", "MB-100", "rev.B", "MB-SN-77", "ASSET-9"))
        self.assertEqual([p.socket for p in info.processors if p.populated], ["CPU 0", "CPU 1"])
        self.assertEqual(info.processors[0].current_speed, 2400)
        self.assertEqual([(m.size, m.size_mb, m.speed, m.type_name) for m in info.memory_devices],
                         [(2048, 2048, 2933, "RAM")])

    def test_ovmf_smbios_30(self) -> None:
        """The OVMF VM's 64-bit (3.0) entry point; 20 GiB of RAM as two QEMU DIMMs."""
        info = smbios.read(os.path.join(DATA, "qemu-q35-uefi"))
        assert info is not None and info.system is not None
        self.assertEqual(str(info.version), "3.0")
        self.assertEqual(info.system.uuid, "4c4c4544-0042-3510-8052-b4c04f4d3732")
        self.assertEqual(sum(m.size_mb for m in info.memory_devices), 20 * 1024)
        self.assertEqual([(p.core_count, p.thread_count) for p in info.processors], [(2, 2)] * 2)

    def test_uuid_matches_kernel(self) -> None:
        """Our UUID is exactly what the kernel put in class/dmi/id/product_uuid."""
        for name in ("qemu-pc", "qemu-q35-uefi"):
            info = smbios.read(os.path.join(DATA, name))
            with open(os.path.join(DATA, name, "class", "dmi", "id", "product_uuid")) as f:
                assert info is not None and info.system is not None
                self.assertEqual(info.system.uuid, f.read().strip())

    def test_fallback_to_dmi_id(self) -> None:
        """Without the raw tables, class/dmi/id gives the system (no CPUs or memory)."""
        root = self.mktemp()
        os.makedirs(root)
        os.symlink(os.path.join(DATA, "qemu-pc", "class"), os.path.join(root, "class"))
        info = smbios.read(root)
        assert info is not None and info.system is not None
        self.assertEqual(info.system.uuid, "11223344-5566-7788-99aa-bbccddeeff00")
        self.assertEqual(info.system.manufacturer, "Acme Compute")
        self.assertEqual(info.processors, ())

    def test_malformed_table_falls_back(self) -> None:
        """A garbage raw table falls back to class/dmi/id and reports why."""
        root = self.mktemp()
        tables = os.path.join(root, "firmware", "dmi", "tables")
        os.makedirs(tables)
        with open(os.path.join(tables, "smbios_entry_point"), "wb") as f:
            f.write(ep3())
        with open(os.path.join(tables, "DMI"), "wb") as f:
            f.write(b"\x01\x02")
        os.symlink(os.path.join(DATA, "qemu-pc", "class"), os.path.join(root, "class"))
        info, error = smbios.read_with_fallback(root)
        assert info is not None and info.system is not None
        self.assertEqual(info.system.serial_number, "ACME-SN-0001")
        self.assertIn("truncated", error or "")

    def test_nothing(self) -> None:
        """No tables and no class/dmi/id: None."""
        self.assertIsNone(smbios.read(self.mktemp()))


class EdgeCaseTests(SynchronousTestCase):
    def test_uuid_byte_order(self) -> None:
        """≥ 2.6 swaps the first three fields; older versions take the bytes as they are."""
        table = system() + END
        new = smbios.parse(ep2(2, 6), table).system
        old = smbios.parse(ep2(2, 5), table).system
        assert new is not None and old is not None
        self.assertEqual(new.uuid, "04030201-0605-0807-090a-0b0c0d0e0f10")
        self.assertEqual(old.uuid, str(uuidlib.UUID(bytes=UUID_BYTES)))
        self.assertEqual((new.sku_number, new.family), ("SKU", "Fam"))

    def test_populated_and_extended_counts(self) -> None:
        """Status bit 6 says populated; 0xFF core/thread counts use the 16-bit fields."""
        info = smbios.parse(ep3(), processor(0x41) + processor(0x00) +
                            processor(0x41, 0xFF, 0xFF, 300, 600) + END)
        self.assertEqual([p.populated for p in info.processors], [True, False, True])
        self.assertEqual((info.processors[2].core_count, info.processors[2].thread_count),
                         (300, 600))
        self.assertEqual(info.processors[0].version, "Xeon Gold")

    def test_memory_sizes(self) -> None:
        """0 and 0xFFFF are not installed; 0x7FFF uses the extended size; bit 15 means KB."""
        info = smbios.parse(ep3(), memory(0) + memory(0xFFFF) + memory(0x7FFF, 65536)
                            + memory(0x8000 | 2048) + memory(16384, mtype=0x22) + END)
        installed = [m for m in info.memory_devices if m.installed]
        self.assertEqual([(m.module_size, m.size_mb) for m in installed],
                         [(65536, 65536), (0x8000 | 2048, 2), (16384, 16384)])
        self.assertEqual([m.type_name for m in installed], ["DDR4", "DDR4", "DDR5"])
        self.assertEqual(installed[0].part_number, "M393A4K40")

    def test_bad_string_index(self) -> None:
        """A string number past the string set reads as empty instead of failing."""
        info = smbios.parse(ep3(), structure(2, bytes((1, 9, 0, 0, 0)), "Board") + END)
        assert info.baseboard is not None
        self.assertEqual((info.baseboard.manufacturer, info.baseboard.product), ("Board", ""))

    def test_structure_count_limit(self) -> None:
        """A 2.x entry point's structure count stops the scan (trailing garbage ignored)."""
        info = smbios.parse(ep2(count=1), system() + b"\xff\x01garbage")
        self.assertIsNotNone(info.system)

    def test_errors(self) -> None:
        """Bad anchors, short headers, short lengths and unterminated strings are parse errors."""
        for ep, table in ((b"junk", END), (b"_SM3_", END), (ep3(), b"\x01\x02\x00"),
                          (ep3(), b"\x01\x02\x00\x00\x00\x00"), (ep3(), b"\x01\x20\x00\x00"),
                          (ep3(), structure(1, b"\x01")[:-2] + b"abc")):
            self.assertRaises(smbios.SMBIOSParseError, smbios.parse, ep, table)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=64), st.binary(max_size=600))
    def test_fuzz_only_typed_errors(self, ep: bytes, table: bytes) -> None:
        """Any bytes either parse or raise SMBIOSParseError, nothing else."""
        for entry in (ep, ep3() + ep, ep2(2, 8) + ep):
            try:
                smbios.parse(entry, table)
            except smbios.SMBIOSParseError:
                pass

    @settings(max_examples=200, deadline=None)
    @given(st.integers(min_value=0, max_value=200), st.binary(max_size=40))
    def test_fuzz_truncated_recording(self, cut: int, garbage: bytes) -> None:
        """A recorded table cut anywhere or followed by garbage never raises anything else."""
        with open(os.path.join(DATA, "qemu-pc", "firmware", "dmi", "tables", "DMI"), "rb") as f:
            table = f.read()
        try:
            smbios.parse(ep3(), table[: len(table) - cut] + garbage)
        except smbios.SMBIOSParseError:
            pass
