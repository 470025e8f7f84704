# -*- test-case-name: tests.service.test_timeline -*-
"""The boot timeline: each step of a machine's network boot, recorded against its identity.

Operators debugging PXE always lack this: which offer a machine got, whether it fetched the
boot file, what C{/ipxe} decided and why, whether the kernel and initrd came, when the agent
registered. Each protocol knows a different name for the machine: DHCP its MAC (and often
its SMBIOS UUID, option 97), TFTP and C{/boot.ipxe} only its IP address, C{/ipxe} and the
agent its UUID. L{BootTimeline} links those names as it learns them (the 4011 request and
C{/ipxe} come from an address and name a MAC; C{/ipxe} and option 97 pair a MAC with a UUID)
and files each step under the best name known, moving earlier steps along when a better
name is learned. It lives in memory, bounded per machine and in machines, and is read by
C{sidero describe server} and the management API.
"""

from __future__ import annotations

import re
import uuid as _uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from zope.interface import Attribute, Interface, implementer

#: Steps kept per machine (the oldest go first) and machines kept (least recently seen go).
DEFAULT_PER_MACHINE = 200
DEFAULT_MACHINES = 4096
#: Limit on one detail value, so a hostile query string cannot bloat the recorder.
MAX_DETAIL = 256
# Names already in canonical form (what the protocols pass) skip the general parsing: the
# DHCP proxy records a step per reply, at tens of thousands of replies a second.
_CANONICAL_MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class ITimeline(Interface):
    """Where protocols report boot steps (the recorder is optional: None means "not kept")."""

    per_machine = Attribute("How many steps are kept per machine.")

    def record(step: str, *, source: str, mac: str | None = None, uuid: str | None = None,
               ip: str | None = None, **details: Any) -> None:
        """Record one step; any of C{mac}, C{uuid}, C{ip} that the caller knows names the
        machine (giving two links them). Never raises: a recorder must not break a boot."""

    def for_machine(uuid: str | None = None, mac: str | None = None) -> list[Entry]:
        """The steps recorded for a machine, oldest first (under any of its names)."""

    def subscribe(callback: Callable[[Entry], object]) -> Callable[[], None]:
        """Call C{callback} with each new entry (the dashboard); returns an unsubscribe."""


@dataclass(frozen=True)
class Entry:
    """One recorded step."""

    time: float
    step: str
    source: str
    mac: str | None = None
    uuid: str | None = None
    ip: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON form: RFC 3339 time, the names known then, the step's details."""
        moment = datetime.fromtimestamp(self.time, UTC)
        return {
            "time": moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z",
            "step": self.step, "source": self.source, "mac": self.mac, "uuid": self.uuid,
            "ip": self.ip, "details": dict(self.details),
        }


def normalise_mac(value: str | bytes | None) -> str | None:
    """C{aa:bb:cc:dd:ee:ff} from colon, hyphen or raw 6-byte forms; None if not a MAC."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.hex(":") if len(value) == 6 else None
    if _CANONICAL_MAC.fullmatch(value):
        return value
    digits = value.replace(":", "").replace("-", "").replace(".", "").lower()
    if len(digits) != 12 or any(c not in "0123456789abcdef" for c in digits):
        return None
    return ":".join(digits[i:i + 2] for i in range(0, 12, 2))


def normalise_uuid(value: str | None) -> str | None:
    """A lowercase canonical UUID, or None if C{value} is not one."""
    if not value:
        return None
    if _CANONICAL_UUID.fullmatch(value):
        return value
    try:
        return str(_uuid.UUID(value.strip()))
    except ValueError:
        return None


def uuid_from_pxe_guid(option97: bytes | None) -> str | None:
    """DHCP option 97 (type 0 + 16 bytes) as the SMBIOS UUID string Linux and the agent report
    (the first three fields are little-endian on the wire, as in SMBIOS)."""
    if option97 is None or len(option97) != 17 or option97[0] != 0:
        return None
    guid = option97[1:]
    if guid in (b"\x00" * 16, b"\xff" * 16):
        return None
    # str(uuid.UUID(bytes_le=guid)), without building the object (once per DHCP reply).
    h = (guid[3::-1] + guid[5:3:-1] + guid[7:5:-1] + guid[8:]).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _detail(value: Any) -> Any:
    kind = type(value)
    if kind is str:
        return value if len(value) <= MAX_DETAIL else value[:MAX_DETAIL] + "..."
    if value is None or kind is bool or kind is int:
        return value
    if isinstance(value, str) and len(value) > MAX_DETAIL:
        return value[:MAX_DETAIL] + "..."
    if isinstance(value, bytes):
        return _detail(value.decode("utf-8", "replace"))
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return _detail(str(value))


@implementer(ITimeline)
class BootTimeline:
    """The in-memory recorder (reactor thread only, like the protocols that feed it)."""

    def __init__(self, clock: Callable[[], float], per_machine: int = DEFAULT_PER_MACHINE,
                 machines: int = DEFAULT_MACHINES) -> None:
        if per_machine < 1 or machines < 1:
            raise ValueError("per_machine and machines must be at least 1")
        self.clock = clock
        self.per_machine = per_machine
        self.machines = machines
        self._buckets: OrderedDict[str, deque[Entry]] = OrderedDict()
        self._mac_of_ip: OrderedDict[str, str] = OrderedDict()
        self._uuid_of_mac: OrderedDict[str, str] = OrderedDict()
        self._subscribers: list[Callable[[Entry], object]] = []

    # -- recording -------------------------------------------------------------------

    def record(self, step: str, *, source: str, mac: str | None = None, uuid: str | None = None,
               ip: str | None = None, **details: Any) -> None:
        try:
            self._record(step, source, normalise_mac(mac), normalise_uuid(uuid), ip or None,
                         details)
        except Exception:  # a recorder must never break a boot
            pass

    def _record(self, step: str, source: str, mac: str | None, uuid: str | None,
                ip: str | None, details: dict[str, Any]) -> None:
        if ip and mac:
            self._link(self._mac_of_ip, ip, mac, "ip:", "mac:")
        if mac and uuid:
            self._link(self._uuid_of_mac, mac, uuid, "mac:", "uuid:")
        if mac is None and ip is not None:
            mac = self._mac_of_ip.get(ip)
        if uuid is None and mac is not None:
            uuid = self._uuid_of_mac.get(mac)
        entry = Entry(self.clock(), step, source, mac, uuid, ip,
                      {k: _detail(v) for k, v in details.items()})
        key = f"uuid:{uuid}" if uuid else f"mac:{mac}" if mac else f"ip:{ip}" if ip else None
        if key is None:
            return
        self._bucket(key).append(entry)
        for callback in list(self._subscribers):
            try:
                callback(entry)
            except Exception:
                pass

    def _link(self, table: OrderedDict[str, str], name: str, better: str, prefix: str,
              better_prefix: str) -> None:
        """Remember C{name} -> C{better}; steps filed under C{name} move to C{better}."""
        if table.get(name) == better:
            # Known link (every DHCP reply of a machine): since it was made, steps naming
            # C{name} were filed under C{better}, so there is nothing to move.
            table.move_to_end(name)
            return
        if table.get(name) != better:
            table[name] = better
            while len(table) > self.machines * 2:
                table.popitem(last=False)
        table.move_to_end(name)
        old = self._buckets.pop(prefix + name, None)
        if old:
            target = better_prefix + better
            if better_prefix == "mac:" and better in self._uuid_of_mac:
                target = "uuid:" + self._uuid_of_mac[better]
            merged = sorted([*self._buckets.get(target, ()), *old], key=lambda e: e.time)
            bucket = self._bucket(target)
            bucket.clear()
            bucket.extend(merged[-self.per_machine:])

    def _bucket(self, key: str) -> deque[Entry]:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = deque(maxlen=self.per_machine)
            while len(self._buckets) > self.machines:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(key)
        return bucket

    # -- reading ---------------------------------------------------------------------

    def for_machine(self, uuid: str | None = None, mac: str | None = None) -> list[Entry]:
        keys: list[str] = []
        u = normalise_uuid(uuid) if uuid else None
        m = normalise_mac(mac) if mac else None
        if u is None and uuid:
            return []
        if u is not None:
            keys.append("uuid:" + u)
            keys.extend("mac:" + k for k, v in self._uuid_of_mac.items() if v == u)
        if m is not None:
            keys.append("mac:" + m)
            if m in self._uuid_of_mac:
                keys.append("uuid:" + self._uuid_of_mac[m])
        found: list[Entry] = []
        for key in dict.fromkeys(keys):
            found.extend(self._buckets.get(key, ()))
        found.sort(key=lambda e: e.time)
        return found[-self.per_machine:]

    def machines_known(self) -> Iterable[str]:
        """Names (C{uuid:...}, C{mac:...}, C{ip:...}) with recorded steps, most recent last."""
        return list(self._buckets)

    def subscribe(self, callback: Callable[[Entry], object]) -> Callable[[], None]:
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe
