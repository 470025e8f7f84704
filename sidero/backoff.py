# -*- test-case-name: tests.service.test_backoff -*-
"""Capped exponential delays with jitter, for everything that retries on a clock.

The informers reconnect with it, the controller runtime restarts failed runnables with it and
the webhook service retries its registration with it: one formula, so they cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Reconnect delays: C{initial * factor**n}, capped at C{maximum}, plus up to C{jitter}
    of itself at random, so many informers losing one store do not reconnect in lockstep."""

    initial: float = 0.8
    factor: float = 2.0
    maximum: float = 30.0
    jitter: float = 0.5

    def delay(self, attempt: int, rnd: float) -> float:
        """The delay before retry C{attempt} (0 first), C{rnd} a random number in [0, 1)."""
        base = min(self.maximum, self.initial * (self.factor ** min(attempt, 64)))
        return min(self.maximum, base * (1.0 + self.jitter * rnd))
