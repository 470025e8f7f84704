# -*- test-case-name: tests.service.test_tap -*-
"""The service tree's shared context and its ordered root service.

L{sidero.tap} builds one named child per service from small factories; each factory gets the
resolved L{Settings} and an L{AppContext} holding what earlier factories made (the reactor,
the thread pools, the store...). L{OrderedMultiService} starts children in order, waiting for
any that start asynchronously (the store must be open before controllers run), and stops them
in reverse order, one at a time, so nothing loses a dependency while it shuts down.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python.components import Componentized
from twisted.python.failure import Failure

from sidero.config import Settings, StartupError
from sidero.store.errors import StoreError
from sidero.threads import ThreadPoolService, with_timeout

if TYPE_CHECKING:
    from sidero.controllers.events import EventRecorder
    from sidero.controllers.informer import Informer
    from sidero.controllers.lease import LeaseElector
    from sidero.controllers.runtime import ControllerManager
    from sidero.dashboard.service import DashboardService
    from sidero.health import HealthChecks
    from sidero.metrics import Metrics
    from sidero.protocols.syslog.protocol import SyslogSink
    from sidero.serverlogs import ServerLogs
    from sidero.siderolink.annotator import Annotator
    from sidero.siderolink.config import SideroLinkConfig
    from sidero.siderolink.eventsink import EventSinkAPI
    from sidero.siderolink.logreceiver import KmsgFactory
    from sidero.siderolink.output import LineWriter
    from sidero.siderolink.service import DeviceOpener, SideroLinkService
    from sidero.timeline import BootTimeline


@dataclass
class AppContext:
    """What service factories share: the reactor, settings, and what earlier factories made.

    Each field is set by the one factory named beside it; a later factory reads it and finds
    None (or empty) when that service is disabled or absent from this build. The metrics
    registry, boot timeline and server log buffer always exist, so that every factory can
    feed them whether or not anything serves them.
    """

    reactor: Any
    settings: Settings
    #: thread pools by name (C{k8s}, C{disk}, C{ipmi}, C{subprocess}): C{threads}.
    pools: dict[str, ThreadPoolService] = field(default_factory=dict)
    #: the L{IResourceStore} (timed by the metrics): C{store}.
    store: Any = None
    #: the Kubernetes C{ApiClient} the store talks through, None on the embedded store: C{store}.
    api_client: Any = None
    #: C{controllers}: the manager (its shared informers), its Event recorder, the Lease elector.
    controller_manager: ControllerManager | None = None
    event_recorder: EventRecorder | None = None
    leader_elector: LeaseElector | None = None
    #: the informers the HTTP service made or borrowed (readiness waits on them): C{http}.
    http_informers: list[Informer] = field(default_factory=list)
    #: the installation's SideroLink identity, once loaded: C{http} or C{siderolink}.
    siderolink_config: SideroLinkConfig | None = None
    #: registrations for the API port's gRPC server, called when it starts (Provision).
    grpc_services: list[Callable[[Any], None]] = field(default_factory=list)
    #: C{siderolink}: the tunnel; the device opener a test may hand in before the factory runs.
    siderolink: SideroLinkService | None = None
    siderolink_opener: DeviceOpener | None = None
    #: informers of SideroLink's own when no controller manager shares its (by kind).
    siderolink_informers: dict[str, Informer] = field(default_factory=dict)
    #: tunnel and source address to server, shared by the log receiver, event sink and syslog.
    siderolink_annotator: Annotator | None = None
    #: the C{--server-log} writer shared by the log receiver and syslog.
    server_log_writer: LineWriter | None = None
    log_receiver_factory: KmsgFactory | None = None
    event_sink: EventSinkAPI | None = None
    syslog_sink: SyslogSink | None = None
    #: the liveness and readiness checks shared by the probe port and systemd.
    health_checks: HealthChecks | None = None
    #: the operator dashboard's listener: C{dashboard}.
    dashboard: DashboardService | None = None
    metrics: Metrics = field(init=False)
    timeline: BootTimeline = field(init=False)
    server_logs: ServerLogs = field(init=False)

    def __post_init__(self) -> None:
        from sidero.metrics import Metrics
        from sidero.serverlogs import ServerLogs
        from sidero.timeline import BootTimeline

        self.metrics = Metrics()
        self.timeline = BootTimeline(self.reactor.seconds)
        self.server_logs = ServerLogs(self.reactor.seconds)


class OrderedMultiService(MultiService):
    """A MultiService that starts children in order and stops them in reverse, one by one.

    A child's C{startService} may return a Deferred; the next child starts only when it has
    fired. If a child fails to start, the children already started are stopped and
    L{on_start_failure} is called (twistd cannot otherwise report a start-up failure).

    @ivar stop_timeout: seconds one child may take to stop before we move on without it.
    """

    log = Logger()
    #: Log "All services started" at info (the root) rather than debug (nested groups).
    announce = False

    def __init__(self, clock: Any, stop_timeout: float = 30.0) -> None:
        super().__init__()
        self.clock = clock
        self.stop_timeout = stop_timeout
        self.log_observer: ILogObserver | None = None
        self._running_children: list[IService] = []
        self._starting: Deferred[None] | None = None
        self._stop_requested = False
        self._start_outcome: list[Failure | None] = []
        self._start_waiters: list[Deferred[None]] = []

    def when_started(self) -> Deferred[None]:
        """A Deferred that fires once every child has started, or fails as the start did."""
        d: Deferred[None] = Deferred()
        if self._start_outcome:
            self._fire(d, self._start_outcome[0])
        else:
            self._start_waiters.append(d)
        return d

    @staticmethod
    def _fire(d: Deferred[None], outcome: Failure | None) -> None:
        if outcome is None:
            d.callback(None)
        else:
            d.errback(outcome)

    def _settle(self, outcome: Failure | None) -> None:
        self._start_outcome[:] = [outcome]
        waiters, self._start_waiters = self._start_waiters, []
        for d in waiters:
            self._fire(d, outcome)

    def setServiceParent(self, parent: Any) -> None:
        # twistd makes a Componentized Application and parents us to it; registering our
        # observer as its ILogObserver component makes twistd log through it.
        if self.log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)

    def on_start_failure(self, failure: Failure) -> None:
        """Called after a failed start has been rolled back; the tap stops the process."""

    def startService(self) -> None:
        # Service.startService, not MultiService's: we start the children ourselves.
        self.running = 1
        self._stop_requested = False
        self._starting = Deferred.fromCoroutine(self._start_children())
        self._starting.addCallbacks(lambda _: self._settle(None), self._start_failed)

    async def _start_children(self) -> None:
        for child in list(self):
            if self._stop_requested:
                return
            self.log.debug("Starting {service}", service=child.name)
            await maybeDeferred(child.startService)
            self._running_children.append(child)
        self.log.emit(
            LogLevel.info if self.announce else LogLevel.debug,
            "All services started: {services}",
            services=", ".join(str(c.name) for c in self._running_children),
        )

    def _start_failed(self, failure: Failure) -> None:
        name = next((c.name for c in self if c not in self._running_children), "?")
        if failure.check(StartupError, StoreError):
            # Self-describing (no CRDs, API server unreachable...): one line, no traceback.
            self.log.error("Service {service} failed to start: {error}", service=name,
                           error=failure.getErrorMessage())
        else:
            self.log.failure("Service {service} failed to start", failure, service=name)
        d = Deferred.fromCoroutine(self._stop_children())
        d.addBoth(lambda _: self.on_start_failure(failure))
        d.addBoth(lambda _: self._settle(failure))

    def stopService(self) -> Deferred[None]:
        self.running = 0
        self._stop_requested = True
        starting = self._starting if self._starting is not None else succeed(None)
        # Wait for a start in progress to settle, then stop what did start.
        waited: Deferred[Any] = DeferredList([starting], consumeErrors=True)
        return waited.addCallback(lambda _: Deferred.fromCoroutine(self._stop_children()))

    async def _stop_children(self) -> None:
        while self._running_children:
            child = self._running_children.pop()
            self.log.debug("Stopping {service}", service=child.name)
            try:
                d = maybeDeferred(child.stopService)
                await with_timeout(d, self.clock, self.stop_timeout, f"stopping {child.name}")
            except Exception:
                self.log.failure("Service {service} did not stop cleanly", service=child.name)
