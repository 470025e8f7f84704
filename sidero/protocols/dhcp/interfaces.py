# -*- test-case-name: tests.protocols.dhcp.test_service -*-
"""Which local interfaces the proxy listens on (spec 3.5: the one owning the endpoint IP),
and the address it answers each one with.

Addresses are read over netlink with pyroute2; the reader is injectable so the selection
logic is tested without touching the host.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address


@dataclass(frozen=True)
class InterfaceAddress:
    name: str
    address: str


AddressReader = Callable[[], Sequence[InterfaceAddress]]


class InterfaceSelectionError(Exception):
    """No usable interface; the message says why and what to pass instead."""


def netlink_ipv4_addresses() -> list[InterfaceAddress]:
    """Every IPv4 address of every link in this network namespace (netlink, no shell-out)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        names = {link["index"]: link.get("IFLA_IFNAME") for link in ipr.get_links()}
        out = []
        for msg in ipr.get_addr(family=socket.AF_INET):
            name = names.get(msg["index"]) or msg.get("IFA_LABEL")
            addr = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
            if name and addr:
                out.append(InterfaceAddress(str(name), str(addr)))
        return out


def resolve_ipv4(endpoint: str) -> str:
    """The first IPv4 address of C{endpoint} (an IP literal needs no resolver).

    DHCPv4 can only name an IPv4 server, so an IPv6-only endpoint is an error.
    """
    host = endpoint.strip("[]")
    try:
        ip = ip_address(host)
    except ValueError:
        pass
    else:
        if isinstance(ip, IPv4Address):
            return str(ip)
        raise InterfaceSelectionError(
            f"API endpoint {endpoint} is IPv6; the DHCPv4 proxy needs an IPv4 endpoint "
            "(or pass --disable-dhcp-proxy)")
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_DGRAM)
    except OSError as e:
        raise InterfaceSelectionError(
            f"cannot resolve API endpoint {endpoint!r} to an IPv4 address ({e}); "
            "pass an IPv4 --api-endpoint or --disable-dhcp-proxy") from e
    if not infos:
        raise InterfaceSelectionError(f"API endpoint {endpoint!r} has no IPv4 address")
    return str(infos[0][4][0])


def select_interface(server_ip: str, interface: str | None,
                     read_addresses: AddressReader = netlink_ipv4_addresses) -> str:
    """The interface to bind: C{interface} if given (it must exist), else the owner of C{server_ip}."""
    addrs = read_addresses()
    if interface is not None:
        if interface not in {a.name for a in addrs}:
            raise InterfaceSelectionError(
                f"interface {interface!r} has no IPv4 address here; "
                f"interfaces with IPv4: {sorted({a.name for a in addrs})}")
        return interface
    owners = [a.name for a in addrs if a.address == server_ip]
    if not owners:
        raise InterfaceSelectionError(
            f"no local interface owns the API endpoint address {server_ip}; pass "
            "--dhcp-interface <name> to choose one, or --disable-dhcp-proxy "
            f"(local IPv4: {', '.join(f'{a.name}={a.address}' for a in addrs) or 'none'})")
    return owners[0]


#: C{--dhcp-interface} value meaning every interface with a non-loopback IPv4 address.
ALL_INTERFACES = "*"


def select_interfaces(server_ip: str, requested: str | None,
                      read_addresses: AddressReader = netlink_ipv4_addresses,
                      ) -> list[tuple[str, str]]:
    """(interface, the server address it answers with) for each interface to serve.

    C{requested} is None (the owner of C{server_ip}, as Sidero), a comma-separated list of
    names, or L{ALL_INTERFACES}. A multi-homed host answers each network with its own
    address: the endpoint address on the interface that owns it, else the interface's first
    IPv4 address.
    """
    addrs = read_addresses()
    if requested is None:
        return [(select_interface(server_ip, None, lambda: addrs), server_ip)]
    if requested.strip() == ALL_INTERFACES:
        names = list(dict.fromkeys(
            a.name for a in addrs if not IPv4Address(a.address).is_loopback))
        if not names:
            raise InterfaceSelectionError("no interface with a non-loopback IPv4 address here")
    else:
        names = list(dict.fromkeys(n.strip() for n in requested.split(",") if n.strip()))
        for name in names:
            select_interface(server_ip, name, lambda: addrs)  # raises for an unknown one
    out = []
    for name in names:
        own = [a.address for a in addrs if a.name == name]
        out.append((name, server_ip if server_ip in own else own[0]))
    return out
