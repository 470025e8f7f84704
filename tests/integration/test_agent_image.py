"""End to end: a QEMU machine network-boots the agent image and goes through its lifecycle.

The lab (L{tests.integration.pxe_support}): dnsmasq is the site DHCP server, the real sidero
runs whole (DHCP proxy, TFTP, HTTP, gRPC, controllers, embedded store) and serves the image
C{scripts/build-agent-image} built as C{agent-amd64}.  The machine's BMC is OpenIPMI's ipmi_sim,
whose chassis control starts and stops the VM (L{tests.integration.bmc_machine}); the guest
reaches the same BMC as /dev/ipmi0 through QEMU's KCS interface.  The machine boots network
first, as sfyra's VMs do.  For BIOS (SeaBIOS + Debian's iPXE ROM) and UEFI (OVMF's own PXE,
then iPXE over TFTP):

1. power on with ipmitool (the BMC's admin) → DHCP + proxy → iPXE → /boot.ipxe → /ipxe → the
   agent kernel and initramfs → the agent registers the SMBIOS tables QEMU was given, its disks
   and NICs: the Server appears with that inventory, not accepted, the disks untouched;
2. accept it (the management API) → the agent's next boot wipes (insecure: the first and last
   MiB of every disk, checked in the disk images), marks it wiped, creates the C{sidero} BMC user
   through /dev/ipmi0 and reports it → sidero powers the machine off over IPMI with that user;
3. allocate it (a ServerBinding with C{TalosInstalled}: what a Talos install would leave) →
   sidero sets PXE boot and powers it on → /ipxe answers boot-from-disk; then the test changes
   the Server's C{bootFromDiskMethod} and power cycles it with ipmitool, as the C{sidero} user,
   for the next method.  Between them the two machines see ipxe-exit, http-404, ipxe-sanboot.

A failure shows the serial console, the chassis calls, sidero's and dnsmasq's logs.

L{Arm64AgentImageTests} boots the arm64 image once on an emulated arm64 machine.  Measured here
(2 cores, TCG, nothing else running): BIOS 2 min, UEFI 2 min 10 s, arm64 1.5 min.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from sidero.api.registry import SECRET, SERVER, SERVER_BINDING
from sidero.management.client import ManagementClient, resource_path
from tests.integration.bmc_machine import MIB, OLD_DATA, BMCMachine, Disk
from tests.integration.lifecycle_support import SideroProcess
from tests.integration.pxe_support import (
    OVMF_CODE,
    PXELabTestCase,
    agent_images,
    bios_nic,
    qemu_base,
    tail,
    uefi_firmware,
    uefi_nic,
)
from tests.netlab import missing_requirements

MAC = "52:54:00:e2:e0:01"
SECOND_MAC = "52:54:00:e2:e0:02"
DISK_SIZE = 8 * MIB
#: A network boot up to the agent's registration, under TCG (measured ~60-90 s with firmware).
BOOT_TIMEOUT = 300.0
#: What iPXE prints when it acts on each boot-from-disk answer (on the serial console).
IPXE_SAYS = {"ipxe-sanboot": "Booting from SAN device 0x80",
             "http-404": "/ipxe... No such file or directory",
             "ipxe-exit": "/ipxe... ok"}


def smbios(uuid: str, serial: str) -> list[str]:
    return [f"type=1,manufacturer=Sidero E2E,product=Metal VM,version=1.0,serial={serial},"
            f"uuid={uuid},sku=SKU-E2E-1,family=E2E Family",
            "type=4,manufacturer=E2E Silicon,version=E2E CPU 9000",
            "type=17,manufacturer=E2E Memory,part=E2E-RAM-1,serial=RAM-SN-1"]


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return dict(c)
    return None


class AgentImageBootTests(PXELabTestCase):
    NET = 1
    timeout = 1200

    def setUp(self) -> None:
        reason = missing_requirements(["qemu-system-x86_64", "dnsmasq", "curl", "ipmi_sim",
                                       "ipmitool"])
        if reason:
            raise SkipTest(f"LOUD SKIP: {reason}")
        images = agent_images("amd64")
        # Long enough for a whole network boot under TCG, so the controller does not power
        # cycle a machine whose agent is still coming up (heartbeats start with the wipe).
        self.start_lab(images, "sa", "--server-reboot-timeout", "5m")
        self.bmc_ip = self.net.ip(3)
        self.net.run("ip", "-n", self.net.sw, "addr", "add", f"{self.bmc_ip}/24", "dev", "br0")
        self.client = ManagementClient(self.socket, timeout=10)
        self.timings: list[tuple[str, float]] = []
        self.started = time.monotonic()

    # -- helpers ---------------------------------------------------------------------------

    def machine(self, firmware: str, uuid: str) -> BMCMachine:
        directory = os.path.join(self.work, f"machine-{firmware}")
        os.makedirs(directory)
        console = os.path.join(directory, "console.log")
        second_nic = ["-netdev", "user,id=n1,restrict=on",
                      "-device", f"virtio-net-pci,netdev=n1,mac={SECOND_MAC},romfile="]
        base = qemu_base(console, 1024, smbios(uuid, f"E2E-{firmware.upper()}-0001"))
        if firmware == "bios":
            argv = [*base, "-device", "sga", *bios_nic(MAC), *second_nic]
            boot = {"default": ["-boot", "order=nc"]}
            disks = [Disk("vda", DISK_SIZE, ("-drive", "file={file},format=raw,if=virtio")),
                     Disk("sda", DISK_SIZE, ("-drive", "file={file},format=raw,if=ide,index=0"))]
        else:
            argv = [*base, *uefi_firmware(directory), *uefi_nic(MAC, bootindex=1), *second_nic]
            boot = {"default": []}
            disks = [Disk("vda", DISK_SIZE, ("-drive", "file={file},format=raw,if=none,id=d0",
                                              "-device", "virtio-blk-pci,drive=d0,bootindex=2")),
                     Disk("nvme0n1", DISK_SIZE, ("-drive", "file={file},format=raw,if=none,id=d1",
                                                  "-device", "nvme,drive=d1,serial=NVME-E2E-1"))]
        machine = BMCMachine(directory, self.net.sw, self.bmc_ip, "255.255.255.0", argv, boot,
                             disks)
        self.addCleanup(machine.stop)
        self.extra_logs += [("serial console", machine.console, 80),
                            ("chassis control calls", os.path.join(directory, "chassis.log"), 30),
                            ("ipmi_sim", os.path.join(directory, "bmc", "ipmi_sim.log"), 15)]
        return machine

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time a step; a failed assertion in it also shows the console and the logs."""
        begun = time.monotonic()
        try:
            yield
        except self.failureException as e:
            text = str(e)
            if "--- serial console" not in text:
                text += "\n" + self.failure_context()
            raise self.failureException(f"step {name!r} failed: {text}") from None
        self.timings.append((name, time.monotonic() - begun))
        with open(os.path.join(self.work, "timings.txt"), "a") as f:
            f.write(f"{self.id()} {name}: {time.monotonic() - begun:.1f} s\n")

    def server(self, uuid: str) -> dict[str, Any] | None:
        try:
            return self.client.get(SERVER, uuid)
        except Exception:
            return None

    def ipxe_answers(self, uuid: str, since: int) -> list[dict[str, Any]]:
        return [e for e in self.http_requests()[since:]
                if str(e.get("uri", "")).startswith("/ipxe?") and e.get("uuid") == uuid]

    async def ipmitool(self, machine: BMCMachine, user: str, password: str, *args: str) -> str:
        result = await deferToThread(machine.bmc.ipmitool_as, user, password, *args)
        self.assertEqual(result.returncode, 0, f"ipmitool {' '.join(args)} as {user}: "
                         f"{result.stderr}")
        return result.stdout

    # -- the lifecycle ---------------------------------------------------------------------

    async def lifecycle(self, firmware: str, uuid: str, methods: list[str]) -> None:
        machine = self.machine(firmware, uuid)
        await self.wait_for("sidero to be ready", self.sidero_ready, 60)
        await deferToThread(machine.start)
        disks = sorted(machine.disks)

        with self.step("registration"):
            await self.ipmitool(machine, "admin", "secret", "chassis", "power", "on")
            server = await self.wait_for(
                "the agent to register the machine and its addresses",
                lambda: (s := self.server(uuid)) and (s.get("status") or {}).get("addresses")
                and s, BOOT_TIMEOUT, interval=1, thread=True)
            self.assert_inventory(server, uuid, firmware, disks)
            self.assertIs(server["spec"]["accepted"], False)
            for name in disks:
                head, middle, end = machine.disk_regions(name)
                self.assertEqual({*head, *middle, *end}, {OLD_DATA},
                                 f"{name} changed before the server was accepted")
            served = [e["uri"] for e in self.http_requests()]
            for uri in ("/boot.ipxe", "/env/agent-amd64/vmlinuz", "/env/agent-amd64/initramfs.xz"):
                self.assertIn(uri, served)

        with self.step("accept, wipe and BMC set-up"):
            await deferToThread(self.client.patch, SERVER, uuid, {"spec": {"accepted": True}})
            server = await self.wait_for(
                "the agent to wipe the accepted server",
                lambda: (s := self.server(uuid)) and (s.get("status") or {}).get("isClean") and s,
                BOOT_TIMEOUT, interval=1, thread=True)
            for name in disks:
                head, middle, end = machine.disk_regions(name)
                self.assertEqual(head, bytes(MIB), f"{name}: first MiB not zeroed")
                self.assertEqual(end, bytes(MIB), f"{name}: last MiB not zeroed")
                self.assertEqual(set(middle), {OLD_DATA}, f"{name}: insecure wipe went further")
            self.assertEqual(condition(server, "PowerCycle")["status"], "True")  # type: ignore[index]
            user, password = await self.wait_for(
                "the agent to report the BMC user it created",
                lambda: self.bmc_credentials(uuid), 60, interval=1, thread=True)
            self.assertEqual(user, "sidero")
            bmc = (self.server(uuid) or {})["spec"]["bmc"]
            self.assertEqual((bmc["endpoint"], bmc["port"]), (self.bmc_ip, 623))
            console = machine.console_text()
            self.assertIn("[sidero] BMC user sidero in slot", console)
            self.assertIn("ipmi device interface", console)

        with self.step("powered off over IPMI"):
            await self.wait_for("sidero to power the clean server off",
                                lambda: not machine.powered(), 120, interval=0.5)
            self.assertIn("chassis 0x20 set power 0", machine.chassis_log())
            # the user the agent made is a real BMC administrator
            status = await self.ipmitool(machine, user, password, "chassis", "power", "status")
            self.assertIn("off", status)

        for method in methods:
            await self.boot_from_disk(machine, uuid, method, user, password)
        await self.ipmitool(machine, user, password, "chassis", "power", "off")

    def bmc_credentials(self, uuid: str) -> tuple[str, str] | None:
        try:
            secret = self.client.get(SECRET, f"{uuid}-bmc", "default")
        except Exception:
            return None
        data = secret.get("data") or {}
        if not data.get("user") or not data.get("pass"):
            return None
        return base64.b64decode(data["user"]).decode(), base64.b64decode(data["pass"]).decode()

    def assert_inventory(self, server: dict[str, Any], uuid: str, firmware: str,
                         disks: list[str]) -> None:
        hw = server["spec"]["hardware"]
        self.assertEqual(hw["system"], {
            "uuid": uuid, "manufacturer": "Sidero E2E", "productName": "Metal VM",
            "serialNumber": f"E2E-{firmware.upper()}-0001", "skuNumber": "SKU-E2E-1",
            "family": "E2E Family"})
        self.assertEqual([(p["manufacturer"], p["productName"])
                          for p in hw["compute"]["processors"]],
                         [("E2E Silicon", "E2E CPU 9000")])
        self.assertEqual([(m["manufacturer"], m["productName"], m["serialNumber"], m["size"])
                          for m in hw["memory"]["modules"]],
                         [("E2E Memory", "E2E-RAM-1", "RAM-SN-1", 1024)])
        devices = {d["deviceName"]: d for d in hw["storage"]["devices"]}
        self.assertEqual(sorted(devices), [f"/dev/{d}" for d in disks])
        for d in disks:
            self.assertEqual(devices[f"/dev/{d}"]["size"], DISK_SIZE)
        if "nvme0n1" in disks:
            self.assertEqual(devices["/dev/nvme0n1"]["type"], "NVMe")
            self.assertEqual(devices["/dev/nvme0n1"]["serialNumber"], "NVME-E2E-1")
        nics = {i["mac"]: i for i in hw["network"]["interfaces"]}
        self.assertEqual(sorted(nics), [MAC, SECOND_MAC])
        self.assertIn("up", nics[MAC]["flags"].split("|"))
        self.assertRegex(" ".join(nics[MAC]["addresses"]), rf"10\.213\.{self.NET}\.1\d\d/24")
        reported = {(a["type"], a["address"].rsplit(".", 1)[0])
                    for a in (server.get("status") or {}).get("addresses") or []}
        self.assertIn(("InternalIP", f"10.213.{self.NET}"), reported)

    async def boot_from_disk(self, machine: BMCMachine, uuid: str, method: str, user: str,
                             password: str) -> None:
        with self.step(f"boot from disk: {method}"):
            since = len(self.http_requests())
            await deferToThread(self.client.patch, SERVER, uuid,
                                {"spec": {"bootFromDiskMethod": method}})
            if not any(True for _ in self.bindings(uuid)):
                await deferToThread(self.allocate, uuid)
                # sidero's controller notices the allocation: PXE once, power on
                await self.wait_for(
                    "sidero to mark the server PXEBooted and power it on",
                    lambda: (s := self.server(uuid)) and condition(s, "PXEBooted")
                    and machine.powered(), 120, interval=0.5, thread=True)
                self.assertIn("chassis 0x20 set boot pxe", machine.chassis_log())
            else:
                await self.ipmitool(machine, user, password, "chassis", "bootdev", "pxe")
                await self.ipmitool(machine, user, password, "chassis", "power", "cycle")
            expected = (404 if method == "http-404" else 200, f"boot from disk ({method})")
            answers = await self.wait_for(
                f"the machine to ask /ipxe and be told {method}",
                lambda: self.ipxe_answers(uuid, since), BOOT_TIMEOUT, interval=1)
            self.assertEqual((answers[0]["status"], answers[0]["decision"]), expected)
            await self.wait_for(f"iPXE to act on {method}",
                                lambda: IPXE_SAYS[method] in machine.console_of_last_boot(), 60)
            later = [e["uri"] for e in self.http_requests()[since:]]
            self.assertNotIn("/env/agent-amd64/vmlinuz", later)
            self.assertNotIn("Linux version", machine.console_of_last_boot())

    def bindings(self, uuid: str) -> list[dict[str, Any]]:
        return [b for b in self.client.list(SERVER_BINDING).get("items") or []
                if b["metadata"]["name"] == uuid]

    def allocate(self, uuid: str) -> None:
        """What a MetalMachine allocation and a Talos install leave: a ServerBinding with
        C{TalosInstalled=True} (Talos's events set it in a cluster)."""
        self.client.create(SERVER_BINDING, {
            "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha3", "kind": "ServerBinding",
            "metadata": {"name": uuid},
            "spec": {"metalMachineRef": {"kind": "MetalMachine", "name": "e2e",
                                         "namespace": "default"}}})
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.client.request(
            "PATCH", resource_path(SERVER_BINDING, name=uuid, subresource="status"),
            {"status": {"conditions": [{"type": "TalosInstalled", "status": "True",
                                        "lastTransitionTime": now}]}},
            "application/merge-patch+json")

    # -- the tests -------------------------------------------------------------------------

    async def test_bios(self) -> None:
        """SeaBIOS + iPXE ROM: register, accept, wipe, BMC user, off; ipxe-sanboot, http-404."""
        await self.lifecycle("bios", "e2e00000-0000-4000-8000-00000000b105",
                             ["ipxe-sanboot", "http-404"])

    async def test_uefi(self) -> None:
        """OVMF's PXE + iPXE: register, accept, wipe, BMC user, off; ipxe-exit."""
        if not os.path.exists(OVMF_CODE):
            raise SkipTest(f"LOUD SKIP: no {OVMF_CODE} (apt-get install ovmf)")
        await self.lifecycle("uefi", "e2e00000-0000-4000-8000-0000000efe01", ["ipxe-exit"])


AAVMF = "/usr/share/qemu-efi-aarch64/QEMU_EFI.fd"
ARM64_UUID = "e2e00000-0000-4000-8000-0000000a4064"
ARM64_MAC = "52:54:00:e2:a6:40"


class Arm64AgentImageTests(TestCase):
    """The arm64 image on an emulated arm64 machine: one boot with what sidero's /ipxe tells an
    arm64 client (UEFI firmware for the SMBIOS tables, QEMU's user network reaching sidero on
    loopback), auto-accepted, so it registers and wipes at once."""

    timeout = 600

    def setUp(self) -> None:
        missing = [t for t in ("qemu-system-aarch64",) if shutil.which(t) is None]
        if missing or not os.path.exists(AAVMF):
            raise SkipTest("LOUD SKIP: the arm64 boot needs qemu-system-aarch64 and "
                           f"{AAVMF} (apt-get install qemu-system-arm qemu-efi-aarch64)")
        self.images = agent_images("arm64")

    async def test_register_and_wipe(self) -> None:
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        sidero = SideroProcess(work, "--api-endpoint", "10.0.2.2", "--auto-accept-servers",
                               "--extra-agent-kernel-args", "console=ttyAMA0")
        agent_env = os.path.join(sidero.state, "env", "agent-arm64")
        os.makedirs(agent_env)
        for name in ("vmlinuz", "initramfs.xz"):
            shutil.copy(os.path.join(self.images, name), os.path.join(agent_env, name))
        self.addCleanup(sidero.stop)
        sidero.start()
        deadline = time.monotonic() + 60
        while not await deferToThread(sidero.ready):
            self.assertLess(time.monotonic(), deadline, "sidero did not start:\n"
                            + tail(sidero.log_path))
            await deferLater(reactor, 0.25, lambda: None)
        base = f"http://127.0.0.1:{sidero.port}"
        script = await deferToThread(fetch, f"{base}/ipxe?uuid={ARM64_UUID}&mac="
                                     f"{ARM64_MAC.replace(':', '-')}&arch=arm64")
        kernel = re.search(r"^kernel /env/agent-arm64/vmlinuz (.*)$", script, re.M)
        self.assertIsNotNone(kernel, script)
        args = kernel[1].split() if kernel else []
        self.assertIn(f"sidero.endpoint=10.0.2.2:{sidero.port}", args)
        self.assertIn("console=ttyAMA0", args)
        disk = os.path.join(work, "vda.img")
        with open(disk, "wb") as f:
            f.write(bytes([OLD_DATA]) * DISK_SIZE)
        console = os.path.join(work, "console.log")
        begun = time.monotonic()
        qemu = await deferToThread(subprocess.run, [
            "timeout", "420", "qemu-system-aarch64", "-M", "virt", "-cpu", "max", "-m", "1024",
            "-nographic", "-nodefaults", "-no-reboot", "-bios", AAVMF,
            "-chardev", f"file,id=console,path={console}", "-serial", "chardev:console",
            "-kernel", os.path.join(agent_env, "vmlinuz"),
            "-initrd", os.path.join(agent_env, "initramfs.xz"), "-append", " ".join(args),
            "-netdev", "user,id=n0", "-device", f"virtio-net-pci,netdev=n0,mac={ARM64_MAC},romfile=",
            "-smbios", f"type=1,manufacturer=Sidero E2E,product=Arm VM,serial=E2E-ARM-1,"
                       f"uuid={ARM64_UUID}",
            "-drive", f"file={disk},format=raw,if=virtio",
        ], capture_output=True, text=True, stdin=subprocess.DEVNULL)
        output = tail(console, 60)
        with open(os.path.join(work, "timings.txt"), "w") as f:
            f.write(f"arm64 boot to reboot: {time.monotonic() - begun:.1f} s\n")
        self.assertEqual(qemu.returncode, 0, f"QEMU: {qemu.stderr}\n--- console:\n{output}")
        self.assertIn("[sidero] disks wiped: {'vda': 'insecure'}", output)
        server = sidero.get(SERVER, ARM64_UUID)
        self.assertEqual(server["spec"]["hardware"]["system"]["productName"], "Arm VM")
        self.assertEqual([d["deviceName"] for d in server["spec"]["hardware"]["storage"]["devices"]],
                         ["/dev/vda"])
        self.assertIs(server["status"]["isClean"], True, output)
        with open(disk, "rb") as f:
            data = f.read()
        self.assertEqual(data[:MIB], bytes(MIB))
        self.assertEqual(data[-MIB:], bytes(MIB))


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
        return body.decode()
