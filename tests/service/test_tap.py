"""The service tree: factories, names, --disable-X, ordered start/stop, store start-up."""

from __future__ import annotations

import io
import os
import tempfile
from typing import Any

import treq
from twisted.application.service import Application, IService, MultiService, Service
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sidero import tap
from sidero.app import AppContext, OrderedMultiService
from sidero.config import Host, Settings, resolve
from tests.ports import free_tcp_port, free_udp_port

FULL_TREE = ["threads", "store", "controllers", "dhcp-proxy", "tftp", "http", "siderolink",
             "log-receiver", "event-sink", "syslog", "management", "dashboard", "metrics", "health"]


def settings_for(state_dir: str, *argv_flags: str, **flags: str) -> Settings:
    given = dict(flags)
    # trial's temp paths can exceed the 107-byte limit of a unix socket path.
    given.setdefault("management_socket", os.path.join(tempfile.mkdtemp(prefix="sdm-"), "m.sock"))
    # Never github.com from a test: a closed loopback port makes the default Environment's
    # downloads fail at once (a logged warning, retried with backoff).
    given.setdefault("talos_assets_url", "http://127.0.0.1:1")
    # The dashboard's default port (8082) would be shared by every tree a test starts.
    given.setdefault("dashboard_port", str(free_tcp_port()))
    for name in argv_flags:
        given[name] = "true"
    host = Host(is_root=True, home="/nonexistent", addresses=lambda: [])
    return resolve({"api_endpoint": "127.0.0.1", "state_dir": state_dir, **given}, {}, host).settings


class Recorder(Service):
    """A child that records start/stop into a shared journal; optionally async or failing."""

    def __init__(self, name: str, journal: list[str], start: Deferred[None] | None = None,
                 stop: Deferred[None] | None = None, fail: bool = False) -> None:
        self.setName(name)
        self.journal = journal
        self.start_d = start
        self.stop_d = stop
        self.fail = fail

    def startService(self) -> Any:
        self.journal.append("start " + str(self.name))
        if self.fail:
            raise RuntimeError(f"{self.name} cannot start")
        super().startService()
        return self.start_d

    def stopService(self) -> Any:
        self.journal.append("stop " + str(self.name))
        super().stopService()
        return self.stop_d


class AgentImageTests(SynchronousTestCase):
    """The start-up check that the agent environments have their image (issue 11)."""

    def test_missing_files_name_the_architecture(self) -> None:
        env = self.mktemp()
        os.makedirs(os.path.join(env, "agent-amd64"))
        self.assertEqual(tap.missing_agent_images(env), ["amd64", "arm64"])
        for name in ("vmlinuz", "initramfs.xz"):
            with open(os.path.join(env, "agent-amd64", name), "wb") as f:
                f.write(b"x")
        self.assertEqual(tap.missing_agent_images(env), ["arm64"])
        os.makedirs(os.path.join(env, "agent-arm64"))
        with open(os.path.join(env, "agent-arm64", "vmlinuz"), "wb") as f:
            f.write(b"x")
        self.assertEqual(tap.missing_agent_images(env), ["arm64"])


class OrderedMultiServiceTests(SynchronousTestCase):
    """Start in order waiting for async starts; stop in reverse waiting for each."""

    def test_start_waits_and_stop_reverses(self) -> None:
        """The second child starts after the first's Deferred fires; stops go last-first."""
        journal: list[str] = []
        opened: Deferred[None] = Deferred()
        closed: Deferred[None] = Deferred()
        root = OrderedMultiService(Clock())
        Recorder("a", journal).setServiceParent(root)
        Recorder("b", journal, start=opened, stop=closed).setServiceParent(root)
        Recorder("c", journal).setServiceParent(root)
        root.startService()
        self.assertEqual(journal, ["start a", "start b"])
        started = root.when_started()
        self.assertNoResult(started)
        opened.callback(None)
        self.assertEqual(journal, ["start a", "start b", "start c"])
        self.successResultOf(started)
        stopped = root.stopService()
        self.assertEqual(journal[3:], ["stop c", "stop b"])
        self.assertNoResult(stopped)
        closed.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(journal[3:], ["stop c", "stop b", "stop a"])

    def test_stuck_stop_times_out(self) -> None:
        """A child that never stops is abandoned after stop_timeout; the others still stop."""
        journal: list[str] = []
        clock = Clock()
        root = OrderedMultiService(clock, stop_timeout=5)
        Recorder("a", journal).setServiceParent(root)
        Recorder("b", journal, stop=Deferred()).setServiceParent(root)
        root.startService()
        stopped = root.stopService()
        self.assertNoResult(stopped)
        clock.advance(5)
        self.successResultOf(stopped)
        self.assertEqual(journal[-2:], ["stop b", "stop a"])
        self.assertEqual(len(self.flushLoggedErrors()), 1)

    def test_start_failure_rolls_back(self) -> None:
        """A failing child stops those already started and reports the failure once."""
        journal: list[str] = []
        failures: list[Failure] = []
        root = OrderedMultiService(Clock())
        root.on_start_failure = failures.append  # type: ignore[method-assign]
        Recorder("a", journal).setServiceParent(root)
        Recorder("b", journal, fail=True).setServiceParent(root)
        Recorder("c", journal).setServiceParent(root)
        root.startService()
        self.assertEqual(journal, ["start a", "start b", "stop a"])
        self.assertEqual(len(failures), 1)
        self.failureResultOf(root.when_started(), RuntimeError)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_log_observer_registered_on_application(self) -> None:
        """Parenting to a twistd Application registers our observer as its ILogObserver."""
        root = OrderedMultiService(Clock())

        def observer(event: dict[str, Any]) -> None:
            pass

        root.log_observer = observer  # type: ignore[assignment]
        application = Application("sidero")
        root.setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), observer)


class BuildServiceTests(SynchronousTestCase):
    """build_service/makeService structure on a memory reactor."""

    def setUp(self) -> None:
        self.state_dir = self.mktemp()
        # Under systemd (NOTIFY_SOCKET set) the tree gains a "systemd" child; not here.
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"})

    def names(self, service: MultiService) -> list[str]:
        return [str(child.name) for child in service]

    def test_children_in_dependency_order(self) -> None:
        """Every service of this build is a named child, in dependency order."""
        root = tap.build_service(settings_for(self.state_dir), MemoryReactorClock())
        self.assertIsInstance(root, MultiService)
        self.assertEqual(self.names(root), FULL_TREE)
        for name in FULL_TREE:
            self.assertIsNotNone(root.getServiceNamed(name))
        threads = root.getServiceNamed("threads")
        self.assertEqual(self.names(threads), [f"threads-{n}" for n, _ in tap.THREAD_POOLS])

    def test_disable_removes_service(self) -> None:
        """--disable-<name> leaves that child out and keeps the rest."""
        for name in ["controllers", "dhcp-proxy", "tftp", "http", "siderolink", "log-receiver",
                     "event-sink", "syslog", "dashboard"]:
            with self.subTest(name=name):
                flag = "disable_" + name.replace("-", "_")
                root = tap.build_service(settings_for(self.state_dir, flag), MemoryReactorClock())
                self.assertEqual(self.names(root), [n for n in FULL_TREE if n != name])
                self.assertRaises(KeyError, root.getServiceNamed, name)

    def test_http_without_controllers_has_own_informers(self) -> None:
        """With --disable-controllers the HTTP service runs the informers it reads."""
        root = tap.build_service(
            settings_for(self.state_dir, "disable_controllers"), MemoryReactorClock()
        )
        http = root.getServiceNamed("http")
        names = [str(child.name) for child in http]
        self.assertIn("informer-servers", names)
        self.assertIn("http", names)
        with_manager = tap.build_service(settings_for(self.state_dir), MemoryReactorClock())
        self.assertEqual([str(c.name) for c in with_manager.getServiceNamed("http")], ["http"])

    def test_absent_factory_result_is_skipped(self) -> None:
        """A factory returning None (implementation not in the build) adds no child."""
        def nothing(settings: Settings, context: AppContext) -> IService | None:
            return None

        def thing(settings: Settings, context: AppContext) -> IService | None:
            return Service()

        root = tap.build_service(
            settings_for(self.state_dir), MemoryReactorClock(),
            factories=[("metrics", nothing), ("health", thing)],
        )
        self.assertEqual(self.names(root), ["health"])

    def test_make_service_from_options(self) -> None:
        """makeService builds the tree from parsed Options and registers the log observer."""
        options = tap.Options(
            environ={}, host=Host(is_root=True, home="/x", addresses=lambda: []), stderr=io.StringIO()
        )
        options.parseOptions(["--api-endpoint", "127.0.0.1", "--state-dir", self.state_dir,
                              "--disable-dhcp-proxy", "--log-format", "json"])
        root = tap.makeService(options)
        self.addCleanup(self._forget_bridge)
        self.assertEqual(self.names(root), [n for n in FULL_TREE if n != "dhcp-proxy"])
        self.assertIsNotNone(root.log_observer)

    def _forget_bridge(self) -> None:
        import logging

        from sidero import logs

        if logs._bridge is not None:
            logging.getLogger().removeHandler(logs._bridge)
            logs._bridge = None

    def test_kubernetes_store_bad_kubeconfig(self) -> None:
        """--store kubernetes with a kubeconfig that does not exist stops with one line."""
        stderr = io.StringIO()
        options = tap.Options(environ={}, host=Host(True, "/x", lambda: []), stderr=stderr)
        options.parseOptions(["--api-endpoint", "127.0.0.1", "--store", "kubernetes",
                              "--kubeconfig", "/nonexistent/kubeconfig", "--state-dir", self.mktemp()])
        with self.assertRaises(SystemExit):
            tap.makeService(options)
        self._forget_bridge()
        self.assertEqual(stderr.getvalue().count("\n"), 1, stderr.getvalue())
        self.assertIn("kubeconfig /nonexistent/kubeconfig does not exist", stderr.getvalue())

    def test_auto_store_kubernetes_from_kubeconfig_variable(self) -> None:
        """auto picks kubernetes when KUBECONFIG is set, and that kubeconfig is what is checked."""
        stderr = io.StringIO()
        options = tap.Options(environ={"KUBECONFIG": "/k"}, host=Host(True, "/x", lambda: []),
                              stderr=stderr)
        options.parseOptions(["--api-endpoint", "127.0.0.1", "--state-dir", self.mktemp()])
        self.assertEqual(options.settings.store, "kubernetes")
        with self.assertRaises(SystemExit):
            tap.makeService(options)
        self._forget_bridge()
        self.assertIn("kubeconfig /k does not exist", stderr.getvalue())


class ServiceTreeLifecycleTests(TestCase):
    """The real tree on the real reactor: embedded store on a temp dir, TFTP on loopback."""

    timeout = 60

    async def test_start_and_stop(self) -> None:
        """Start opens state.db, the start-up runnables create ServerClass any, stop is clean."""
        from sidero.api.registry import SERVER_CLASS
        from sidero.store.errors import NotFound

        state_dir = os.path.abspath(self.mktemp())
        api_port = free_tcp_port()
        # No WireGuard interface in the test's own network namespace (tests/siderolink has
        # the tunnel tests, in namespaces of their own).
        settings = settings_for(
            state_dir, "disable_dhcp_proxy", "disable_siderolink", "disable_syslog",
            api_port=str(api_port), http_port=str(api_port),
            tftp_port=str(free_udp_port()), listen_address="127.0.0.1",
            metrics_port=str(free_tcp_port()), health_port=str(free_tcp_port()),
        )
        root = tap.build_service(settings, global_reactor)
        root.exit_on_start_failure = False
        root.startService()
        await root.when_started()
        self.assertTrue(os.path.exists(os.path.join(state_dir, "state.db")))
        store = root.context.store
        found = None
        for _ in range(100):
            try:
                found = await store.get(SERVER_CLASS, "any")
                break
            except NotFound:
                await deferLater(global_reactor, 0.05, lambda: None)
        self.assertIsNotNone(found, "ServerClass any was not created")
        response = await treq.get(f"http://127.0.0.1:{api_port}/boot.ipxe", persistent=False)
        self.assertEqual(response.code, 200)
        self.assertTrue((await response.content()).startswith(b"#!ipxe"))
        response = await treq.get(f"http://127.0.0.1:{api_port}/readyz", persistent=False)
        await response.content()
        self.assertEqual(response.code, 200)
        await root.stopService()
        self.assertFalse(root.running)
