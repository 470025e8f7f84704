"""The HTTP service of the API port, reading boot decisions from informer caches."""

from __future__ import annotations

from typing import Any

from twisted.application.internet import TCPServer
from twisted.application.service import IService
from twisted.web.resource import IResource
from twisted.web.server import Site

from sidero.controllers.informer import Informer
from sidero.protocols.http.ipxe import LookupFailed


class InformerBootLookup:
    """L{sidero.protocols.http.ipxe.BootLookup} over informer caches.

    Before a cache has synced nothing is known for sure: answering "unknown server" then could
    send an installed machine to the agent, so the lookup fails instead (HTTP 500) and iPXE
    retries.
    """

    def __init__(
        self, servers: Informer, bindings: Informer, classes: Informer, environments: Informer,
    ) -> None:
        self.informers = {
            "server": servers, "binding": bindings, "class": classes, "environment": environments,
        }

    def _get(self, which: str, name: str) -> dict[str, Any] | None:
        informer = self.informers[which]
        if not informer.has_synced:
            raise LookupFailed(f"{informer.kind.plural} cache has not synced yet")
        return informer.get(name)

    def server(self, name: str) -> dict[str, Any] | None:
        return self._get("server", name)

    def server_binding(self, name: str) -> dict[str, Any] | None:
        return self._get("binding", name)

    def server_class(self, name: str) -> dict[str, Any] | None:
        return self._get("class", name)

    def environment(self, name: str) -> dict[str, Any] | None:
        return self._get("environment", name)


def make_http_service(
    reactor: Any, resource: IResource, port: int, interface: str = "",
) -> IService:
    """A TCP listener named C{http} serving C{resource} (HTTP/1.1)."""
    site = Site(resource)
    site.displayTracebacks = False
    service = TCPServer(port, site, interface=interface, reactor=reactor)
    service.setName("http")
    return service
