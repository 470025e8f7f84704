"""ipmi_sim's chassis control and LAN configuration programs for a QEMU machine (stdlib only).

OpenIPMI's ipmi_sim runs an external program for every chassis request it gets, over LAN from
sidero's power manager or ipmitool, or from the guest's own /dev/ipmi0:

    qemu_chassis.py chassis DIR 0x20 get power boot      → "power:1", "boot:pxe" lines
    qemu_chassis.py chassis DIR 0x20 set power 1 boot pxe
    qemu_chassis.py lan DIR get ip_addr subnet_mask ...  → "ip_addr:10.213.1.3" lines

"power 1" starts the machine's QEMU (C{DIR/machine.json}: its argv, and extra arguments for a
network boot and for the default boot), "power 0" stops it, "reset 1" does both; the boot
device asked for is used by the next start and then forgotten (a one-time boot, as sidero
asks for).  Every call is appended to C{DIR/chassis.log}, every start is marked in the serial
console file, so a test reads what the "hardware" was told and did.  QEMU stays in ipmi_sim's
process group, so stopping ipmi_sim's group stops it too.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

STOP_TIMEOUT = 10.0


def _path(directory: str, name: str) -> str:
    return os.path.join(directory, name)


def _read(directory: str, name: str) -> str:
    try:
        with open(_path(directory, name)) as f:
            return f.read().strip()
    except OSError:
        return ""


def _write(directory: str, name: str, text: str) -> None:
    with open(_path(directory, name), "w") as f:
        f.write(text + "\n")


def config(directory: str) -> dict[str, Any]:
    with open(_path(directory, "machine.json")) as f:
        loaded: dict[str, Any] = json.load(f)
    return loaded


def qemu_pid(directory: str) -> int | None:
    """The running QEMU's pid: alive (not a zombie) and started for this machine."""
    text = _read(directory, "qemu.pid")
    if not text:
        return None
    pid = int(text)
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return None
    if state in ("Z", "X") or config(directory)["console"].encode() not in cmdline:
        return None
    return pid


def power_on(directory: str) -> None:
    if qemu_pid(directory) is not None:
        return
    machine = config(directory)
    boot = _read(directory, "boot") or "default"
    extra = machine["boot"].get(boot, machine["boot"]["default"])
    _write(directory, "boot", "default")  # a one-time boot device
    starts = int(_read(directory, "starts") or "0") + 1
    _write(directory, "starts", str(starts))
    with open(machine["console"], "a") as console:
        console.write(f"\n=== power on #{starts} (boot device: {boot}) ===\n")
    with open(_path(directory, "qemu.log"), "ab") as out:
        proc = subprocess.Popen([*machine["argv"], *extra], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, close_fds=True,
                                cwd=directory)
    _write(directory, "qemu.pid", str(proc.pid))


def power_off(directory: str) -> None:
    pid = qemu_pid(directory)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while qemu_pid(directory) is not None:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline += STOP_TIMEOUT
        time.sleep(0.05)
    with open(config(directory)["console"], "a") as console:
        console.write("\n=== power off ===\n")


def chassis(directory: str, args: list[str]) -> int:
    _mc, op, *words = args
    if op == "get":
        for word in words:
            if word == "power":
                print(f"power:{0 if qemu_pid(directory) is None else 1}")
            elif word == "boot":
                print(f"boot:{_read(directory, 'boot') or 'default'}")
        return 0
    for key, value in zip(words[::2], words[1::2], strict=False):
        if key == "power":
            (power_on if value == "1" else power_off)(directory)
        elif key == "reset":
            power_off(directory)
            power_on(directory)
        elif key == "shutdown":
            power_off(directory)
        elif key == "boot":
            _write(directory, "boot", value)
    return 0


def lan(directory: str, args: list[str]) -> int:
    op, *names = args
    if op == "get":
        values = config(directory)["lan"]
        for name in names:
            if name in values:
                print(f"{name}:{values[name]}")
    return 0


def main(argv: list[str]) -> int:
    program, directory, *args = argv
    with open(_path(directory, "chassis.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(_path(directory, "chassis.log"), "a") as log:
            log.write(f"{time.time():.3f} {program} {' '.join(args)}\n")
        return chassis(directory, args) if program == "chassis" else lan(directory, args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
