# -*- test-case-name: tests.k8s.test_ratelimit -*-
"""Client-side rate limiting of Kubernetes API requests (client-go's token bucket).

controller-runtime gives every client a token bucket of QPS 20 and burst 30, so a controller
that loops (or a fleet of thousands of objects at start) cannot flood the API server.  This is
the same bucket, with one difference in how it waits: L{TokenBucket.reserve} takes a token at
once and says how long the caller must wait for it (golang.org/x/time/rate's C{Reserve}), so
the caller chooses where to wait.  The store waits on the reactor with C{callLater} before it
hands a request to the C{k8s} pool (no pool thread sleeps, so a queue of throttled requests
never holds threads the Lease needs); a watch thread, which is its own, sleeps in itself.

The clock is injected (C{time.monotonic} by default) and the bucket is thread-safe: watch
threads and the reactor share it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

#: controller-runtime's defaults (rest.Config QPS and Burst when unset).
DEFAULT_QPS = 20.0
DEFAULT_BURST = 30


class TokenBucket:
    """C{burst} tokens, refilled at C{qps} per second; C{qps <= 0} means unlimited.

    @ivar requests: tokens taken so far (every throttled request), for metrics and benchmarks.
    @ivar throttled: requests that had to wait, and C{waited} the seconds they waited in all.
    """

    def __init__(self, qps: float = DEFAULT_QPS, burst: int = DEFAULT_BURST,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if qps > 0 and burst < 1:
            raise ValueError(f"burst must be at least 1 when qps is limited, not {burst}")
        self.qps = float(qps)
        self.burst = int(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()
        self._lock = threading.Lock()
        self.requests = 0
        self.throttled = 0
        self.waited = 0.0

    @property
    def unlimited(self) -> bool:
        return self.qps <= 0

    def reserve(self) -> float:
        """Take one token now; return the seconds to wait before using it (0 when one was
        there).  Tokens may go negative: later callers queue behind earlier ones, in order."""
        with self._lock:
            self.requests += 1
            if self.unlimited:
                return 0.0
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.qps)
            self._stamp = now
            self._tokens -= 1.0
            if self._tokens >= 0:
                return 0.0
            delay = -self._tokens / self.qps
            self.throttled += 1
            self.waited += delay
            return delay

    def give_back(self) -> None:
        """Return a token taken by L{reserve} for a request that was never sent (it was
        cancelled while it waited), as golang.org/x/time/rate's C{Reservation.Cancel}."""
        with self._lock:
            if not self.unlimited:
                self._tokens = min(float(self.burst), self._tokens + 1.0)

    def wait(self, stop: threading.Event | None = None) -> bool:
        """Block the calling thread (never the reactor's) until a token is ours; False when
        C{stop} was set while waiting."""
        delay = self.reserve()
        if delay <= 0:
            return True
        if stop is None:
            time.sleep(delay)
            return True
        return not stop.wait(delay)
