"""Tests for the dhcp-proxy service: interface selection, binding, failing softly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from twisted.application.service import IService, MultiService
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from sidero.protocols.dhcp import codec
from sidero.protocols.dhcp.interfaces import (
    InterfaceAddress,
    InterfaceSelectionError,
    netlink_ipv4_addresses,
    resolve_ipv4,
    select_interface,
)
from sidero.protocols.dhcp.protocol import DHCPProxyProtocol
from sidero.protocols.dhcp.service import DHCPProxyService, make_dhcp_proxy_service
from tests.netlab import NetLab
from tests.paths import REPO, tree_env
from tests.ports import free_udp_port
from tests.protocols.dhcp import packets as p

ADDRS = [InterfaceAddress("lo", "127.0.0.1"), InterfaceAddress("eth0", "10.213.0.2"),
         InterfaceAddress("eth1", "10.99.0.1")]


class SocketRecorder:
    """Hands out real (unbound) sockets and records what was asked, or fails on demand."""

    def __init__(self, fail_port: int | None = None) -> None:
        self.calls: list[tuple[str, int]] = []
        self.sockets: list[socket.socket] = []
        self.fail_port = fail_port

    def __call__(self, interface: str, port: int) -> socket.socket:
        self.calls.append((interface, port))
        if port == self.fail_port:
            raise PermissionError(13, "Permission denied")
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sockets.append(s)
        return s


def make(interface: str | None = None, endpoint: str = "10.213.0.2",
         opener: SocketRecorder | None = None) -> tuple[DHCPProxyService, MemoryReactorClock,
                                                        SocketRecorder]:
    reactor = MemoryReactorClock()
    opener = opener or SocketRecorder()
    svc = make_dhcp_proxy_service(
        reactor, endpoint=endpoint, api_port=8081, interface=interface,
        read_addresses=lambda: ADDRS, open_socket=opener)
    assert isinstance(svc, DHCPProxyService)
    return svc, reactor, opener


class SelectionTests(SynchronousTestCase):
    """Choosing the interface (spec 3.5)."""

    def test_owner_of_endpoint_ip(self) -> None:
        """Without --interface, the interface owning the endpoint IP is chosen."""
        self.assertEqual(select_interface("10.213.0.2", None, lambda: ADDRS), "eth0")

    def test_explicit_interface(self) -> None:
        """A given interface wins, even if it does not own the endpoint IP."""
        self.assertEqual(select_interface("10.213.0.2", "eth1", lambda: ADDRS), "eth1")

    def test_several_interfaces_each_with_its_address(self) -> None:
        """A multi-homed host answers each network with its own address (the endpoint's
        where the interface owns it)."""
        from sidero.protocols.dhcp.interfaces import select_interfaces

        self.assertEqual(select_interfaces("10.213.0.2", None, lambda: ADDRS),
                         [("eth0", "10.213.0.2")])
        self.assertEqual(select_interfaces("10.213.0.2", "eth0,eth1", lambda: ADDRS),
                         [("eth0", "10.213.0.2"), ("eth1", "10.99.0.1")])
        self.assertEqual(select_interfaces("10.213.0.2", "*", lambda: ADDRS),
                         [("eth0", "10.213.0.2"), ("eth1", "10.99.0.1")])
        self.assertRaises(InterfaceSelectionError, select_interfaces, "10.213.0.2", "eth0,eth9",
                          lambda: ADDRS)

    def test_no_owner(self) -> None:
        """No owner: the error says what to pass."""
        e = self.assertRaises(InterfaceSelectionError, select_interface, "192.0.2.9", None,
                              lambda: ADDRS)
        self.assertIn("--dhcp-interface", str(e))
        self.assertIn("eth0=10.213.0.2", str(e))

    def test_unknown_interface(self) -> None:
        """A named interface that does not exist is refused."""
        self.assertRaises(InterfaceSelectionError, select_interface, "10.213.0.2", "wlan9",
                          lambda: ADDRS)

    def test_resolve_literal_and_ipv6(self) -> None:
        """IPv4 literals pass through; IPv6 endpoints are refused for DHCPv4."""
        self.assertEqual(resolve_ipv4("10.1.2.3"), "10.1.2.3")
        self.assertRaises(InterfaceSelectionError, resolve_ipv4, "[fd00::1]")

    def test_resolve_name(self) -> None:
        """A host name resolves to its first IPv4 address."""
        self.assertEqual(resolve_ipv4("localhost"), "127.0.0.1")

    def test_netlink_reads_loopback(self) -> None:
        """The netlink reader sees this namespace's loopback address."""
        self.assertIn(InterfaceAddress("lo", "127.0.0.1"), netlink_ipv4_addresses())


class ServiceTests(SynchronousTestCase):
    """Binding and lifecycle."""

    def test_named_multiservice(self) -> None:
        """The service is a MultiService named dhcp-proxy providing IService."""
        svc, _, _ = make()
        self.assertIsInstance(svc, MultiService)
        self.assertEqual(svc.name, "dhcp-proxy")
        self.assertTrue(verifyObject(IService, svc))

    def test_binds_in_privileged_start(self) -> None:
        """Ports 67 and 4011 are bound on the chosen interface in privilegedStartService."""
        svc, reactor, opener = make()
        svc.privilegedStartService()
        self.assertEqual(opener.calls, [("eth0", 67), ("eth0", 4011)])
        protos = [entry[2] for entry in reactor.adoptedPorts]
        self.assertEqual([type(x) for x in protos], [DHCPProxyProtocol] * 2)
        self.assertEqual([x.proxy_port for x in protos], [False, True])
        self.assertTrue(all(s.fileno() == -1 for s in opener.sockets))  # originals closed
        svc.startService()
        self.assertTrue(svc.running)
        self.assertEqual(opener.calls, [("eth0", 67), ("eth0", 4011)])  # not bound twice
        self.assertEqual(svc.interface, "eth0")

    def test_each_interface_answers_with_its_address(self) -> None:
        """Sockets per interface; each protocol's siaddr and HTTP-boot URLs are its own address."""
        svc, reactor, opener = make(interface="eth0,eth1")
        svc.privilegedStartService()
        self.assertEqual(opener.calls, [("eth0", 67), ("eth0", 4011), ("eth1", 67), ("eth1", 4011)])
        protos = [entry[2] for entry in reactor.adoptedPorts]
        self.assertEqual([x.config.server_ip for x in protos],
                         ["10.213.0.2", "10.213.0.2", "10.99.0.1", "10.99.0.1"])
        self.assertEqual(svc.configs["eth1"].http_url("tftp/snp.efi"),
                         "http://10.99.0.1:8081/tftp/snp.efi")
        # The endpoint may be a name: URLs carry the address, as Go's serverIP.
        named = DHCPProxyService(MemoryReactorClock(), endpoint="sidero.lab", api_port=8081,
                                 interface=None, read_addresses=lambda: ADDRS,
                                 open_socket=SocketRecorder(), resolve=lambda _: "10.213.0.2")
        named.startService()
        self.assertEqual(named.configs["eth0"].http_url("boot.ipxe"), "http://10.213.0.2:8081/boot.ipxe")

    def test_fatal_failures_as_root(self) -> None:
        """With fatal (root), no interface or a port that cannot be bound stops start-up with
        one line, and nothing stays bound."""
        from sidero.protocols.dhcp.service import DHCPProxyStartError

        for kwargs in ({"endpoint": "192.0.2.9"}, {"opener": SocketRecorder(fail_port=4011)}):
            reactor = MemoryReactorClock()
            svc = make_dhcp_proxy_service(
                reactor, endpoint=kwargs.get("endpoint", "10.213.0.2"), api_port=8081,  # type: ignore[arg-type]
                interface=None, read_addresses=lambda: ADDRS,
                open_socket=kwargs.get("opener", SocketRecorder()), fatal=True)
            with self.assertRaises(DHCPProxyStartError) as caught:
                svc.privilegedStartService()
            self.assertNotIn("\n", str(caught.exception))
            self.assertIn("--disable-dhcp-proxy", str(caught.exception))
            self.assertFalse(svc.running)
            self.assertEqual(svc._ports, [])  # type: ignore[attr-defined]

    def test_start_without_privileged_start(self) -> None:
        """startService alone binds too (service added to a running parent)."""
        svc, reactor, _ = make()
        svc.startService()
        self.assertEqual(len(reactor.adoptedPorts), 2)
        self.assertTrue(svc.running)

    def test_proxy_port_optional(self) -> None:
        """proxy_port=None binds only :67."""
        reactor = MemoryReactorClock()
        opener = SocketRecorder()
        svc = DHCPProxyService(reactor, endpoint="10.213.0.2", api_port=1, interface=None,
                               proxy_port=None, read_addresses=lambda: ADDRS, open_socket=opener)
        svc.startService()
        self.assertEqual(opener.calls, [("eth0", 67)])

    def test_no_interface_stays_stopped(self) -> None:
        """No matching interface: one error line, not running, nothing raised or bound."""
        svc, reactor, opener = make(endpoint="192.0.2.9")
        with capturedLogs() as events:
            svc.privilegedStartService()
            svc.startService()
        self.assertFalse(svc.running)
        self.assertEqual(reactor.adoptedPorts, [])
        errors = [e for e in events if e["log_level"] >= LogLevel.warn]
        self.assertEqual(len(errors), 1)
        self.assertIn("192.0.2.9", errors[0]["reason"])
        self.assertIn("192.0.2.9", svc.failure or "")
        self.successResultOf(svc.stopService())

    def test_bind_failure_stays_stopped(self) -> None:
        """A bind failure on 4011 closes the :67 port and stays stopped with a clear reason."""
        svc, reactor, _ = make(opener=SocketRecorder(fail_port=4011))
        with capturedLogs() as events:
            svc.privilegedStartService()
            svc.startService()
        self.assertFalse(svc.running)
        self.assertIn("4011", svc.failure or "")
        self.assertIn("--disable-dhcp-proxy", svc.failure or "")
        self.assertEqual(len([e for e in events if e["log_level"] == LogLevel.error]), 1)
        self.assertEqual(len(reactor.adoptedPorts), 1)  # :67 was adopted...
        self.assertEqual(svc._ports, [])  # ...and not kept

    def test_unexpected_error_contained(self) -> None:
        """Even an unexpected exception from the address reader does not escape."""
        reactor = MemoryReactorClock()

        def boom() -> list[InterfaceAddress]:
            raise RuntimeError("netlink exploded")

        svc = DHCPProxyService(reactor, endpoint="10.213.0.2", api_port=1, interface=None,
                               read_addresses=boom)
        with capturedLogs():
            svc.startService()
        self.assertFalse(svc.running)
        self.assertIn("netlink exploded", svc.failure or "")

    def test_stop(self) -> None:
        """stopService stops listening and leaves the service stopped."""
        svc, _, _ = make()
        svc.startService()
        self.successResultOf(svc.stopService())
        self.assertFalse(svc.running)
        self.assertEqual(svc._ports, [])

    def test_shared_counters(self) -> None:
        """Both ports count into the service's one counters object."""
        svc, reactor, _ = make()
        svc.startService()
        protos = [entry[2] for entry in reactor.adoptedPorts]
        for proto in protos:
            proto.datagramReceived(b"junk", ("10.0.0.1", 68))
        self.assertEqual(svc.counters.malformed, 2)


class RealSocketTests(SynchronousTestCase):
    """The default socket opener, on loopback with an unprivileged port."""

    def test_open_bound_socket(self) -> None:
        """The socket is bound to the device, broadcast-enabled and non-blocking."""
        from sidero.protocols.dhcp.service import SO_BINDTODEVICE, open_bound_socket

        try:
            s = open_bound_socket("lo", 0)
        except PermissionError:
            raise self.skipTest("SO_BINDTODEVICE needs CAP_NET_RAW (not root)") from None
        try:
            self.assertEqual(s.getsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST), 1)
            self.assertEqual(s.getsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, 16).rstrip(b"\0"),
                             b"lo")
            self.assertFalse(s.getblocking())
        finally:
            s.close()


class RunnerTests(SynchronousTestCase):
    """The ``python -m sidero.protocols.dhcp`` runner as a real process on loopback."""

    def spawn(self, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = Path(self.mktemp())
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sidero.protocols.dhcp", *args], stdout=out,
                stderr=subprocess.STDOUT, cwd=REPO,
                env=tree_env(PYTHONUNBUFFERED="1"))

        def cleanup() -> None:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)

        self.addCleanup(cleanup)
        return proc, log

    def test_no_interface_keeps_running(self) -> None:
        """An endpoint no interface owns: one clear line, the process stays up, exits cleanly."""
        proc, log = self.spawn("--endpoint", "192.0.2.77", "--dhcp-port", "0", "--proxy-port", "0")
        NetLab.wait_for(log, "DHCP proxy NOT started", 20, proc)
        time.sleep(0.3)
        self.assertIsNone(proc.poll())
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(10), 0)
        text = log.read_text()
        self.assertEqual(text.count("NOT started"), 1)
        self.assertIn("--dhcp-interface", text)
        self.assertIn('"failure": "no local interface owns the API endpoint address', text)

    def test_answers_on_loopback(self) -> None:
        """The runner bound to lo ACKs a :4011-style REQUEST sent to its proxy port."""
        if os.geteuid() != 0:
            raise self.skipTest("SO_BINDTODEVICE needs root/CAP_NET_RAW: runner not exercised")
        port = free_udp_port()
        proc, log = self.spawn("--endpoint", "127.0.0.1", "--interface", "lo",
                               "--dhcp-port", str(free_udp_port()), "--proxy-port", str(port))
        NetLab.wait_for(log, "DHCP proxy listening on lo", 20, proc)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.bind(("127.0.0.1", 0))
            s.sendto(p.EDK2_PROXY_REQUEST, ("127.0.0.1", port))
            data, _addr = s.recvfrom(2048)
        ack = codec.decode(data)
        self.assertEqual(ack.message_type, codec.DHCPACK)
        self.assertEqual(ack.siaddr, "127.0.0.1")
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(10), 0)
        self.assertIn('"acks": 1', log.read_text())
