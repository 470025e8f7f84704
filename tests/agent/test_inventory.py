"""Inventory: storage from sysfs trees, Go flag strings, addresses, the wire message."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from sidero.agent import inventory, smbios
from sidero.proto import agent_pb2 as pb
from tests.agent.trees import DATA, make_sysfs

IFACE = inventory.Interface(2, "eth0", 0x11043, 1500, "52:54:00:12:34:56",
                            ("10.0.0.5/24", "fd00::5/64", "fe80::1/64"))


class StorageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.sysfs = make_sysfs(self.mktemp(), dmi=None)

    def test_enumeration(self) -> None:
        """Excluded prefixes and size-0 devices are left out; the rest is sorted by name."""
        names = [d.name for d in inventory.list_disks(self.sysfs)]
        self.assertEqual(names, ["mmcblk0", "nvme0n1", "sda", "vdb", "xvda"])

    def test_attributes(self) -> None:
        """Size is sectors × 512; type, model, serial, name, uuid, wwid and ro come from sysfs."""
        disks = {d.name: d for d in inventory.list_disks(self.sysfs)}
        self.assertEqual(disks["sda"], inventory.Disk(
            "sda", 16384 * 512, pb.HDD, model="QEMU HARDDISK", serial="HD-1",
            wwid="t10.ATA QEMU HARDDISK HD-1", dev_path="/dev/sda"))
        nvme = disks["nvme0n1"]
        self.assertEqual((nvme.type, nvme.serial, nvme.uuid, nvme.wwid),
                         (pb.NVMe, "NV-SER", "nv-uuid", "eui.0011223344556677"))
        self.assertEqual((disks["mmcblk0"].type, disks["mmcblk0"].device_name_attr), (pb.SD, "SD32G"))
        self.assertIs(disks["vdb"].read_only, True)
        self.assertEqual(disks["vdb"].type, pb.SSD)
        self.assertEqual(disks["xvda"].type, pb.Unknown)

    def test_no_block_dir(self) -> None:
        """A sysfs without block/ gives no disks rather than an error."""
        self.assertEqual(inventory.list_disks(self.mktemp()), [])


class NetworkTests(SynchronousTestCase):
    def test_go_flags(self) -> None:
        """Flags are rendered in Go's order and names; none at all is "0"."""
        self.assertEqual(inventory.go_flags(0x11043), "up|broadcast|multicast|running")
        self.assertEqual(inventory.go_flags(0x10049), "up|loopback|running")
        self.assertEqual(inventory.go_flags(0x91), "up|pointtopoint")
        self.assertEqual(inventory.go_flags(0), "0")

    def test_reportable_addresses(self) -> None:
        """Global unicast (private included) is reported; link-local, loopback are not."""
        lo = inventory.Interface(1, "lo", 0x49, 65536, "", ("127.0.0.1/8", "::1/128"))
        ll4 = inventory.Interface(3, "eth1", 0x1043, 1500, "aa:bb:cc:dd:ee:ff",
                                  ("169.254.3.3/16", "10.0.0.5/24"))
        self.assertEqual(inventory.reportable_addresses([lo, IFACE, ll4]),
                         ["10.0.0.5", "fd00::5"])

    def test_current_namespace(self) -> None:
        """list_interfaces reads rtnetlink: loopback (no MAC) is never listed."""
        names = [i.name for i in inventory.list_interfaces()]
        self.assertNotIn("lo", names)


class HardwareTests(SynchronousTestCase):
    def test_no_smbios_only_storage(self) -> None:
        """Without SMBIOS only storage is sent, even when interfaces are known."""
        sysfs = make_sysfs(self.mktemp(), dmi=None)
        hw = inventory.build_hardware(None, inventory.list_disks(sysfs), [IFACE])
        self.assertEqual(hw.storage.device_count, 5)
        self.assertEqual(hw.storage.total_size, (16384 + 6144 + 4096 + 2048 + 2048) * 512)
        for part in ("system", "compute", "memory", "network"):
            self.assertFalse(hw.HasField(part), part)

    def test_empty_everything(self) -> None:
        """An empty SMBIOS, no disks and no interfaces still build a message."""
        hw = inventory.build_hardware(smbios.SMBIOS(smbios.Version(0, 0)), [], [])
        self.assertEqual(hw.storage.device_count, 0)
        self.assertEqual(hw.compute.processor_count, 0)

    def test_recorded_machine(self) -> None:
        """The recorded SeaBIOS VM: system without version, populated CPUs, memory in MB."""
        info = smbios.read(os.path.join(DATA, "qemu-pc"))
        hw = inventory.build_hardware(info, [], [IFACE])
        self.assertEqual(hw.system.uuid, "11223344-5566-7788-99aa-bbccddeeff00")
        self.assertEqual(hw.system.version, "")
        self.assertEqual(hw.system.sku_number, "SKU-R1")
        self.assertEqual((hw.compute.processor_count, hw.compute.total_core_count,
                          hw.compute.total_thread_count), (2, 2, 2))
        self.assertEqual(hw.compute.processors[0].product_name, "Acme X 3000")
        self.assertEqual(hw.compute.processors[0].speed, 2400)
        self.assertEqual((hw.memory.total_size, hw.memory.module_count), (2048, 1))
        self.assertEqual(hw.memory.modules[0].type, "RAM")
        self.assertEqual(hw.network.interfaces[0].flags, "up|broadcast|multicast|running")
        self.assertEqual(list(hw.network.interfaces[0].addresses), list(IFACE.addresses))

    def test_memory_rules(self) -> None:
        """Module size is the raw word (or extended MB); the total honours KB granularity."""
        mods = (smbios.MemoryDeviceInfo(size=0x7FFF, extended_size=65536, memory_type=0x1A),
                smbios.MemoryDeviceInfo(size=0x8000 | 4096),
                smbios.MemoryDeviceInfo(size=0),
                smbios.MemoryDeviceInfo(size=0xFFFF))
        info = smbios.SMBIOS(smbios.Version(3, 0), memory_devices=mods)
        hw = inventory.build_hardware(info, [], [])
        self.assertEqual([m.size for m in hw.memory.modules], [65536, 0x8000 | 4096])
        self.assertEqual(hw.memory.total_size, 65536 + 4)
        self.assertEqual(hw.memory.module_count, 2)

    def test_unpopulated_sockets(self) -> None:
        """Unpopulated sockets are neither listed nor counted."""
        procs = (smbios.ProcessorInfo(status=0x41, core_count=4, thread_count=8),
                 smbios.ProcessorInfo(status=0x00, core_count=4, thread_count=8))
        hw = inventory.build_hardware(smbios.SMBIOS(smbios.Version(3, 0), processors=procs), [], [])
        self.assertEqual((hw.compute.processor_count, hw.compute.total_core_count), (1, 4))
