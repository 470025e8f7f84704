"""Crash consistency on the embedded store: one real C{twistd sidero} (SQLite in WAL mode,
synchronous=FULL) SIGKILLed at random moments and started again, while MetalMachines are
allocated and released, and while real agents register, get accepted, wiped and deleted (the
drivers and their invariants: L{tests.integration.crash_support}).

With one process, a kill takes the store, the controllers, the agent API and the management
socket down together: kills land during start-up (the store opening, garbage collection
resuming, informers listing) as well as in the middle of writes.  A power loss of the database
file itself is L{tests.store.test_power_loss}; a database damaged otherwise stops the service
at start, untouched (L{DamagedStoreTests}).
"""

from __future__ import annotations

import os
import random
import uuid

from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from tests.integration.crash_support import (
    AllocationCrash,
    Hands,
    Killer,
    RegistrationCrash,
    scaled,
)
from tests.integration.lifecycle_support import SideroProcess

log = Logger()


class EmbeddedCrashTestCase(TestCase):
    timeout = 900

    def setUp(self) -> None:
        self.run_id = uuid.uuid4().hex[:8]
        self.rng = random.Random(int(self.run_id, 16))
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        self.sidero = SideroProcess(self.work)
        self.addCleanup(self.sidero.stop)
        self.hands = Hands(self.sidero.client)
        # One process: each kill takes everything down until the restart is ready (about 2 s
        # on an idle machine); the Killer waits for that, except for its start-up kills.
        self.killer = Killer([self.sidero], self.rng, interval=(0.5, 3.0), pause=(0.0, 0.5))
        self.sidero.start()

    def report(self, what: str, figures: object) -> None:
        with open(self.sidero.log_path, errors="replace") as f:
            text = f.read()
        log.info("embedded store, {what}: {figures}", what=what, figures=figures)
        self.assertNotIn("Traceback", text)


class AllocationCrashTests(EmbeddedCrashTestCase):
    async def test_kill_during_allocations(self) -> None:
        """No double binding, no orphan, everything released, with >= 40 kills in 150
        allocations (times SIDERO_CRASH_SCALE)."""
        driver = AllocationCrash(self.hands, self.killer, f"crash-{self.run_id}", self.run_id, self.rng)
        figures = await driver.run(target_allocations=scaled(150), min_kills=scaled(40), time_limit=600)
        self.report("allocation", figures)


class RegistrationCrashTests(EmbeddedCrashTestCase):
    async def test_kill_during_registration_and_wipe(self) -> None:
        """No lost, duplicated, resurrected or partial Server, every acknowledged wipe kept,
        nothing stuck, with >= 30 kills in 24 registrations and wipes (times
        SIDERO_CRASH_SCALE)."""
        driver = RegistrationCrash(self.hands, self.killer, [self.sidero.endpoint], self.work, self.rng)
        figures = await driver.run(target_registrations=scaled(24), min_kills=scaled(30), time_limit=600)
        self.report("registration and wipe", figures)


class DamagedStoreTests(TestCase):
    timeout = 120

    def test_refuses_to_start(self) -> None:
        """A state.db that is not a database (what a failing disk can leave, never a crash)
        stops the service at start with one line naming the file, exit status 1, and the
        file is left as it was."""
        work = os.path.abspath(self.mktemp())
        sidero = SideroProcess(work)
        os.makedirs(sidero.state)
        path = os.path.join(sidero.state, "state.db")
        garbage = random.Random(4).randbytes(8192)
        with open(path, "wb") as f:
            f.write(garbage)
        self.addCleanup(sidero.stop)
        sidero.start()
        assert sidero.process is not None
        self.assertEqual(sidero.process.wait(60), 1)
        with open(sidero.log_path, errors="replace") as f:
            lines = [line for line in f if "cannot start" in line]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(f"the store database {path} is damaged", lines[0])
        with open(path, "rb") as f:
            self.assertEqual(f.read(), garbage)
