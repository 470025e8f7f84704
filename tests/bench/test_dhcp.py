"""bench/dhcp/bench_proxy.py at a tiny size: it runs both peers, stops, and prints its table."""

from __future__ import annotations

import re
import subprocess
import sys

from twisted.trial.unittest import SkipTest, TestCase

from tests.netlab import missing_requirements
from tests.paths import REPO, tree_env

ROW = re.compile(r"^(:67 offer|:4011 ack)\s+(sidero|dnsmasq)\s+\|\s+(\d+)", re.M)


class DHCPBenchTests(TestCase):
    timeout = 120

    def test_tiny_run_has_both_peers(self) -> None:
        """One round of one second at a low rate: a row per exchange and peer with a rate,
        and the ratios."""
        reason = missing_requirements(("dnsmasq", "perfdhcp"))
        if reason:
            raise SkipTest(reason)
        done = subprocess.run(
            [sys.executable, "-m", "bench.dhcp.bench_proxy", "--rounds", "1", "--seconds", "1",
             "--max-rate", "2000", "--latency-rate", "200", "--clients", "20000"],
            cwd=REPO, env=tree_env(), capture_output=True, text=True, timeout=110)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        rows = {(m.group(1), m.group(2)): int(m.group(3)) for m in ROW.finditer(done.stdout)}
        self.assertEqual(set(rows), {(x, p) for x in (":67 offer", ":4011 ack")
                                     for p in ("sidero", "dnsmasq")}, done.stdout)
        for row, rate in rows.items():
            self.assertGreater(rate, 0, f"{row} answered nothing:\n{done.stdout}")
        self.assertRegex(done.stdout, r"(?m)^:67 offer\s+ratio\s+\|\s+[\d.]+x")
        self.assertRegex(done.stdout, r"(?m)^:4011 ack\s+ratio\s+\|\s+[\d.]+x")
