"""Record a QEMU VM's SMBIOS tables as a sysfs tree (how tests/agent/data/*/ were made).

Usage: python record_dmi.py KERNEL OUTDIR [qemu args...]

Boots KERNEL (any x86-64 Linux with CONFIG_DMI_SYSFS, e.g. Debian's cloud kernel) with a tiny
busybox initramfs that prints /sys/firmware/dmi/tables/* (base64) and /sys/class/dmi/id/* on the
serial console, then writes them under OUTDIR/firmware/dmi/tables and OUTDIR/class/dmi/id.
Needs qemu-system-x86_64, cpio and a static busybox (BUSYBOX, default /bin/busybox-static or
the busybox-static package's binary).
"""

import base64
import os
import shutil
import subprocess
import sys
import tempfile

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "DMI-EP-BEGIN"; base64 /sys/firmware/dmi/tables/smbios_entry_point; echo "DMI-EP-END"
echo "DMI-T-BEGIN"; base64 /sys/firmware/dmi/tables/DMI; echo "DMI-T-END"
echo "DMIID-BEGIN"
for f in /sys/class/dmi/id/*; do [ -f "$f" ] && echo "$(basename $f)=$(cat $f 2>/dev/null)"; done
echo "DMIID-END"
poweroff -f
"""


def between(text: str, begin: str, end: str) -> list[str]:
    lines = text.splitlines()  # firmware escape sequences may precede a marker on its line
    start = next(i for i, line in enumerate(lines) if line.endswith(begin)) + 1
    stop = next(i for i, line in enumerate(lines) if i >= start and line.endswith(end))
    return lines[start:stop]


def main() -> None:
    kernel, out, *qemu = sys.argv[1:]
    busybox = os.environ.get("BUSYBOX", "/bin/busybox-static")
    work = tempfile.mkdtemp(prefix="dmi-rec-")
    try:
        root = os.path.join(work, "root")
        for d in ("bin", "proc", "sys", "dev"):
            os.makedirs(os.path.join(root, d))
        shutil.copy(busybox, os.path.join(root, "bin", "busybox"))
        with open(os.path.join(root, "init"), "w") as f:
            f.write(INIT)
        os.chmod(os.path.join(root, "init"), 0o755)
        initrd = os.path.join(work, "initrd.cpio")
        files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
        with open(initrd, "wb") as f:
            subprocess.run(["cpio", "-o", "-H", "newc"], cwd=root, input=files, stdout=f,
                           stderr=subprocess.DEVNULL, check=True)
        console = os.path.join(work, "console.log")
        subprocess.run(["qemu-system-x86_64", "-accel", "tcg", "-nographic", "-vga", "none",
                        "-nodefaults", "-no-reboot", "-serial", f"file:{console}",
                        "-kernel", kernel, "-initrd", initrd,
                        "-append", "console=ttyS0 quiet panic=-1", *qemu],
                       stdin=subprocess.DEVNULL, check=True, timeout=300)
        with open(console, errors="replace") as f:
            text = f.read().replace("\r", "")
        tables = os.path.join(out, "firmware", "dmi", "tables")
        ids = os.path.join(out, "class", "dmi", "id")
        os.makedirs(tables, exist_ok=True)
        os.makedirs(ids, exist_ok=True)
        for name, begin, end in (("smbios_entry_point", "DMI-EP-BEGIN", "DMI-EP-END"),
                                 ("DMI", "DMI-T-BEGIN", "DMI-T-END")):
            with open(os.path.join(tables, name), "wb") as f:
                f.write(base64.b64decode("".join(between(text, begin, end))))
        for line in between(text, "DMIID-BEGIN", "DMIID-END"):
            key, _, value = line.partition("=")
            if key in ("modalias", "uevent"):
                continue
            with open(os.path.join(ids, key), "w") as f:
                f.write(value + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
