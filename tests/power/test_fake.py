"""The fake manager and failure injection (explicit and silent), with a seeded RNG."""

from __future__ import annotations

import random
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from sidero.power.fake import (
    EXPLICIT,
    SILENT,
    FailureDice,
    FailureInjectingPowerManager,
    FakeFleet,
    FakePowerManager,
)
from sidero.power.interfaces import IPowerManager, SimulatedFailure, UnsupportedPXEMode


class FakePowerManagerTests(SynchronousTestCase):
    def test_provides_interface(self) -> None:
        """The fake provides IPowerManager, is fake, and says so in kind."""
        fake = FakePowerManager("s")
        verifyObject(IPowerManager, fake)
        self.assertTrue(fake.is_fake)
        self.assertEqual(fake.kind, "fake")

    def test_always_on_without_reporting(self) -> None:
        """Like Sidero's fake, it reads as on even after a power off."""
        fleet = FakeFleet()
        fake = FakePowerManager("s", fleet)
        self.successResultOf(fake.power_off())
        self.assertIs(self.successResultOf(fake.is_powered_on()), True)
        self.assertFalse(fleet.machine("s").powered)

    def test_state_per_server(self) -> None:
        """With a reporting fleet, each server keeps its own power state, PXE mode and history."""
        fleet = FakeFleet(report_state=True)
        a, b = FakePowerManager("a", fleet), FakePowerManager("b", fleet)
        self.successResultOf(a.set_pxe("bios"))
        self.successResultOf(a.power_on())
        self.assertIs(self.successResultOf(a.is_powered_on()), True)
        self.assertIs(self.successResultOf(b.is_powered_on()), False)
        self.successResultOf(a.power_off())
        self.assertIs(self.successResultOf(a.is_powered_on()), False)
        self.assertEqual(fleet.machine("a").operations, ["set_pxe:bios", "power_on", "power_off"])
        self.assertEqual(fleet.machine("a").pxe_mode, "bios")
        self.assertEqual(fleet.machine("b").operations, [])

    def test_state_survives_new_managers(self) -> None:
        """A manager built on the next reconcile sees the state the previous one left."""
        fleet = FakeFleet(report_state=True)
        self.successResultOf(FakePowerManager("a", fleet).power_cycle())
        self.assertIs(self.successResultOf(FakePowerManager("a", fleet).is_powered_on()), True)

    def test_unsupported_mode(self) -> None:
        """An unknown PXE mode fails with Sidero's message and records nothing."""
        fleet = FakeFleet()
        f = self.failureResultOf(FakePowerManager("a", fleet).set_pxe("pxe"), UnsupportedPXEMode)
        self.assertEqual(f.getErrorMessage(), 'unsupported mode "pxe"')
        self.assertEqual(fleet.machine("a").operations, [])


    def test_calls_include_queries(self) -> None:
        """C{calls} is every call in order, queries included; C{operations} only the changes."""
        fleet = FakeFleet(report_state=True)
        fake = FakePowerManager("a", fleet)
        self.successResultOf(fake.is_powered_on())
        self.successResultOf(fake.set_pxe("uefi"))
        self.successResultOf(fake.power_on())
        self.assertEqual(fleet.machine("a").calls, ["is_powered_on", "set_pxe:uefi", "power_on"])
        self.assertEqual(fleet.machine("a").operations, ["set_pxe:uefi", "power_on"])

    def test_failing_calls(self) -> None:
        """An explicitly failing call fails with SimulatedFailure and changes nothing; a
        silently failing one reports success and changes nothing; both are counted."""
        fleet = FakeFleet(report_state=True)
        fake = FakePowerManager("a", fleet)
        machine = fleet.machine("a")
        machine.failing = {"is_powered_on": EXPLICIT, "set_pxe:bios": EXPLICIT, "power_on": SILENT}
        self.failureResultOf(fake.is_powered_on(), SimulatedFailure)
        self.failureResultOf(fake.set_pxe("bios"), SimulatedFailure)
        self.successResultOf(fake.power_on())
        self.assertEqual((machine.powered, machine.pxe_mode, machine.operations), (False, None, []))
        self.assertEqual(machine.calls, ["is_powered_on", "set_pxe:bios", "power_on"])
        self.assertEqual(machine.failures, 3)
        del machine.failing["power_on"]
        self.successResultOf(fake.power_on())
        self.assertTrue(machine.powered)

    def test_standing_in_for_a_real_bmc(self) -> None:
        """With is_fake false the manager says it is not the fake (the controller then treats
        it as a real BMC); its kind stays "fake"."""
        fake = FakePowerManager("a", FakeFleet(), is_fake=False)
        verifyObject(IPowerManager, fake)
        self.assertFalse(fake.is_fake)
        self.assertEqual(fake.kind, "fake")


class FailureDiceTests(SynchronousTestCase):
    def test_zero_never_fails(self) -> None:
        """With both probabilities 0 the dice never choose a failure and are inactive."""
        dice = FailureDice(0, 0, random.Random(1))
        self.assertFalse(dice.active)
        self.assertEqual({dice.roll() for _ in range(1000)}, {None})

    def test_one_always_fails_explicitly(self) -> None:
        """Explicit probability 1 fails every call."""
        dice = FailureDice(1, 0, random.Random(1))
        self.assertEqual({dice.roll() for _ in range(100)}, {EXPLICIT})

    def test_rates_are_respected(self) -> None:
        """Over many seeded rolls the explicit and silent rates come out close to the settings."""
        dice = FailureDice(0.1, 0.2, random.Random(42))
        rolls = [dice.roll() for _ in range(10000)]
        self.assertLess(abs(rolls.count(EXPLICIT) / 10000 - 0.1), 0.02)
        self.assertLess(abs(rolls.count(SILENT) / 10000 - 0.2), 0.02)

    def test_seed_is_deterministic(self) -> None:
        """Two dice with the same seed roll the same sequence."""
        a = FailureDice(0.3, 0.3, random.Random(7))
        b = FailureDice(0.3, 0.3, random.Random(7))
        self.assertEqual([a.roll() for _ in range(50)], [b.roll() for _ in range(50)])

    def test_probability_out_of_range(self) -> None:
        """A probability outside 0..1 is refused."""
        self.assertRaises(ValueError, FailureDice, 1.5, 0)
        self.assertRaises(ValueError, FailureDice, 0, -0.1)


class ScriptedDice(FailureDice):
    """Dice that return a scripted sequence of outcomes."""

    def __init__(self, *outcomes: str | None) -> None:
        super().__init__(0.5, 0.5)
        self.outcomes = list(outcomes)

    def roll(self) -> str | None:
        return self.outcomes.pop(0)


class FailureInjectionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fleet = FakeFleet(report_state=True)
        self.clock = Clock()

    def wrap(self, *outcomes: str | None) -> FailureInjectingPowerManager:
        return FailureInjectingPowerManager(
            FakePowerManager("s", self.fleet), ScriptedDice(*outcomes), self.clock
        )

    def test_provides_interface_and_mirrors_kind(self) -> None:
        """The wrapper provides IPowerManager with the wrapped manager's kind and fakeness."""
        wrapped = self.wrap()
        verifyObject(IPowerManager, wrapped)
        self.assertEqual((wrapped.kind, wrapped.is_fake), ("fake", True))

    def test_explicit_failure_raises_and_does_nothing(self) -> None:
        """An explicit failure fails with Sidero's message and never reaches the machine."""
        f = self.failureResultOf(self.wrap(EXPLICIT).power_on(), SimulatedFailure)
        self.assertEqual(f.getErrorMessage(), "simulated failure from the power management")
        self.assertEqual(self.fleet.machine("s").operations, [])

    def test_silent_failure_succeeds_and_does_nothing(self) -> None:
        """A silent failure reports success but the machine is not touched."""
        self.assertIsNone(self.successResultOf(self.wrap(SILENT).power_on()))
        self.assertEqual(self.fleet.machine("s").operations, [])
        self.assertFalse(self.fleet.machine("s").powered)

    def test_no_failure_passes_through(self) -> None:
        """Without a failure the call reaches the wrapped manager, arguments included."""
        self.successResultOf(self.wrap(None).set_pxe("uefi"))
        self.assertEqual(self.fleet.machine("s").operations, ["set_pxe:uefi"])

    def test_silent_status_follows_the_clock(self) -> None:
        """A silently failed status query answers on in even seconds and off in odd ones."""
        wrapped = self.wrap(SILENT, SILENT)
        self.clock.advance(10)
        self.assertIs(self.successResultOf(wrapped.is_powered_on()), True)
        self.clock.advance(1)
        self.assertIs(self.successResultOf(wrapped.is_powered_on()), False)

    def test_explicit_status_failure(self) -> None:
        """A status query can fail explicitly too."""
        self.failureResultOf(self.wrap(EXPLICIT).is_powered_on(), SimulatedFailure)

    def test_ten_percent_failures_converge_with_retries(self) -> None:
        """With 10% explicit and 10% silent failures, a caller that re-checks and retries with
        the controller's logic (off → set PXE, power on; requeue) gets every server on."""
        dice = FailureDice(0.1, 0.1, random.Random(2024))
        fleet = FakeFleet(report_state=True)
        explicit_failures = rounds = 0
        for i in range(50):
            name = f"server-{i}"
            machine = fleet.machine(name)
            for _ in range(50):  # bounded requeue; the test (not the caller) knows the truth
                if machine.powered:
                    break
                rounds += 1
                self.clock.advance(1)
                m = FailureInjectingPowerManager(FakePowerManager(name, fleet), dice, self.clock)
                on = _settle(m.is_powered_on())
                if on is _FAILED:
                    explicit_failures += 1
                    continue  # "Failed to determine power status", requeue
                if on:
                    continue  # a silent failure may lie: the periodic re-check catches it
                if _settle(m.set_pxe("uefi")) is _FAILED or _settle(m.power_on()) is _FAILED:
                    explicit_failures += 1
            # (a silently dropped set_pxe can leave a server on without PXE: that is what the
            # silent mode simulates, and the wipe timeout handles it in production)
            self.assertTrue(machine.powered, name)
        self.assertGreater(explicit_failures, 5)  # failures really happened and were retried
        self.assertGreater(rounds, 50)


_FAILED = object()


def _settle(d: Deferred[Any]) -> Any:
    """The result of an already-fired Deferred, or _FAILED for a SimulatedFailure."""
    box: list[Any] = []

    def failed(f: Any) -> None:
        f.trap(SimulatedFailure)
        box.append(_FAILED)

    d.addCallbacks(box.append, failed)
    return box[0]
