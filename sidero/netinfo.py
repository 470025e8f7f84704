# -*- test-case-name: tests.service.test_netinfo -*-
"""The host's addresses, and the choice of the address servers use to reach us.

Sidero needs an API endpoint in every URL, kernel argument and DHCP reply it hands out. The
Go controller takes it from the pod's host IP; a plain host has no such thing, so when none is
configured we pick the first usable address. The choice (L{choose_endpoint}) is a pure
function over L{InterfaceAddress} records so it can be tested on fixtures; L{read_addresses}
is the thin netlink reader (pyroute2) and runs once at start-up, before the reactor.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# rtnetlink constants (linux/if.h, linux/if_addr.h, linux/rtnetlink.h).
IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFA_F_TEMPORARY = 0x01
IFA_F_DADFAILED = 0x08
IFA_F_DEPRECATED = 0x20
IFA_F_TENTATIVE = 0x40
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_HOST = 254


@dataclass(frozen=True)
class InterfaceAddress:
    """One address on one interface, as the kernel reports it.

    @ivar flags: the C{IFA_F_*} address flags (temporary, deprecated, tentative...).
    @ivar link_flags: the interface's C{IFF_*} flags (up, loopback...).
    """

    interface: str
    index: int
    address: IPAddress
    prefixlen: int
    scope: int = RT_SCOPE_UNIVERSE
    flags: int = 0
    link_flags: int = IFF_UP

    @property
    def is_loopback(self) -> bool:
        return bool(self.link_flags & IFF_LOOPBACK) or self.address.is_loopback

    @property
    def is_up(self) -> bool:
        return bool(self.link_flags & IFF_UP)


@dataclass(frozen=True)
class EndpointChoice:
    """The chosen address and a sentence saying why it won (logged at start-up)."""

    address: IPAddress
    interface: str
    reason: str


def _usable(a: InterfaceAddress) -> bool:
    """Addresses a remote server could reach us on: not loopback, not link-local, not in DAD."""
    if a.is_loopback or a.scope == RT_SCOPE_HOST:
        return False
    if a.address.is_link_local or a.scope == RT_SCOPE_LINK:
        return False
    if a.address.is_unspecified or a.address.is_multicast:
        return False
    return not a.flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED)


def choose_endpoint(addresses: Iterable[InterfaceAddress]) -> EndpointChoice | None:
    """Pick the API endpoint from the host's addresses, or None when nothing fits.

    Preference: interfaces that are up over those that are down, then global IPv4 over
    global IPv6 (an IPv4 literal works in every iPXE build and kernel command line), then
    stable IPv6 addresses over deprecated or temporary ones, then the kernel's order
    (interface index, then the order addresses were listed).
    """
    candidates = [(i, a) for i, a in enumerate(addresses) if _usable(a)]
    if not candidates:
        return None

    def rank(item: tuple[int, InterfaceAddress]) -> tuple[int, int, int, int, int]:
        order, a = item
        unstable = 1 if a.flags & (IFA_F_DEPRECATED | IFA_F_TEMPORARY) else 0
        return (0 if a.is_up else 1, a.address.version, unstable, a.index, order)

    _, best = min(candidates, key=rank)
    family = "IPv4" if best.address.version == 4 else "IPv6"
    others = len(candidates) - 1
    reason = (
        f"first global {family} address on {'an up' if best.is_up else 'a down'} interface"
        f" ({best.interface}, index {best.index}); {others} other usable address"
        f"{'' if others == 1 else 'es'}; loopback and link-local addresses are never chosen"
    )
    return EndpointChoice(address=best.address, interface=best.interface, reason=reason)


def interface_for_address(
    addresses: Iterable[InterfaceAddress], address: IPAddress
) -> InterfaceAddress | None:
    """The interface record that owns C{address} (the DHCP proxy binds to that one)."""
    for a in addresses:
        if a.address == address:
            return a
    return None


def read_addresses() -> list[InterfaceAddress]:
    """Read every interface address over rtnetlink (blocking; start-up only)."""
    from pyroute2 import IPRoute

    result: list[InterfaceAddress] = []
    with IPRoute() as ipr:
        links = {link["index"]: link for link in ipr.get_links()}
        for msg in ipr.get_addr():
            family = msg["family"]
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            text = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if not text:
                continue
            link = links.get(msg["index"])
            name = (link.get_attr("IFLA_IFNAME") if link is not None else None) or str(msg["index"])
            flags = msg.get_attr("IFA_FLAGS")
            result.append(
                InterfaceAddress(
                    interface=name,
                    index=int(msg["index"]),
                    address=ipaddress.ip_address(text.split("%")[0]),
                    prefixlen=int(msg["prefixlen"]),
                    scope=int(msg["scope"]),
                    flags=int(flags if flags is not None else msg["flags"]),
                    link_flags=int(link["flags"]) if link is not None else IFF_UP,
                )
            )
    return result
