"""End to end: real PXE firmware boots a kernel that sidero serves.

In namespaces the test builds, dnsmasq is the site DHCP server (addresses only); sidero runs
as a whole process (DHCP proxy, TFTP, HTTP, embedded store). A QEMU VM boots from the network:

* BIOS: SeaBIOS with Debian's iPXE ROM (e1000) → DHCP (address from dnsmasq, boot options
  from our proxy) → /boot.ipxe → /ipxe → agent kernel + initrd over HTTP.
* UEFI: OVMF's own EDK2 PXE client (virtio-net, no option ROM) → DHCP + proxy → TFTP
  ipxe.efi → iPXE → the same HTTP chain.

The kernel is Debian's, the initramfs prints a marker and the kernel command line on the
serial console and powers off: seeing the marker proves every step ran.
"""

from __future__ import annotations

import json
import os

from twisted.trial.unittest import SkipTest

from tests.integration.pxe_support import (
    OVMF_CODE,
    PXELabTestCase,
    bios_nic,
    e2e_images,
    qemu_base,
    tail,
    uefi_firmware,
    uefi_nic,
)
from tests.netlab import missing_requirements

UUID = "11111111-2222-3333-4444-555555555555"
VM_TIMEOUT = 150.0


class PXEBootTests(PXELabTestCase):
    timeout = 400

    def setUp(self) -> None:
        reason = missing_requirements(["qemu-system-x86_64", "dnsmasq", "curl"])
        if reason:
            raise SkipTest(f"LOUD SKIP: {reason}")
        self.start_lab(e2e_images(), "sd")

    async def boot_vm(self, console: str, *qemu_args: str) -> str:
        await self.wait_for("sidero to be ready", self.sidero_ready, 60)
        self.extra_logs.append(("serial console", console, 60))
        proc = self.net.spawn(self.net.sw, [
            "timeout", str(int(VM_TIMEOUT)),
            *qemu_base(console, 512, [f"type=1,serial=E2E-SN-001,manufacturer=E2E,uuid={UUID}"]),
            "-no-reboot", *qemu_args,
        ], os.path.join(self.work, "qemu.out"))

        def booted() -> bool:
            return "SIDERO-E2E-BOOTED" in tail(console, 10_000) or proc.poll() is not None

        await self.wait_for("the VM to boot the served kernel", booted, VM_TIMEOUT + 10)
        return tail(console, 10_000)

    def assert_chain(self, console: str, arch: str) -> None:
        self.assertIn("SIDERO-E2E-BOOTED", console, "the served kernel did not boot:\n" + console[-3000:])
        self.assertIn(f"sidero.mac=52:54:00:12:34:56 sidero.endpoint={self.boot_ip}:8081", console)
        uris = [e.get("uri", "") for e in self.http_requests()]
        self.assertIn("/boot.ipxe", uris)
        ipxe = [u for u in uris if u.startswith("/ipxe?")]
        self.assertTrue(ipxe, f"no /ipxe request in {uris}")
        self.assertIn(f"uuid={UUID}", ipxe[0])
        self.assertIn("mac=52-54-00-12-34-56", ipxe[0])
        self.assertIn(f"arch={arch}", ipxe[0])
        self.assertIn("/env/agent-amd64/vmlinuz", uris)
        self.assertIn("/env/agent-amd64/initramfs.xz", uris)
        with open(self.dnsmasq_log, errors="replace") as f:
            dnsmasq = f.read()
        self.assertRegex(dnsmasq, r"DHCPACK\(eth0\) 10\.213\.0\.1\d\d 52:54:00:12:34:56",
                         "the site DHCP server did not lease the address")

    async def test_bios_ipxe_rom(self) -> None:
        """SeaBIOS + Debian's iPXE ROM boots the agent kernel served over HTTP."""
        console = await self.boot_vm(
            os.path.join(self.work, "console.log"), *bios_nic("52:54:00:12:34:56"), "-boot", "n")
        self.assert_chain(console, "i386")

    async def test_uefi_edk2_pxe(self) -> None:
        """OVMF's EDK2 PXE client loads ipxe.efi over TFTP, which boots the agent over HTTP."""
        if not os.path.exists(OVMF_CODE):
            raise SkipTest(f"LOUD SKIP: no {OVMF_CODE} (apt-get install ovmf)")
        console = await self.boot_vm(
            os.path.join(self.work, "console.log"), *uefi_firmware(self.work),
            *uefi_nic("52:54:00:12:34:56"))
        self.assert_chain(console, "x86_64")
        tftp = [e for e in self.read_events() if "tftp" in str(e.get("logger", ""))
                and "snponly.efi" in json.dumps(e)]
        self.assertTrue(tftp, "no TFTP transfer of the iPXE EFI binary was logged")
