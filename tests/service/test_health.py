"""sidero.health: checks, controller-runtime's probe answers, and the probe port of the tree."""

from __future__ import annotations

import os
from typing import Any

import treq
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sidero import health, tap
from sidero.controllers.leader import ManualLeader
from sidero.health import CheckResult, HealthChecks
from tests.ports import free_tcp_port, free_udp_port
from tests.service.test_metrics import wait_for
from tests.service.test_tap import settings_for


class ChecksTests(SynchronousTestCase):
    """Checks may be plain values, Deferreds or coroutines; failures and hangs are results."""

    def test_kinds_of_check(self) -> None:
        """bool, CheckResult, Deferred and a raising check all become CheckResults."""
        checks = HealthChecks(Clock())
        checks.add("healthz", "plain", lambda: True)
        checks.add("healthz", "result", lambda: CheckResult(False, "disk full"))

        async def coro() -> CheckResult:
            return CheckResult(True, "fine")

        checks.add("healthz", "coro", lambda: ensureDeferred(coro()))
        checks.add("healthz", "raises", lambda: 1 / 0)  # type: ignore[arg-type,return-value]
        results = dict(self.successResultOf(ensureDeferred(checks.run("healthz"))))
        self.assertEqual(results["plain"], CheckResult(True, "ok"))
        self.assertEqual(results["result"], CheckResult(False, "disk full"))
        self.assertEqual(results["coro"], CheckResult(True, "fine"))
        self.assertFalse(results["raises"].ok)
        self.assertIn("division by zero", results["raises"].message)
        ok, why = self.successResultOf(ensureDeferred(checks.passing("healthz")))
        self.assertFalse(ok)
        self.assertIn("result: disk full", why)

    def test_hanging_check_times_out(self) -> None:
        """A check that never answers fails after the timeout instead of hanging the probe."""
        clock = Clock()
        checks = HealthChecks(clock, timeout=10.0)
        checks.add("readyz", "stuck", lambda: Deferred())
        d = ensureDeferred(checks.run("readyz"))
        clock.advance(9.9)
        self.assertNoResult(d)
        clock.advance(0.2)
        ((name, result),) = self.successResultOf(d)
        self.assertEqual(name, "stuck")
        self.assertFalse(result.ok)

    def test_bad_names(self) -> None:
        """Unknown endpoints and names with a slash are refused."""
        checks = HealthChecks(Clock())
        self.assertRaises(ValueError, checks.add, "livez", "x", lambda: True)
        self.assertRaises(ValueError, checks.add, "healthz", "a/b", lambda: True)

    def test_leadership(self) -> None:
        """Not ready before the Lease was read; ready as leader and as standby, saying which."""

        class Elector(ManualLeader):
            current_leader: str | None = None

        elector = Elector()
        check = health.leadership_reported(elector)
        self.assertFalse(check().ok)  # type: ignore[union-attr]
        elector.current_leader = "other-replica"
        self.assertEqual(check(), CheckResult(True, "standby (leader: other-replica)"))
        elector.gain()
        self.assertEqual(check(), CheckResult(True, "leader"))

    def test_informers(self) -> None:
        """Not ready while a cache has not synced; the message names it."""

        class Kind:
            plural = "servers"

        class Inf:
            kind = Kind()
            has_synced = False

        inf = Inf()
        check = health.informers_synced(lambda: [inf])
        self.assertEqual(check(), CheckResult(False, "caches not synced: servers"))
        inf.has_synced = True
        self.assertTrue(check().ok)  # type: ignore[union-attr]

    def test_local_url(self) -> None:
        """Wildcard binds are probed on loopback; IPv6 hosts are bracketed."""
        self.assertEqual(health.local_url("", 8081, "/boot.ipxe"), "http://127.0.0.1:8081/boot.ipxe")
        self.assertEqual(health.local_url("::", 1, "/"), "http://[::1]:1/")
        self.assertEqual(health.local_url("10.0.0.2", 1, "/"), "http://10.0.0.2:1/")


class ProbeServerTests(TestCase):
    """The probe server on a real loopback port answers as controller-runtime does."""

    timeout = 30

    def setUp(self) -> None:
        self.state = {"ready": False}
        checks = HealthChecks(global_reactor)
        checks.add("healthz", "ping", health.ping)
        checks.add("readyz", "ping", health.ping)
        checks.add("readyz", "informers", lambda: CheckResult(self.state["ready"], "not synced"))
        service = health.make_health_service(global_reactor, checks, 0, interface="127.0.0.1")
        service.startService()
        self.addCleanup(service.stopService)
        self.base = f"http://127.0.0.1:{service._port.getHost().port}"  # type: ignore[attr-defined]

    async def get(self, path: str) -> tuple[int, str]:
        response = await treq.get(self.base + path, persistent=False)
        return response.code, (await response.content()).decode()

    async def test_healthz_ok(self) -> None:
        """Passing: 200 and the body ok; verbose lists each check and says passed."""
        self.assertEqual(await self.get("/healthz"), (200, "ok"))
        self.assertEqual(await self.get("/healthz?verbose"), (200, "[+]ping ok\nhealthz check passed\n"))
        self.assertEqual(await self.get("/healthz/ping"), (200, "ok"))

    async def test_readyz_failing(self) -> None:
        """Failing: 500 with [+]/[-] lines, reasons withheld unless verbose; per-check path."""
        self.assertEqual(await self.get("/readyz"), (
            500, "[+]ping ok\n[-]informers failed: reason withheld\nreadyz check failed\n"))
        code, body = await self.get("/readyz?verbose=1")
        self.assertEqual(code, 500)
        self.assertIn("[-]informers failed: not synced", body)
        self.assertEqual(await self.get("/readyz/informers"),
                         (500, "internal server error: not synced\n"))
        self.assertEqual(await self.get("/readyz?exclude=informers&verbose"),
                         (200, "[+]ping ok\n[+]informers excluded: ok\nreadyz check passed\n"))
        self.state["ready"] = True
        self.assertEqual(await self.get("/readyz"), (200, "ok"))

    async def test_unknown_paths(self) -> None:
        """Unknown checks and other paths are 404."""
        self.assertEqual((await self.get("/readyz/nope"))[0], 404)
        self.assertEqual((await self.get("/metrics"))[0], 404)
        self.assertEqual((await self.get("/"))[0], 404)


class ServiceTreeHealthTests(TestCase):
    """The real tree: probes on --health-port; --disable-health turns them off."""

    timeout = 120

    def start_tree(self, *flags: str) -> tuple[tap.SideroService, int, int]:
        state_dir = os.path.abspath(self.mktemp())
        api_port, health_port = free_tcp_port(), free_tcp_port()
        settings = settings_for(
            state_dir, "disable_dhcp_proxy", *flags, api_port=str(api_port), http_port=str(api_port),
            metrics_port=str(free_tcp_port()), health_port=str(health_port),
            tftp_port=str(free_udp_port()), listen_address="127.0.0.1",
        )
        root = tap.build_service(settings, global_reactor)
        root.exit_on_start_failure = False
        root.startService()
        self.addCleanup(root.stopService)
        return root, api_port, health_port

    async def test_probes(self) -> None:
        """healthz and readyz pass once started and synced, each naming its checks."""
        root, _, health_port = self.start_tree()
        await root.when_started()
        base = f"http://127.0.0.1:{health_port}"

        async def ready() -> Any:
            response = await treq.get(base + "/readyz?verbose", persistent=False)
            body = (await response.content()).decode()
            return body if response.code == 200 else None

        body = await wait_for(ready, "readyz to pass")
        self.assertEqual(body, "[+]ping ok\n[+]ipxe ok\n[+]informers ok\nreadyz check passed\n")
        response = await treq.get(base + "/healthz?verbose", persistent=False)
        self.assertEqual((await response.content()).decode(),
                         "[+]ping ok\n[+]ipxe ok\nhealthz check passed\n")

    async def test_ipxe_check_fails_without_http(self) -> None:
        """The ipxe check really fetches /boot.ipxe: with the HTTP port stopped, healthz fails."""
        root, _, health_port = self.start_tree()
        await root.when_started()
        await root.getServiceNamed("http").stopService()
        response = await treq.get(f"http://127.0.0.1:{health_port}/healthz?verbose",
                                  persistent=False)
        body = (await response.content()).decode()
        self.assertEqual(response.code, 500)
        self.assertIn("[-]ipxe failed:", body)

    async def test_disable_health(self) -> None:
        """--disable-health: no health child and nothing listens on the probe port."""
        root, api_port, health_port = self.start_tree("disable_health")
        await root.when_started()
        self.assertNotIn("health", [c.name for c in root])
        with self.assertRaises(ConnectionRefusedError):
            await treq.get(f"http://127.0.0.1:{health_port}/healthz", persistent=False)
        response = await treq.get(f"http://127.0.0.1:{api_port}/boot.ipxe", persistent=False)
        self.assertEqual(response.code, 200)
        await response.content()
