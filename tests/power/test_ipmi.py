"""IPMI manager: request bytes, the boot-options sequence, per-BMC serialisation, time limits."""

from __future__ import annotations

from typing import Any

from pyghmi.exceptions import IpmiException
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from sidero.power.interfaces import (
    BMCCommandError,
    BMCConnectionError,
    ConfigurationError,
    IPowerManager,
    UnsupportedPXEMode,
)
from sidero.power.ipmi import (
    BMCEndpoint,
    IPMIExecutor,
    IPMIPowerManager,
    PyghmiSession,
    chassis_power_is_on,
    make_endpoint,
    set_boot_pxe,
)
from sidero.threads import CallTimeout
from tests.power.helpers import ManualPool, RecordingSession, inline_run

A = BMCEndpoint("10.0.0.1", 623, "admin", "secret")
B = BMCEndpoint("10.0.0.2", 623, "admin", "secret")


class EndpointTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """Port 0 becomes 623 and an empty interface becomes lanplus (spec §1.1, §0.3)."""
        e = make_endpoint("bmc.example", 0, "u", "p", "")
        self.assertEqual((e.port, e.interface), (623, "lanplus"))
        self.assertEqual(make_endpoint("h", None, "u", "p", None).port, 623)

    def test_explicit_values_kept(self) -> None:
        """A given port and the lan interface are kept."""
        e = make_endpoint("h", 9623, "u", "p", "lan")
        self.assertEqual((e.port, e.interface, e.key), (9623, "lan", ("h", 9623)))

    def test_unsupported_interface(self) -> None:
        """An interface we cannot speak from the controller is refused with a clear message."""
        e = self.assertRaises(ConfigurationError, make_endpoint, "h", 0, "u", "p", "open")
        self.assertEqual(str(e), 'unsupported IPMI interface "open" (supported: lanplus, lan)')

    def test_bad_host_or_port(self) -> None:
        """An empty endpoint or a port beyond 65535 is refused."""
        self.assertRaises(ConfigurationError, make_endpoint, "", 0, "u", "p", "")
        self.assertRaises(ConfigurationError, make_endpoint, "h", 70000, "u", "p", "")

    def test_password_not_in_repr(self) -> None:
        """The password never shows in the endpoint's repr (which reaches logs)."""
        self.assertNotIn("secret", repr(A))
        self.assertNotIn("secret", repr(IPMIPowerManager(A, IPMIExecutor(Clock(), inline_run))))


class RequestTests(SynchronousTestCase):
    def test_power_state_bit(self) -> None:
        """Chassis status byte 0 bit 0 is the power state; other bits do not matter."""
        for data, on in ((b"\x01\x00\x00", True), (b"\x00\x00\x00", False), (b"\x40", False),
                         (b"\x61\x10", True)):
            s = RecordingSession({(0, 1, None): data})
            self.assertIs(chassis_power_is_on(s), on)
            self.assertEqual(s.requests, [(0x00, 0x01, ())])

    def test_empty_status_is_an_error(self) -> None:
        """A status response without data is an error, not "off"."""
        self.assertRaises(BMCCommandError, chassis_power_is_on, RecordingSession({(0, 1, None): b""}))

    def test_uefi_sequence_with_progress(self) -> None:
        """UEFI: set-in-progress, ack, flags 0xA0 + PXE device, commit, complete (Sidero's order)."""
        s = RecordingSession()
        set_boot_pxe(s, "uefi")
        self.assertEqual(s.requests, [
            (0, 8, (0x00, 0x01)), (0, 8, (0x04, 0x01, 0x01)),
            (0, 8, (0x05, 0xA0, 0x04, 0, 0, 0)), (0, 8, (0x00, 0x02)), (0, 8, (0x00, 0x00)),
        ])

    def test_bios_flags(self) -> None:
        """BIOS sets only the valid bit (next boot only, no EFI)."""
        s = RecordingSession()
        set_boot_pxe(s, "bios")
        self.assertIn((0, 8, (0x05, 0x80, 0x04, 0, 0, 0)), s.requests)

    def test_no_progress_flags_when_refused(self) -> None:
        """A BMC refusing set-in-progress (ipmi_sim) gets ack and flags only, no commit/complete."""
        s = RecordingSession({(0, 8, 0x00): 0xCC})
        set_boot_pxe(s, "uefi")
        self.assertEqual(s.requests, [
            (0, 8, (0x00, 0x01)), (0, 8, (0x04, 0x01, 0x01)), (0, 8, (0x05, 0xA0, 0x04, 0, 0, 0)),
        ])

    def test_ack_failure_aborts(self) -> None:
        """A failed boot-info ack resets the progress flag and fails before touching the flags."""
        s = RecordingSession({(0, 8, 0x04): 0xC1})
        e = self.assertRaises(BMCCommandError, set_boot_pxe, s, "uefi")
        self.assertEqual(e.code, 0xC1)
        self.assertEqual(s.requests, [
            (0, 8, (0x00, 0x01)), (0, 8, (0x04, 0x01, 0x01)), (0, 8, (0x00, 0x00)),
        ])

    def test_flags_failure_completes_without_commit(self) -> None:
        """A failed flags write is reported; the set is completed but not committed."""
        s = RecordingSession({(0, 8, 0x05): 0xCC})
        self.assertRaises(BMCCommandError, set_boot_pxe, s, "bios")
        self.assertEqual(s.requests[-1], (0, 8, (0x00, 0x00)))
        self.assertNotIn((0, 8, (0x00, 0x02)), s.requests)

    def test_unsupported_mode_sends_nothing(self) -> None:
        """An unknown mode fails with Sidero's message before any request."""
        s = RecordingSession()
        e = self.assertRaises(UnsupportedPXEMode, set_boot_pxe, s, "efi")
        self.assertEqual(str(e), 'unsupported mode "efi"')
        self.assertEqual(s.requests, [])


class ManagerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.sessions: list[RecordingSession] = []
        self.answers: dict[tuple[int, int, int | None], bytes | int] = {(0, 1, None): b"\x01\x00\x00"}
        self.executor = IPMIExecutor(Clock(), inline_run, self.connect)
        self.manager = IPMIPowerManager(A, self.executor)

    def connect(self, endpoint: BMCEndpoint) -> RecordingSession:
        self.assertEqual(endpoint, A)
        s = RecordingSession(self.answers)
        self.sessions.append(s)
        return s

    def test_provides_interface(self) -> None:
        """The IPMI manager provides IPowerManager and is not fake."""
        verifyObject(IPowerManager, self.manager)
        self.assertEqual((self.manager.kind, self.manager.is_fake), ("ipmi", False))

    def test_chassis_control_bytes(self) -> None:
        """on/off/cycle send Chassis Control 0x01/0x00/0x02, each in its own closed session."""
        self.successResultOf(self.manager.power_on())
        self.successResultOf(self.manager.power_off())
        self.successResultOf(self.manager.power_cycle())
        self.assertEqual([s.requests for s in self.sessions],
                         [[(0, 2, (1,))], [(0, 2, (0,))], [(0, 2, (2,))]])
        self.assertTrue(all(s.closed for s in self.sessions))

    def test_status(self) -> None:
        """is_powered_on reads the chassis status."""
        self.assertIs(self.successResultOf(self.manager.is_powered_on()), True)

    def test_command_error_propagates_and_session_closed(self) -> None:
        """A completion-code error reaches the caller and the session is still logged out."""
        self.answers[(0, 2, None)] = 0xD5
        f = self.failureResultOf(self.manager.power_cycle(), BMCCommandError)
        self.assertEqual(f.value.code, 0xD5)
        self.assertTrue(self.sessions[0].closed)

    def test_set_pxe_unsupported_mode(self) -> None:
        """set_pxe with an unknown mode fails without opening a session."""
        self.failureResultOf(self.manager.set_pxe("netboot"), UnsupportedPXEMode)
        self.assertEqual(self.sessions, [])

    def test_connect_failure(self) -> None:
        """A failure to log in reaches the caller as a BMCConnectionError, and the lock is freed."""
        def refuse(endpoint: BMCEndpoint) -> RecordingSession:
            raise BMCConnectionError("IPMI session with 10.0.0.1:623 failed: Incorrect password provided")

        manager = IPMIPowerManager(A, IPMIExecutor(Clock(), inline_run, refuse))
        f = self.failureResultOf(manager.power_on(), BMCConnectionError)
        self.assertIn("Incorrect password", f.getErrorMessage())
        self.assertEqual(len(manager.executor.locks), 0)


class SerialisationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = ManualPool()
        self.active: dict[str, int] = {}
        self.max_active: dict[str, int] = {}
        self.executor = IPMIExecutor(self.clock, self.pool.run, self.connect, timeout=30)

    def connect(self, endpoint: BMCEndpoint) -> RecordingSession:
        return RecordingSession({(0, 1, None): b"\x00"})

    def submit(self, endpoint: BMCEndpoint, tag: str) -> Any:
        return self.executor.submit(endpoint, tag, lambda s: tag)

    def test_one_operation_at_a_time_per_bmc(self) -> None:
        """Two operations on one BMC never run together: the second starts when the first ends."""
        first, second = self.submit(A, "first"), self.submit(A, "second")
        self.assertEqual(len(self.pool.pending), 1)
        self.assertNoResult(second)
        self.pool.complete()
        self.assertEqual(self.successResultOf(first), "first")
        self.assertEqual(len(self.pool.pending), 1)
        self.pool.complete()
        self.assertEqual(self.successResultOf(second), "second")
        self.assertEqual(len(self.executor.locks), 0)

    def test_different_bmcs_run_in_parallel(self) -> None:
        """Operations on two BMCs are both handed to the pool at once."""
        a, b = self.submit(A, "a"), self.submit(B, "b")
        self.assertEqual(len(self.pool.pending), 2)
        self.pool.complete(1)
        self.assertEqual(self.successResultOf(b), "b")
        self.assertNoResult(a)

    def test_same_host_other_port_is_another_bmc(self) -> None:
        """The lock is per host and port, as pyghmi keys its sessions."""
        self.submit(A, "a")
        self.submit(BMCEndpoint(A.host, 6230, "admin", "secret"), "a2")
        self.assertEqual(len(self.pool.pending), 2)

    def test_order_is_kept(self) -> None:
        """Queued operations on one BMC run in the order they were asked for."""
        results = [self.submit(A, str(i)) for i in range(4)]
        for _ in range(4):
            self.pool.complete()
        self.assertEqual([self.successResultOf(d) for d in results], ["0", "1", "2", "3"])

    def test_hung_call_times_out_without_blocking_others(self) -> None:
        """A hung call fails with CallTimeout at its limit; another BMC meanwhile works normally."""
        hung = self.submit(A, "hung")
        self.clock.advance(10)
        other = self.submit(B, "other")
        self.pool.complete(1)
        self.assertEqual(self.successResultOf(other), "other")
        self.assertNoResult(hung)
        self.clock.advance(20)
        f = self.failureResultOf(hung, CallTimeout)
        self.assertEqual(f.value.name, "IPMI hung on 10.0.0.1:623")
        self.assertEqual(f.value.seconds, 30)

    def test_waiter_behind_hung_call_times_out_and_never_runs(self) -> None:
        """An operation queued behind a hung call times out too and is withdrawn: it never runs
        later, and the BMC's lock is kept until the hung thread really returns."""
        with capturedLogs() as events:
            hung = self.submit(A, "hung")
            self.clock.advance(5)
            queued = self.submit(A, "queued")
            self.clock.advance(25)
            self.failureResultOf(hung, CallTimeout)
            self.clock.advance(5)
            self.failureResultOf(queued, CallTimeout)
            self.assertEqual(self.pool.started, 1)
            late = self.submit(A, "late")  # while the hung thread still holds the BMC
            self.assertEqual(self.pool.started, 1)
            self.pool.complete()  # the hung thread finally returns
        self.assertEqual(self.pool.started, 2)  # only "late" runs, "queued" was withdrawn
        self.pool.complete()
        self.assertEqual(self.successResultOf(late), "late")
        self.assertEqual(len(self.executor.locks), 0)
        self.assertEqual(sum(1 for e in events if "timed out" in e.get("log_format", "")), 2)

    def test_late_failure_is_logged_not_lost(self) -> None:
        """A call failing after its caller gave up is logged, and frees the lock."""
        d = self.executor.submit(A, "boom", lambda s: 1 / 0)
        self.clock.advance(30)
        self.failureResultOf(d, CallTimeout)
        with capturedLogs() as events:
            self.pool.complete()
        self.assertTrue(any("after its caller gave up" in e.get("log_format", "") for e in events))
        self.assertEqual(len(self.executor.locks), 0)

    def test_runner_refusal_is_reported(self) -> None:
        """A pool that refuses work (stopped) fails the call at once and frees the lock."""
        def refuse(f: Any) -> Any:
            raise RuntimeError("pool stopped")

        executor = IPMIExecutor(self.clock, refuse, self.connect)
        self.failureResultOf(executor.submit(A, "x", lambda s: 1), RuntimeError)
        self.assertEqual(len(executor.locks), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class StubCommand:
    """Stands in for pyghmi's Command to check PyghmiSession's error mapping."""

    def __init__(self, response: Any) -> None:
        self.response = response
        self.ipmi_session = self
        self.logged_out = False

    def raw_command(self, netfn: int, command: int, data: tuple[int, ...]) -> Any:
        if isinstance(self.response, Exception):
            raise self.response
        return self.response

    def logout(self) -> None:
        self.logged_out = True
        raise IpmiException("already gone")


class PyghmiSessionTests(SynchronousTestCase):
    def session(self, response: Any) -> PyghmiSession:
        s = PyghmiSession.__new__(PyghmiSession)
        s._endpoint = A
        s._key = (A.host, b"admin", b"secret", A.port, None)
        s._command = StubCommand(response)
        return s

    def test_data_returned(self) -> None:
        """A zero completion code returns the data bytes."""
        s = self.session({"code": 0, "data": bytearray(b"\x01\x02")})
        self.assertEqual(s.raw(0, 1), b"\x01\x02")

    def test_completion_code_mapped(self) -> None:
        """A non-zero completion code becomes BMCCommandError naming request, BMC and reason."""
        s = self.session({"code": 0xCC, "data": b"", "error": "Invalid data field in request"})
        e = self.assertRaises(BMCCommandError, s.raw, 0, 8, (0, 1))
        self.assertEqual(e.code, 0xCC)
        self.assertEqual(str(e), "IPMI request netfn 0x00 cmd 0x08 to 10.0.0.1:623 failed: "
                                 "completion code 0xcc (Invalid data field in request)")

    def test_session_loss_mapped(self) -> None:
        """pyghmi's exceptions become BMCConnectionError; a textless one says unreachable."""
        e = self.assertRaises(BMCConnectionError, self.session(IpmiException("Session no longer connected")).raw, 0, 1)
        self.assertEqual(str(e), "IPMI session with 10.0.0.1:623 failed: Session no longer connected")
        e = self.assertRaises(BMCConnectionError, self.session(IpmiException(None)).raw, 0, 1)
        self.assertIn("no answer (BMC unreachable", str(e))

    def test_unexpected_exception_mapped(self) -> None:
        """Even a bug inside pyghmi reaches the caller as a BMCConnectionError naming it."""
        e = self.assertRaises(BMCConnectionError, self.session(TypeError("bad compare")).raw, 0, 1)
        self.assertEqual(str(e), "IPMI session with 10.0.0.1:623 failed: TypeError: bad compare")

    def test_close_never_raises(self) -> None:
        """Logging out of a broken session does not raise."""
        s = self.session({"code": 0})
        s.close()
        self.assertTrue(s._command.logged_out)

    def test_unreachable_bmc(self) -> None:
        """Connecting to a closed loopback port fails (after pyghmi's retries) as BMCConnectionError."""
        import socket

        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        e = self.assertRaises(BMCConnectionError, PyghmiSession, BMCEndpoint("127.0.0.1", port, "a", "b"))
        self.assertIn(f"127.0.0.1:{port}", str(e))
