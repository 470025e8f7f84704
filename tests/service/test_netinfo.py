"""Choosing the API endpoint from the host's addresses (pure chooser, fixture addresses)."""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from sidero.netinfo import (
    IFA_F_DADFAILED,
    IFA_F_DEPRECATED,
    IFA_F_TEMPORARY,
    IFA_F_TENTATIVE,
    IFF_LOOPBACK,
    IFF_UP,
    RT_SCOPE_HOST,
    RT_SCOPE_LINK,
    InterfaceAddress,
    choose_endpoint,
    interface_for_address,
    read_addresses,
)


def a(text: str, interface: str = "eth0", index: int = 2, **kw: Any) -> InterfaceAddress:
    return InterfaceAddress(interface, index, ipaddress.ip_address(text), 24, **kw)


LOOPBACK = [
    a("127.0.0.1", "lo", 1, scope=RT_SCOPE_HOST, link_flags=IFF_UP | IFF_LOOPBACK),
    a("::1", "lo", 1, scope=RT_SCOPE_HOST, link_flags=IFF_UP | IFF_LOOPBACK),
]


class ChooseEndpointTests(SynchronousTestCase):
    """choose_endpoint over recorded-shape address lists."""

    def chosen(self, addresses: list[InterfaceAddress]) -> str | None:
        choice = choose_endpoint(addresses)
        return None if choice is None else str(choice.address)

    def test_prefers_global_ipv4(self) -> None:
        """A global IPv4 wins over a global IPv6 listed earlier."""
        addresses = LOOPBACK + [a("2001:db8::5"), a("fe80::1", scope=RT_SCOPE_LINK), a("10.0.0.5")]
        choice = choose_endpoint(addresses)
        assert choice is not None
        self.assertEqual(str(choice.address), "10.0.0.5")
        self.assertEqual(choice.interface, "eth0")
        self.assertIn("IPv4", choice.reason)

    def test_ipv6_when_no_ipv4(self) -> None:
        """Without IPv4, a global IPv6 address is chosen; link-local never."""
        addresses = LOOPBACK + [a("fe80::1", scope=RT_SCOPE_LINK), a("2001:db8::7")]
        self.assertEqual(self.chosen(addresses), "2001:db8::7")

    def test_only_loopback_and_link_local(self) -> None:
        """Nothing usable gives None (the caller reports it)."""
        addresses = LOOPBACK + [a("fe80::1", scope=RT_SCOPE_LINK), a("169.254.3.4")]
        self.assertIsNone(self.chosen(addresses))
        self.assertIsNone(self.chosen([]))

    def test_first_interface_wins(self) -> None:
        """Between equals, the lower interface index, then kernel order, wins."""
        addresses = [a("10.0.2.1", "eth1", 3), a("10.0.1.1", "eth0", 2), a("10.0.1.2", "eth0", 2)]
        self.assertEqual(self.chosen(addresses), "10.0.1.1")

    def test_up_interfaces_first(self) -> None:
        """An address on a down interface loses to one on an up interface."""
        addresses = [a("10.0.0.1", "eth0", 2, link_flags=0), a("10.0.9.1", "eth1", 3)]
        self.assertEqual(self.chosen(addresses), "10.0.9.1")
        self.assertEqual(self.chosen(addresses[:1]), "10.0.0.1")

    def test_skips_tentative_and_prefers_stable_ipv6(self) -> None:
        """DAD-pending addresses are unusable; deprecated/temporary ones lose to stable ones."""
        addresses = [
            a("2001:db8::1", flags=IFA_F_TENTATIVE),
            a("2001:db8::2", flags=IFA_F_DADFAILED),
            a("2001:db8::3", flags=IFA_F_TEMPORARY),
            a("2001:db8::4", flags=IFA_F_DEPRECATED),
            a("2001:db8::5"),
        ]
        self.assertEqual(self.chosen(addresses), "2001:db8::5")
        self.assertEqual(self.chosen(addresses[:3]), "2001:db8::3")

    def test_loopback_interface_addresses_skipped(self) -> None:
        """A global address on a loopback interface (anycast setups) is not chosen."""
        addresses = [a("203.0.113.1", "lo", 1, link_flags=IFF_UP | IFF_LOOPBACK), a("10.1.1.1")]
        self.assertEqual(self.chosen(addresses), "10.1.1.1")

    def test_interface_for_address(self) -> None:
        """The owner of an address is found; an unknown address gives None."""
        addresses = [a("10.0.0.1", "eth0"), a("10.0.0.2", "br0", 4)]
        found = interface_for_address(addresses, ipaddress.ip_address("10.0.0.2"))
        self.assertEqual(found.interface if found else None, "br0")
        self.assertIsNone(interface_for_address(addresses, ipaddress.ip_address("10.0.0.3")))


class ReadAddressesTests(SynchronousTestCase):
    """The netlink reader on this host."""

    def test_reads_loopback(self) -> None:
        """Every Linux host has 127.0.0.1 on a loopback interface, which the reader reports."""
        found = read_addresses()
        loop = [x for x in found if str(x.address) == "127.0.0.1"]
        self.assertEqual(len(loop), 1)
        self.assertTrue(loop[0].is_loopback)
        self.assertTrue(loop[0].is_up)
