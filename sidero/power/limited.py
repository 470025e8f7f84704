# -*- test-case-name: tests.test_limits -*-
"""An L{IPowerManager} whose operations wait for a slot of a shared L{ConcurrencyLimit}.

Every power manager of the process shares one limit (C{--max-concurrent-power}), so a mass
accept or a controller restart queues its BMC calls instead of opening hundreds of IPMI
sessions at once; the queue is visible as C{sidero_limit_queued{limit="power"}}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from sidero.limits import ConcurrencyLimit
from sidero.power.interfaces import IPowerManager


class LimitedPowerManager:
    """Wraps C{wrapped}; C{close} and attributes pass straight through."""

    def __init__(self, wrapped: IPowerManager, limit: ConcurrencyLimit) -> None:
        self.wrapped = wrapped
        self.limit = limit

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)

    @property
    def is_fake(self) -> bool:
        return bool(self.wrapped.is_fake)

    def power_on(self) -> Deferred[None]:
        return self.limit.run(self.wrapped.power_on)

    def power_off(self) -> Deferred[None]:
        return self.limit.run(self.wrapped.power_off)

    def power_cycle(self) -> Deferred[None]:
        return self.limit.run(self.wrapped.power_cycle)

    def is_powered_on(self) -> Deferred[bool]:
        return self.limit.run(self.wrapped.is_powered_on)

    def set_pxe(self, mode: str) -> Deferred[None]:
        return self.limit.run(self.wrapped.set_pxe, mode)
