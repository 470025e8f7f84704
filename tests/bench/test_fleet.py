"""bench/fleet at a tiny size: it starts sidero (and kube-apiserver), loads a fleet, drives the
boot routes with vegeta, and prints a table that parses. Never its figures."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

from twisted.internet import threads
from twisted.trial.unittest import SkipTest, TestCase

from tests.paths import REPO, tree_env

ROUTES = ("/boot.ipxe", "/ipxe?uuid=", "/configdata?uuid=", "nginx static file")


def _vegeta() -> str:
    from bench.fleet.bench_fleet import vegeta_binary

    try:
        return vegeta_binary()
    except SystemExit as e:
        raise SkipTest(f"{e} (scripts/install-test-deps does)") from None


def _run(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "bench.fleet.bench_fleet", "--servers", "60", "--classes", "4",
         "--machines", "6", "--rate", "50", "--duration", "1", "--runs", "1", *args],
        cwd=str(REPO), env=tree_env(), capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"bench_fleet failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-4000:]}")
    return result.stdout


def _rows(table: str) -> dict[tuple[str, str], list[str]]:
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 8 and cells[0] not in ("store", "---"):
            rows[(cells[0], cells[1])] = cells[2:]
    return rows


class FleetBenchTests(TestCase):
    timeout = 900

    def setUp(self) -> None:
        if shutil.which("nginx") is None:
            raise SkipTest("nginx is not installed (Debian nginx-light; scripts/install-test-deps)")
        _vegeta()

    def check(self, table: str, store: str) -> dict[tuple[str, str], list[str]]:
        rows = _rows(table)
        for route in ROUTES:
            rate, p50, p99, _max, errors, cpu = rows[(store, route)]
            self.assertGreaterEqual(float(cpu), 0.0)
            self.assertEqual(float(errors), 0.0, f"{store} {route}: {table}")
            self.assertGreater(float(rate), 0.0)
            self.assertLessEqual(float(p50), float(p99))
        for measure in ("ServerClass status after a server joins (s)",
                        "ServerClass status after its selector widens (s)", "sidero RSS (MiB)"):
            self.assertGreater(float(rows[(store, measure)][0]), 0.0, measure)
        self.assertTrue(re.match(r"fleet: 60 servers, 4 classes, 6 bound machines", table), table)
        return rows

    def test_embedded(self) -> object:
        d = threads.deferToThread(_run, "--stores", "embedded")
        return d.addCallback(self.check, "embedded")

    def test_kubernetes_with_allocation(self) -> object:
        from tests.k8s.apiserver import require_binary

        require_binary()

        def checked(table: str) -> None:
            rows = self.check(table, "kubernetes")
            self.assertEqual(float(rows[("kubernetes", "machines with two bindings")][0]), 0.0)
            self.assertGreater(float(rows[("kubernetes", "API requests per allocation")][0]), 0.0)

        d = threads.deferToThread(_run, "--stores", "kubernetes", "--allocate", "10")
        return d.addCallback(checked)
