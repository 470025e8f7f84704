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
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase

from tests.netlab import NetLab, missing_requirements
from tests.paths import RUN_SIDERO, tree_env

UUID = "11111111-2222-3333-4444-555555555555"
NET = 0  # 10.213.0.0/24: the site DHCP server is .1, sidero .2
VM_TIMEOUT = 150.0


def e2e_images() -> str:
    """Directory with vmlinuz and initramfs.xz (scripts/build-e2e-images), or SkipTest."""
    path = os.environ.get("SIDERO_E2E_IMAGES") or os.path.join(
        os.environ.get("SIDERO_CACHE_DIR", "/var/cache/sidero-test"), "e2e-images")
    if not (os.path.isfile(os.path.join(path, "vmlinuz"))
            and os.path.isfile(os.path.join(path, "initramfs.xz"))):
        raise SkipTest(f"LOUD SKIP: no e2e kernel/initramfs in {path}; run scripts/build-e2e-images")
    return path


def sidero_command(*args: str) -> list[str]:
    """Run the service tree from this source tree (see tests/integration/run_sidero.py)."""
    return [sys.executable, str(RUN_SIDERO), *args]


class PXEBootTests(TestCase):
    timeout = 400

    def setUp(self) -> None:
        reason = missing_requirements(["qemu-system-x86_64", "dnsmasq", "curl"])
        if reason:
            raise SkipTest(f"LOUD SKIP: {reason}")
        images = e2e_images()
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        self.state = os.path.join(self.work, "state")
        agent = os.path.join(self.state, "env", "agent-amd64")
        os.makedirs(agent)
        for name in ("vmlinuz", "initramfs.xz"):
            shutil.copy(os.path.join(images, name), os.path.join(agent, name))
        self.net = NetLab(f"sd{os.getpid() % 100000}", NET, self.work)
        self.addCleanup(self.net.teardown)
        self.net.setup_switch(tap=True)
        site = self.net.add_host("dhcp", 1)
        self.boot = self.net.add_host("boot", 2)
        self.boot_ip = self.net.ip(2)
        self.dnsmasq_log = os.path.join(self.work, "dnsmasq.log")
        self.net.site_dnsmasq(site, ipv6_ra=True, log=self.dnsmasq_log)
        self.sidero_log = os.path.join(self.work, "sidero.log")
        # trial's temp paths can exceed the 107-byte limit of a unix socket path.
        socket_dir = tempfile.mkdtemp(prefix="sd-")
        self.addCleanup(shutil.rmtree, socket_dir, True)
        self.sidero_proc = self.net.spawn(self.boot, sidero_command(
            "--api-endpoint", self.boot_ip, "--api-port", "8081", "--state-dir", self.state,
            "--talos-assets-url", "http://127.0.0.1:1",
            "--dhcp-interface", "eth0", "--log-format", "json", "--no-enable-leader-election",
            "--management-socket", os.path.join(socket_dir, "m.sock"),
        ), self.sidero_log, env=tree_env())

    async def wait_for(self, what: str, predicate: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            await deferLater(reactor, 0.25, lambda: None)
        self.fail(f"timed out after {timeout:g}s waiting for {what}; sidero exit status "
                  f"{self.sidero_proc.poll()}\n--- sidero log tail:\n" + self.tail(self.sidero_log)
                  + "\n--- dnsmasq log tail:\n" + self.tail(self.dnsmasq_log, 10))

    def tail(self, path: str, lines: int = 40) -> str:
        try:
            with open(path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(missing)"

    def sidero_ready(self) -> bool:
        probe = subprocess.run(
            ["ip", "netns", "exec", self.boot, "curl", "-sf", "-m", "1",
             f"http://{self.boot_ip}:8081/readyz"], capture_output=True)
        return probe.returncode == 0

    def read_events(self) -> list[dict[str, Any]]:
        """sidero's JSON log lines (--log-format json)."""
        out = []
        with open(self.sidero_log, errors="replace") as f:
            for line in f:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    out.append(event)
        return out

    def http_requests(self) -> list[dict[str, Any]]:
        return [e for e in self.read_events()
                if str(e.get("msg", "")).startswith("HTTP ") and "uri" in e]

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
            return "SIDERO-E2E-BOOTED" in self.tail(console, 10_000) or proc.poll() is not None

        await self.wait_for("the VM to boot the served kernel", booted, VM_TIMEOUT + 10)
        return self.tail(console, 10_000)

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
            os.path.join(self.work, "console.log"), "-m", "512",
            "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
            "-device", "e1000,netdev=n0,mac=52:54:00:12:34:56", "-boot", "n",
        )
        self.assert_chain(console, "i386")

    async def test_uefi_edk2_pxe(self) -> None:
        """OVMF's EDK2 PXE client loads ipxe.efi over TFTP, which boots the agent over HTTP."""
        vars_copy = os.path.join(self.work, "OVMF_VARS.fd")
        shutil.copy("/usr/share/OVMF/OVMF_VARS_4M.fd", vars_copy)
        console = await self.boot_vm(
            os.path.join(self.work, "console.log"), "-m", "512", "-machine", "q35",
            "-drive", "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
            "-drive", f"if=pflash,format=raw,file={vars_copy}",
            "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
            "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,romfile=,bootindex=1",
        )
        self.assert_chain(console, "x86_64")
        tftp = [e for e in self.read_events() if "tftp" in str(e.get("logger", ""))
                and "snponly.efi" in json.dumps(e)]
        self.assertTrue(tftp, "no TFTP transfer of the iPXE EFI binary was logged")
