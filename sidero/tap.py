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

from twisted.application.service import Application, IService
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from twisted.python.failure import Failure

from sidero import logs
from sidero.app import AppContext, OrderedMultiService
from sidero.config import SERVICES, Note, Settings, SettingsOptions, StartupError
from sidero.store.service import StoreService
from sidero.threads import ThreadPoolService

log = Logger(namespace="sidero.tap")

#: Thread pools (name, max threads): Kubernetes client, disk/sqlite, IPMI, subprocesses.
#: "sendfile" sends boot assets (sidero.protocols.http.sendfile): one thread per core is enough.
THREAD_POOLS: tuple[tuple[str, int], ...] = (
    ("k8s", 8), ("disk", 4), ("ipmi", 8), ("subprocess", 2), ("sendfile", 2))

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
        from sidero.k8s.ratelimit import TokenBucket

        k8s_store = KubernetesStore(
            context.reactor, client, context.pools["k8s"].pool,
            rate_limiter=TokenBucket(settings.kube_api_qps, settings.kube_api_burst),
        )
        context.api_client = client
        context.store = context.metrics.timed_store(k8s_store)
        return StoreService(k8s_store, settings.state_dir)

    from sidero.api.admission import Admission
    from sidero.store.embedded import EmbeddedStore

    store = EmbeddedStore(context.reactor, settings.database_path, admission=Admission())
    context.store = context.metrics.timed_store(store)
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
    from sidero.limits import ConcurrencyLimit, WipeSlots
    from sidero.power.factory import PowerManagerFactory
    from sidero.power.limited import LimitedPowerManager

    elector = _make_elector(settings, context)
    metrics = context.metrics
    manager = ControllerManager(context.store, context.reactor, elector=elector, metrics=metrics)
    metrics.add_informers(lambda: manager.informers)
    metrics.add_controllers(lambda: manager.controllers)
    install_startup_runnables(manager, context.store, assets_url=settings.talos_assets_url)
    recorder = EventRecorder(context.store, context.reactor)
    wipes = WipeSlots(settings.max_concurrent_wipes)
    downloads = ConcurrencyLimit("download", settings.max_concurrent_downloads)
    power_limit = ConcurrencyLimit("power", settings.max_concurrent_power)
    metrics.add_limits(lambda: (wipes, downloads, power_limit))
    make_environment_controller(
        manager, context.store, settings.state_dir, context.reactor,
        pool=context.pools["disk"], assets_url=settings.talos_assets_url, downloads=downloads,
    )
    make_serverclass_controller(manager, context.store)
    power = PowerManagerFactory.from_settings(
        context.reactor, context.store, context.pools["ipmi"], settings)
    def power_for(server: dict[str, Any]) -> Deferred[Any]:
        return power.for_server(server).addCallback(
            lambda manager: LimitedPowerManager(metrics.instrument_power(manager), power_limit))

    make_server_controller(
        manager, context.store, power_for,
        reboot_timeout=settings.server_reboot_timeout, pxe_mode=settings.ipmi_pxe_method,
        clock=context.reactor, recorder=recorder,
        # A BMC that dropped a power-off (seen with silent failures) gets it again.
        power_off_recheck=DEFAULT_REQUEUE_AFTER, wipes=wipes,
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
    context.controller_manager = manager
    context.event_recorder = recorder
    if elector is None:
        return manager
    # The elector starts first and stops last: controllers finish, then the Lease is released.
    group = OrderedMultiService(context.reactor)
    elector.setServiceParent(group)
    manager.setServiceParent(group)
    context.leader_elector = elector
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
        tls_min_version=settings.tls_min_version, tls_cipher_suites=settings.tls_cipher_suites,
        api_client=context.api_client if settings.webhook_register else None,
        endpoint=WebhookEndpoint(url=settings.webhook_url) if settings.webhook_register else None,
    )


def _make_dhcp_proxy(settings: Settings, context: AppContext) -> IService | None:
    from sidero.protocols.dhcp.ratelimit import PerClientLimiter
    from sidero.protocols.dhcp.service import make_dhcp_proxy_service

    service = make_dhcp_proxy_service(
        context.reactor,
        endpoint=settings.api_endpoint,
        api_port=settings.api_port,
        interface=settings.dhcp_interface or None,
        dhcp_port=settings.dhcp_port,
        proxy_port=settings.dhcp_proxy_port,
        fatal=_is_root(),
        limiter=PerClientLimiter(settings.dhcp_mac_rate, settings.dhcp_mac_burst,
                                 context.reactor.seconds),
        trace=settings.log_level == "debug",
    )
    counters = getattr(service, "counters", None)
    if counters is not None:
        context.metrics.add_dhcp(counters)
    service.timeline = context.timeline  # type: ignore[attr-defined]
    return service


def _make_tftp(settings: Settings, context: AppContext) -> IService | None:
    from sidero.protocols.http.ipxe import boot_script
    from sidero.protocols.tftp.service import make_tftp_service

    os.makedirs(settings.tftp_roots[0], exist_ok=True)
    script = boot_script(settings.api_endpoint, settings.api_port)
    _install_ipxe_binaries(settings, script)
    service = make_tftp_service(
        context.reactor,
        roots=list(settings.tftp_roots),
        port=settings.tftp_port,
        interface=settings.listen_address,
        chain_script=script,
        fatal_bind=_is_root(),
        workers=settings.tftp_workers,
    )
    for child in service:  # type: ignore[attr-defined]
        protocol = getattr(child, "protocol", None)
        if protocol is not None:
            context.metrics.add_tftp(protocol.stats)
            protocol.timeline = context.timeline
    return service


def _is_root() -> bool:
    """Binding 67/4011/69 as root must work: a failure then is fatal, not a half-start."""
    return os.geteuid() == 0


def _install_ipxe_binaries(settings: Settings, script: bytes) -> None:
    """Put every iPXE binary the Go Sidero serves into C{<state-dir>/tftp}: Sidero-style builds
    from C{<state-dir>/ipxe} patched with the chain script (spec 3.3), else copies of the stock
    builds of C{--ipxe-dir} and Debian's C{/usr/lib/ipxe}; log where each came from.  Runs
    before the reactor (nothing is served yet)."""
    from sidero.protocols import bootfiles

    source = os.path.join(settings.state_dir, "ipxe")
    tftp_dir = settings.tftp_roots[0]
    try:
        patched = bootfiles.install_patched(source, tftp_dir, script).files
        copied = bootfiles.install_stock(settings.ipxe_search_path, tftp_dir, skip=list(patched))
    except (bootfiles.PatchError, OSError) as e:
        raise StartupError(f"iPXE binaries for {tftp_dir}: {e}") from e
    found = bootfiles.locate(settings.tftp_roots)
    for name in bootfiles.SERVED_NAMES:
        if name in patched:
            log.info("iPXE {name}: {source} with the chain script embedded", name=name,
                     source=patched[name])
        elif name in copied:
            log.info("iPXE {name}: {source} (stock build: iPXE clients get the chain script)",
                     name=name, source=copied[name])
        elif found[name] is not None:
            log.info("iPXE {name}: {source}", name=name, source=found[name])
    missing = [name for name, path in found.items() if path is None]
    if missing:
        log.warn("iPXE binaries not found for {names} in {roots}: install Debian's ipxe package"
                 " (scripts/run does; Debian 12 has no arm64 build, Debian 13's ships"
                 " ipxe-arm64.efi) or put builds in --ipxe-dir", names=", ".join(missing),
                 roots=", ".join(settings.ipxe_search_path))


def _make_http(settings: Settings, context: AppContext) -> IService | None:
    """iPXE script, boot decisions, Talos metadata, /env and /tftp assets and probes.

    Boot decisions and /configdata read informer caches: the controller manager's shared ones
    when controllers run, else informers of our own that live inside this service.  Before
    anything starts, the SideroLink identity is loaded or created (spec 2.4 [rec], 3.8): its
    tunnel address is in every Talos boot's kernel args and config.
    """
    from sidero.api.registry import (
        CAPI_MACHINE,
        ENVIRONMENT,
        METAL_MACHINE,
        SECRET,
        SERVER,
        SERVER_BINDING,
        SERVER_CLASS,
    )
    from sidero.api.registry import ResourceType as Kind
    from sidero.controllers.events import EventRecorder
    from sidero.controllers.informer import Informer
    from sidero.protocols.http.ipxe import BootSettings
    from sidero.protocols.http.service import (
        InformerBootLookup,
        PreparedService,
        make_http_service,
        store_serves,
    )
    from sidero.protocols.http.site import BootSite
    from sidero.siderolink.config import SideroLinkConfigError, load_or_create

    manager = context.controller_manager
    informers = context.http_informers

    def informer_for(kind: Kind) -> Informer:
        if manager is not None:
            informer: Informer = manager.informer(kind)
        else:
            informer = Informer(context.store, kind, clock=context.reactor)
            informer.setServiceParent(group)
        informers.append(informer)
        return informer

    async def prepare() -> None:
        try:
            identity = await load_or_create(context.store)
        except (SideroLinkConfigError, ValueError) as e:
            raise StartupError(f"SideroLink identity (Secret default/siderolink): {e}") from e
        site.set_siderolink_server_address(str(identity.server_address))
        context.siderolink_config = identity
        log.info("SideroLink server address {address}", address=str(identity.server_address))
        if not lookup.machines_known:
            # Cluster API CRDs may be missing from a Kubernetes cluster: then no Machine exists.
            served = await store_serves(context.store, CAPI_MACHINE)
            lookup.set_machines(informer_for(CAPI_MACHINE) if served else None)
            if not served:
                log.info("the store does not serve {resource}: MetalMachines need the {annotation} "
                         "annotation to boot", resource=CAPI_MACHINE.resource,
                         annotation="metal.sidero.dev/bootstrap-data-secret")

    group = PreparedService(context.reactor, prepare)
    boot = [informer_for(kind) for kind in (SERVER, SERVER_BINDING, SERVER_CLASS, ENVIRONMENT)]
    lookup = InformerBootLookup(
        *boot, metal_machines=informer_for(METAL_MACHINE), secrets=informer_for(SECRET),
        # The embedded store keeps every kind; a Kubernetes one is asked in prepare().
        machines=informer_for(CAPI_MACHINE) if settings.store != "kubernetes" else None,
        machines_known=settings.store != "kubernetes",
    )
    if manager is None:
        context.metrics.add_informers(lambda: informers)

    def ready() -> tuple[bool, str]:
        waiting = [i.kind.plural for i in informers if not i.has_synced]
        if not site.settings.siderolink_server_address:
            waiting.append("siderolink identity")
        return (not waiting, "waiting for " + ", ".join(waiting) if waiting else "ok")

    env_dir = os.path.join(settings.state_dir, "env")
    os.makedirs(env_dir, exist_ok=True)
    for arch in missing_agent_images(env_dir):
        log.warn("no agent image in {dir}: unknown {arch} machines cannot boot the agent "
                 "(scripts/build-agent-image --install {state} builds and installs it)",
                 dir=os.path.join(env_dir, f"agent-{arch}"), arch=arch, state=settings.state_dir)
    metrics = context.metrics
    site = BootSite(
        lookup,
        BootSettings(
            api_endpoint=settings.api_endpoint,
            api_port=settings.api_port,
            boot_from_disk_method=settings.boot_from_disk_method,
            extra_agent_kernel_args=settings.extra_agent_kernel_args,
            configdata_access=settings.configdata_access,
            configdata_trusted=settings.configdata_trusted_networks,
        ),
        env_dir=env_dir,
        tftp_roots=settings.tftp_roots,
        ready=ready,
        events=context.event_recorder or EventRecorder(context.store, context.reactor),
        sendfile_run=getattr(context.pools.get("sendfile"), "run", None),
    )
    timeline = context.timeline
    site.timeline = timeline
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
        def record_from_thread(step: str, **fields: Any) -> None:
            context.reactor.callFromThread(timeline.record, step, **fields)

        interceptor = metrics.grpc_interceptor(record_from_thread)

        def grpc_server() -> Any:
            server = make_grpc_server(servicer, interceptors=[interceptor])
            # Later factories add theirs (SideroLink's Provision); called when the port starts.
            for register in context.grpc_services:
                register(server)
            return server

        listener = make_api_port_service(
            context.reactor, metrics.instrument_resource(site.resource(), timeline), grpc_server,
            settings.http_port, interface=settings.listen_address, limits=_http_limits(settings),
        )
        factory = getattr(listener, "factory", None)
        if factory is not None:
            metrics.add_api_port(lambda: dict(factory.counters), lambda: dict(factory.refused))
    else:
        listener = make_http_service(
            context.reactor, metrics.instrument_resource(site.resource(), timeline), settings.http_port,
            interface=settings.listen_address, limits=_http_limits(settings),
        )
        refused = getattr(listener, "refused", None)
        if refused is not None:
            metrics.add_api_port(dict, lambda: dict(refused))
    listener.setServiceParent(group)
    return group


def _http_limits(settings: Settings) -> Any:
    from sidero.protocols.http.limits import HTTPLimits

    return HTTPLimits(
        request_timeout=settings.http_header_timeout,
        max_connections=settings.http_max_connections,
        max_connections_per_source=settings.http_max_connections_per_source,
    )


# --- SideroLink: the tunnel, Provision, the log receiver, the event sink, syslog -----------------


def _waiting_group(context: AppContext) -> OrderedMultiService:
    """A group whose start the root waits for (the tunnel must be up before the sinks bind)."""
    from sidero.protocols.http.service import PreparedService

    async def nothing() -> None:
        return None

    return PreparedService(context.reactor, nothing)


def _own_informer(context: AppContext, kind: Any, parent: OrderedMultiService) -> Any:
    """The controller manager's shared informer of C{kind}, or (controllers disabled) one of
    our own, made once and run by the first SideroLink service (or the dashboard) that asks
    for it."""
    manager = context.controller_manager
    if manager is not None:
        return manager.informer(kind)
    from sidero.controllers.informer import Informer

    own = context.siderolink_informers
    if kind.kind not in own:
        own[kind.kind] = Informer(context.store, kind, clock=context.reactor)
        own[kind.kind].setServiceParent(parent)
    return own[kind.kind]


def _siderolink_identity(context: AppContext) -> Callable[[], Any]:
    """Loads or creates the installation identity (the HTTP service's prepare does too; it
    is create-if-absent, so whichever runs first creates the Secret and the other reads it)."""
    async def identity() -> Any:
        from sidero.siderolink.config import SideroLinkConfigError, load_or_create

        config = context.siderolink_config
        if config is None:
            try:
                config = await load_or_create(context.store)
            except (SideroLinkConfigError, ValueError) as e:
                raise StartupError(f"SideroLink identity (Secret default/siderolink): {e}") from e
            context.siderolink_config = config
        return config

    return identity


def _tunnel_host(context: AppContext) -> Callable[[], Any]:
    identity = _siderolink_identity(context)

    async def host() -> str:
        return str((await identity()).server_address)

    return host


def _annotator(context: AppContext, parent: OrderedMultiService) -> Any:
    """One annotator for the log receiver, the event sink and syslog."""
    if context.siderolink_annotator is None:
        from sidero.api.registry import METAL_MACHINE, SERVER, SERVER_BINDING
        from sidero.siderolink.annotator import Annotator

        context.siderolink_annotator = Annotator(
            _own_informer(context, SERVER_BINDING, parent),
            _own_informer(context, METAL_MACHINE, parent),
            _own_informer(context, SERVER, parent),
        )
    return context.siderolink_annotator


def _server_log_writer(settings: Settings, context: AppContext) -> Any:
    """The writer of servers' log lines (C{--server-log}), shared by log receiver and syslog."""
    if context.server_log_writer is None:
        from sidero.siderolink.output import LineWriter

        context.server_log_writer = LineWriter(context.pools["disk"], settings.server_log)
    return context.server_log_writer


def _make_siderolink(settings: Settings, context: AppContext) -> IService | None:
    """The WireGuard server of the tunnel (spec 3.8) and Provision on the API port's gRPC."""
    from sidero.api.registry import SERVER_BINDING
    from sidero.siderolink.provision import ProvisionAPI, ProvisionServicer, add_to_server
    from sidero.siderolink.service import DEFAULT_INTERFACE, SideroLinkService
    from sidero.siderolink.wireguard import open_device

    group = _waiting_group(context)
    # A test may hand in its own device opener through the context.
    link = SideroLinkService(
        context.reactor, _siderolink_identity(context),
        _own_informer(context, SERVER_BINDING, group),
        endpoint=settings.siderolink_endpoint, port=settings.siderolink_port,
        mode=settings.siderolink_wireguard,
        interface=settings.siderolink_interface or DEFAULT_INTERFACE,
        opener=context.siderolink_opener or open_device,
    )
    link.setServiceParent(group)
    context.siderolink = link
    provision = ProvisionAPI(context.store, link)
    provision.timeline = context.timeline
    servicer = ProvisionServicer(context.reactor, provision)
    context.grpc_services.append(lambda server: add_to_server(servicer, server))
    return group


def _make_log_receiver(settings: Settings, context: AppContext) -> IService | None:
    """Talos kernel logs on [tunnel address]:4001 (spec 3.10), to --server-log."""
    from sidero.siderolink.logreceiver import KmsgFactory, make_log_receiver_service

    group = _waiting_group(context)
    factory = KmsgFactory(_server_log_writer(settings, context),
                          _annotator(context, group).for_tunnel_ip,
                          server_logs=context.server_logs, timeline=context.timeline)
    make_log_receiver_service(context.reactor, factory, _tunnel_host(context)).setServiceParent(group)
    context.log_receiver_factory = factory
    return group


def _make_event_sink(settings: Settings, context: AppContext) -> IService | None:
    """Talos events on [tunnel address]:4002 (spec 3.11) into ServerBindings."""
    from sidero.siderolink.eventsink import (
        EventSinkAPI,
        EventSinkServicer,
        make_event_sink_service,
    )

    group = _waiting_group(context)
    api = EventSinkAPI(context.store, context.reactor, _annotator(context, group).for_tunnel_ip,
                       settings.events_negative_address_filter)
    api.timeline = context.timeline
    context.event_sink = api
    make_event_sink_service(context.reactor, EventSinkServicer(context.reactor, api),
                            _tunnel_host(context)).setServiceParent(group)
    return group


def _make_syslog(settings: Settings, context: AppContext) -> IService | None:
    """Syslog from agents, iPXE and BMCs (UDP 514, TCP 601; beyond Sidero), to --server-log."""
    from sidero.protocols.syslog.protocol import SyslogSink
    from sidero.protocols.syslog.service import SyslogService

    group = _waiting_group(context)
    writer = _server_log_writer(settings, context)
    sink = SyslogSink(writer.write, _annotator(context, group).for_source_ip,
                      overloaded=lambda: writer.queued_bytes > 2 * writer.high_water,
                      server_logs=context.server_logs)
    context.syslog_sink = sink
    SyslogService(context.reactor, sink, udp_port=settings.syslog_port,
                  tcp_port=settings.syslog_tcp_port, interface=settings.listen_address,
                  register=writer.register, unregister=writer.unregister).setServiceParent(group)
    return group


def _make_management(settings: Settings, context: AppContext) -> IService | None:
    """The C{sidero} CLI's API on a local unix socket (embedded store only: with Kubernetes,
    kubectl is the management tool). The socket's permissions are the access control."""
    if settings.store != "embedded":
        return None
    from sidero.management.server import make_management_service

    return make_management_service(context.reactor, context.store, settings.management_socket,
                                   timeline=context.timeline, server_logs=context.server_logs)


def _make_dashboard(settings: Settings, context: AppContext) -> IService | None:
    """The read-only operator dashboard on its own listener (C{--dashboard-port}), from
    informer caches, the boot timeline and the server log buffer.  Off loopback it needs a
    password file: the provisioning network must not read inventories and kernel logs."""
    from sidero.api.registry import ENVIRONMENT, SERVER, SERVER_BINDING, SERVER_CLASS
    from sidero.dashboard import auth
    from sidero.dashboard.live import LiveHub
    from sidero.dashboard.service import DashboardService
    from sidero.dashboard.site import DashboardApp

    password = None
    if settings.dashboard_password_file:
        try:
            password = auth.read_password_file(settings.dashboard_password_file)
        except auth.PasswordFileError as e:
            raise StartupError(f"--dashboard-password-file: {e}") from e
        if auth.loosely_readable(settings.dashboard_password_file):
            log.warn("dashboard password file {path} can be read by other users (chmod 600 it)",
                     path=settings.dashboard_password_file)
    elif not auth.is_loopback_address(settings.dashboard_address):
        raise StartupError(
            f"the dashboard on {settings.dashboard_address or 'every address'} needs a login:"
            " set --dashboard-password-file, bind --dashboard-address to 127.0.0.1 or ::1,"
            " or --disable-dashboard")
    group = OrderedMultiService(context.reactor)
    servers, bindings, classes, environments = (
        _own_informer(context, kind, group)
        for kind in (SERVER, SERVER_BINDING, SERVER_CLASS, ENVIRONMENT))
    hub = LiveHub(context.reactor, servers, bindings, classes, environments,
                  timeline=context.timeline, server_logs=context.server_logs)
    app = DashboardApp(hub, context.reactor, password=password)
    service = DashboardService(context.reactor, app, hub, settings.dashboard_port,
                               interface=settings.dashboard_address)
    service.setServiceParent(group)
    context.metrics.add_dashboard(lambda: {"open": len(hub.streams), **hub.counters,
                                           **app.counters})
    context.dashboard = service
    return group


def _make_metrics(settings: Settings, context: AppContext) -> IService | None:
    """Prometheus C{/metrics} on --metrics-port (plain HTTP; bind it with --listen-address)."""
    from twisted.application.internet import TCPServer
    from twisted.web.server import Site

    site = Site(context.metrics.resource(), reactor=context.reactor)
    site.displayTracebacks = False
    site.noisy = False
    return TCPServer(settings.metrics_port, site, interface=settings.metrics_address or settings.listen_address,
                     reactor=context.reactor)


def _health_checks(settings: Settings, context: AppContext) -> Any:
    """The liveness and readiness checks (one set, shared by the probe port and systemd).

    healthz: C{ping}, and (spec 3.1) C{ipxe}: our own C{GET /boot.ipxe} answers 200.
    readyz: those, C{informers} (every cache the protocols and controllers read has synced)
    and, with leader election, C{leader} (the elector knows who leads).
    """
    if context.health_checks is not None:
        return context.health_checks
    from sidero import health

    checks = context.health_checks = health.HealthChecks(context.reactor)
    ipxe = None
    if settings.enabled("http"):
        ipxe = health.http_ok(context.reactor, health.local_url(
            settings.listen_address, settings.http_port, "/boot.ipxe"))
    for endpoint in health.ENDPOINTS:
        checks.add(endpoint, "ping", health.ping)
        if ipxe is not None:
            checks.add(endpoint, "ipxe", ipxe)

    def informers() -> list[Any]:
        found = list(context.http_informers)
        manager = context.controller_manager
        if manager is not None:
            found.extend(manager.informers)
        return found

    checks.add(health.READYZ, "informers", health.informers_synced(informers))
    elector = context.leader_elector
    if elector is not None:
        checks.add(health.READYZ, "leader", health.leadership_reported(elector))
    return checks


def _make_health(settings: Settings, context: AppContext) -> IService | None:
    """controller-runtime's probe server: C{/healthz} and C{/readyz} on --health-port."""
    from sidero.health import make_health_service

    return make_health_service(context.reactor, _health_checks(settings, context),
                               settings.health_port, interface=settings.health_address or settings.listen_address)


def _make_systemd(settings: Settings, context: AppContext) -> IService | None:
    """sd_notify READY/STATUS/WATCHDOG/STOPPING when systemd gave us C{NOTIFY_SOCKET} (it
    runs whether or not the probe port does: C{Type=notify} depends on it)."""
    from sidero.systemd import make_notifier_service

    try:
        return make_notifier_service(context.reactor, _health_checks(settings, context))
    except ValueError as e:
        raise StartupError(str(e)) from e


FACTORIES: list[tuple[str, Factory]] = [
    ("threads", _make_threads),
    ("store", _make_store),
    ("controllers", _make_controllers),
    ("webhook", _make_webhook),
    ("dhcp-proxy", _make_dhcp_proxy),
    ("tftp", _make_tftp),
    ("http", _make_http),
    ("siderolink", _make_siderolink),
    ("log-receiver", _make_log_receiver),
    ("event-sink", _make_event_sink),
    ("syslog", _make_syslog),
    ("management", _make_management),
    ("dashboard", _make_dashboard),
    ("metrics", _make_metrics),
    ("health", _make_health),
    ("systemd", _make_systemd),
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
