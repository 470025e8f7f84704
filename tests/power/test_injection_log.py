"""Injected power failures leave a trace: a log line and a count per kind."""

from __future__ import annotations

import random

from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from sidero.power.fake import (
    EXPLICIT,
    SILENT,
    FailureDice,
    FailureInjectingPowerManager,
    FakeFleet,
    FakePowerManager,
)
from sidero.power.interfaces import SimulatedFailure


class InjectionTraceTests(SynchronousTestCase):
    def wrap(self, explicit: float, silent: float) -> tuple[FailureInjectingPowerManager, FakeFleet]:
        fleet = FakeFleet(report_state=True)
        dice = FailureDice(explicit, silent, random.Random(7))
        return FailureInjectingPowerManager(FakePowerManager("srv", fleet), dice, Clock()), fleet

    def test_explicit_failure_logged_and_counted(self) -> None:
        """An explicit failure is logged with the operation and counted."""
        manager, _ = self.wrap(1.0, 0.0)
        with capturedLogs() as events:
            self.failureResultOf(manager.power_off(), SimulatedFailure)
        self.assertEqual(manager.dice.injected, {EXPLICIT: 1, SILENT: 0})
        self.assertEqual([(e["method"], e["outcome"]) for e in events], [("power_off", EXPLICIT)])

    def test_silent_failure_logged_and_counted(self) -> None:
        """A silent failure does nothing to the machine, but is logged and counted."""
        manager, fleet = self.wrap(0.0, 1.0)
        with capturedLogs() as events:
            self.successResultOf(manager.power_on())
            self.successResultOf(manager.is_powered_on())
        self.assertFalse(fleet.machine("srv").powered)
        self.assertEqual(manager.dice.injected, {EXPLICIT: 0, SILENT: 2})
        self.assertEqual([e["method"] for e in events], ["power_on", "is_powered_on"])
        self.assertIn("injected silent failure", formatEvent(events[0]))

    def test_real_calls_not_logged(self) -> None:
        """Calls that go through leave no injection trace."""
        manager, fleet = self.wrap(0.0, 0.0)
        with capturedLogs() as events:
            self.successResultOf(manager.power_on())
        self.assertTrue(fleet.machine("srv").powered)
        self.assertEqual((events, manager.dice.injected), ([], {EXPLICIT: 0, SILENT: 0}))
