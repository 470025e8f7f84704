# -*- test-case-name: tests.power.test_ipmi -*-
"""IPMI power control over RMCP+ with pyghmi (spec §3.12).

Sidero sends the raw requests below through C{ipmitool}; we send the very same bytes through
pyghmi, so a BMC sees what it would see from Sidero:

  - IsPoweredOn: Get Chassis Status (netfn 0x00, cmd 0x01), byte 0 bit 0.
  - PowerOn/PowerOff/PowerCycle: Chassis Control (0x00 0x02) with 0x01/0x00/0x02.
  - SetPXE: Set System Boot Options (0x00 0x08): set-in-progress, boot-info-ack, boot flags
    (0x80 BIOS or 0xA0 EFI, "valid, next boot only", device 0x04 = PXE), commit, set-complete.

How pyghmi's threads work, and how we stay safe with them
--------------------------------------------------------
pyghmi is synchronous.  On first use it starts one global daemon thread (C{_IOWorker}) that
C{select()}s over every IPMI socket of the process; a thread calling C{raw_command} registers a
wake-up event with it and blocks until its reply (or retry deadline) arrives.  The calling
threads themselves run the session state machines, including keepalives and retries of *other*
sessions.  Sessions live in class-level dicts (C{Session.bmc_handlers}, keyed by the BMC's
socket address) and are *shared*: a second C{Command} for the same BMC and credentials gets the
same logged-in C{Session} object, and pyghmi keeps it alive with keepalives only while some
thread keeps calling into it.

So, here:
  1. Every pyghmi call runs in a dedicated, bounded thread pool (never the reactor thread, never
     the reactor's default pool), so a slow BMC cannot stall DHCP replies or the Kubernetes
     client, and at most C{POOL_MAX_THREADS} threads are ever inside pyghmi.
  2. Operations on one BMC (keyed by host and port, as pyghmi keys its sessions) are serialised
     with a L{DeferredLock}: two threads never drive the same shared C{Session} at once, and a
     BMC (which often allows only a few sessions) never sees two of ours.  Different BMCs run
     in parallel.
  3. Each operation opens a session, sends its requests and logs out, in one pool call, like
     Sidero's one C{ipmitool} process per request.  No session outlives its operation, so no
     keepalive depends on a thread that happens to call in later, and a BMC that restarted
     never leaves us holding a dead session.  (pyghmi 1.6 files a logging-in session under
     the credentials as passed but removes it under their UTF-8 encoding; with str
     credentials the stale entry would hand the next operation our logged-out session, so
     we pass bytes, and also drop any such entry when we log out.)
  4. A time limit covers waiting for the BMC's lock plus the call.  When it passes the caller
     gets L{CallTimeout} at once; a call still waiting for the lock is withdrawn and never runs.
     A thread cannot be interrupted, so a call already running keeps the BMC's lock until
     pyghmi's own retry deadline gives up (about 5 s for an unreachable BMC); later operations
     on that BMC wait (and time out) rather than overlap it, other BMCs are unaffected.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import CancelledError, Deferred, DeferredLock, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sidero.power.interfaces import (
    KIND_IPMI,
    PXE_MODES,
    BMCCommandError,
    BMCConnectionError,
    ConfigurationError,
    IPowerManager,
    PowerError,
    UnsupportedPXEMode,
)
from sidero.threads import CallTimeout

T = TypeVar("T")

#: spec §0.3 DefaultBMCPort.
DEFAULT_BMC_PORT = 623
#: spec §1.1: an empty C{bmc.interface} means RMCP+.
DEFAULT_INTERFACE = "lanplus"
#: pyghmi negotiates IPMI 2.0 (RMCP+) or 1.5 itself; "open" (local /dev/ipmi0) and "tool" make
#: no sense from the controller, so they are refused with a clear message instead.
SUPPORTED_INTERFACES = ("lanplus", "lan")
#: the pool that runs pyghmi; small, because every thread in it may be waiting on a slow BMC.
POOL_NAME = "ipmi"
POOL_MAX_THREADS = 4
#: per operation, lock wait included; a set_pxe is five round trips plus login and logout.
DEFAULT_TIMEOUT = 30.0

# IPMI network functions / commands / values (IPMI v2.0 spec, chassis chapter).
NETFN_CHASSIS = 0x00
CMD_GET_CHASSIS_STATUS = 0x01
CMD_CHASSIS_CONTROL = 0x02
CMD_SET_SYSTEM_BOOT_OPTIONS = 0x08
CHASSIS_POWER_OFF = 0x00
CHASSIS_POWER_ON = 0x01
CHASSIS_POWER_CYCLE = 0x02
BOOT_PARAM_SET_IN_PROGRESS = 0x00
BOOT_PARAM_INFO_ACK = 0x04
BOOT_PARAM_BOOT_FLAGS = 0x05
SET_COMPLETE = 0x00
SET_IN_PROGRESS = 0x01
COMMIT_WRITE = 0x02
BOOT_FLAGS_VALID = 0x80
BOOT_FLAGS_EFI = 0x20
BOOT_DEVICE_PXE = 0x04

_CHASSIS_ACTIONS = {
    CHASSIS_POWER_OFF: "power off",
    CHASSIS_POWER_ON: "power on",
    CHASSIS_POWER_CYCLE: "power cycle",
}


@dataclass(frozen=True)
class BMCEndpoint:
    """Where and how to reach one BMC.  The password never appears in C{repr} or logs."""

    host: str
    port: int = DEFAULT_BMC_PORT
    user: str = ""
    password: str = field(default="", repr=False)
    interface: str = DEFAULT_INTERFACE

    @property
    def key(self) -> tuple[str, int]:
        """What operations are serialised on: pyghmi shares sessions per socket address."""
        return (self.host, self.port)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def make_endpoint(
    host: str, port: int | None, user: str, password: str, interface: str | None
) -> BMCEndpoint:
    """Apply Sidero's defaults (port 0 → 623, interface "" → lanplus) and refuse what we can't speak.

    @raise ConfigurationError: unknown interface, empty host or a port outside 1..65535.
    """
    iface = interface or DEFAULT_INTERFACE
    if iface not in SUPPORTED_INTERFACES:
        raise ConfigurationError(
            f'unsupported IPMI interface "{iface}" (supported: {", ".join(SUPPORTED_INTERFACES)})'
        )
    if not host:
        raise ConfigurationError("BMC endpoint is empty")
    real_port = port or DEFAULT_BMC_PORT
    if not 0 < real_port < 65536:
        raise ConfigurationError(f"BMC port {real_port} is out of range")
    return BMCEndpoint(host=host, port=real_port, user=user, password=password, interface=iface)


class IPMISession(Protocol):
    """One logged-in session; blocking, used from a single pool thread."""

    def raw(self, netfn: int, command: int, data: Sequence[int] = ()) -> bytes:
        """Send one request; return the response data (completion code already checked).

        @raise BMCCommandError: non-zero completion code.
        @raise BMCConnectionError: the session broke.
        """

    def close(self) -> None:
        """Log out; never raises."""


#: opens a session (blocking, in a pool thread).
Connector = Callable[[BMCEndpoint], IPMISession]
#: runs a blocking callable in the IPMI pool, e.g. L{sidero.threads.ThreadPoolService.run}.
Runner = Callable[..., "Deferred[Any]"]


def _connection_message(endpoint: BMCEndpoint, error: BaseException) -> str:
    text = str(error.args[0]) if error.args and error.args[0] else ""
    if text and not _is_pyghmi_error(error):
        text = f"{type(error).__name__}: {text}"
    if not text:
        text = "no answer (BMC unreachable or not speaking IPMI on this port)"
    return f"IPMI session with {endpoint.address} failed: {text}"


def _is_pyghmi_error(error: BaseException) -> bool:
    return type(error).__module__.startswith("pyghmi")


class PyghmiSession:
    """L{IPMISession} over C{pyghmi.ipmi.command.Command}; construct it in a pool thread only."""

    def __init__(self, endpoint: BMCEndpoint) -> None:
        # Imported here: importing sidero must not import pyghmi (it starts nothing, but is heavy).
        from pyghmi.ipmi.command import Command

        self._endpoint = endpoint
        # Credentials go in as bytes: pyghmi files a logging-in session under the credentials
        # as given but removes it under their encoded form, so with str the entry outlives
        # the login and, once we log out, the next Command is handed the dead session.
        self._key = (endpoint.host, endpoint.user.encode(), endpoint.password.encode(),
                     endpoint.port, None)
        try:
            self._command = Command(
                bmc=endpoint.host, userid=self._key[1], password=self._key[2],
                port=endpoint.port, keepalive=False,
            )
        except Exception as e:
            self._forget()
            raise BMCConnectionError(_connection_message(endpoint, e)) from e

    def raw(self, netfn: int, command: int, data: Sequence[int] = ()) -> bytes:
        try:
            response: dict[str, Any] = self._command.raw_command(
                netfn=netfn, command=command, data=tuple(data)
            )
        except Exception as e:  # pyghmi raises its own errors, socket errors and, rarely, bugs
            raise BMCConnectionError(_connection_message(self._endpoint, e)) from e
        code = int(response.get("code", 0) or 0)
        if code or "error" in response:
            reason = response.get("error") or "error"
            raise BMCCommandError(
                f"IPMI request netfn 0x{netfn:02x} cmd 0x{command:02x} to {self._endpoint.address} "
                f"failed: completion code 0x{code:02x} ({reason})",
                code,
            )
        return bytes(response.get("data", b""))

    def close(self) -> None:
        try:
            self._command.ipmi_session.logout()
        except Exception:  # logging out of a broken session must not mask the result
            pass
        self._forget()

    def _forget(self) -> None:
        """Drop a stale half-open session pyghmi may still file under our credentials, so the
        next operation logs in afresh (belt and braces for the bytes-credentials fix above)."""
        try:
            from pyghmi.ipmi.private.session import Session

            Session.initting_sessions.pop(self._key, None)
        except Exception:  # pyghmi internals moved: nothing to clean
            pass


def pyghmi_connect(endpoint: BMCEndpoint) -> IPMISession:
    """The production L{Connector}."""
    return PyghmiSession(endpoint)


# Blocking operations on an open session: pure request sequences, tested with a recording session.


def chassis_power_is_on(session: IPMISession) -> bool:
    """Get Chassis Status; byte 0 bit 0 is "system power is on"."""
    data = session.raw(NETFN_CHASSIS, CMD_GET_CHASSIS_STATUS)
    if not data:
        raise BMCCommandError("Get Chassis Status returned no data", 0)
    return bool(data[0] & 0x01)


def chassis_control(session: IPMISession, action: int) -> None:
    """Chassis Control with one of L{CHASSIS_POWER_OFF}/L{CHASSIS_POWER_ON}/L{CHASSIS_POWER_CYCLE}."""
    session.raw(NETFN_CHASSIS, CMD_CHASSIS_CONTROL, (action,))


def boot_flags(mode: str) -> int:
    """Param 5 byte 1: valid + next boot only, plus the EFI bit for uefi."""
    if mode == "bios":
        return BOOT_FLAGS_VALID
    if mode == "uefi":
        return BOOT_FLAGS_VALID | BOOT_FLAGS_EFI
    raise UnsupportedPXEMode(mode)


def set_boot_pxe(session: IPMISession, mode: str) -> None:
    """Set System Boot Options for one PXE boot, in Sidero's order.

    BMCs that refuse the set-in-progress parameter (ipmi_sim does) are still driven, just
    without the progress/commit bracketing; a failed boot-info ack aborts before the flags.
    """
    flags = boot_flags(mode)

    def set_param(*data: int) -> None:
        session.raw(NETFN_CHASSIS, CMD_SET_SYSTEM_BOOT_OPTIONS, data)

    use_progress = True
    try:
        set_param(BOOT_PARAM_SET_IN_PROGRESS, SET_IN_PROGRESS)
    except BMCCommandError:
        use_progress = False
    try:
        set_param(BOOT_PARAM_INFO_ACK, 0x01, 0x01)
    except PowerError:
        if use_progress:
            _quietly(set_param, BOOT_PARAM_SET_IN_PROGRESS, SET_COMPLETE)
        raise
    try:
        set_param(BOOT_PARAM_BOOT_FLAGS, flags, BOOT_DEVICE_PXE, 0x00, 0x00, 0x00)
        if use_progress:
            _quietly(set_param, BOOT_PARAM_SET_IN_PROGRESS, COMMIT_WRITE)
    finally:
        if use_progress:
            _quietly(set_param, BOOT_PARAM_SET_IN_PROGRESS, SET_COMPLETE)


def _quietly(f: Callable[..., None], *args: int) -> None:
    """Best-effort bracketing requests: their failure must not hide the real result."""
    try:
        f(*args)
    except PowerError:
        pass


class BMCLocks:
    """One L{DeferredLock} per BMC key, dropped again when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, int], DeferredLock] = {}

    def acquire(self, key: tuple[str, int]) -> Deferred[DeferredLock]:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = DeferredLock()
        return lock.acquire()

    def release(self, key: tuple[str, int]) -> None:
        lock = self._locks[key]
        lock.release()
        if not lock.locked and not lock.waiting:
            del self._locks[key]

    def __len__(self) -> int:
        return len(self._locks)


class IPMIExecutor:
    """Runs blocking IPMI work: pool thread, per-BMC serialisation, time limit.

    Shared by every L{IPMIPowerManager} of the process (the factory builds managers per
    reconcile; the locks must outlive them).
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        run: Runner,
        connect: Connector = pyghmi_connect,
        timeout: float = DEFAULT_TIMEOUT,
        locks: BMCLocks | None = None,
    ) -> None:
        self.clock = clock
        self.run = run
        self.connect = connect
        self.timeout = timeout
        self.locks = locks if locks is not None else BMCLocks()

    def submit(
        self, endpoint: BMCEndpoint, name: str, operation: Callable[[IPMISession], T]
    ) -> Deferred[T]:
        """Open a session to C{endpoint}, run C{operation(session)}, log out: all in the pool.

        Fails with L{CallTimeout} if the BMC's lock plus the call took longer than the limit.
        """
        key = endpoint.key
        label = f"IPMI {name} on {endpoint.address}"
        result: Deferred[T] = Deferred()
        acquired = self.locks.acquire(key)

        def blocking() -> T:
            session = self.connect(endpoint)
            try:
                return operation(session)
            finally:
                session.close()

        def finished(outcome: Any) -> None:
            self.locks.release(key)
            if isinstance(outcome, Failure):
                self.log.debug("{op} failed: {error}", op=label, error=outcome.getErrorMessage())
            if not result.called:
                timer.cancel()
                if isinstance(outcome, Failure):
                    result.errback(outcome)
                else:
                    result.callback(outcome)
            elif isinstance(outcome, Failure):
                self.log.warn(
                    "{op} failed after its caller gave up: {error}",
                    op=label, error=outcome.getErrorMessage(),
                )

        def start(_: object) -> None:
            if result.called:  # pragma: no cover - the timeout cancels a waiting acquire
                self.locks.release(key)
                return
            try:
                work = self.run(blocking)
            except Exception:
                finished(Failure())
                return
            work.addBoth(finished)

        def not_started(failure: Failure) -> None:
            failure.trap(CancelledError)

        def expire() -> None:
            if not acquired.called:
                acquired.cancel()  # withdrawn from the lock's queue: it will never run
            self.log.warn("{op} timed out after {seconds}s", op=label, seconds=self.timeout)
            result.errback(CallTimeout(label, self.timeout))

        timer = self.clock.callLater(self.timeout, expire)
        acquired.addCallbacks(start, not_started)
        return result


@implementer(IPowerManager)
class IPMIPowerManager:
    """L{IPowerManager} for one Server with a BMC; cheap to build, holds no session."""

    kind = KIND_IPMI
    is_fake = False

    def __init__(self, endpoint: BMCEndpoint, executor: IPMIExecutor) -> None:
        self.endpoint = endpoint
        self.executor = executor

    def __repr__(self) -> str:
        return f"<IPMIPowerManager {self.endpoint.address} user={self.endpoint.user!r}>"

    def _control(self, action: int) -> Deferred[None]:
        return self.executor.submit(
            self.endpoint, _CHASSIS_ACTIONS[action], lambda s: chassis_control(s, action)
        )

    def power_on(self) -> Deferred[None]:
        return self._control(CHASSIS_POWER_ON)

    def power_off(self) -> Deferred[None]:
        return self._control(CHASSIS_POWER_OFF)

    def power_cycle(self) -> Deferred[None]:
        return self._control(CHASSIS_POWER_CYCLE)

    def is_powered_on(self) -> Deferred[bool]:
        return self.executor.submit(self.endpoint, "power status", chassis_power_is_on)

    def set_pxe(self, mode: str) -> Deferred[None]:
        if mode not in PXE_MODES:
            return fail(UnsupportedPXEMode(mode))
        return self.executor.submit(
            self.endpoint, f"set PXE boot ({mode})", lambda s: set_boot_pxe(s, mode)
        )

    def close(self) -> Deferred[None]:
        return succeed(None)
