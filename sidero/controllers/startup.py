# -*- test-case-name: tests.controllers.test_startup -*-
"""Start-up runnables of the controller manager (spec §2.4), run on the leader.

They put the cluster in the shape the rest of sidero assumes: the C{any} ServerClass exists
with no qualifiers (so it holds every accepted, non-cordoned server), and the C{default}
Environment exists (created when missing, never overwritten: operators may edit it).
Both are idempotent and tolerate racing a second writer (AlreadyExists, Conflict).
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from sidero import TALOS_RELEASE, TALOS_RELEASES_URL
from sidero.api.environment import DEFAULT_ENVIRONMENT, default_environment
from sidero.api.matching import ANY_SERVER_CLASS, any_server_class, reset_any_server_class
from sidero.api.registry import ENVIRONMENT, SERVER_CLASS
from sidero.controllers.runtime import ControllerManager
from sidero.store.errors import AlreadyExists, Conflict, NotFound
from sidero.store.interfaces import IResourceStore, Object

log = Logger()

#: How often a conflicting write of the C{any} class is retried before giving up (the
#: runnable itself is then retried with backoff by the manager).
CONFLICT_RETRIES = 5


def qualifiers_empty(server_class: Object) -> bool:
    qualifiers: Any = (server_class.get("spec") or {}).get("qualifiers")
    if not qualifiers:
        return True
    return isinstance(qualifiers, dict) and not any(qualifiers.values())


async def ensure_any_server_class(store: IResourceStore) -> Object:
    """Create ServerClass C{any} with an empty spec if missing; else reset its qualifiers.

    Returns the object as stored.
    """
    try:
        current = await store.get(SERVER_CLASS, ANY_SERVER_CLASS)
    except NotFound:
        try:
            created = await store.create(any_server_class())
            log.info("created ServerClass {name}", name=ANY_SERVER_CLASS)
            return created
        except AlreadyExists:
            current = await store.get(SERVER_CLASS, ANY_SERVER_CLASS)
    for _ in range(CONFLICT_RETRIES):
        if qualifiers_empty(current):
            return current
        try:
            updated = await store.update(reset_any_server_class(current))
            log.info("reset qualifiers of ServerClass {name}", name=ANY_SERVER_CLASS)
            return updated
        except Conflict:
            current = await store.get(SERVER_CLASS, ANY_SERVER_CLASS)
    raise Conflict(f'ServerClass "{ANY_SERVER_CLASS}" kept changing; giving up for now')


async def ensure_default_environment(
    store: IResourceStore, talos_release: str = TALOS_RELEASE, assets_url: str = TALOS_RELEASES_URL
) -> Object:
    """Create Environment C{default} for C{talos_release} (assets under C{assets_url}) if
    missing; never update it: an operator's edits win."""
    if not talos_release:
        raise ValueError("TALOS_RELEASE is not set: cannot build the default Environment")
    try:
        return await store.get(ENVIRONMENT, DEFAULT_ENVIRONMENT)
    except NotFound:
        pass
    try:
        created = await store.create(default_environment(talos_release, assets_url))
        log.info(
            "created Environment {name} for Talos {release}",
            name=DEFAULT_ENVIRONMENT, release=talos_release,
        )
        return created
    except AlreadyExists:
        return await store.get(ENVIRONMENT, DEFAULT_ENVIRONMENT)


def install_startup_runnables(
    manager: ControllerManager, store: IResourceStore, talos_release: str = TALOS_RELEASE,
    assets_url: str = TALOS_RELEASES_URL,
) -> None:
    """Register the §2.4 runnables with C{manager}: they run on each leadership gain and are
    retried with backoff until they succeed."""
    if not talos_release:
        raise ValueError("TALOS_RELEASE is not set: the controller manager refuses to start")

    async def any_class() -> None:
        await ensure_any_server_class(store)

    async def default_env() -> None:
        await ensure_default_environment(store, talos_release, assets_url)

    manager.add_runnable("ensure-serverclass-any", any_class)
    manager.add_runnable("ensure-environment-default", default_env)
