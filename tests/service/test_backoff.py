"""Backoff: the capped, jittered exponential delays every retry loop shares."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from sidero.backoff import Backoff


class BackoffTests(SynchronousTestCase):
    def test_doubles_up_to_the_cap(self) -> None:
        """Without jitter the delays double from C{initial} and stop at C{maximum}."""
        b = Backoff(initial=1.0, maximum=60.0, jitter=0.0)
        self.assertEqual([b.delay(n, 0.9) for n in range(8)], [1, 2, 4, 8, 16, 32, 60, 60])

    def test_jitter_lengthens_by_up_to_its_fraction(self) -> None:
        """The random part adds at most C{jitter} of the delay, and never passes the cap."""
        b = Backoff(initial=1.0, maximum=8.0, jitter=0.5)
        self.assertEqual((b.delay(1, 0.0), b.delay(1, 0.5), b.delay(1, 1.0)), (2.0, 2.5, 3.0))
        self.assertEqual(b.delay(3, 1.0), 8.0)

    def test_huge_attempt_counts_do_not_overflow(self) -> None:
        """An informer down for days still gets the capped delay."""
        self.assertEqual(Backoff().delay(10_000, 0.0), 30.0)
