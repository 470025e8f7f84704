# -*- test-case-name: tests.service.test_tap -*-
"""twistd wiring: C{twistd -n sidero [options]} builds the whole process here.

This is the only module that touches the global reactor. L{makeService} resolves nothing
itself (L{Options} did, from L{sidero.config.SETTINGS}); it runs the L{FACTORIES} in
dependency order, each C{_make_<name>(settings, context)} returning a named service or None
(disabled, or its implementation is not in this build). Another part plugs in by adding a
factory to the list.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.application.service import Application, IService, Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from twisted.python.failure import Failure

from sidero import logs
from sidero.app import AppContext, OrderedMultiService
from sidero.config import SERVICES, Note, Settings, SettingsOptions, StartupError
from sidero.threads import ThreadPoolService

log = Logger(namespace="sidero.tap")

#: Thread pools (name, max threads): Kubernetes client, disk/sqlite, IPMI, subprocesses.
THREAD_POOLS: tuple[tuple[str, int], ...] = (("k8s", 8), ("disk", 4), ("ipmi", 8), ("subprocess", 2))

class Options(SettingsOptions):
    """C{twistd sidero} options: every row of the settings table."""


class SideroService(OrderedMultiService):
    """The root service; a failed start stops the process with exit status 1."""

    announce = True

    def __init__(self, reactor: Any, settings: Settings) -> None:
        super().__init__(reactor)
        self.reactor = reactor
        self.settings = settings
        self.context = AppContext(reactor=reactor, settings=settings)
        self.exit_on_start_failure = True

    def privilegedStartService(self) -> None:
        # Children bind low ports here, before twistd drops privileges; a port in use must
        # read as one clear line and exit 1, not as a traceback out of twistd.
        for child in self:
            try:
                child.privilegedStartService()
            except Exception as e:
                log.critical("sidero cannot start: {service}: {error}", service=child.name,
                             error=str(e) or repr(e))
                raise SystemExit(1) from e

    def on_start_failure(self, failure: Failure) -> None:
        if not self.exit_on_start_failure:
            return
        log.critical("sidero cannot start: {error}; stopping", error=failure.getErrorMessage())
        # twistd always exits 0 after reactor.stop(); systemd must see a failure to restart us.
        atexit.register(_exit_failure)
        # A thread a half-started service left behind would make the interpreter wait for it
        # before atexit runs: a daemon watchdog makes sure we still exit.
        self.reactor.addSystemEventTrigger("after", "shutdown", _start_exit_watchdog)
        if self.reactor.running:
            self.reactor.stop()


EXIT_GRACE_SECONDS = 10.0


def missing_agent_images(env_dir: str) -> list[str]:
    """Architectures whose agent environment (served from disk, never downloaded) lacks a file."""
    return [arch for arch in ("amd64", "arm64")
            if not all(os.path.isfile(os.path.join(env_dir, f"agent-{arch}", name))
                       for name in ("vmlinuz", "initramfs.xz"))]


def _exit_failure() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _start_exit_watchdog() -> None:
    def watchdog() -> None:
        time.sleep(EXIT_GRACE_SECONDS)
        _exit_failure()

    threading.Thread(target=watchdog, name="sidero-exit-watchdog", daemon=True).start()


# --- factories, in dependency order ------------------------------------------------------------

Factory = Callable[[Settings, AppContext], IService | None]


def _make_threads(settings: Settings, context: AppContext) -> IService | None:
    """The blocking-work pools; later factories find them in C{context.pools}."""
    group = OrderedMultiService(context.reactor)
    for name, size in THREAD_POOLS:
        pool = ThreadPoolService(context.reactor, name, max_threads=size)
        pool.setServiceParent(group)
        context.pools[name] = pool
    return group


class StoreService(Service):
    """Opens the resource store on start (before anything reads it) and closes it on stop."""

    def __init__(self, store: Any, directory: str) -> None:
        self.store = store
        self.directory = directory

    def startService(self) -> Deferred[Any]:
        super().startService()
        os.makedirs(self.directory, mode=0o750, exist_ok=True)
        return ensureDeferred(self.store.open())

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        return ensureDeferred(self.store.close())


def _make_store(settings: Settings, context: AppContext) -> IService | None:
    """The embedded SQLite store, or a Kubernetes API server (kubeconfig, KUBECONFIG or the
    in-cluster service account).  A kubeconfig that cannot be used stops the start here, in
    one line; an unreachable server or missing CRDs stop it when the store opens."""
    if settings.store == "kubernetes":
        from sidero.k8s.client import load_api_client
        from sidero.k8s.errors import KubeconfigError
        from sidero.k8s.store import KubernetesStore

        try:
            client = load_api_client(settings.kubeconfig or None)
        except KubeconfigError as e:
            raise StartupError(str(e)) from e
        context.store = KubernetesStore(context.reactor, client, context.pools["k8s"].pool)
        return StoreService(context.store, settings.state_dir)

    from sidero.api.admission import Admission
    from sidero.store.embedded import EmbeddedStore

    store = EmbeddedStore(context.reactor, settings.database_path, admission=Admission())
    context.store = store
    return StoreService(store, settings.state_dir)


def _make_controllers(settings: Settings, context: AppContext) -> IService | None:
    """Shared informers, controllers and the spec 2.4 start-up runnables.

    With the embedded store this process is the only writer, so it always leads; a
    Kubernetes-backed build would pass a Lease elector when --enable-leader-election is set.
    """
    from sidero.controllers.environment import make_environment_controller
    from sidero.controllers.events import CAPS_CONTROLLER_MANAGER, EventRecorder
    from sidero.controllers.metalcluster import make_metalcluster_controller
    from sidero.controllers.metalmachine import make_metalmachine_controller
    from sidero.controllers.runtime import DEFAULT_REQUEUE_AFTER, ControllerManager
    from sidero.controllers.server import make_server_controller
    from sidero.controllers.serverbinding import make_serverbinding_controller
    from sidero.controllers.serverclass import make_serverclass_controller
    from sidero.controllers.startup import install_startup_runnables
    from sidero.k8s.workload import WorkloadNodes
    from sidero.power.factory import PowerManagerFactory

    elector = _make_elector(settings, context)
    manager = ControllerManager(context.store, context.reactor, elector=elector)
    install_startup_runnables(manager, context.store, assets_url=settings.talos_assets_url)
    recorder = EventRecorder(context.store, context.reactor)
    make_environment_controller(
        manager, context.store, settings.state_dir, context.reactor,
        pool=context.pools["disk"], assets_url=settings.talos_assets_url,
    )
    make_serverclass_controller(manager, context.store)
    power = PowerManagerFactory.from_settings(
        context.reactor, context.store, context.pools["ipmi"], settings)
    make_server_controller(
        manager, context.store, power.for_server,
        reboot_timeout=settings.server_reboot_timeout, pxe_mode=settings.ipmi_pxe_method,
        clock=context.reactor, recorder=recorder,
        # A BMC that dropped a power-off (seen with silent failures) gets it again.
        power_off_recheck=DEFAULT_REQUEUE_AFTER,
    )
    # The Cluster API provider (spec 2.5-2.7). Machines and Clusters are read from the store
    # when needed, not watched, so these run (and serve standalone MetalMachines) even where
    # the Cluster API CRDs are not installed.
    caps_recorder = EventRecorder(context.store, context.reactor, component=CAPS_CONTROLLER_MANAGER)
    make_metalcluster_controller(manager, context.store)
    make_metalmachine_controller(
        manager, context.store, workload=WorkloadNodes(context.reactor, context.pools["k8s"].pool),
        recorder=caps_recorder,
    )
    make_serverbinding_controller(manager, context.store, recorder=caps_recorder)
    context.extra["controller_manager"] = manager
    context.extra["event_recorder"] = recorder
    if elector is None:
        return manager
    # The elector starts first and stops last: controllers finish, then the Lease is released.
    group = OrderedMultiService(context.reactor)
    elector.setServiceParent(group)
    manager.setServiceParent(group)
    context.extra["leader_elector"] = elector
    return group


def _make_elector(settings: Settings, context: AppContext) -> Any:
    """A Lease elector when several replicas may share one API server; None → always lead.

    The embedded store has exactly one writer (this process), so it never elects.
    """
    if settings.store != "kubernetes" or not settings.enable_leader_election:
        return None
    from sidero.controllers.lease import LEADER_ELECTION_ID, LeaseElector

    try:
        return LeaseElector(
            context.store, context.reactor,
            namespace=settings.leader_election_namespace, name=LEADER_ELECTION_ID,
            lease_duration=settings.leader_election_lease_duration,
            renew_deadline=settings.leader_election_renew_deadline,
            retry_period=settings.leader_election_retry_period,
        )
    except ValueError as e:
        raise StartupError(f"leader election: {e}") from e


def _make_webhook(settings: Settings, context: AppContext) -> IService | None:
    """Conversion and validating webhooks over TLS, for the Kubernetes API server (spec 1.6).

    With the embedded store, admission runs inside the store: no webhook server is needed.
    """
    if settings.store != "kubernetes":
        return None
    import urllib.parse

    from sidero.api.admission import Admission
    from sidero.k8s.webhook import WebhookEndpoint, make_webhook_service

    url_host = urllib.parse.urlsplit(settings.webhook_url).hostname or settings.api_endpoint
    hosts = sorted({"localhost", "127.0.0.1", settings.api_endpoint, url_host})
    return make_webhook_service(
        context.reactor, Admission(), port=settings.webhook_port, interface=settings.listen_address,
        cert_dir=settings.webhook_cert_dir, hosts=hosts, pool=context.pools["k8s"],
        tls_min_version=settings.tls_min_version,
        api_client=context.store.api_client if settings.webhook_register else None,
        endpoint=WebhookEndpoint(url=settings.webhook_url) if settings.webhook_register else None,
    )


def _make_dhcp_proxy(settings: Settings, context: AppContext) -> IService | None:
    from sidero.protocols.dhcp.service import make_dhcp_proxy_service

    return make_dhcp_proxy_service(
        context.reactor,
        endpoint=settings.api_endpoint,
        api_port=settings.api_port,
        interface=settings.dhcp_interface or None,
        dhcp_port=settings.dhcp_port,
        proxy_port=settings.dhcp_proxy_port,
    )


def _make_tftp(settings: Settings, context: AppContext) -> IService | None:
    from sidero.protocols.tftp.service import make_tftp_service

    os.makedirs(settings.tftp_roots[0], exist_ok=True)
    return make_tftp_service(
        context.reactor,
        roots=list(settings.tftp_roots),
        port=settings.tftp_port,
        interface=settings.listen_address,
    )


def _make_http(settings: Settings, context: AppContext) -> IService | None:
    """iPXE script, boot decisions, /env and /tftp assets and probes on the HTTP port.

    Boot decisions read informer caches: the controller manager's shared ones when controllers
    run, else informers of our own that live inside this service.
    """
    from twisted.application.service import MultiService

    from sidero.api.registry import ENVIRONMENT, SERVER, SERVER_BINDING, SERVER_CLASS
    from sidero.controllers.informer import Informer
    from sidero.protocols.http.ipxe import BootSettings
    from sidero.protocols.http.service import InformerBootLookup, make_http_service
    from sidero.protocols.http.site import BootSite

    group = MultiService()
    manager = context.extra.get("controller_manager")
    kinds = (SERVER, SERVER_BINDING, SERVER_CLASS, ENVIRONMENT)
    if manager is not None:
        informers = [manager.informer(kind) for kind in kinds]
    else:
        informers = [Informer(context.store, kind, clock=context.reactor) for kind in kinds]
        for informer in informers:
            informer.setServiceParent(group)

    def ready() -> tuple[bool, str]:
        waiting = [i.kind.plural for i in informers if not i.has_synced]
        return (not waiting, "waiting for " + ", ".join(waiting) if waiting else "ok")

    env_dir = os.path.join(settings.state_dir, "env")
    os.makedirs(env_dir, exist_ok=True)
    for arch in missing_agent_images(env_dir):
        log.warn("no agent image in {dir}: unknown {arch} machines cannot boot the agent "
                 "(scripts/build-agent-image --install {state} builds and installs it)",
                 dir=os.path.join(env_dir, f"agent-{arch}"), arch=arch, state=settings.state_dir)
    site = BootSite(
        InformerBootLookup(*informers),
        BootSettings(
            api_endpoint=settings.api_endpoint,
            api_port=settings.api_port,
            boot_from_disk_method=settings.boot_from_disk_method,
            extra_agent_kernel_args=settings.extra_agent_kernel_args,
        ),
        env_dir=env_dir,
        tftp_roots=settings.tftp_roots,
        ready=ready,
    )
    if settings.enabled("grpc"):
        # One port for HTTP/1.1 and the agent's gRPC API (h2c prior knowledge), spec 3.1.
        from sidero.controllers.events import EventRecorder
        from sidero.protocols.grpc.port import make_api_port_service
        from sidero.protocols.grpc.server import EVENT_COMPONENT, AgentServicer, make_grpc_server

        servicer = AgentServicer(
            context.reactor, context.store,
            auto_accept_servers=settings.auto_accept_servers,
            auto_bmc_setup=settings.auto_bmc_setup,
            insecure_wipe=settings.insecure_wipe,
            server_reboot_timeout=settings.server_reboot_timeout,
            events=EventRecorder(context.store, context.reactor, component=EVENT_COMPONENT),
        )
        listener = make_api_port_service(
            context.reactor, site.resource(), lambda: make_grpc_server(servicer),
            settings.http_port, interface=settings.listen_address,
        )
    else:
        listener = make_http_service(
            context.reactor, site.resource(), settings.http_port, interface=settings.listen_address
        )
    listener.setServiceParent(group)
    return group


def _make_management(settings: Settings, context: AppContext) -> IService | None:
    """The C{sidero} CLI's API on a local unix socket (embedded store only: with Kubernetes,
    kubectl is the management tool). The socket's permissions are the access control."""
    if settings.store != "embedded":
        return None
    from sidero.management.server import make_management_service

    return make_management_service(context.reactor, context.store, settings.management_socket)


FACTORIES: list[tuple[str, Factory]] = [
    ("threads", _make_threads),
    ("store", _make_store),
    ("controllers", _make_controllers),
    ("webhook", _make_webhook),
    ("dhcp-proxy", _make_dhcp_proxy),
    ("tftp", _make_tftp),
    ("http", _make_http),
    ("management", _make_management),
]


def build_service(
    settings: Settings,
    reactor: Any,
    factories: Sequence[tuple[str, Factory]] | None = None,
    notes: Sequence[Note] = (),
    log_observer: ILogObserver | None = None,
) -> SideroService:
    """The service tree for C{settings}: one named child per factory that returned one."""
    root = SideroService(reactor, settings)
    root.setName("sidero")
    root.log_observer = log_observer
    for note in notes:
        log.emit(logs.LEVELS[note.level], note.format, **note.fields)
    for name, factory in FACTORIES if factories is None else factories:
        if name in SERVICES and not settings.enabled(name):
            log.info("Service {service} disabled by --disable-{service}", service=name)
            continue
        try:
            service = factory(settings, root.context)
        except OSError as e:
            raise StartupError(f"cannot set up the {name} service: {e}") from e
        if service is None:
            continue
        service.setName(name)
        service.setServiceParent(root)
    return root


def makeService(options: Options) -> SideroService:
    """twistd entry point: logging first, then the service tree on the global reactor."""
    from twisted.internet import reactor

    settings = options.settings
    stream = _log_stream(options)
    observer = logs.make_observer(settings.log_format, settings.log_level, stream)
    logs.bridge_stdlib_logging(settings.log_level)
    notes = options.resolution.notes if options.resolution is not None else ()
    try:
        return build_service(settings, reactor, notes=notes, log_observer=observer)
    except StartupError as e:
        options.fail(e)
        raise  # not reached: fail() exits


def make_application(environ: Mapping[str, str] | None = None) -> Componentized:
    """The twistd Application for C{twistd -y tap/sidero.tac}: settings from the environment only.

    An invalid variable prints one line and exits 1, as with the plugin.
    """
    options = Options(environ=environ)
    options.parseOptions([])
    application = Application("sidero")
    makeService(options).setServiceParent(application)
    return application


def _log_stream(options: Options) -> Any:
    """stdout, or twistd's C{--logfile} when one was given (daemon mode)."""
    parent = getattr(options, "parent", None)
    logfile = parent.get("logfile") if parent is not None else None
    if logfile and logfile != "-":
        from twisted.python.logfile import LogFile

        return LogFile.fromFullPath(logfile)
    return sys.stdout
