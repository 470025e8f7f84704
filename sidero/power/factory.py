# -*- test-case-name: tests.power.test_factory -*-
"""Which power manager a Server gets (spec §3.12), built afresh on every reconcile.

  1. C{spec.bmc} → resolve user/password (literal or Secret); either still empty → fake
     (the BMC is not fully described yet); else IPMI, port 0 → 623, interface "" → lanplus.
  2. else C{spec.managementApi} → the HTTP power API.
  3. else → fake.

With a test failure probability set, whichever manager was chosen is wrapped in
L{FailureInjectingPowerManager} (Sidero injects into its API client only; here every kind can
be exercised the same way, and the defaults of 0 leave production untouched).

Managers are cheap: what must outlive them (the IPMI pool and per-BMC locks, the HTTP client,
the fake fleet, the dice) lives in the factory.
"""

from __future__ import annotations

import random
from typing import Any

from treq.client import HTTPClient
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime

from sidero.power.api import API_TIMEOUT, APIPowerManager, default_http_client
from sidero.power.credentials import resolve_bmc_credentials
from sidero.power.fake import FailureDice, FailureInjectingPowerManager, FakeFleet, FakePowerManager
from sidero.power.interfaces import ConfigurationError, IPowerManager
from sidero.power.ipmi import DEFAULT_TIMEOUT, IPMIExecutor, IPMIPowerManager, make_endpoint
from sidero.threads import ThreadPoolService


class PowerManagerFactory:
    """Builds the L{IPowerManager} for a Server object.

    @param store: provides L{sidero.store.interfaces.IResourceStore} (for credential Secrets).
    @param ipmi: the shared executor (pool + per-BMC locks) every IPMI manager uses.
    @param http: the treq client API managers use; built from C{clock} when not given.
    @param dice: failure injection; None or all-zero probabilities → managers are not wrapped.
    @param fleet: per-server state for fake managers (tests); None keeps fakes stateless.
    """

    def __init__(
        self,
        clock: IReactorTime,
        store: Any,
        ipmi: IPMIExecutor,
        http: HTTPClient | None = None,
        dice: FailureDice | None = None,
        fleet: FakeFleet | None = None,
        api_timeout: float = API_TIMEOUT,
    ) -> None:
        self.clock = clock
        self.store = store
        self.ipmi = ipmi
        self._http = http
        self.dice = dice
        self.fleet = fleet
        self.api_timeout = api_timeout

    @classmethod
    def from_settings(
        cls, reactor: Any, store: Any, ipmi_pool: ThreadPoolService, settings: Any,
        ipmi_timeout: float = DEFAULT_TIMEOUT,
    ) -> PowerManagerFactory:
        """Production wiring: C{settings} is a L{sidero.config.Settings}."""
        dice = FailureDice(
            settings.test_power_explicit_failure, settings.test_power_silent_failure, random.Random()
        )
        return cls(
            reactor, store, IPMIExecutor(reactor, ipmi_pool.run, timeout=ipmi_timeout),
            dice=dice if dice.active else None,
        )

    @property
    def http(self) -> HTTPClient:
        if self._http is None:
            self._http = default_http_client(self.clock)
        return self._http

    def for_server(self, server: dict[str, Any]) -> Deferred[IPowerManager]:
        """The manager for C{server}; fails with a L{sidero.power.interfaces.PowerError}
        (credentials, configuration) that the controller reports as
        C{Failed to initialize management client: <err>.}."""
        return ensureDeferred(self._build(server))

    async def _build(self, server: dict[str, Any]) -> IPowerManager:
        spec = server.get("spec") or {}
        name = str((server.get("metadata") or {}).get("name", ""))
        manager: Any
        bmc = spec.get("bmc")
        api = spec.get("managementApi")
        if bmc:
            user, password = await resolve_bmc_credentials(self.store, bmc)
            if not user or not password:
                manager = self._fake(name)
            else:
                port = bmc.get("port") or 0
                if not isinstance(port, int) or isinstance(port, bool):
                    raise ConfigurationError(f"BMC port {port!r} is not an integer")
                bmc_endpoint = make_endpoint(
                    str(bmc.get("endpoint") or ""), port, user, password, bmc.get("interface")
                )
                manager = IPMIPowerManager(bmc_endpoint, self.ipmi)
        elif api:
            endpoint = str(api.get("endpoint") or "")
            if not endpoint:
                raise ConfigurationError("managementApi endpoint is empty")
            manager = APIPowerManager(endpoint, self.clock, self.http, self.api_timeout)
        else:
            manager = self._fake(name)
        if self.dice is not None and self.dice.active:
            manager = FailureInjectingPowerManager(manager, self.dice, self.clock)
        result: IPowerManager = manager
        return result

    def _fake(self, name: str) -> FakePowerManager:
        return FakePowerManager(name, self.fleet)
