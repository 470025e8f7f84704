"""As root, a DHCP or TFTP port that cannot be bound stops the real process with one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.paths import RUN_SIDERO, tree_env
from tests.ports import free_tcp_port


class FatalBindTests(SynchronousTestCase):
    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("LOUD SKIP: binding failures are fatal only as root")
        self.state = os.path.abspath(self.mktemp())
        self.sockets = tempfile.mkdtemp(prefix="sd-fb-")

    def run_sidero(self, *args: str) -> subprocess.CompletedProcess[str]:
        port = str(free_tcp_port())
        return subprocess.run(
            [sys.executable, str(RUN_SIDERO), "--state-dir", self.state,
             "--api-endpoint", "127.0.0.1", "--listen-address", "127.0.0.1",
             "--api-port", port, "--http-port", port, "--health-port", str(free_tcp_port()),
             "--metrics-port", str(free_tcp_port()), "--dashboard-port", str(free_tcp_port()),
             "--talos-assets-url", "http://127.0.0.1:1",
             "--management-socket", os.path.join(self.sockets, "m.sock"), *args],
            capture_output=True, text=True, timeout=60, env=tree_env(), stdin=subprocess.DEVNULL)

    def assert_one_line_exit(self, result: subprocess.CompletedProcess[str], needle: str) -> None:
        out = result.stdout + result.stderr
        self.assertEqual(result.returncode, 1, out)
        lines = [line for line in out.splitlines() if "sidero cannot start" in line]
        self.assertEqual(len(lines), 1, out)
        self.assertIn(needle, lines[0])
        self.assertNotIn("Traceback", out)

    def test_tftp_port_in_use(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            taken.bind(("127.0.0.1", 0))
            port = taken.getsockname()[1]
            result = self.run_sidero("--disable-dhcp-proxy", "--tftp-port", str(port))
        self.assert_one_line_exit(result, f"tftp: cannot listen on UDP 127.0.0.1:{port}")

    def test_dhcp_interface_missing(self) -> None:
        result = self.run_sidero("--disable-tftp", "--dhcp-interface", "nosuch0",
                                 "--dhcp-port", "6767", "--dhcp-proxy-port", "6768")
        self.assert_one_line_exit(result, "dhcp-proxy: DHCP proxy: interface 'nosuch0'")
