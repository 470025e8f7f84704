"""The dashboard in a real browser: headless Chromium (Debian's package) driven over the
DevTools protocol against the real service tree.

It logs in with the password file, sees the servers, sees a Server registered by a real agent
call (gRPC on the API port) appear without a reload, and sees a log line sent by util-linux
C{logger} through the real syslog receiver arrive live on the server's page (and in
C{sidero logs}), and the page change in place when C{sidero accept} accepts the server.  Screenshots are decoded (tests/dashboard/png.py) and compared, in the trial
temp directory only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from sidero import tap
from sidero.api.registry import SERVER
from tests.dashboard import png
from tests.dashboard.cdp import Chromium, find_chromium
from tests.paths import REPO
from tests.ports import free_tcp_port, free_udp_port
from tests.service.test_tap import settings_for

KNOWN = "8c2b4a1e-0d3f-4e5a-9b6c-7d8e9f0a1b2c"
NEW = "4c4c4544-0047-4a10-8048-b4c04f4d4a32"
PASSWORD = "correct horse battery staple"
WIDTH, HEIGHT = 1100, 760


def inventory_server(name: str) -> dict[str, Any]:
    return {"apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Server", "metadata": {"name": name},
            "spec": {"accepted": True, "hostname": "rack1-u7", "hardware": {
                "system": {"manufacturer": "QEMU", "productName": "Standard PC (Q35)",
                           "serialNumber": "SN-0007"},
                "compute": {"processorCount": 1, "totalCoreCount": 4, "processors": [
                    {"manufacturer": "Intel", "productName": "Xeon E-2236", "coreCount": 4}]},
                "memory": {"totalSize": "16 GB"},
                "storage": {"deviceCount": 1, "totalSize": "480 GB", "devices": [
                    {"deviceName": "/dev/sda", "productName": "QEMU HARDDISK", "type": "HDD",
                     "size": 480103981056}]},
                "network": {"interfaceCount": 1, "interfaces": [
                    {"name": "eth0", "mac": "52:54:00:aa:bb:07"}]}}}}


class BrowserTests(TestCase):
    timeout = 240

    async def setUp(self) -> None:  # type: ignore[override]
        binary = find_chromium()
        if binary is None:
            raise SkipTest("LOUD SKIP: Chromium is not installed (Debian package chromium;"
                           " scripts/install-test-deps installs it)")
        if shutil.which("logger") is None:
            raise SkipTest("LOUD SKIP: util-linux logger is not installed")
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        self.password_file = os.path.join(self.work, "dashboard-password")
        with open(self.password_file, "w", encoding="utf-8") as f:
            f.write(PASSWORD + "\n")
        os.chmod(self.password_file, 0o600)
        self.api_port = free_tcp_port()
        self.dashboard_port = free_tcp_port()
        self.syslog_port = free_udp_port()
        self.metrics_port = free_tcp_port()
        self.settings = settings_for(
            os.path.join(self.work, "state"), "disable_dhcp_proxy", "disable_siderolink",
            api_port=str(self.api_port), http_port=str(self.api_port),
            metrics_port=str(self.metrics_port), health_port=str(free_tcp_port()),
            tftp_port=str(free_udp_port()), listen_address="127.0.0.1",
            syslog_port=str(self.syslog_port), syslog_tcp_port=str(free_tcp_port()),
            server_log=os.path.join(self.work, "servers.log"),
            dashboard_port=str(self.dashboard_port), dashboard_password_file=self.password_file)
        self.root = tap.build_service(self.settings, global_reactor)
        self.root.exit_on_start_failure = False
        self.root.startService()
        self.addCleanup(self.root.stopService)
        await self.root.when_started()
        await self.root.context.store.create(inventory_server(KNOWN))
        profile = os.path.join(self.work, "chromium-profile")
        os.makedirs(profile)
        self.browser = Chromium.launch(global_reactor, binary, profile, WIDTH, HEIGHT)
        self.addCleanup(self.browser.close)
        await self.browser.open_page(WIDTH, HEIGHT)
        self.base = f"http://127.0.0.1:{self.dashboard_port}"

    async def shot(self, name: str) -> png.Image:
        data = await self.browser.screenshot()
        with open(os.path.join(self.work, name + ".png"), "wb") as f:
            f.write(data)
        image = png.decode(data)
        self.assertEqual((image.width, image.height), (WIDTH, HEIGHT))
        self.assertGreater(image.distinct_colours(), 8, f"{name}.png looks blank")
        return image

    def agent(self, uuid: str, hostname: str, address: str) -> None:
        from sidero.agent.client import AgentClient
        from sidero.proto import agent_pb2 as pb

        client = AgentClient.connect(f"127.0.0.1:{self.api_port}")
        try:
            hw = pb.HardwareInformation(system=pb.SystemInformation(
                uuid=uuid, manufacturer="Dell Inc.", product_name="PowerEdge R640"))
            client.create_server(hw, hostname=hostname)
            client.reconcile_addresses(uuid, [address])
        finally:
            client.close()

    async def test_live_dashboard(self) -> None:
        """Login, servers listed, a new Server appears without reload, a log line arrives live."""
        b = self.browser
        await b.navigate(self.base + "/")
        await b.wait_for("location.pathname === '/login' && !!document.getElementById('password')")
        self.assertIsNone(await b.evaluate("document.getElementById('servers')"))  # nothing shown
        await b.evaluate(f"document.getElementById('password').value = {PASSWORD!r};"
                         " document.getElementById('login').click(); true")
        await b.wait_for("location.pathname === '/' && !!document.getElementById('server:"
                         f"{KNOWN}')")
        # The session cookie is HttpOnly: page scripts cannot read it.
        self.assertNotIn("sidero_dashboard", await b.evaluate("document.cookie"))
        row = await b.evaluate(f"document.getElementById('server:{KNOWN}').innerText")
        for text in ("rack1-u7", "accepted", "Xeon E-2236", "16 GB", "480 GB", "QEMU"):
            self.assertIn(text, row)
        self.assertIn("any", await b.evaluate("document.getElementById('serverclasses').innerText"))
        self.assertIn("default", await b.evaluate("document.getElementById('environments').innerText"))
        await b.wait_for("document.getElementById('live').textContent === 'live'")
        marker = await b.evaluate("window.sideroMarker = Math.random()")
        before = await self.shot("1-overview")

        await deferToThread(self.agent, NEW, "node-new", "127.0.0.1")
        self.assertIsNotNone(await self.root.context.store.get(SERVER, NEW))
        text = await b.wait_for(f"document.getElementById('server:{NEW}')"
                                f" && document.getElementById('server:{NEW}').innerText")
        self.assertIn("node-new", text)
        self.assertIn("127.0.0.1", await b.wait_for(
            f"document.getElementById('server:{NEW}').innerText.includes('127.0.0.1')"
            f" && document.getElementById('server:{NEW}').innerText"))
        self.assertEqual(await b.evaluate("window.sideroMarker"), marker, "the page reloaded")
        order = await b.evaluate("[...document.querySelectorAll('#servers tr')].map(r => r.dataset.key)")
        self.assertEqual(order, sorted([KNOWN, NEW]))
        steps = await b.wait_for("document.getElementById('timeline').innerText.includes('agent-register')"
                                 " && document.getElementById('timeline').innerText")
        self.assertIn(NEW, steps)
        after = await self.shot("2-new-server")
        self.assertGreater(png.differing_rows(before, after), 10)

        await b.navigate(f"{self.base}/servers/{NEW}")
        await b.wait_for("document.getElementById('live').textContent === 'live'")
        details = await b.evaluate("document.getElementById('details').innerText")
        for text in ("node-new", "PowerEdge R640", "127.0.0.1"):
            self.assertIn(text, details)
        self.assertIn("agent-register", await b.evaluate("document.getElementById('timeline').innerText"))
        self.assertEqual(await b.evaluate("document.getElementById('logs').textContent"), "")
        marker = await b.evaluate("window.sideroMarker = Math.random()")
        quiet = await self.shot("3-server-page")

        await deferToThread(subprocess.run, ["logger", "-n", "127.0.0.1", "-P", str(self.syslog_port),
                                             "-d", "--rfc5424", "-t", "sidero-agent",
                                             "wiping /dev/sda (insecure)"], check=True, timeout=10)
        line = await b.wait_for("document.getElementById('logs').textContent")
        self.assertIn("wiping /dev/sda (insecure)", line)
        self.assertIn("sidero-agent", line)
        self.assertEqual(await b.evaluate("window.sideroMarker"), marker, "the page reloaded")
        logged = await self.shot("4-log-line")
        self.assertGreater(png.differing_rows(quiet, logged), 0)

        # The same line through the management API, as `sidero logs` prints it.
        env = dict(os.environ, PYTHONPATH=str(REPO),
                   SIDERO_MANAGEMENT_SOCKET=self.settings.management_socket)
        env.pop("KUBECONFIG", None)
        done = await deferToThread(subprocess.run, [sys.executable, "-m", "sidero.management.cli",
                                                    "logs", NEW], env=env, capture_output=True,
                                   text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.strip(), line.strip())

        # An operator accepts the server with the CLI: its page changes in place.
        self.assertIn("not accepted", await b.evaluate("document.getElementById('details').innerText"))
        done = await deferToThread(subprocess.run, [sys.executable, "-m", "sidero.management.cli",
                                                    "accept", NEW], env=env, capture_output=True,
                                   text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        await b.wait_for("!document.getElementById('details').innerText.includes('not accepted')")
        self.assertEqual(await b.evaluate("window.sideroMarker"), marker, "the page reloaded")

        # What the dashboard did is on /metrics.
        import treq

        response = await treq.get(f"http://127.0.0.1:{self.metrics_port}/metrics", persistent=False)
        text = (await response.content()).decode()
        self.assertIn('sidero_dashboard_events_total{event="logins"} 1.0', text)
        self.assertIn('sidero_dashboard_events_total{event="failed_logins"} 0.0', text)
        self.assertIn("sidero_dashboard_streams 1.0", text)  # the server page's stream
        opened = next(line for line in text.splitlines()
                      if line.startswith('sidero_dashboard_events_total{event="streams"}'))
        self.assertGreaterEqual(float(opened.split()[-1]), 2.0)  # overview, then server page
