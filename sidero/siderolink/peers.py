# -*- test-case-name: tests.siderolink.test_peers -*-
"""WireGuard peers from ServerBindings (spec §3.8 "Peers").

Every binding with both C{spec.siderolink.publicKey} and C{.address} is one peer: that key,
allowed IPs C{<node address>/128}, no endpoint (the node dials in), no keepalive.  The wanted
set is derived from the ServerBinding informer's events (a key used by two bindings belongs to
the one changed last, as in Go); L{PeerSync} brings the device to it one operation at a time,
removals first, retrying with backoff when the device refuses.  When the device is (re)created
the applied set is forgotten and everything is applied again, so a restart rebuilds the peers
from the store.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from sidero.backoff import Backoff
from sidero.siderolink.config import InvalidKey, parse_key
from sidero.siderolink.wireguard import IWireGuardDevice

Object = dict[str, Any]


def peer_of(binding: Object) -> tuple[str, ipaddress.IPv6Network] | None:
    """The peer a binding asks for (public key, node address /128), or None.

    A binding whose key or address cannot be read asks for no peer (and is logged by the
    caller); IPv4 tunnel addresses are not a thing in SideroLink.
    """
    link = (binding.get("spec") or {}).get("siderolink") or {}
    key, address = link.get("publicKey"), link.get("address")
    if not key or not address:
        return None
    try:
        ip = ipaddress.ip_interface(str(address)).ip
        if not isinstance(ip, ipaddress.IPv6Address):
            return None
        return parse_key(str(key)), ipaddress.IPv6Network((ip, 128))
    except (ValueError, InvalidKey):
        return None


def plan(wanted: dict[str, ipaddress.IPv6Network],
         applied: dict[str, ipaddress.IPv6Network]) -> list[tuple[str, ipaddress.IPv6Network | None]]:
    """The operations turning C{applied} into C{wanted}: C{(key, None)} removes a peer,
    C{(key, ip)} adds it or replaces its allowed IPs.  Removals come first, so an address
    moving from one key to another is never held by both."""
    ops: list[tuple[str, ipaddress.IPv6Network | None]] = [
        (key, None) for key in sorted(applied) if key not in wanted]
    ops += [(key, ip) for key, ip in wanted.items() if applied.get(key) != ip]
    return ops


class PeerSync:
    """Keeps a device's peers equal to what the bindings ask for.

    Feed it binding events (L{binding_changed}, L{binding_deleted}); L{attach} a device once
    it is up and L{detach} it when it goes.  Operations run one at a time on the reactor;
    the device's own calls do not block it.

    @ivar applied: what the device is known to hold (key -> allowed IP).
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, backoff: Backoff | None = None) -> None:
        self.clock = clock
        self.backoff = backoff or Backoff(initial=1.0, maximum=30.0)
        self._by_binding: dict[str, tuple[str, ipaddress.IPv6Network]] = {}
        self.applied: dict[str, ipaddress.IPv6Network] = {}
        self.device: IWireGuardDevice | None = None
        self._running = False
        self._failures = 0
        self._retry: IDelayedCall | None = None
        self._generation = 0

    # -- what is wanted ---------------------------------------------------------------

    @property
    def wanted(self) -> dict[str, ipaddress.IPv6Network]:
        """Key -> allowed IP; for a key two bindings share, the binding changed last wins."""
        out: dict[str, ipaddress.IPv6Network] = {}
        for key, ip in self._by_binding.values():
            out.pop(key, None)
            out[key] = ip
        return out

    def binding_changed(self, binding: Object) -> None:
        name = str((binding.get("metadata") or {}).get("name") or "")
        peer = peer_of(binding)
        self._by_binding.pop(name, None)  # re-inserted last: latest event wins
        if peer is not None:
            self._by_binding[name] = peer
        elif ((binding.get("spec") or {}).get("siderolink") or {}).get("publicKey"):
            self.log.warn("ServerBinding {name}: unreadable siderolink key or address; no peer",
                          name=name)
        self.kick()

    def binding_deleted(self, binding: Object) -> None:
        self._by_binding.pop(str((binding.get("metadata") or {}).get("name") or ""), None)
        self.kick()

    def load(self, bindings: Iterable[Object]) -> None:
        for binding in bindings:
            self.binding_changed(binding)

    # -- the device -------------------------------------------------------------------

    def attach(self, device: IWireGuardDevice) -> None:
        """A fresh device (no peers): apply everything."""
        self.device = device
        self.applied = {}
        self._generation += 1
        self._failures = 0
        self.kick()

    def detach(self) -> None:
        self.device = None
        self.applied = {}
        self._generation += 1
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None

    def kick(self) -> None:
        """Start applying (coalesced: one run at a time; a running one sees the new state)."""
        if self._running or self.device is None or (self._retry is not None and self._retry.active()):
            return
        self._running = True
        from twisted.internet.defer import Deferred

        Deferred.fromCoroutine(self._run()).addErrback(
            lambda f: self.log.failure("SideroLink peer sync crashed", f))

    async def _run(self) -> None:
        generation = self._generation
        try:
            while self.device is not None and generation == self._generation:
                ops = plan(self.wanted, self.applied)
                if not ops:
                    self._failures = 0
                    return
                key, ip = ops[0]
                device = self.device
                try:
                    if ip is None:
                        await device.remove_peer(key)
                    else:
                        await device.set_peer(key, ip)
                except Exception as e:
                    if generation != self._generation:
                        return
                    delay = self.backoff.delay(self._failures, 0.0)
                    self._failures += 1
                    self.log.warn("SideroLink peer {key}: {error}; retrying in {delay:.1f}s",
                                  key=key, error=str(e) or repr(e), delay=delay)
                    self._retry = self.clock.callLater(delay, self._retry_now)
                    return
                if generation != self._generation:
                    return
                if ip is None:
                    self.applied.pop(key, None)
                    self.log.info("SideroLink peer {key} removed", key=key)
                else:
                    self.applied[key] = ip
                    self.log.info("SideroLink peer {key} allowed {ip}", key=key, ip=ip.with_prefixlen)
        finally:
            self._running = False

    def _retry_now(self) -> None:
        self._retry = None
        self.kick()
