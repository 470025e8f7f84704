# -*- test-case-name: tests.power.test_fake -*-
"""The fake power manager, and failure injection for any manager (spec §3.12).

A Server with neither a usable BMC nor a management API gets the fake: every operation
succeeds and does nothing, and the machine always reads as on (so the controller's status shows
C{power: on}, as Sidero's does).  For tests the fake can also remember, per server, what it was
asked (L{FakeFleet}), optionally report the power state those requests would have left, fail
chosen calls (L{FakeMachine.failing}) and stand in for a real BMC (C{is_fake=False}): the
controller tests drive the Server controller with it.

L{FailureInjectingPowerManager} mirrors C{--test-power-simulated-explicit-failure-prob} and
C{--test-power-simulated-silent-failure-prob}: before every call one roll of the dice decides
between an explicit failure (L{SimulatedFailure}), a silent one (report success, do nothing;
a status query answers "on" in even seconds, "off" in odd ones) and the real call.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from sidero.power.interfaces import (
    KIND_FAKE,
    PXE_MODES,
    IPowerManager,
    SimulatedFailure,
    UnsupportedPXEMode,
)

EXPLICIT = "explicit"
SILENT = "silent"


@dataclass
class FakeMachine:
    """What the fake was told about one server.

    @ivar operations: the state changes carried out, in order (C{power_on}, C{set_pxe:bios}...).
    @ivar calls: every call in order, queries and failed ones included.
    @ivar failing: calls (as named in C{calls}) that fail: L{EXPLICIT} ones with
        L{SimulatedFailure}, L{SILENT} ones report success and change nothing.
    """

    powered: bool = False
    pxe_mode: str | None = None
    operations: list[str] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    failing: dict[str, str] = field(default_factory=dict)
    failures: int = 0

    def call(self, name: str) -> str | None:
        """Record call C{name}; the failure it is to have (L{EXPLICIT}, L{SILENT}) or None."""
        self.calls.append(name)
        outcome = self.failing.get(name)
        if outcome is not None:
            self.failures += 1
        return outcome


class FakeFleet:
    """Per-server state shared by every fake manager built for the same process.

    @ivar report_state: when true, fakes answer L{IPowerManager.is_powered_on} from the tracked
        state instead of Sidero's constant "on" (useful to drive controller tests).
    """

    def __init__(self, report_state: bool = False, initially_on: bool = False) -> None:
        self.report_state = report_state
        self.initially_on = initially_on
        self.machines: dict[str, FakeMachine] = {}

    def machine(self, name: str) -> FakeMachine:
        if name not in self.machines:
            self.machines[name] = FakeMachine(powered=self.initially_on)
        return self.machines[name]


@implementer(IPowerManager)
class FakePowerManager:
    """Every operation succeeds (unless its L{FakeMachine} says otherwise); nothing is
    controlled.  C{is_fake} is true unless the test makes it stand in for a real BMC (then the
    controller believes the power state it reports and records events for it)."""

    kind = KIND_FAKE

    def __init__(self, name: str = "", fleet: FakeFleet | None = None, *,
                 is_fake: bool = True) -> None:
        self.name = name
        self.fleet = fleet
        self.is_fake = is_fake

    def __repr__(self) -> str:
        return f"<FakePowerManager {self.name!r}>"

    def _record(self, operation: str, powered: bool | None = None,
                pxe_mode: str | None = None) -> Deferred[None]:
        if self.fleet is not None:
            machine = self.fleet.machine(self.name)
            outcome = machine.call(operation)
            if outcome == EXPLICIT:
                return fail(SimulatedFailure())
            if outcome == SILENT:
                return succeed(None)
            machine.operations.append(operation)
            if powered is not None:
                machine.powered = powered
            if pxe_mode is not None:
                machine.pxe_mode = pxe_mode
        return succeed(None)

    def power_on(self) -> Deferred[None]:
        return self._record("power_on", True)

    def power_off(self) -> Deferred[None]:
        return self._record("power_off", False)

    def power_cycle(self) -> Deferred[None]:
        return self._record("power_cycle", True)

    def is_powered_on(self) -> Deferred[bool]:
        if self.fleet is not None:
            machine = self.fleet.machine(self.name)
            if machine.call("is_powered_on") == EXPLICIT:
                return fail(SimulatedFailure())
            if self.fleet.report_state:
                return succeed(machine.powered)
        return succeed(True)

    def set_pxe(self, mode: str) -> Deferred[None]:
        if mode not in PXE_MODES:
            return fail(UnsupportedPXEMode(mode))
        return self._record(f"set_pxe:{mode}", pxe_mode=mode)

    def close(self) -> Deferred[None]:
        return succeed(None)


class FailureDice:
    """One roll per call: below C{explicit} → explicit, below C{explicit+silent} → silent.

    @param rng: a seeded C{random.Random} in tests; production uses a fresh unseeded one.
    """

    def __init__(self, explicit: float, silent: float, rng: random.Random | None = None) -> None:
        for name, p in (("explicit", explicit), ("silent", silent)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} failure probability {p!r} is not between 0 and 1")
        self.explicit = explicit
        self.silent = silent
        self.rng = rng if rng is not None else random.Random()
        #: how many failures of each kind were injected (shared by every manager it wraps).
        self.injected: dict[str, int] = {EXPLICIT: 0, SILENT: 0}

    @property
    def active(self) -> bool:
        return self.explicit > 0 or self.silent > 0

    def roll(self) -> str | None:
        value = self.rng.random()
        if value < self.explicit:
            return EXPLICIT
        if value < self.explicit + self.silent:
            return SILENT
        return None


@implementer(IPowerManager)
class FailureInjectingPowerManager:
    """Wraps any L{IPowerManager}; C{kind} and C{is_fake} are the wrapped one's.

    Every injected failure is logged (and counted in the dice): a silent one leaves no other
    trace, and a test must be able to tell that the injection really happened.
    """

    log = Logger()

    def __init__(self, inner: Any, dice: FailureDice, clock: IReactorTime) -> None:
        self.inner = inner
        self.dice = dice
        self.clock = clock
        self.kind = inner.kind
        self.is_fake = inner.is_fake

    def __repr__(self) -> str:
        return f"<FailureInjecting {self.inner!r} explicit={self.dice.explicit} silent={self.dice.silent}>"

    def _roll(self, method: str) -> str | None:
        outcome = self.dice.roll()
        if outcome is not None:
            self.dice.injected[outcome] += 1
            self.log.info("power {method} on {manager}: injected {outcome} failure",
                          method=method, manager=repr(self.inner), outcome=outcome)
        return outcome

    def _call(self, method: str, *args: Any) -> Deferred[None]:
        outcome = self._roll(method)
        if outcome == EXPLICIT:
            return fail(SimulatedFailure())
        if outcome == SILENT:
            return succeed(None)
        result: Deferred[None] = getattr(self.inner, method)(*args)
        return result

    def power_on(self) -> Deferred[None]:
        return self._call("power_on")

    def power_off(self) -> Deferred[None]:
        return self._call("power_off")

    def power_cycle(self) -> Deferred[None]:
        return self._call("power_cycle")

    def set_pxe(self, mode: str) -> Deferred[None]:
        return self._call("set_pxe", mode)

    def is_powered_on(self) -> Deferred[bool]:
        outcome = self._roll("is_powered_on")
        if outcome == EXPLICIT:
            return fail(SimulatedFailure())
        if outcome == SILENT:
            return succeed(int(self.clock.seconds()) % 2 == 0)
        result: Deferred[bool] = self.inner.is_powered_on()
        return result

    def close(self) -> Deferred[None]:
        result: Deferred[None] = self.inner.close()
        return result
