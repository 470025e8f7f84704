"""The resource store seam: what every backend (embedded SQLite, Kubernetes) provides.

Objects are plain JSON-shaped dicts exactly as Kubernetes serialises them
(C{apiVersion}, C{kind}, C{metadata}, C{spec}, C{status}), always in the kind's storage
version (conversion happens at the edges: the management API, the Kubernetes webhook).
Every method returns a Deferred that fires on the reactor thread; no backend blocks it.
Failures are L{sidero.store.errors.StoreError} subclasses with Kubernetes reasons.

The contract tests in C{tests/store/contract.py} define the behaviour precisely; a backend is
correct when it passes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from sidero.api.registry import ResourceType

Object = dict[str, Any]

ADDED = "ADDED"
MODIFIED = "MODIFIED"
DELETED = "DELETED"
BOOKMARK = "BOOKMARK"
ERROR = "ERROR"


@dataclass(frozen=True)
class WatchEvent:
    """One change seen by a watch.

    C{type} is ADDED, MODIFIED, DELETED or BOOKMARK (C{object} then carries only
    C{metadata.resourceVersion}).  For DELETED, C{object} is the last state of the object
    with the resourceVersion of its deletion.
    """

    type: str
    object: Object


@dataclass
class ResourceList:
    """The result of a list: the items, and the store's resourceVersion to watch from."""

    items: list[Object]
    resource_version: str
    kind: ResourceType | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class IWatch(Interface):
    """A running watch.  Events go to the callback given to L{IResourceStore.watch}."""

    done = Attribute(
        "Deferred that fires with None when the watch ends because stop() was called, and "
        "errbacks with a StoreError (Gone for an expired resourceVersion, Unavailable when the "
        "backend went away) when it ends by itself.  Nothing is delivered after it fires."
    )

    def stop() -> None:
        """End the watch; no event is delivered after this returns."""


class IAdmission(Interface):
    """Defaulting and validation applied by a store before it writes (the API server's
    structural schema plus sidero's validating webhooks)."""

    def admit(kind: ResourceType, operation: str, new: Object | None, old: Object | None) -> Object | None:
        """Return the object to store (defaults filled in) for C{operation} in
        C{CREATE}, C{UPDATE}, C{DELETE}.

        @raise sidero.store.errors.Invalid: with one cause per offending field.
        @raise sidero.store.errors.BadRequest: an update the kind forbids (immutable spec).
        """


class IResourceStore(Interface):
    """CRUD, watch and finalizer semantics of the Kubernetes API, for the kinds of the registry."""

    def get(kind: ResourceType, name: str, namespace: str | None = None) -> Deferred[Object]:
        """The object, or L{NotFound}.  C{namespace} is ignored for cluster-scoped kinds."""

    def list(
        kind: ResourceType,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> Deferred[ResourceList]:
        """Every matching object (all namespaces when C{namespace} is None), ordered by
        namespace then name, with the resourceVersion to start a watch from."""

    def create(obj: Object) -> Deferred[Object]:
        """Store a new object (kind from C{apiVersion}/C{kind}; a v1alpha1 object must have
        been converted already).  Sets uid, creationTimestamp, resourceVersion and generation.
        C{metadata.generateName} without a name gets a random suffix.
        The status of a kind with a status subresource is dropped, as Kubernetes does.

        @raise AlreadyExists, Invalid, BadRequest
        """

    def update(obj: Object) -> Deferred[Object]:
        """Replace metadata and spec.  A non-empty C{metadata.resourceVersion} must equal the
        stored one (L{Conflict} otherwise); empty means unconditional.  The status of kinds with
        a status subresource is kept as stored.  generation increases when spec changes.
        Removing the last finalizer of an object being deleted deletes it.
        """

    def update_status(obj: Object) -> Deferred[Object]:
        """Replace only C{status}, with the same resourceVersion rule as update."""

    def patch(
        kind: ResourceType,
        name: str,
        patch: Object,
        namespace: str | None = None,
        subresource: str | None = None,
    ) -> Deferred[Object]:
        """Apply an RFC 7386 JSON merge patch to the object (C{subresource="status"} patches
        status only).  A C{metadata.resourceVersion} inside the patch is a precondition."""

    def delete(
        kind: ResourceType,
        name: str,
        namespace: str | None = None,
        resource_version: str | None = None,
    ) -> Deferred[Object | None]:
        """Delete: with finalizers present, set C{deletionTimestamp} (once) and return the
        object; without, remove it, cascade to objects whose ownerReferences name its uid
        (background garbage collection), and return None."""

    def watch(
        kind: ResourceType,
        callback: Callable[[WatchEvent], object],
        namespace: str | None = None,
        resource_version: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        bookmarks: bool = False,
    ) -> Deferred[IWatch]:
        """Deliver every change after C{resource_version} to C{callback}, on the reactor thread,
        in resourceVersion order, without gaps or repeats.  With C{resource_version} None or
        C{""}, start with an ADDED event for each current object.  A resourceVersion the store
        no longer remembers ends the watch with L{Gone} (via C{IWatch.done})."""
