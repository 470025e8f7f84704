"""Hand-built sysfs and /dev trees for agent tests (beside the recorded SMBIOS tables)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


@dataclass
class BlockDev:
    name: str
    sectors: int
    rotational: str | None = "0"
    ro: bool = False
    attrs: dict[str, str] = field(default_factory=dict)  # path under block/<name> → content


#: A machine with the kinds of devices the enumeration must tell apart.
DEFAULT_DISKS = (
    BlockDev("sda", 16384, "1", attrs={"device/model": "QEMU HARDDISK", "device/serial": "HD-1",
                                       "device/wwid": "t10.ATA QEMU HARDDISK HD-1"}),
    BlockDev("nvme0n1", 6144, "0", attrs={"device/model": "NVMe Disk", "serial": "NV-SER",
                                           "wwid": "eui.0011223344556677", "uuid": "nv-uuid"}),
    BlockDev("mmcblk0", 4096, "0", attrs={"device/name": "SD32G", "device/serial": "0x1234"}),
    BlockDev("vdb", 2048, "0", ro=True),
    BlockDev("vdc", 0, "1"),
    BlockDev("sr0", 2048, "1"),
    BlockDev("loop0", 2048, "0"),
    BlockDev("dm-0", 2048, "0"),
    BlockDev("md127", 2048, "0"),
    BlockDev("ram0", 2048, "0"),
    BlockDev("sg0", 2048, "0"),
    BlockDev("xvda", 2048, None),
)


def make_sysfs(root: str, dmi: str | None = "qemu-pc",
               disks: tuple[BlockDev, ...] = DEFAULT_DISKS) -> str:
    """A sysfs tree: a recorded DMI folder (C{data/<dmi>}) plus C{block/} entries."""
    if dmi is not None:
        shutil.copytree(os.path.join(DATA, dmi), root, dirs_exist_ok=True)
    for d in disks:
        base = os.path.join(root, "block", d.name)
        files = {"size": str(d.sectors), "ro": "1" if d.ro else "0", **d.attrs}
        if d.rotational is not None:
            files["queue/rotational"] = d.rotational
        for rel, content in files.items():
            path = os.path.join(base, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(content + "\n")
    return root


def make_dev(root: str, disks: tuple[BlockDev, ...] = DEFAULT_DISKS, fill: bytes = b"\xaa",
             skip: tuple[str, ...] = ()) -> str:
    """Regular files standing in for the disks, as big as sysfs says, full of C{fill}."""
    os.makedirs(root, exist_ok=True)
    for d in disks:
        if d.name in skip:
            continue
        with open(os.path.join(root, d.name), "wb") as f:
            f.write(fill * (d.sectors * 512))
    return root
