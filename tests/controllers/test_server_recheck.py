"""The Server controller's optional re-check after powering a clean server off."""

from __future__ import annotations

from sidero.controllers.runtime import Result
from sidero.controllers.server import ServerReconciler
from sidero.power.fake import SILENT
from tests.controllers.test_server import Base, server


class PowerOffRecheckTests(Base):
    """C{power_off_recheck}: a power-off the BMC accepted but did not carry out is retried."""

    def setUp(self) -> None:
        super().setUp()
        self.reconciler = ServerReconciler(self.store, self.power_for, self.recorder, self.clock,
                                           reboot_timeout=self.reboot_timeout, pxe_mode="bios",
                                           power_off_recheck=20.0)
        self.ok(self.store.create(server()))
        self.set_status(isClean=True)

    def test_power_off_is_checked_again(self) -> None:
        """After powering a clean server off, the reconcile asks to come back after the delay."""
        p = self.power(on=True)
        self.assertEqual(self.reconcile(), Result(requeue_after=20.0))
        self.assertEqual(p.calls, ["is_powered_on", "power_off"])
        self.assertTrue(self.get()["status"]["ready"])

    def test_ignored_power_off_is_repeated(self) -> None:
        """A power-off that did nothing is sent again on the re-check; once off, no more re-checks."""
        p = self.power(on=True)
        p.failing["power_off"] = SILENT  # the BMC accepts the power-off and ignores it
        self.assertEqual(self.reconcile(), Result(requeue_after=20.0))
        self.assertTrue(p.powered)
        del p.failing["power_off"]  # the BMC works again
        self.assertEqual(self.reconcile(), Result(requeue_after=20.0))
        self.assertFalse(p.powered)
        self.assertIsNone(self.reconcile())
        self.assertEqual(p.calls, ["is_powered_on", "power_off", "is_powered_on", "power_off",
                                   "is_powered_on"])

    def test_already_off_is_not_rechecked(self) -> None:
        """A clean server found off needs no re-check."""
        self.power(on=False)
        self.assertIsNone(self.reconcile())

    def test_fake_power_is_not_rechecked(self) -> None:
        """The fake manager always reads as on: re-checking it would loop forever, so it is not."""
        self.power(on=True, fake=True)
        self.assertIsNone(self.reconcile())

    def test_default_is_the_spec(self) -> None:
        """Without the setting, a powered-off clean server is not requeued (spec 2.2)."""
        self.reconciler.power_off_recheck = None
        self.power(on=True)
        self.assertIsNone(self.reconcile())
