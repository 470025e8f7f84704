"""bench/dhcp/bench_proxy.py at a tiny size: it runs both peers, stops, and prints its table."""

from __future__ import annotations

import re
import subprocess
import sys

from twisted.trial.unittest import SkipTest, TestCase

from tests.netlab import missing_requirements
from tests.paths import REPO, tree_env

ROW = re.compile(r"^(sidero|dnsmasq)\s+\|\s+(\d+)\s*(?:\[[\d-]+\])?\s+\|\s+([\d.]+)", re.M)


class DHCPBenchTests(TestCase):
    timeout = 120

    def test_tiny_run_has_both_peers(self) -> None:
        """One round of one second at a low rate: a row per peer with a rate, and the ratio."""
        reason = missing_requirements(("dnsmasq", "perfdhcp"))
        if reason:
            raise SkipTest(reason)
        done = subprocess.run(
            [sys.executable, "-m", "bench.dhcp.bench_proxy", "--rounds", "1", "--seconds", "1",
             "--max-rate", "2000", "--latency-rate", "200", "--clients", "100"],
            cwd=REPO, env=tree_env(), capture_output=True, text=True, timeout=110)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        rows = {m.group(1): int(m.group(2)) for m in ROW.finditer(done.stdout)}
        self.assertEqual(set(rows), {"sidero", "dnsmasq"}, done.stdout)
        for peer, rate in rows.items():
            self.assertGreater(rate, 0, f"{peer} answered nothing:\n{done.stdout}")
        self.assertRegex(done.stdout, r"(?m)^ratio\s+\|\s+[\d.]+x")
