"""sd_notify: messages on a real unix datagram socket standing in for systemd's NOTIFY_SOCKET."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from twisted.internet import reactor as global_reactor
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sidero import tap
from sidero.health import CheckResult, HealthChecks
from sidero.systemd import (
    Notifier,
    SystemdNotifierService,
    make_notifier_service,
    watchdog_interval,
)
from tests.paths import RUN_SIDERO
from tests.ports import free_tcp_port, free_udp_port
from tests.service.test_tap import settings_for


def _api_ports(port: int) -> dict[str, str]:
    """The API port and the HTTP port it binds (no longer the same setting)."""
    return {"api_port": str(port), "http_port": str(port)}


class NotifySocket:
    """A bound AF_UNIX datagram socket, as systemd's notify socket is."""

    def __init__(self, abstract: bool = False) -> None:
        self.dir = tempfile.mkdtemp(prefix="sdn-")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"sidero-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.address = os.path.join(self.dir, "notify")
            self.sock.bind(self.address)
        self.sock.settimeout(0)

    def messages(self) -> list[dict[str, str]]:
        """Every datagram received so far, each as its KEY=value fields."""
        found = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return found
            found.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def wait_for(self, key: str, timeout: float = 60.0) -> tuple[dict[str, str], list[dict[str, str]]]:
        """Block (in a thread) until a message with C{key} arrives; return it and all seen."""
        seen: list[dict[str, str]] = []
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.2)
        try:
            while time.monotonic() < deadline:
                try:
                    data = self.sock.recv(4096)
                except TimeoutError:
                    continue
                message = dict(line.split("=", 1) for line in data.decode().splitlines())
                seen.append(message)
                if key in message:
                    return message, seen
        finally:
            self.sock.settimeout(0)
        raise AssertionError(f"no {key} notification within {timeout}s; got {seen}")

    def close(self) -> None:
        self.sock.close()
        if os.path.exists(os.path.join(self.dir, "notify")):
            os.unlink(os.path.join(self.dir, "notify"))
        os.rmdir(self.dir)


class NotifierTests(SynchronousTestCase):
    """The sender: paths, abstract names, bad values, a missing socket."""

    def test_path_socket(self) -> None:
        """Fields arrive as KEY=value lines in one datagram."""
        ns = NotifySocket()
        self.addCleanup(ns.close)
        n = Notifier(ns.address)
        self.addCleanup(n.close)
        self.assertTrue(n.send(READY="1", STATUS="ready"))
        self.assertEqual(ns.messages(), [{"READY": "1", "STATUS": "ready"}])

    def test_abstract_socket(self) -> None:
        """A leading @ names an abstract socket."""
        ns = NotifySocket(abstract=True)
        self.addCleanup(ns.close)
        n = Notifier(ns.address)
        self.addCleanup(n.close)
        n.send(WATCHDOG="1")
        self.assertEqual(ns.messages(), [{"WATCHDOG": "1"}])

    def test_missing_socket_is_not_fatal(self) -> None:
        """Sending to a socket nobody listens on returns False and does not raise."""
        n = Notifier(os.path.join(tempfile.mkdtemp(), "gone"))
        self.addCleanup(n.close)
        self.assertFalse(n.send(READY="1"))

    def test_bad_address(self) -> None:
        """A NOTIFY_SOCKET that is neither a path nor abstract is refused (at start-up)."""
        self.assertRaises(ValueError, Notifier, "vsock:2:1234")
        self.assertIsNone(make_notifier_service(Clock(), HealthChecks(Clock()), environ={}))

    def test_watchdog_interval(self) -> None:
        """Half WATCHDOG_USEC, only for the named pid, nothing when unset or bad."""
        self.assertEqual(watchdog_interval({"WATCHDOG_USEC": "30000000"}, 7), 15.0)
        self.assertEqual(watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 7), 15.0)
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"}, 7))
        self.assertIsNone(watchdog_interval({}, 7))
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "soon"}, 7))
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "0"}, 7))


class NotifierServiceTests(SynchronousTestCase):
    """READY once ready, STATUS meanwhile, WATCHDOG only while healthy, STOPPING at the end."""

    def setUp(self) -> None:
        self.ns = NotifySocket()
        self.addCleanup(self.ns.close)
        self.clock = Clock()
        self.state = {"ready": False, "healthy": True}
        checks = HealthChecks(self.clock)
        checks.add("readyz", "informers", lambda: CheckResult(self.state["ready"], "caches not synced"))
        checks.add("healthz", "ipxe", lambda: CheckResult(self.state["healthy"], "HTTP 500"))
        notifier = Notifier(self.ns.address)
        self.addCleanup(notifier.close)
        self.service = SystemdNotifierService(self.clock, notifier, checks, watchdog=15.0)

    def test_ready_after_checks_pass(self) -> None:
        """Not ready: one STATUS naming the wait; then READY=1 with MAINPID, sent once."""
        self.service.startService()
        self.clock.advance(1)
        self.clock.advance(1)
        messages = self.ns.messages()
        self.assertIn({"STATUS": "starting: informers: caches not synced"}, messages)
        self.assertEqual(sum(1 for m in messages if "STATUS" in m), 1)  # said once, not per poll
        self.assertFalse(any("READY" in m for m in messages))
        self.state["ready"] = True
        self.clock.advance(1)
        self.clock.advance(5)
        ready = [m for m in self.ns.messages() if "READY" in m]
        self.assertEqual(ready, [{"READY": "1", "STATUS": "ready", "MAINPID": str(os.getpid())}])
        self.assertTrue(self.service.ready_sent)

    def test_watchdog_only_while_healthy(self) -> None:
        """WATCHDOG=1 every interval while healthz passes; none while it fails."""
        self.service.startService()
        self.assertIn({"WATCHDOG": "1"}, self.ns.messages())
        self.state["healthy"] = False
        self.clock.advance(15)
        self.clock.advance(15)
        messages = self.ns.messages()
        self.assertNotIn({"WATCHDOG": "1"}, messages)
        self.assertIn({"STATUS": "unhealthy: ipxe: HTTP 500"}, messages)
        self.state["healthy"] = True
        self.clock.advance(15)
        self.assertIn({"WATCHDOG": "1"}, self.ns.messages())

    def test_stopping(self) -> None:
        """Stopping sends STOPPING=1 and ends both loops."""
        self.service.startService()
        self.ns.messages()
        self.service.stopService()
        self.assertEqual(self.ns.messages(), [{"STOPPING": "1", "STATUS": "stopping"}])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ServiceTreeNotifyTests(TestCase):
    """The real tree with NOTIFY_SOCKET set: READY=1 once ready, watchdog pings."""

    timeout = 120

    def start_tree(self, environ: dict[str, str], *flags: str) -> tap.SideroService:
        self.patch(os, "environ", {**os.environ, **environ})
        settings = settings_for(
            os.path.abspath(self.mktemp()), "disable_dhcp_proxy", *flags,
            **_api_ports(free_tcp_port()), metrics_port=str(free_tcp_port()),
            health_port=str(free_tcp_port()), tftp_port=str(free_udp_port()),
            listen_address="127.0.0.1",
        )
        root = tap.build_service(settings, global_reactor)
        root.exit_on_start_failure = False
        root.startService()
        self.addCleanup(root.stopService)
        return root

    async def test_ready_and_watchdog(self) -> None:
        """READY=1 arrives after start; WATCHDOG=1 follows at half WATCHDOG_USEC."""
        ns = NotifySocket()
        self.addCleanup(ns.close)
        root = self.start_tree({"NOTIFY_SOCKET": ns.address, "WATCHDOG_USEC": "400000"})
        self.assertEqual([c.name for c in root][-1], "systemd")
        await root.when_started()
        ready, _ = await deferToThread(ns.wait_for, "READY")
        self.assertEqual(ready["STATUS"], "ready")
        self.assertTrue(root.getServiceNamed("systemd").ready_sent)
        await deferToThread(ns.wait_for, "WATCHDOG")
        await deferToThread(ns.wait_for, "WATCHDOG")

    async def test_ready_without_probe_port(self) -> None:
        """--disable-health turns off the probe port, not READY=1 (Type=notify needs it)."""
        ns = NotifySocket()
        self.addCleanup(ns.close)
        root = self.start_tree({"NOTIFY_SOCKET": ns.address}, "disable_health")
        self.assertNotIn("health", [c.name for c in root])
        await root.when_started()
        await deferToThread(ns.wait_for, "READY")

    async def test_no_socket_no_notifier(self) -> None:
        """Without NOTIFY_SOCKET there is no systemd child."""
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        self.patch(os, "environ", env)
        root = self.start_tree({})
        self.assertNotIn("systemd", [c.name for c in root])
        await root.when_started()


class TwistdProcessNotifyTests(TestCase):
    """The real C{twistd sidero} process notifies as systemd's Type=notify expects."""

    timeout = 120

    async def test_twistd_ready_and_stopping(self) -> None:
        """READY=1 with the process's own MAINPID, then STOPPING=1 on SIGTERM and a clean exit
        (twistd re-raises the signal it stopped on; systemd counts SIGTERM as success)."""
        ns = NotifySocket()
        self.addCleanup(ns.close)
        state = os.path.abspath(self.mktemp())
        env = {**os.environ, "NOTIFY_SOCKET": ns.address, "WATCHDOG_USEC": "2000000"}
        env.pop("WATCHDOG_PID", None)
        proc = subprocess.Popen(
            [sys.executable, str(RUN_SIDERO), "--api-endpoint", "127.0.0.1", "--state-dir", state,
             "--listen-address", "127.0.0.1", "--api-port", str(free_tcp_port()),
             "--metrics-port", str(free_tcp_port()), "--health-port", str(free_tcp_port()),
             "--dashboard-port", str(free_tcp_port()), "--tftp-port", str(free_udp_port()), "--disable-dhcp-proxy",
             "--management-socket", os.path.join(ns.dir, "m.sock"),
             "--talos-assets-url", "http://127.0.0.1:1"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )

        def reap() -> None:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()

        self.addCleanup(reap)
        ready, _ = await deferToThread(ns.wait_for, "READY", 90.0)
        self.assertEqual(ready["MAINPID"], str(proc.pid))
        await deferToThread(ns.wait_for, "WATCHDOG", 10.0)
        proc.send_signal(signal.SIGTERM)
        await deferToThread(ns.wait_for, "STOPPING", 30.0)
        rc = await deferToThread(proc.wait, 60)
        assert proc.stdout is not None
        output = proc.stdout.read().decode(errors="replace")
        self.assertIn(rc, (0, -signal.SIGTERM), output[-3000:])
        self.assertNotIn("Traceback", output)
