# -*- test-case-name: tests.agent.test_inventory -*-
"""The inventory the agent registers with (spec §4 step 7): SMBIOS, disks and NICs.

Disks come from a sysfs tree (C{<sysfs>/block}), so tests use recorded trees; interfaces come
from rtnetlink in the current network namespace (pyroute2), so tests run in a namespace they
built.  L{build_hardware} is pure: it turns those into the wire message.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from twisted.logger import Logger

from sidero.agent import smbios
from sidero.proto import agent_pb2 as pb

log = Logger()

#: /sys/block names the agent never reports nor wipes (spec §4 step 7).
EXCLUDED_PREFIXES = ("sg", "sr", "loop", "md", "dm-", "ram")

# Linux IFF_* flags and Go's names for them, in Go's order (net.Flags.String()).
_GO_FLAGS = ((0x1, "up"), (0x2, "broadcast"), (0x8, "loopback"), (0x10, "pointtopoint"),
             (0x1000, "multicast"), (0x40, "running"))


@dataclass(frozen=True)
class Disk:
    name: str
    size: int  # bytes
    type: int  # pb.StorageType value
    model: str = ""
    serial: str = ""
    device_name_attr: str = ""  # device/name
    uuid: str = ""
    wwid: str = ""
    read_only: bool = False
    dev_path: str = ""  # /dev/<name> as reported (independent of --dev)


@dataclass(frozen=True)
class Interface:
    index: int
    name: str
    flags: int
    mtu: int
    mac: str
    addresses: tuple[str, ...] = field(default_factory=tuple)  # CIDR strings

    @property
    def flag_string(self) -> str:
        return go_flags(self.flags)


def go_flags(flags: int) -> str:
    """Go's C{net.Flags.String()}: names joined by "|", or "0" when none is set."""
    names = [name for bit, name in _GO_FLAGS if flags & bit]
    return "|".join(names) if names else "0"


# --- storage ------------------------------------------------------------------------------------

def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def _first(*paths: str) -> str:
    for p in paths:
        value = _read(p)
        if value:
            return value
    return ""


def storage_type(name: str, rotational: str) -> int:
    if "nvme" in name:
        return pb.NVMe
    if "mmc" in name:
        return pb.SD
    if rotational == "1":
        return pb.HDD
    if rotational == "0":
        return pb.SSD
    return pb.Unknown


def list_disks(sysfs: str = "/sys") -> list[Disk]:
    """Every block device the agent reports (and wipes), sorted by name."""
    block = os.path.join(sysfs, "block")
    try:
        names = sorted(os.listdir(block))
    except OSError as e:
        log.warn("cannot list block devices in {block}: {error}", block=block, error=e)
        return []
    disks = []
    for name in names:
        if name.startswith(EXCLUDED_PREFIXES):
            continue
        d = os.path.join(block, name)
        try:
            sectors = int(_read(os.path.join(d, "size")) or "0")
        except ValueError:
            sectors = 0
        if sectors <= 0:
            continue
        disks.append(Disk(
            name=name, size=sectors * 512,
            type=storage_type(name, _read(os.path.join(d, "queue", "rotational"))),
            model=_read(os.path.join(d, "device", "model")),
            serial=_first(os.path.join(d, "serial"), os.path.join(d, "device", "serial")),
            device_name_attr=_read(os.path.join(d, "device", "name")),
            uuid=_first(os.path.join(d, "uuid"), os.path.join(d, "device", "uuid")),
            wwid=_first(os.path.join(d, "wwid"), os.path.join(d, "device", "wwid")),
            read_only=_read(os.path.join(d, "ro")) == "1",
            dev_path=f"/dev/{name}",
        ))
    return disks


# --- network ------------------------------------------------------------------------------------

def list_interfaces() -> list[Interface]:
    """Interfaces of the current network namespace with a hardware address (rtnetlink)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = ipr.get_links()
        addrs = ipr.get_addr()
    by_index: dict[int, list[str]] = {}
    for a in addrs:
        address = a.get_attr("IFA_LOCAL") if a["family"] == 2 else None
        address = address or a.get_attr("IFA_ADDRESS")
        if address:
            by_index.setdefault(a["index"], []).append(f"{address}/{a['prefixlen']}")
    out = []
    for link in links:
        mac = (link.get_attr("IFLA_ADDRESS") or "").lower()
        if not mac or all(part in ("0", "00") for part in mac.split(":")):
            continue  # Go leaves an all-zero address (lo) empty, and skips empty ones
        out.append(Interface(
            index=link["index"], name=link.get_attr("IFLA_IFNAME") or "", flags=link["flags"],
            mtu=link.get_attr("IFLA_MTU") or 0, mac=mac,
            addresses=tuple(by_index.get(link["index"], ())),
        ))
    return out


def reportable_addresses(interfaces: Iterable[Interface]) -> list[str]:
    """Addresses for ReconcileServerAddresses: global unicast, not link-local (v4 and v6).

    Go's IsGlobalUnicast: not unspecified, loopback, multicast, link-local or limited
    broadcast (private ranges count as global).
    """
    out: list[str] = []
    for iface in interfaces:
        for cidr in iface.addresses:
            try:
                ip = ipaddress.ip_interface(cidr).ip
            except ValueError:
                continue
            if (ip.is_unspecified or ip.is_loopback or ip.is_multicast or ip.is_link_local
                    or ip == ipaddress.IPv4Address("255.255.255.255")):
                continue
            if str(ip) not in out:
                out.append(str(ip))
    return out


# --- the wire message ---------------------------------------------------------------------------

def build_hardware(
    info: smbios.SMBIOS | None, disks: Iterable[Disk], interfaces: Iterable[Interface],
) -> pb.HardwareInformation:
    """C{HardwareInformation} as the Go agent fills it.

    Without SMBIOS only storage is sent: system, compute, memory and network stay empty
    (the Go agent returns before it looks at interfaces).  The system version is never sent.
    """
    hw = pb.HardwareInformation()
    for d in disks:
        hw.storage.devices.add(
            type=d.type, size=d.size, model=d.model, serial=d.serial, name=d.device_name_attr,
            device_name=d.dev_path, uuid=d.uuid, wwid=d.wwid,
        )
        hw.storage.total_size += d.size
    hw.storage.device_count = len(hw.storage.devices)
    if info is None:
        return hw
    if info.system is not None:
        s = info.system
        hw.system.CopyFrom(pb.SystemInformation(
            uuid=s.uuid, manufacturer=s.manufacturer, product_name=s.product_name,
            serial_number=s.serial_number, sku_number=s.sku_number, family=s.family,
        ))
    for p in info.processors:
        if not p.populated:
            continue
        hw.compute.processors.add(
            manufacturer=p.manufacturer, product_name=p.version, serial_number=p.serial_number,
            speed=p.current_speed, core_count=p.core_count, thread_count=p.thread_count,
        )
        hw.compute.total_core_count += p.core_count
        hw.compute.total_thread_count += p.thread_count
    hw.compute.processor_count = len(hw.compute.processors)
    for m in info.memory_devices:
        if not m.installed:
            continue
        hw.memory.modules.add(
            manufacturer=m.manufacturer, product_name=m.part_number, serial_number=m.serial_number,
            type=m.type_name, size=m.module_size & 0xFFFFFFFF, speed=m.speed,
        )
        hw.memory.total_size = (hw.memory.total_size + m.size_mb) & 0xFFFFFFFF
    hw.memory.module_count = len(hw.memory.modules)
    for i in interfaces:
        hw.network.interfaces.add(index=i.index, name=i.name, flags=i.flag_string, mtu=i.mtu,
                                  mac=i.mac, addresses=list(i.addresses))
    hw.network.interface_count = len(hw.network.interfaces)
    return hw
