"""A WireGuard device that records what it is told (unit tests of the peer manager and the
SideroLink service; the real devices are tested against wireguard-go in namespaces)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from sidero.siderolink.wireguard import IWireGuardDevice, WireGuardError


@implementer(IWireGuardDevice)
class FakeDevice:
    """Holds peers like a device; C{fail_next} makes the next peer operations fail;
    C{hold} makes them wait until the test fires the returned Deferred."""

    backend = "fake"

    def __init__(self, name: str = "siderolink") -> None:
        self.name = name
        self.calls: list[tuple[Any, ...]] = []
        self.state: dict[str, list[str]] = {}
        self.is_up = False
        self.fail_next = 0
        self.hold: list[Deferred[None]] | None = None
        self._lost: list[Callable[[str], None]] = []

    def up(self, private_key: str, listen_port: int,
           address: ipaddress.IPv6Interface) -> Deferred[None]:
        self.calls.append(("up", private_key, listen_port, address.with_prefixlen))
        self.is_up = True
        self.state = {}
        return succeed(None)

    def _op(self, call: tuple[Any, ...], apply: Callable[[], None]) -> Deferred[None]:
        self.calls.append(call)
        if self.fail_next:
            self.fail_next -= 1
            return fail(WireGuardError("device busy"))
        if self.hold is not None:
            d: Deferred[None] = Deferred()
            d.addCallback(lambda _: apply())
            self.hold.append(d)
            return d
        apply()
        return succeed(None)

    def set_peer(self, public_key: str, allowed_ip: ipaddress.IPv6Network) -> Deferred[None]:
        return self._op(("set", public_key, allowed_ip.with_prefixlen),
                        lambda: self.state.__setitem__(public_key, [allowed_ip.with_prefixlen]))

    def remove_peer(self, public_key: str) -> Deferred[None]:
        return self._op(("remove", public_key), lambda: self.state.pop(public_key, None) and None)

    def peers(self) -> Deferred[dict[str, list[str]]]:
        return succeed(dict(self.state))

    def down(self) -> Deferred[None]:
        self.calls.append(("down",))
        self.is_up = False
        return succeed(None)

    def on_lost(self, callback: Callable[[str], None]) -> None:
        self._lost.append(callback)

    def lose(self, reason: str) -> None:
        self.is_up = False
        for cb in list(self._lost):
            cb(reason)
