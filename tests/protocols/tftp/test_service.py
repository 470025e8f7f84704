"""The tftp service: naming, binding, and surviving a port it cannot bind."""

from __future__ import annotations

import socket
from typing import Any

from twisted.application.service import IService
from twisted.internet import reactor as global_reactor
from twisted.internet.error import CannotListenError
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sidero.protocols.tftp.protocol import TFTPProtocol
from sidero.protocols.tftp.service import TFTPListener, make_tftp_service

from .fakes import MemoryAssets


class RefusingReactor:
    """A reactor whose listenUDP always fails like a privileged port without root."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str]] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "") -> Any:
        self.calls.append((port, interface))
        raise CannotListenError(interface, port, PermissionError(13, "Permission denied"))

    def seconds(self) -> float:
        return 0.0

    def callLater(self, *a: Any, **kw: Any) -> Any:
        raise AssertionError("not expected")


class ServiceTests(SynchronousTestCase):
    """Composition and failure handling."""

    def test_named_tftp(self) -> None:
        """make_tftp_service returns an IService named tftp with a pool and a listener."""
        svc = make_tftp_service(RefusingReactor(), roots=[self.mktemp()], port=6969)
        self.assertTrue(IService.providedBy(svc))
        self.assertEqual(svc.name, "tftp")
        self.assertIsInstance(svc.getServiceNamed("tftp-udp"), TFTPListener)  # type: ignore[attr-defined]
        self.assertIsNotNone(svc.getServiceNamed("threads-tftp-io"))  # type: ignore[attr-defined]

    def test_bind_failure_is_one_log_line(self) -> None:
        """A bind failure logs one clear error and does not raise out of start-up."""
        fake = RefusingReactor()
        listener = TFTPListener(fake, TFTPProtocol(MemoryAssets(), clock=fake), 69, "")  # type: ignore[arg-type]
        with capturedLogs() as events:
            listener.privilegedStartService()
            listener.startService()
        errors = [e for e in events if e["log_level"].name == "error"]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["port"], 69)
        self.assertIn("Permission denied", errors[0]["error"])
        self.assertEqual(fake.calls, [(69, "")])  # not retried by startService
        self.assertTrue(listener.running)
        self.assertIsNone(listener.stopService())


class RealBindTests(TestCase):
    """Binding on loopback with the real reactor."""

    def test_port_in_use_keeps_process_running(self) -> None:
        """A port already taken leaves the service down but the rest of the process up."""
        taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        taken.bind(("127.0.0.1", 0))
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        svc = make_tftp_service(global_reactor, roots=[self.mktemp()], port=port,
                                interface="127.0.0.1")
        with capturedLogs() as events:
            svc.privilegedStartService()
            svc.startService()
        self.addCleanup(svc.stopService)
        listener = svc.getServiceNamed("tftp-udp")  # type: ignore[attr-defined]
        self.assertIsNone(listener.listening)
        self.assertIn("Address already in use", listener.bind_error)
        self.assertEqual(len([e for e in events if e["log_level"].name == "error"]), 1)

    def test_binds_and_stops(self) -> None:
        """On a free port the listener binds, and stopping releases the port."""
        svc = make_tftp_service(global_reactor, roots=[self.mktemp()], port=0,
                                interface="127.0.0.1")
        svc.privilegedStartService()
        svc.startService()
        listener = svc.getServiceNamed("tftp-udp")  # type: ignore[attr-defined]
        self.assertIsNotNone(listener.listening)
        self.assertGreater(listener.listening.getHost().port, 0)
        return svc.stopService()
