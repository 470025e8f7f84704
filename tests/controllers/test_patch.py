"""The patch helper: merge patches of what changed, preconditions when lists are replaced."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from sidero.api.registry import METAL_MACHINE
from sidero.controllers.patch import merge_diff, patch_changes
from sidero.store import errors
from sidero.store.interfaces import Object
from tests.store.inline import inline_store


class MergeDiffTests(SynchronousTestCase):
    def test_equal(self) -> None:
        self.assertEqual(merge_diff({"a": {"b": 1}}, {"a": {"b": 1}}), ({}, False))

    def test_nested_change_and_removal(self) -> None:
        self.assertEqual(merge_diff({"a": {"b": 1, "c": 2}, "d": 1}, {"a": {"b": 3}}),
                         ({"a": {"b": 3, "c": None}, "d": None}, False))

    def test_list_replaced(self) -> None:
        self.assertEqual(merge_diff({"f": ["x"]}, {"f": ["x", "y"]}), ({"f": ["x", "y"]}, True))
        self.assertEqual(merge_diff({"f": ["x"]}, {}), ({"f": None}, True))


class PatchChangesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store, _ = inline_store()
        self.ok(self.store.open())
        self.addCleanup(lambda: self.ok(self.store.close()))
        self.obj = self.ok(self.store.create({
            "apiVersion": METAL_MACHINE.api_version, "kind": "MetalMachine",
            "metadata": {"name": "m", "namespace": "default"}, "spec": {}}))

    def ok(self, d: Any) -> Any:
        if isinstance(d, Coroutine):
            d = Deferred.fromCoroutine(d)
        return self.successResultOf(d)

    def test_spec_and_status_written(self) -> None:
        new: Object = {**self.obj, "spec": {"providerID": "sidero://s"}, "status": {"ready": True}}
        written = self.ok(patch_changes(self.store, METAL_MACHINE, self.obj, new))
        self.assertEqual(written["spec"], {"providerID": "sidero://s"})
        self.assertEqual(written["status"], {"ready": True})

    def test_nothing_changed_writes_nothing(self) -> None:
        written = self.ok(patch_changes(self.store, METAL_MACHINE, self.obj, dict(self.obj)))
        self.assertIs(written, self.obj)

    def test_list_change_against_stale_copy_conflicts(self) -> None:
        """Finalizers replaced from a stale read must not overwrite a concurrent change."""
        self.ok(self.store.patch(METAL_MACHINE, "m", {"metadata": {"finalizers": ["other"]}},
                                 namespace="default"))
        new = {**self.obj, "metadata": {**self.obj["metadata"], "finalizers": ["mine"]}}
        failure = self.failureResultOf(Deferred.fromCoroutine(
            patch_changes(self.store, METAL_MACHINE, self.obj, new)))
        self.assertIsInstance(failure.value, errors.Conflict)
        self.assertEqual(self.ok(self.store.get(METAL_MACHINE, "m", "default"))["metadata"]["finalizers"],
                         ["other"])

    def test_scalar_change_against_stale_copy_applies(self) -> None:
        self.ok(self.store.patch(METAL_MACHINE, "m", {"metadata": {"labels": {"a": "1"}}}, namespace="default"))
        new = {**self.obj, "spec": {"providerID": "sidero://s"}}
        written = self.ok(patch_changes(self.store, METAL_MACHINE, self.obj, new))
        self.assertEqual(written["metadata"]["labels"], {"a": "1"})
        self.assertEqual(written["spec"]["providerID"], "sidero://s")

    def test_gone_object(self) -> None:
        self.ok(self.store.delete(METAL_MACHINE, "m", "default"))
        new = {**self.obj, "spec": {"providerID": "x"}}
        self.assertIsNone(self.ok(patch_changes(self.store, METAL_MACHINE, self.obj, new)))
