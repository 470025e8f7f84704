"""bench/tftp/bench.py at a tiny size: it runs every server, stops, and prints its table."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from twisted.trial.unittest import SkipTest, TestCase

from tests.paths import REPO, tree_env

ROW = re.compile(r"^(sidero|sidero-2w|tftpd-hpa|dnsmasq)\s+\|\s+([\d.]+)", re.M)


class TFTPBenchTests(TestCase):
    timeout = 180

    def test_tiny_run_has_every_peer(self) -> None:
        """One round of 4 clients x 100 kB: a row with a rate per server, and the ratios."""
        missing = [t for t in ("curl", "in.tftpd", "dnsmasq", "unshare") if not shutil.which(t)]
        if os.geteuid() != 0 or missing:
            raise SkipTest(f"needs root and {', '.join(missing) or 'nothing else'} "
                           "(dnsmasq's TFTP port is 69: a private namespace)")
        done = subprocess.run(
            [sys.executable, str(REPO / "bench" / "tftp" / "bench.py"), "--rounds", "1",
             "--clients", "4", "--size", "100000", "--workers", "2"],
            cwd=REPO, env=tree_env(), capture_output=True, text=True, timeout=170)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        rows = {m.group(1): float(m.group(2)) for m in ROW.finditer(done.stdout)}
        self.assertEqual(set(rows), {"sidero", "sidero-2w", "tftpd-hpa", "dnsmasq"},
                         done.stdout)
        for server, rate in rows.items():
            self.assertGreater(rate, 0, f"{server}: {done.stdout}")
        self.assertRegex(done.stdout, r"(?m)^ratio sidero-2w / dnsmasq: [\d.]+x")
        self.assertRegex(done.stdout, r"(?m)^ratio sidero-2w / tftpd-hpa: [\d.]+x")
