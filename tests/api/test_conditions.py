"""CAPI condition helpers (sidero.api.conditions), spec §0.4."""

from __future__ import annotations

import datetime

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sidero.api import conditions as c

T0 = 1_700_000_000.25  # 2023-11-14T22:13:20Z
T1 = T0 + 60


class TimeTests(SynchronousTestCase):
    def test_rfc3339_second_precision_utc(self) -> None:
        """Epoch seconds render as second-precision UTC with Z."""
        self.assertEqual(c.rfc3339(T0), "2023-11-14T22:13:20Z")

    def test_aware_datetime_converted(self) -> None:
        """An aware datetime in another zone is converted to UTC."""
        tz = datetime.timezone(datetime.timedelta(hours=2))
        self.assertEqual(c.rfc3339(datetime.datetime(2024, 1, 1, 12, 0, 5, 999, tzinfo=tz)),
                         "2024-01-01T10:00:05Z")

    def test_clock_seconds_callable(self) -> None:
        """A task.Clock's seconds method can be injected as now."""
        clock = Clock()
        clock.advance(T0)
        self.assertEqual(c.rfc3339(clock.seconds), "2023-11-14T22:13:20Z")


class SetTests(SynchronousTestCase):
    def test_mark_true_shape(self) -> None:
        """MarkTrue sets status True with no severity, reason or message."""
        obj: dict = {}
        c.mark_true(obj, "TalosInstalled", T0)
        self.assertEqual(obj["status"]["conditions"],
                         [{"type": "TalosInstalled", "status": "True", "lastTransitionTime": "2023-11-14T22:13:20Z"}])
        self.assertTrue(c.is_true(obj, "TalosInstalled"))

    def test_mark_false_shape(self) -> None:
        """MarkFalse records reason, severity and message."""
        obj: dict = {"status": {}}
        c.mark_false(obj, "PowerCycle", "InProgress", c.SEVERITY_INFO, "Server wipe in progress.", T0)
        got = c.get(obj, "PowerCycle")
        self.assertEqual(got, {"type": "PowerCycle", "status": "False", "severity": "Info",
                               "reason": "InProgress", "message": "Server wipe in progress.",
                               "lastTransitionTime": "2023-11-14T22:13:20Z"})
        self.assertTrue(c.is_false(obj, "PowerCycle"))
        self.assertEqual((c.reason(obj, "PowerCycle"), c.severity(obj, "PowerCycle")), ("InProgress", "Info"))

    def test_unchanged_keeps_transition_time(self) -> None:
        """Setting an identical condition later keeps the first lastTransitionTime."""
        obj: dict = {}
        c.mark_false(obj, "X", "R", "Error", "m", T0)
        c.mark_false(obj, "X", "R", "Error", "m", T1)
        self.assertEqual(c.get_conditions(obj)[0]["lastTransitionTime"], "2023-11-14T22:13:20Z")

    def test_changed_message_updates_transition_time(self) -> None:
        """Any change of status, severity, reason or message takes the new time."""
        obj: dict = {}
        c.mark_false(obj, "X", "R", "Error", "m", T0)
        c.mark_false(obj, "X", "R", "Error", "other", T1)
        self.assertEqual(c.get_conditions(obj)[0]["lastTransitionTime"], "2023-11-14T22:14:20Z")
        c.mark_true(obj, "X", T1 + 60)
        self.assertEqual(c.get_conditions(obj)[0]["lastTransitionTime"], "2023-11-14T22:15:20Z")

    def test_sorted_ready_first(self) -> None:
        """Ready comes first, others alphabetically by type."""
        obj: dict = {}
        for t in ("TalosInstalled", "Ready", "ProviderSet", "TalosConfigLoaded"):
            c.mark_true(obj, t, T0)
        self.assertEqual([x["type"] for x in obj["status"]["conditions"]],
                         ["Ready", "ProviderSet", "TalosConfigLoaded", "TalosInstalled"])

    def test_delete(self) -> None:
        """Delete removes the condition, and the list when it becomes empty."""
        obj: dict = {}
        c.mark_true(obj, "A", T0)
        c.mark_true(obj, "B", T0)
        c.delete(obj, "A")
        self.assertFalse(c.has(obj, "A"))
        self.assertTrue(c.has(obj, "B"))
        c.delete(obj, "B")
        self.assertNotIn("conditions", obj["status"])
        self.assertIsNone(c.get(obj, "B"))
        self.assertEqual(c.delete({}, "B"), {})


class AssetConditionTests(SynchronousTestCase):
    def test_one_entry_per_url(self) -> None:
        """set_asset_condition replaces the entry of the same URL and keeps order."""
        env: dict = {}
        c.set_asset_condition(env, "http://k", "", False)
        c.set_asset_condition(env, "http://i", "abc", False)
        c.set_asset_condition(env, "http://k", "", True)
        self.assertEqual(env["status"]["conditions"], [
            {"type": "Ready", "status": "True", "url": "http://k"},
            {"type": "Ready", "status": "False", "url": "http://i", "sha512": "abc"}])
