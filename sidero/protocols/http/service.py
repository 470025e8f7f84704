"""The HTTP service of the API port, reading boot decisions from informer caches."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.application.internet import TCPServer
from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource

from sidero.api.registry import ResourceType
from sidero.app import OrderedMultiService
from sidero.controllers.informer import Informer
from sidero.protocols.http.ipxe import LookupFailed
from sidero.protocols.http.limits import HTTPLimits, guarded_site, new_refusals
from sidero.store.errors import Forbidden, NotFound

log = Logger(namespace="sidero.protocols.http")


class InformerBootLookup:
    """L{sidero.protocols.http.metadata.MetadataLookup} (and so L{BootLookup}) over informer
    caches.

    Before a cache has synced nothing is known for sure: answering "unknown server" then could
    send an installed machine to the agent, so the lookup fails instead (HTTP 500) and iPXE or
    Talos retries.  The Machine informer is None when the store does not serve Cluster API
    Machines (then no Machine exists); until that is known (L{set_machines}), Machine lookups
    fail too.
    """

    def __init__(
        self, servers: Informer, bindings: Informer, classes: Informer, environments: Informer,
        *,
        metal_machines: Informer | None = None,
        secrets: Informer | None = None,
        machines: Informer | None = None,
        machines_known: bool = True,
    ) -> None:
        self.informers = {
            "server": servers, "binding": bindings, "class": classes, "environment": environments,
        }
        self.metal_machines = metal_machines
        self.secrets = secrets
        self.machines = machines
        self.machines_known = machines_known or machines is not None

    def set_machines(self, informer: Informer | None) -> None:
        """Machines are watched by C{informer}, or (None) not served by the store at all."""
        self.machines = informer
        self.machines_known = True

    def _get(self, which: str, name: str) -> dict[str, Any] | None:
        return _cached(self.informers[which], name, None)

    def server(self, name: str) -> dict[str, Any] | None:
        return self._get("server", name)

    def server_binding(self, name: str) -> dict[str, Any] | None:
        return self._get("binding", name)

    def server_class(self, name: str) -> dict[str, Any] | None:
        return self._get("class", name)

    def environment(self, name: str) -> dict[str, Any] | None:
        return self._get("environment", name)

    def metal_machine(self, namespace: str, name: str) -> dict[str, Any] | None:
        if self.metal_machines is None:
            raise LookupFailed("metalmachines are not watched by this process")
        return _cached(self.metal_machines, name, namespace)

    def secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        if self.secrets is None:
            raise LookupFailed("secrets are not watched by this process")
        return _cached(self.secrets, name, namespace)

    def machine(self, namespace: str, name: str) -> dict[str, Any] | None:
        if not self.machines_known:
            raise LookupFailed("not yet known whether the store serves Cluster API machines")
        if self.machines is None:
            return None
        return _cached(self.machines, name, namespace)


def _cached(informer: Informer, name: str, namespace: str | None) -> dict[str, Any] | None:
    if not informer.has_synced:
        raise LookupFailed(f"{informer.kind.plural} cache has not synced yet")
    return informer.get(name, namespace)


class PreparedService(OrderedMultiService):
    """Children started in order after C{prepare()} has finished (e.g. loading the SideroLink
    identity before the HTTP port answers Talos); a failed prepare fails the start.

    Its C{startService} returns a Deferred, so an L{OrderedMultiService} parent waits for it
    and stops the process if it fails.
    """

    def __init__(self, clock: Any, prepare: Callable[[], Awaitable[None]]) -> None:
        super().__init__(clock)
        self.prepare = prepare
        self.prepared = False

    def startService(self) -> Deferred[None]:  # type: ignore[override]
        self.prepared = False
        super().startService()
        return self.when_started()

    async def _start_children(self) -> None:
        await self.prepare()
        self.prepared = True
        await super()._start_children()

    def _start_failed(self, failure: Failure) -> None:
        if self.prepared:
            super()._start_failed(failure)
            return
        # Nothing started; the parent reports the failure under this service's name.
        self.on_start_failure(failure)
        self._settle(failure)


def make_http_service(
    reactor: Any, resource: IResource, port: int, interface: str = "",
    limits: HTTPLimits | None = None,
) -> IService:
    """A TCP listener named C{http} serving C{resource} (HTTP/1.1; no gRPC), with the API
    port's request limits (L{sidero.protocols.http.limits}); its C{refused} attribute counts
    what they refused."""
    refused = new_refusals()
    site = guarded_site(resource, reactor, limits or HTTPLimits(), refused)
    from sidero.protocols.grpc.port import LISTEN_BACKLOG

    service = TCPServer(port, site, interface=interface, reactor=reactor, backlog=LISTEN_BACKLOG)
    service.setName("http")
    service.refused = refused  # type: ignore[attr-defined]
    return service


async def store_serves(store: Any, kind: ResourceType) -> bool:
    """Whether C{store} serves C{kind} (e.g. Cluster API Machines: their CRDs may not be
    installed on a Kubernetes cluster).  A list that the server answers NotFound (no such
    resource) or Forbidden (no RBAC for it) means no; other errors propagate.
    """
    try:
        await store.list(kind)
    except NotFound:
        return False
    except Forbidden as e:
        log.warn("cannot list {resource}: {error}; treating them as absent",
                 resource=kind.resource, error=str(e))
        return False
    return True
