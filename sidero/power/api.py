# -*- test-case-name: tests.power.test_api -*-
"""The simple HTTP power API of C{spec.managementApi.endpoint} (spec §3.12).

Talos' QEMU provisioner serves it for test VMs: C{POST /poweron}, C{POST /poweroff},
C{POST /reboot} (our power cycle), C{POST /pxeboot} (PXE boot once; the API has no way to pick
BIOS or UEFI, so the mode is ignored) and C{GET /status} answering C{{"PoweredOn": bool}}.
Each request has a 10 s limit; anything but 200 is C{API error: <code> <reason>}.
"""

from __future__ import annotations

import json
from collections.abc import Coroutine
from typing import Any

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface import implementer

from sidero.power.interfaces import KIND_API, APIError, IPowerManager
from sidero.threads import CallTimeout

#: Sidero's per-request limit.
API_TIMEOUT = 10.0


def default_http_client(reactor: Any) -> HTTPClient:
    """A treq client that keeps no connections: a VM's API lives as long as its VM."""
    return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


def parse_status(body: bytes) -> bool:
    """C{{"PoweredOn": true}} → True.

    Go's decoder matches field names case-insensitively and leaves a missing field false; so
    do we.  Anything that is not a JSON object with a boolean (or no) PoweredOn is an error.
    """
    try:
        document = json.loads(body)
    except ValueError as e:
        raise APIError(f"API error: invalid status response: {e}") from e
    if not isinstance(document, dict):
        raise APIError("API error: invalid status response: not a JSON object")
    for key, value in document.items():
        if isinstance(key, str) and key.lower() == "poweredon":
            if not isinstance(value, bool):
                raise APIError(f"API error: invalid status response: PoweredOn is {value!r}")
            return value
    return False


@implementer(IPowerManager)
class APIPowerManager:
    """L{IPowerManager} over the HTTP power API of one VM."""

    kind = KIND_API
    is_fake = False
    log = Logger()

    def __init__(
        self, endpoint: str, clock: IReactorTime, http: HTTPClient, timeout: float = API_TIMEOUT
    ) -> None:
        self.endpoint = endpoint
        self.base = f"http://{endpoint}"
        self.clock = clock
        self.http = http
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"<APIPowerManager {self.base}>"

    def _limited(self, name: str, work: Coroutine[Any, Any, Any]) -> Deferred[Any]:
        d = ensureDeferred(work)

        def timed_out(result: Any, seconds: float) -> Any:
            raise CallTimeout(f"power API {name} on {self.endpoint}", seconds)

        d.addTimeout(self.timeout, self.clock, onTimeoutCancel=timed_out)
        return d

    async def _request(self, method: str, path: str) -> bytes:
        url = self.base + path
        try:
            response = await self.http.request(method, url)
            body: bytes = await response.content()
        except (CallTimeout, APIError):
            raise
        except Exception as e:
            if isinstance(e, CancelledError):
                raise
            raise APIError(f"API error: {method} {url}: {_describe(e)}") from e
        if response.code != 200:
            phrase = response.phrase.decode("latin-1") if response.phrase else ""
            raise APIError(f"API error: {response.code} {phrase}".rstrip())
        return body

    async def _post(self, path: str) -> None:
        await self._request("POST", path)
        self.log.debug("power API POST {path} on {endpoint}", path=path, endpoint=self.endpoint)

    def power_on(self) -> Deferred[None]:
        return self._limited("power on", self._post("/poweron"))

    def power_off(self) -> Deferred[None]:
        return self._limited("power off", self._post("/poweroff"))

    def power_cycle(self) -> Deferred[None]:
        return self._limited("power cycle", self._post("/reboot"))

    def set_pxe(self, mode: str) -> Deferred[None]:
        # Like Sidero: the VM API cannot choose BIOS or UEFI, so any mode means "PXE once".
        return self._limited("PXE boot", self._post("/pxeboot"))

    def is_powered_on(self) -> Deferred[bool]:
        async def status() -> bool:
            return parse_status(await self._request("GET", "/status"))

        return self._limited("status", status())

    def close(self) -> Deferred[None]:
        return succeed(None)


def _describe(e: BaseException) -> str:
    """Twisted wraps connection failures in lists of Failures; surface the first reason."""
    reasons = getattr(e, "reasons", None)
    if reasons:
        first = reasons[0]
        return str(getattr(first, "value", first))
    return str(e) or type(e).__name__
