"""A QEMU machine with a BMC: OpenIPMI's ipmi_sim powers it, the guest sees it as /dev/ipmi0.

ipmi_sim runs in the lab's switch namespace, with its LAN interface on an address of the bridge
(sidero's power manager and ipmitool reach it there, port 623) and its chassis control and LAN
configuration programs being L{tests.integration.qemu_chassis}: "power on" starts the QEMU of
the machine, "power off" stops it.  QEMU's C{ipmi-bmc-extern} device connects the guest's KCS
interface to the same ipmi_sim over its VM serial port, so what the agent sets up through
/dev/ipmi0 (the C{sidero} user) is what sidero then logs in with.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from tests.integration import qemu_chassis
from tests.power.test_ipmi_sim import SimulatedBMC

MIB = 1 << 20
#: What every disk holds before the machine is wiped.
OLD_DATA = 0xA5
CHASSIS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qemu_chassis.py")


@dataclass(frozen=True)
class Disk:
    """A raw disk image and how QEMU attaches it (C{{file}} is filled in)."""

    name: str
    size: int
    qemu: tuple[str, ...]


class BMCMachine:
    """One VM: its disks, its console, ipmi_sim as its BMC (see the module docstring)."""

    VM_PORT = 9002

    def __init__(self, directory: str, netns: str, bmc_ip: str, netmask: str,
                 argv: Sequence[str], boot: dict[str, list[str]], disks: Sequence[Disk],
                 user: str = "admin", password: str = "secret") -> None:
        self.dir = os.path.abspath(directory)
        os.makedirs(self.dir, exist_ok=True)
        self.console = os.path.join(self.dir, "console.log")
        self.disks = {d.name: os.path.join(self.dir, f"{d.name}.img") for d in disks}
        self.disk_sizes = {d.name: d.size for d in disks}
        drives = [a.format(file=self.disks[d.name]) for d in disks for a in d.qemu]
        ipmi = ["-chardev", f"socket,id=bmc,host=127.0.0.1,port={self.VM_PORT},reconnect=1",
                "-device", "ipmi-bmc-extern,id=bmc0,chardev=bmc",
                "-device", "isa-ipmi-kcs,bmc=bmc0"]
        self.config = {"argv": [*argv, *drives, *ipmi], "boot": boot, "console": self.console,
                       "lan": {"ip_addr": bmc_ip, "ip_addr_src": "static",
                               "subnet_mask": netmask, "mac_addr": "52:54:00:b3:c0:01",
                               "default_gw_ip_addr": "0.0.0.0",
                               "default_gw_mac_addr": "00:00:00:00:00:00",
                               "backup_gw_ip_addr": "0.0.0.0",
                               "backup_gw_mac_addr": "00:00:00:00:00:00"}}
        self.bmc = SimulatedBMC(
            os.path.join(self.dir, "bmc"), user, password, host=bmc_ip, port=623,
            chassis_control=self._program("chassis"),
            lan_extra=[f'lan_config_program "{self._program("lan")}"'],
            mc_extra=[f"serial 15 127.0.0.1 {self.VM_PORT} codec VM"], netns=netns)

    def _program(self, kind: str) -> str:
        """A shell wrapper ipmi_sim can run (it appends its arguments)."""
        path = os.path.join(self.dir, f"{kind}.sh")
        with open(path, "w") as f:
            f.write(f"#!/bin/sh\nexec {sys.executable} {CHASSIS} {kind} {self.dir} \"$@\"\n")
        os.chmod(path, 0o755)
        return path

    def start(self) -> None:
        """Blocking: write the disks full of old data and the config, start ipmi_sim."""
        for name, path in self.disks.items():
            with open(path, "wb") as f:
                f.write(bytes([OLD_DATA]) * self.disk_sizes[name])
        with open(os.path.join(self.dir, "machine.json"), "w") as f:
            json.dump(self.config, f, indent=1)
        open(self.console, "a").close()
        self.bmc.start()

    def stop(self) -> None:
        """Power off (if on) and stop ipmi_sim; idempotent."""
        try:
            qemu_chassis.power_off(self.dir)
        except (OSError, ValueError):
            pass
        self.bmc.stop()

    def powered(self) -> bool:
        return qemu_chassis.qemu_pid(self.dir) is not None

    def chassis_log(self) -> list[str]:
        """The chassis control calls, without their timestamps."""
        try:
            with open(os.path.join(self.dir, "chassis.log")) as f:
                return [line.split(" ", 1)[1].strip() for line in f if " chassis " in f" {line}"]
        except OSError:
            return []

    def console_text(self) -> str:
        with open(self.console, errors="replace") as f:
            return f.read()

    def console_of_last_boot(self) -> str:
        """The console since the last power on (the chassis control marks each one)."""
        text = self.console_text()
        return text[text.rfind("=== power on #"):]

    def disk_regions(self, name: str) -> tuple[bytes, bytes, bytes]:
        """The first MiB, the middle and the last MiB of a disk image."""
        with open(self.disks[name], "rb") as f:
            data = f.read()
        return data[:MIB], data[MIB:-MIB], data[-MIB:]
