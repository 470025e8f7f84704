"""The twistd dropin from an installed wheel, and the real process started by twistd."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
import zipfile

from twisted.trial.unittest import SynchronousTestCase

from sidero.config import SETTINGS
from tests.ports import free_port
from tests.service.wheelenv import DROPIN, REPO, WheelEnv, wheel_env


class InstalledWheelTests(SynchronousTestCase):
    """Build the wheel, install it in a fresh venv, run twistd from outside the repository."""

    def setUp(self) -> None:
        self.env: WheelEnv = wheel_env()
        self.cwd = self.tempdir("sidero-cwd-")

    def tempdir(self, prefix: str) -> str:
        path = tempfile.mkdtemp(prefix=prefix)
        self.addCleanup(shutil.rmtree, path, True)
        return path

    def twistd(self, *args: str, env: dict[str, str] | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.env.twistd, *args], cwd=self.cwd, env=env or self.env.env(),
            capture_output=True, text=True, timeout=timeout,
        )

    def test_wheel_ships_dropin_without_package_markers(self) -> None:
        """The wheel has twisted/plugins/sidero_plugin.py and no twisted/__init__ of its own."""
        with zipfile.ZipFile(self.env.wheel) as zf:
            names = zf.namelist()
        self.assertIn(DROPIN, names)
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertFalse([n for n in names if n.startswith("tests/")])

    def test_plugin_found_and_cache_written(self) -> None:
        """getPlugins finds tapname sidero from site-packages, and dropin.cache was written."""
        out = subprocess.run(
            [self.env.python, "-c",
             "from twisted.plugin import getPlugins; from twisted.application.service import"
             " IServiceMaker; print([p.tapname for p in getPlugins(IServiceMaker)]);"
             " import twisted.plugins.sidero_plugin as m; print(m.__file__)"],
            cwd=self.cwd, env=self.env.env(), capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        tapnames, dropin = out.stdout.splitlines()[-2:]
        self.assertIn("'sidero'", tapnames)
        # The dropin loaded comes from an installed wheel (this venv's, or the tox env's that it
        # inherits), never from the source tree; its dropin.cache was written beside it.
        self.assertIn(os.sep + "site-packages" + os.sep, dropin)
        self.assertNotIn(os.path.join("sidero", "plugins"), dropin)
        cache = os.path.join(os.path.dirname(dropin), "dropin.cache")
        self.assertTrue(os.path.exists(cache), f"no dropin.cache beside {dropin}")

    def test_agent_console_script(self) -> None:
        """The wheel installs sidero-agent; a fatal error (no endpoint) is one line and exit 1."""
        script = os.path.join(os.path.dirname(self.env.twistd), "sidero-agent")
        cmdline = os.path.join(self.cwd, "cmdline")
        with open(cmdline, "w") as f:
            f.write("console=ttyS0 panic=30\n")
        result = subprocess.run(
            [script, "--cmdline", cmdline, "--no-reboot", "--no-network", "--no-bmc"],
            cwd=self.cwd, env=self.env.env(), capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        fatal = [line for line in result.stderr.splitlines() if "fatal" in line]
        self.assertEqual(len(fatal), 1, result.stderr)
        self.assertIn("sidero.endpoint", fatal[0])
        self.assertNotIn("Traceback", result.stderr)

    def test_help_lists_every_setting(self) -> None:
        """C{twistd sidero --help} shows every flag of the settings table (and --no- forms)."""
        result = self.twistd("sidero", "--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        for setting in SETTINGS:
            self.assertIn(setting.flag, result.stdout)
            if setting.boolean:
                self.assertIn("--no-" + setting.flag[2:], result.stdout)

    def test_invalid_variable_one_line(self) -> None:
        """A bad variable stops twistd with exit 1 and one line, not the usage text."""
        result = self.twistd(
            "-n", "--pidfile=", "sidero",
            env=self.env.env(SIDERO_CONTROLLER_MANAGER_IPMI_PXE_METHOD="foo"),
        )
        self.assertEqual(result.returncode, 1)
        self.assertEqual(
            result.stderr,
            'sidero: invalid value "foo" for --ipmi-pxe-method (from '
            "SIDERO_CONTROLLER_MANAGER_IPMI_PXE_METHOD): expected one of uefi, bios\n",
        )
        self.assertEqual(result.stdout, "")

    def run_until_started(
        self, args: list[str], env: dict[str, str], state_dir: str, api_port: int
    ) -> str:
        """Start twistd, wait for the full start, check it stays up, SIGTERM it; the log."""
        log_path = os.path.join(self.cwd, "out.log")
        with open(log_path, "w") as log:
            proc = subprocess.Popen([self.env.twistd, *args], cwd=self.cwd, env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
        started = "All services started: threads, store, controllers, tftp, http"
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and started not in _read(log_path):
                self.assertIsNone(proc.poll(), _read(log_path))
                time.sleep(0.2)
            self.assertIn(started, _read(log_path))
            time.sleep(3)
            self.assertIsNone(proc.poll(), "twistd exited early:\n" + _read(log_path))
            self.assertTrue(os.path.exists(os.path.join(state_dir, "state.db")))
            with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/boot.ipxe", timeout=10) as r:
                self.assertTrue(r.read().startswith(b"#!ipxe"))
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        text = _read(log_path)
        # twistd shuts down in order, then re-raises the signal so the parent sees it (systemd
        # counts SIGTERM as a clean exit).
        self.assertEqual(code, -signal.SIGTERM, text)
        self.assertIn("Server Shut Down", text)
        for bad in ("Traceback", "CRITICAL", "ERROR ", "Unhandled", '"level": "error"'):
            self.assertNotIn(bad, text)
        return text

    def test_real_process(self) -> None:
        """twistd -n sidero stays up with a clean log and a state db, then shuts down on SIGTERM."""
        state_dir = self.tempdir("sidero-state-")
        api_port = free_port(socket.SOCK_STREAM)
        text = self.run_until_started(
            ["-n", "--pidfile=", "sidero", "--state-dir", state_dir,
             "--api-endpoint", "127.0.0.1", "--listen-address", "127.0.0.1",
             "--api-port", str(api_port), "--http-port", str(api_port), "--disable-dhcp-proxy",
             "--tftp-port", str(free_port(socket.SOCK_DGRAM)),
             "--dashboard-port", str(free_port(socket.SOCK_STREAM))],
            self.env.env(), state_dir, api_port,
        )
        self.assertIn("Main loop terminated", text)
        # Every line is ours: "<time> <LEVEL> [namespace] message".
        self.assertTrue(all(line[:4].isdigit() and "Z " in line[:30] for line in text.splitlines()),
                        text)

    def test_tac_from_environment(self) -> None:
        """twistd -y tap/sidero.tac takes every setting from variables (JSON logs here)."""
        state_dir = self.tempdir("sidero-state-")
        api_port = free_port(socket.SOCK_STREAM)
        env = self.env.env(
            SIDERO_STATE_DIR=state_dir,
            SIDERO_CONTROLLER_MANAGER_API_ENDPOINT="127.0.0.1",
            SIDERO_CONTROLLER_MANAGER_API_PORT=str(api_port),
            SIDERO_CONTROLLER_MANAGER_CONTAINER_API_PORT=str(api_port),
            SIDERO_LISTEN_ADDRESS="127.0.0.1",
            SIDERO_CONTROLLER_MANAGER_DISABLE_DHCP_PROXY="true",
            SIDERO_TFTP_PORT=str(free_port(socket.SOCK_DGRAM)),
            SIDERO_LOG_FORMAT="json",
            SIDERO_DASHBOARD_PORT=str(free_port(socket.SOCK_STREAM)),
        )
        tac = os.path.join(REPO, "tap", "sidero.tac")
        text = self.run_until_started(["-n", "--pidfile=", "-y", tac], env, state_dir, api_port)
        records = [json.loads(line) for line in text.splitlines()]
        self.assertIn("Main loop terminated.", [r["msg"] for r in records])

    def test_setup_failure_one_line(self) -> None:
        """A state directory that is a file stops twistd with exit 1 and one line."""
        not_a_dir = os.path.join(self.cwd, "file")
        with open(not_a_dir, "w") as f:
            f.write("x")
        result = self.twistd(
            "-n", "--pidfile=", "sidero", "--state-dir", not_a_dir, "--api-endpoint", "127.0.0.1",
            "--listen-address", "127.0.0.1", "--disable-dhcp-proxy", "--disable-tftp",
        )
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
        self.assertTrue(result.stderr.startswith("sidero: cannot set up the "), result.stderr)

    def test_start_failure_exits_nonzero(self) -> None:
        """The store failing to open at start (state.db is a directory) exits with status 1."""
        state_dir = self.tempdir("sidero-state-")
        os.mkdir(os.path.join(state_dir, "state.db"))
        result = self.twistd(
            "-n", "--pidfile=", "sidero", "--state-dir", state_dir, "--api-endpoint", "127.0.0.1",
            "--listen-address", "127.0.0.1", "--disable-dhcp-proxy", "--disable-tftp",
            "--http-port", str(free_port(socket.SOCK_STREAM)),
        )
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("sidero cannot start", result.stdout)
        self.assertIn("Server Shut Down", result.stdout)

    def test_port_in_use_exits_nonzero(self) -> None:
        """An HTTP port already taken is reported in one log line and exits with status 1."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            result = self.twistd(
                "-n", "--pidfile=", "sidero", "--state-dir", self.tempdir("sidero-state-"),
                "--api-endpoint", "127.0.0.1", "--listen-address", "127.0.0.1",
                "--disable-dhcp-proxy", "--disable-tftp", "--http-port", str(port),
            )
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn(f"sidero cannot start: http: Couldn't listen on 127.0.0.1:{port}", result.stdout)
        self.assertNotIn("Traceback", result.stdout + result.stderr)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()
