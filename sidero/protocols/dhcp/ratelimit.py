# -*- test-case-name: tests.protocols.dhcp.test_ratelimit -*-
"""A token bucket per client MAC (chaddr) for the DHCP proxy.

One misbehaving or hostile client (a PXE ROM in a reboot loop, a flood tool) must not use up
the proxy's one reactor thread and starve every other machine: each MAC may send C{burst}
packets at once and C{rate} per second after that; the excess is dropped before any decision
or reply is made and counted as C{rate-limited}.  A real PXE client sends a few DISCOVERs
seconds apart and one REQUEST to 4011, far below the defaults.

Memory is bounded: at most C{max_clients} buckets (16384, a few MiB), the least recently seen
evicted first.  A flood of random MACs costs one small entry each, then recycles them (it is
not what this guards against; an evicted client merely starts again with a full bucket).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

#: The reason recorded in L{sidero.protocols.dhcp.protocol.DHCPCounters.ignored}.
RATE_LIMITED = "rate-limited"


class PerClientLimiter:
    """C{allow(key)} is False when C{key} has used up its tokens.

    @param rate: tokens added per second (0: no limit at all).
    @param burst: bucket size, and what a new client starts with.
    @param now: the clock (C{reactor.seconds}).
    """

    def __init__(self, rate: float, burst: int, now: Callable[[], float],
                 max_clients: int = 16384) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.now = now
        self.max_clients = max_clients
        self._buckets: OrderedDict[bytes, tuple[float, float]] = OrderedDict()

    def allow(self, key: bytes) -> bool:
        if self.rate <= 0:
            return True
        now = self.now()
        entry = self._buckets.pop(key, None)
        if entry is None:
            tokens = self.burst
            if len(self._buckets) >= self.max_clients:
                self._buckets.popitem(last=False)
        else:
            tokens, seen = entry
            tokens = min(self.burst, tokens + (now - seen) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        return allowed

    def __len__(self) -> int:
        return len(self._buckets)
