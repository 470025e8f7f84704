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
import subprocess

from twisted.trial.unittest import SkipTest

from tests.integration.pxe_support import (
    PXELabTestCase,
    bios_nic,
    e2e_images,
    tail,
    uefi_firmware,
    uefi_nic,
)
from tests.netlab import missing_requirements

UUID = "11111111-2222-3333-4444-555555555555"
MAC = "52:54:00:12:34:56"
VM_TIMEOUT = 150.0


class PXEBootTests(PXELabTestCase):
    timeout = 400
    NET = 0  # 10.213.0.0/24: the site DHCP server is .1, sidero .2
    #: More dnsmasq lines for the site DHCP server, and more sidero arguments.
    site_options: tuple[str, ...] = ()
    sidero_args: tuple[str, ...] = ()

    def setUp(self) -> None:
        reason = missing_requirements(["qemu-system-x86_64", "dnsmasq", "curl"])
        if reason:
            raise SkipTest(f"LOUD SKIP: {reason}")
        # wireguard-go's sockets are shared by every namespace: no tunnel named "siderolink".
        self.start_lab(e2e_images(), "sd", *self.sidero_args, "--disable-siderolink", "--disable-syslog",
                       site_options=self.site_options)

    async def boot_vm(self, console: str, *qemu_args: str) -> str:
        await self.wait_for("sidero to be ready", self.sidero_ready, 60)
        proc = self.net.spawn(self.net.sw, [
            "timeout", str(int(VM_TIMEOUT)), "qemu-system-x86_64", "-accel", "tcg",
            "-nographic", "-vga", "none", "-nodefaults", "-no-reboot",
            "-serial", f"file:{console}",
            "-smbios", f"type=1,serial=E2E-SN-001,manufacturer=E2E,uuid={UUID}",
            *qemu_args,
        ], os.path.join(self.work, "qemu.out"))

        def booted() -> bool:
            return "SIDERO-E2E-BOOTED" in tail(console, 10_000) or proc.poll() is not None

        await self.wait_for("the VM to boot the served kernel", booted, VM_TIMEOUT + 10)
        return tail(console, 10_000)

    def assert_chain(self, console: str, arch: str, boot_ipxe: bool = True) -> None:
        self.assertIn("SIDERO-E2E-BOOTED", console, "the served kernel did not boot:\n" + console[-3000:])
        self.assertIn(f"sidero.mac=52:54:00:12:34:56 sidero.endpoint={self.boot_ip}:8081", console)
        uris = [e.get("uri", "") for e in self.http_requests()]
        if boot_ipxe:
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

    async def boot_bios(self) -> str:
        return await self.boot_vm(os.path.join(self.work, "console.log"), "-m", "512",
                                  *bios_nic(MAC), "-boot", "n")

    async def boot_uefi(self) -> str:
        return await self.boot_vm(os.path.join(self.work, "console.log"), "-m", "512",
                                  *uefi_firmware(self.work), *uefi_nic(MAC))

    async def test_bios_ipxe_rom(self) -> None:
        """SeaBIOS + Debian's iPXE ROM boots the agent kernel served over HTTP."""
        self.assert_chain(await self.boot_bios(), "i386")

    async def test_uefi_edk2_pxe(self) -> None:
        """OVMF's EDK2 PXE client loads snp.efi over TFTP, which boots the agent over HTTP."""
        self.assert_chain(await self.boot_uefi(), "x86_64")
        tftp = [e for e in self.read_events() if "tftp" in str(e.get("logger", ""))
                and "snp.efi" in json.dumps(e)]
        self.assertTrue(tftp, "no TFTP transfer of the iPXE EFI binary was logged")

    def tftp_sent(self, name: str) -> list[int]:
        """Sizes of the completed TFTP transfers of C{name}, in order."""
        return [int(e["size"]) for e in self.read_events()
                if str(e.get("msg", "")).startswith("TFTP sent") and e.get("filename") == name]


class SiteDHCPNamesBinaryTests(PXEBootTests):
    """The site's own DHCP server names the iPXE binary (no user-class rule, our proxy off).

    A firmware PXE client gets the binary; the iPXE it starts asks the site again, is handed
    the same name, and gets the chain script from our TFTP instead of itself, so it reaches
    C{/ipxe?uuid=} rather than loading itself forever (spec 3.3, 3.4).
    """

    site_options = (
        "dhcp-match=set:efi64,option:client-arch,7",
        "dhcp-boot=tag:!efi64,undionly.kpxe,sidero,{sidero}",
        "dhcp-boot=tag:efi64,snp.efi,sidero,{sidero}",
    )
    sidero_args = ("--disable-dhcp-proxy",)

    async def test_bios_ipxe_rom(self) -> None:
        """SeaBIOS's iPXE ROM is handed undionly.kpxe by the site and runs the chain script."""
        self.assert_chain(await self.boot_bios(), "i386", boot_ipxe=False)
        self.assertEqual(self.tftp_sent("undionly.kpxe"), [self.http_script_size()],
                         "the iPXE ROM was not sent the chain script (once) for undionly.kpxe")

    async def test_uefi_edk2_pxe(self) -> None:
        """OVMF's PXE client gets snp.efi (the binary); the iPXE in it gets the script."""
        self.assert_chain(await self.boot_uefi(), "x86_64", boot_ipxe=False)
        binary = os.path.getsize("/usr/lib/ipxe/snponly.efi")
        self.assertEqual(self.tftp_sent("snp.efi"), [binary, self.http_script_size()],
                         "snp.efi: the firmware should get the binary, then iPXE the script")

    def http_script_size(self) -> int:
        probe = subprocess.run(
            ["ip", "netns", "exec", self.boot, "curl", "-sf", "-m", "5",
             f"http://{self.boot_ip}:8081/boot.ipxe"], capture_output=True, check=True)
        return len(probe.stdout)
