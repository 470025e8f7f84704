"""kind_of and namespace_for: what every backend checks before a write."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from sidero.api import registry
from sidero.store import errors
from sidero.store.kinds import kind_of, namespace_for


class KindOfTests(SynchronousTestCase):
    def test_storage_version(self) -> None:
        """An object in its storage version names its registered kind."""
        self.assertIs(kind_of({"apiVersion": registry.SERVER.api_version, "kind": "Server"}),
                      registry.SERVER)

    def test_refusals(self) -> None:
        """Not an object, no kind, an unknown kind and a non-storage version are BadRequest."""
        for obj, message in [
            ([], "the object to store must be a JSON object"),
            ({"apiVersion": "v1"}, "Object 'Kind' is missing in the object to store"),
            ({"apiVersion": "metal.sidero.dev/v1alpha1", "kind": "Server"},
             "the API version in the data (metal.sidero.dev/v1alpha1) does not match the "
             "expected API version (metal.sidero.dev/v1alpha2)"),
        ]:
            e = self.assertRaises(errors.BadRequest, kind_of, obj)
            self.assertEqual(e.message, message)
        self.assertRaises(errors.BadRequest, kind_of, {"apiVersion": "x.io/v1", "kind": "Nope"})


class NamespaceForTests(SynchronousTestCase):
    def test_namespaced_defaults(self) -> None:
        """A namespaced kind keeps its namespace, or gets C{default}."""
        self.assertEqual(namespace_for(registry.SECRET, "sidero-system"), "sidero-system")
        self.assertEqual(namespace_for(registry.SECRET, None), "default")

    def test_cluster_scoped_drops_it(self) -> None:
        """A cluster-scoped kind has no namespace, whatever was given."""
        self.assertEqual(namespace_for(registry.SERVER, "x"), "")
