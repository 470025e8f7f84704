"""WireGuard peers follow the ServerBindings (spec §3.8): added, replaced, removed, rebuilt."""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sidero.siderolink.config import generate_private_key, public_key
from sidero.siderolink.peers import PeerSync, peer_of, plan
from tests.siderolink.fakes import FakeDevice

K1, K2, K3 = (public_key(generate_private_key()) for _ in range(3))
A1, A2 = "fd00:1:2:3:aaaa::1/64", "fd00:1:2:3:bbbb::2/64"


def binding(name: str, key: str | None = K1, address: str | None = A1) -> dict[str, Any]:
    link = {k: v for k, v in (("publicKey", key), ("address", address)) if v is not None}
    return {"metadata": {"name": name}, "spec": {"siderolink": link} if link else {}}


def net(address: str) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Network((ipaddress.IPv6Interface(address).ip, 128))


class PureTests(SynchronousTestCase):
    def test_peer_of(self) -> None:
        """Both key and address make a peer at the node address /128; anything less, none."""
        self.assertEqual(peer_of(binding("a")), (K1, net(A1)))
        self.assertIsNone(peer_of(binding("a", key=None)))
        self.assertIsNone(peer_of(binding("a", address=None)))
        self.assertIsNone(peer_of(binding("a", key="garbage")))
        self.assertIsNone(peer_of(binding("a", address="not-an-address")))
        self.assertIsNone(peer_of(binding("a", address="10.0.0.1/24")))
        self.assertIsNone(peer_of({"metadata": {"name": "a"}}))

    def test_plan_removes_first(self) -> None:
        """Removals before additions; unchanged peers are left alone."""
        applied = {K1: net(A1), K2: net(A2)}
        wanted = {K2: net(A2), K3: net(A1)}
        self.assertEqual(plan(wanted, applied), [(K1, None), (K3, net(A1))])
        self.assertEqual(plan(applied, applied), [])


class PeerSyncTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.sync = PeerSync(self.clock)
        self.device = FakeDevice()

    def test_bindings_before_and_after_attach(self) -> None:
        """Peers of bindings known before the device are applied when it is attached; later
        bindings are applied as they come."""
        self.sync.binding_changed(binding("a"))
        self.assertEqual(self.device.calls, [])
        self.sync.attach(self.device)
        self.assertEqual(self.device.state, {K1: [str(net(A1))]})
        self.sync.binding_changed(binding("b", K2, A2))
        self.assertEqual(self.device.state, {K1: [str(net(A1))], K2: [str(net(A2))]})

    def test_binding_changes(self) -> None:
        """A new key replaces the old peer (removed first); a new address replaces the allowed
        IPs; a deleted binding removes its peer; an unrelated update does nothing."""
        self.sync.attach(self.device)
        self.sync.binding_changed(binding("a"))
        self.device.calls.clear()
        self.sync.binding_changed(binding("a", K2, A1))
        self.assertEqual(self.device.calls, [("remove", K1), ("set", K2, str(net(A1)))])
        self.sync.binding_changed(binding("a", K2, A2))
        self.assertEqual(self.device.calls[-1], ("set", K2, str(net(A2))))
        calls = len(self.device.calls)
        self.sync.binding_changed(binding("a", K2, A2))
        self.assertEqual(len(self.device.calls), calls, "no change, no device call")
        self.sync.binding_deleted(binding("a", K2, A2))
        self.assertEqual(self.device.state, {})

    def test_shared_key_latest_wins(self) -> None:
        """Two bindings with one key: the binding changed last decides the allowed IP; when it
        goes, the other's address comes back."""
        self.sync.attach(self.device)
        self.sync.binding_changed(binding("a", K1, A1))
        self.sync.binding_changed(binding("b", K1, A2))
        self.assertEqual(self.device.state, {K1: [str(net(A2))]})
        self.sync.binding_deleted(binding("b", K1, A2))
        self.assertEqual(self.device.state, {K1: [str(net(A1))]})

    def test_failures_retry_with_backoff(self) -> None:
        """A refused operation is retried later (not in a loop), then the rest follows."""
        self.sync.attach(self.device)
        self.device.fail_next = 2
        self.sync.binding_changed(binding("a"))
        self.sync.binding_changed(binding("b", K2, A2))
        self.assertEqual(self.device.state, {})
        self.assertEqual(len(self.device.calls), 1)
        self.clock.advance(1.0)
        self.assertEqual(len(self.device.calls), 2)
        self.assertEqual(self.device.state, {})
        self.clock.advance(2.0)
        self.assertEqual(self.device.state, {K1: [str(net(A1))], K2: [str(net(A2))]})

    def test_one_operation_at_a_time(self) -> None:
        """While the device works on one peer, new events wait; the running pass picks them up."""
        self.device.hold = []
        self.sync.attach(self.device)
        self.sync.binding_changed(binding("a"))
        self.sync.binding_changed(binding("b", K2, A2))
        self.assertEqual(len(self.device.hold), 1)
        first: Deferred[None] = self.device.hold.pop()
        first.callback(None)
        self.assertEqual(len(self.device.hold), 1)
        self.device.hold.pop().callback(None)
        self.assertEqual(set(self.device.state), {K1, K2})

    def test_reattach_rebuilds(self) -> None:
        """A fresh device (a restart, a restarted wireguard-go) gets every peer again; a
        detached device gets nothing more."""
        self.sync.attach(self.device)
        self.sync.load([binding("a"), binding("b", K2, A2)])
        self.sync.detach()
        self.sync.binding_changed(binding("c", K3, "fd00:1:2:3:cccc::3/64"))
        fresh = FakeDevice()
        self.sync.attach(fresh)
        self.assertEqual(set(fresh.state), {K1, K2, K3})
        self.assertNotIn(K3, self.device.state)
