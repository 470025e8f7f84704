"""The API server's per-write rules, on plain dicts."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from sidero.api import registry
from sidero.store import _objects as objects
from sidero.store import errors


def stored(**extra: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": registry.SERVER.api_version, "kind": "Server",
        "metadata": {"name": "a", "uid": "u1", "resourceVersion": "7", "generation": 3,
                     "creationTimestamp": "2024-01-01T00:00:00Z"},
        "spec": {"accepted": True}, "status": {"power": "on"},
    }
    obj.update(extra)
    return obj


class ObjectRuleTests(SynchronousTestCase):
    def test_format_time(self) -> None:
        """Timestamps are RFC 3339 UTC with whole seconds."""
        self.assertEqual(objects.format_time(0.9), "1970-01-01T00:00:00Z")
        self.assertEqual(objects.format_time(1_700_000_000.5), "2023-11-14T22:13:20Z")

    def test_generate_name(self) -> None:
        """generateName keeps at most 58 characters of the base and adds 5 from the safe alphabet."""
        name = objects.generate_name("x" * 70, rand=lambda: 0.0)
        self.assertEqual(name, "x" * 58 + "bbbbb")
        self.assertEqual(len(objects.generate_name("srv-")), 9)

    def test_update_ignores_server_owned_metadata(self) -> None:
        """uid, creationTimestamp and generation come from the stored object on update."""
        sent = stored()
        sent["metadata"] = {"name": "a", "uid": "", "creationTimestamp": "1999-01-01T00:00:00Z",
                            "generation": 99, "labels": {"x": "y"}}
        new = objects.prepare_update(registry.SERVER, stored(), sent)
        meta = new["metadata"]
        self.assertEqual((meta["uid"], meta["creationTimestamp"], meta["generation"]),
                         ("u1", "2024-01-01T00:00:00Z", 3))
        self.assertEqual(meta["labels"], {"x": "y"})

    def test_uid_precondition(self) -> None:
        """A different uid in the update is a Conflict naming both uids."""
        sent = stored()
        sent["metadata"] = {"name": "a", "uid": "u2"}
        err = self.assertRaises(errors.Conflict, objects.prepare_update, registry.SERVER, stored(), sent)
        self.assertIn("UID in precondition: u2", err.message)

    def test_rename_is_bad_request(self) -> None:
        """An update may not change the name."""
        sent = stored()
        sent["metadata"] = {"name": "b"}
        self.assertRaises(errors.BadRequest, objects.prepare_update, registry.SERVER, stored(), sent)

    def test_generation_without_status_subresource(self) -> None:
        """For a kind without status subresource any non-metadata change bumps generation."""
        rt = registry.METAL_MACHINE_TEMPLATE
        old: dict[str, Any] = {"apiVersion": rt.api_version, "kind": rt.kind,
               "metadata": {"name": "t", "generation": 1, "resourceVersion": "1"}, "spec": {}}
        new: dict[str, Any] = dict(old, status={"x": 1})
        objects.bump_generation(rt, old, new)
        self.assertEqual(new["metadata"]["generation"], 2)

    def test_same_object_ignores_resource_version(self) -> None:
        """Objects differing only by resourceVersion are the same; any other difference is not."""
        a = stored()
        b = stored(metadata=dict(a["metadata"], resourceVersion="8"))
        self.assertTrue(objects.same_object(a, b))
        self.assertFalse(objects.same_object(a, stored(spec={"accepted": False})))

    def test_owner_uids(self) -> None:
        """owner_uids lists each referenced uid once, skipping malformed references."""
        obj = stored()
        obj["metadata"]["ownerReferences"] = [{"uid": "a"}, {"uid": "b"}, {"uid": "a"}, "junk", {}]
        self.assertEqual(objects.owner_uids(obj), ["a", "b"])
