# -*- test-case-name: tests.protocols.grpc.test_server -*-
"""The Agent gRPC API (spec §3.7): registration, wipe bookkeeping, addresses and BMC details.

Two layers, so the decisions can be tested without threads or sockets:

  - L{AgentAPI}: one coroutine per RPC, run on the reactor thread against an
    L{IResourceStore}.  It takes request messages and returns response messages.
  - L{AgentServicer}: the grpcio servicer.  grpcio calls it on its own worker threads, which
    must never touch the store (the store and everything Twisted are reactor-thread only), so
    each call is handed to the reactor and the worker waits for the result, with a deadline on
    both sides: the reactor side gives up after C{call_timeout}, and the worker side gives up a
    little later even if the reactor never ran the call (e.g. while shutting down).

Errors are answered as Go's gRPC server does for a plain Go error: status C{UNKNOWN} with the
Kubernetes error text (C{servers.metal.sidero.dev "x" not found}); the agent only logs and
retries them.
"""

from __future__ import annotations

import base64
import copy
import queue
from collections.abc import Callable, Coroutine, Sequence
from concurrent import futures
from typing import Any, Protocol, TypeVar

import grpc
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from sidero.api import conditions
from sidero.api.registry import SECRET, SERVER
from sidero.proto import agent_pb2 as pb
from sidero.proto import agent_pb2_grpc as pb_grpc
from sidero.store.errors import AlreadyExists, BadRequest, Conflict, NotFound, StoreError
from sidero.store.interfaces import IResourceStore, Object
from sidero.threads import CallTimeout, with_timeout

T = TypeVar("T")

#: Server condition the wipe cycle is tracked with (spec §1.1).
POWER_CYCLE = "PowerCycle"
#: Default IPMI port written when the agent reports none (spec §0.3, §3.7 quirk).
DEFAULT_BMC_PORT = 623
#: Where BMC credential Secrets live (spec §1.7).
BMC_SECRET_NAMESPACE = "default"
#: clusterctl carries objects with this label along in a `clusterctl move`.
MOVE_LABEL = "clusterctl.cluster.x-k8s.io/move"
#: Component name of the Events the API writes (spec §0.4).
EVENT_COMPONENT = "sidero-server"

#: Store writes retried on a resourceVersion conflict (another writer, e.g. the Server
#: controller, changed the Server between our read and our write).
_CONFLICT_RETRIES = 5

STORAGE_TYPES = {v: k for k, v in pb.StorageType.items()}


class EventSink(Protocol):
    """What the API needs of L{sidero.controllers.events.EventRecorder}."""

    def normal(self, obj: Object, reason: str, message: str) -> Deferred[Any]: ...


# --- hardware mapping (spec §3.7 "map(hardware)") -----------------------------------------------

def _pruned(d: dict[str, Any]) -> dict[str, Any]:
    """Drop zero values, as Go's C{omitempty} does."""
    return {k: v for k, v in d.items() if v not in ("", 0, None, [])}


def map_hardware(hw: pb.HardwareInformation) -> Object:
    """C{spec.hardware} of a Server from what the agent reported.

    Lists are taken as sent (Go sizes them by the C{*_count} fields and panics when more
    entries arrive; the spec recommends the actual list).  Totals are rendered as Go renders
    them: whole GB, rounded down.
    """
    s, c, m, st, n = hw.system, hw.compute, hw.memory, hw.storage, hw.network
    return {
        "system": _pruned({
            "uuid": s.uuid, "manufacturer": s.manufacturer, "productName": s.product_name,
            "version": s.version, "serialNumber": s.serial_number, "skuNumber": s.sku_number,
            "family": s.family,
        }),
        "compute": _pruned({
            "totalCoreCount": c.total_core_count, "totalThreadCount": c.total_thread_count,
            "processorCount": c.processor_count,
            "processors": [_pruned({
                "manufacturer": p.manufacturer, "productName": p.product_name,
                "serialNumber": p.serial_number, "speed": p.speed, "coreCount": p.core_count,
                "threadCount": p.thread_count,
            }) for p in c.processors],
        }),
        "memory": _pruned({
            "totalSize": f"{m.total_size // 1024} GB",
            "moduleCount": m.module_count,
            "modules": [_pruned({
                "manufacturer": mm.manufacturer, "productName": mm.product_name,
                "serialNumber": mm.serial_number, "type": mm.type, "size": mm.size,
                "speed": mm.speed,
            }) for mm in m.modules],
        }),
        "storage": _pruned({
            "totalSize": f"{st.total_size // 1024 ** 3} GB",
            "deviceCount": st.device_count,
            "devices": [_pruned({
                "type": STORAGE_TYPES.get(d.type, "Unknown"), "size": d.size,
                "productName": d.model, "serialNumber": d.serial, "name": d.name,
                "deviceName": d.device_name, "uuid": d.uuid, "wwid": d.wwid,
            }) for d in st.devices],
        }),
        "network": _pruned({
            "interfaceCount": n.interface_count,
            "interfaces": [_pruned({
                "index": i.index, "name": i.name, "flags": i.flags, "mtu": i.mtu, "mac": i.mac,
                "addresses": list(i.addresses),
            }) for i in n.interfaces],
        }),
    }


def reconcile_addresses(
    old: list[dict[str, str]], new: list[tuple[str, str]],
) -> list[dict[str, str]] | None:
    """The Server's new C{status.addresses}, or None when nothing changes.

    For each address type the agent sent, its addresses replace the old ones of that type;
    types it did not send are kept.  "Unchanged" compares sets per sent type, so a reordering
    alone writes nothing.  The result lists the sent addresses in request order (duplicates
    dropped), then the kept ones in their old order.
    """
    def by_type(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
        grouped: dict[str, list[str]] = {}
        for t, a in pairs:
            if a not in grouped.setdefault(t, []):
                grouped[t].append(a)
        return grouped

    old_pairs = [(str(a.get("type", "")), str(a.get("address", ""))) for a in old]
    before, after = by_type(old_pairs), by_type(new)
    if all(set(addrs) == set(before.get(t) or ()) and t in before for t, addrs in after.items()):
        return None
    result = [{"type": t, "address": a} for t, addrs in after.items() for a in addrs]
    result += [{"type": t, "address": a} for t, a in old_pairs if t not in after]
    return result


def _b64(value: str) -> str:
    return base64.b64encode(value.encode("utf-8")).decode("ascii")


def _secret_ref(name: str, key: str) -> dict[str, Any]:
    return {"secretKeyRef": {"namespace": BMC_SECRET_NAMESPACE, "name": name, "key": key}}


# --- the RPCs, on the reactor thread -------------------------------------------------------------

class AgentAPI:
    """The Agent RPCs over the resource store; every method runs on the reactor thread.

    @param server_reboot_timeout: seconds (C{--server-reboot-timeout}); sent to agents that
        must wipe so they heartbeat often enough to hold off another power cycle.
    """

    log = Logger()

    def __init__(
        self,
        store: IResourceStore,
        clock: IReactorTime,
        *,
        auto_accept_servers: bool,
        auto_bmc_setup: bool,
        insecure_wipe: bool,
        server_reboot_timeout: float,
        events: EventSink | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.auto_accept_servers = auto_accept_servers
        self.auto_bmc_setup = auto_bmc_setup
        self.insecure_wipe = insecure_wipe
        self.server_reboot_timeout = server_reboot_timeout
        self.events = events

    def _event(self, obj: Object, reason: str, message: str) -> None:
        """Record a Normal event without making the RPC wait for (or fail with) its write."""
        if self.events is None:
            return
        d = self.events.normal(obj, reason, message)
        if isinstance(d, Deferred):
            d.addErrback(lambda f: self.log.failure("event {reason} not recorded", f, reason=reason))

    async def _get_server(self, uuid: str) -> Object:
        if not uuid:
            # What client-go answers before it even asks the API server.
            raise BadRequest("resource name may not be empty")
        obj: Object = await self.store.get(SERVER, uuid)
        return obj

    async def _write_server(
        self, uuid: str, change: Callable[[Object], bool], status: bool,
    ) -> Object | None:
        """Read the Server, let C{change} edit it in place, write it back if C{change} says it
        changed; a conflicting concurrent write makes it start over from a fresh read."""
        for attempt in range(_CONFLICT_RETRIES):
            obj = await self._get_server(uuid)
            edited = copy.deepcopy(obj)
            if not change(edited):
                return None
            try:
                written: Object = await (
                    self.store.update_status(edited) if status else self.store.update(edited)
                )
                return written
            except Conflict:
                if attempt == _CONFLICT_RETRIES - 1:
                    raise
                self.log.debug("Server {uuid} changed under us; retrying", uuid=uuid)
        raise AssertionError("not reached")

    async def create_server(self, request: pb.CreateServerRequest) -> pb.CreateServerResponse:
        """Register the machine if it is new, then tell it what to do (only when accepted)."""
        uuid = request.hardware.system.uuid
        try:
            obj = await self._get_server(uuid)
        except NotFound:
            new = {
                "apiVersion": SERVER.api_version,
                "kind": SERVER.kind,
                "metadata": {"name": uuid},
                "spec": _pruned({
                    "hardware": map_hardware(request.hardware),
                    "hostname": request.hostname,
                }) | {"accepted": self.auto_accept_servers},
            }
            try:
                obj = await self.store.create(new)
            except AlreadyExists:
                # Another CreateServer for the same machine won the race; use its Server.
                obj = await self._get_server(uuid)
            else:
                self.log.info("Server {uuid} registered (accepted: {accepted})",
                              uuid=uuid, accepted=self.auto_accept_servers)
                self._event(obj, "Server Registration", "Server auto-registered via API.")
        response = pb.CreateServerResponse()
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        # Nothing destructive for machines nobody accepted: a random PXE client must not be wiped.
        if spec.get("accepted"):
            if not spec.get("bmc") and self.auto_bmc_setup:
                response.setup_bmc = True
            if not status.get("isClean"):
                response.wipe = True
                response.insecure_wipe = self.insecure_wipe
                response.reboot_timeout = float(self.server_reboot_timeout)
        return response

    async def mark_server_as_wiped(
        self, request: pb.MarkServerAsWipedRequest,
    ) -> pb.MarkServerAsWipedResponse:
        """The disks are wiped: clean again, and the wipe's power cycle is over."""
        def change(obj: Object) -> bool:
            obj.setdefault("status", {})["isClean"] = True
            conditions.mark_true(obj, POWER_CYCLE, self.clock.seconds())
            return True

        written = await self._write_server(request.uuid, change, status=True)
        if written is not None:
            self._event(written, "Server Wipe", "Server wiped via agent.")
        return pb.MarkServerAsWipedResponse()

    async def reconcile_server_addresses(
        self, request: pb.ReconcileServerAddressesRequest,
    ) -> pb.ReconcileServerAddressesResponse:
        """Replace the addresses of each type the agent reported."""
        reported = [(a.type, a.address) for a in request.address]

        def change(obj: Object) -> bool:
            status = obj.setdefault("status", {})
            addresses = reconcile_addresses(list(status.get("addresses") or []), reported)
            if addresses is None:
                return False
            status["addresses"] = addresses
            return True

        await self._write_server(request.uuid, change, status=True)
        return pb.ReconcileServerAddressesResponse()

    async def heartbeat(self, request: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        """A wipe is running: restart the PowerCycle clock so the controller waits again."""
        def change(obj: Object) -> bool:
            # Deleting first forces a new lastTransitionTime even if nothing else differs.
            conditions.delete(obj, POWER_CYCLE)
            conditions.mark_false(obj, POWER_CYCLE, "InProgress", conditions.SEVERITY_INFO,
                                  "Server wipe in progress.", self.clock.seconds())
            return True

        await self._write_server(request.uuid, change, status=True)
        return pb.HeartbeatResponse()

    async def update_bmc_info(self, request: pb.UpdateBMCInfoRequest) -> pb.UpdateBMCInfoResponse:
        """Record the BMC endpoint and, with credentials, keep them in a Secret owned by the
        Server (so deleting the Server deletes them, and clusterctl move carries them)."""
        info = request.bmc_info
        uuid = request.uuid
        secret_name = f"{uuid}-bmc"
        password = getattr(info, "pass")  # a Python keyword, so not an attribute name
        with_credentials = bool(info.user and password)
        if with_credentials:
            server = await self._get_server(uuid)
            await self._put_bmc_secret(server, secret_name, info.user, password)

        def change(obj: Object) -> bool:
            spec = obj.setdefault("spec", {})
            bmc = spec.get("bmc")
            if not isinstance(bmc, dict):
                bmc = spec["bmc"] = {}
            if info.ip:
                bmc["endpoint"] = info.ip
            bmc["port"] = info.port or DEFAULT_BMC_PORT
            if with_credentials:
                bmc["userFrom"] = _secret_ref(secret_name, "user")
                bmc["passFrom"] = _secret_ref(secret_name, "pass")
            return True

        written = await self._write_server(uuid, change, status=False)
        assert written is not None
        self.log.info("Server {uuid} BMC info updated", uuid=uuid)
        self._event(written, "BMC Update", "BMC info updated via API.")
        return pb.UpdateBMCInfoResponse()

    async def _put_bmc_secret(self, server: Object, name: str, user: str, password: str) -> None:
        data = {"user": _b64(user), "pass": _b64(password)}
        for attempt in range(_CONFLICT_RETRIES):
            try:
                secret: Object = await self.store.get(SECRET, name, BMC_SECRET_NAMESPACE)
            except NotFound:
                meta = server["metadata"]
                secret = {
                    "apiVersion": SECRET.api_version,
                    "kind": SECRET.kind,
                    "metadata": {
                        "name": name,
                        "namespace": BMC_SECRET_NAMESPACE,
                        "labels": {MOVE_LABEL: ""},
                        "ownerReferences": [{
                            "apiVersion": SERVER.api_version, "kind": SERVER.kind,
                            "name": meta["name"], "uid": meta["uid"],
                            "controller": True, "blockOwnerDeletion": True,
                        }],
                    },
                    "type": "Opaque",
                    "data": data,
                }
                try:
                    await self.store.create(secret)
                    return
                except AlreadyExists:
                    continue
            secret["data"] = data
            try:
                await self.store.update(secret)
                return
            except Conflict:
                if attempt == _CONFLICT_RETRIES - 1:
                    raise
        raise Conflict(f'secrets "{name}" kept changing; giving up')


# --- the grpcio side ---------------------------------------------------------------------------

class ReactorUnavailable(Exception):
    """The reactor did not run a bridged call in time (stopped, or wedged)."""


def call_timeout(context: grpc.ServicerContext, limit: float) -> float:
    """How long a call may run on the reactor: C{limit}, or less when the client's deadline is
    nearer."""
    remaining = context.time_remaining()
    return limit if remaining is None else max(0.0, min(limit, remaining))


def call_on_reactor(
    reactor: Any, f: Callable[[], Coroutine[Any, Any, T]], timeout: float,
    grace: float = 5.0,
) -> T:
    """Run C{f} on the reactor thread and wait for its result on this (non-reactor) thread.

    Like L{twisted.internet.threads.blockingCallFromThread}, but bounded: the reactor side
    fails the call with L{CallTimeout} after C{timeout}, and this thread stops waiting after
    C{timeout + grace} even if the reactor never picked the call up.  A call past its time is
    cancelled: its store requests still waiting for a rate-limit token are never sent (and
    give the token back), so a client's retries cannot pile writes up behind its deadline.
    """
    results: queue.Queue[Any] = queue.Queue(maxsize=1)

    def start() -> None:
        try:
            d: Deferred[T] = ensureDeferred(f())
        except BaseException:
            results.put(Failure())
            return
        bounded = with_timeout(d, reactor, timeout, "agent API call")

        def cancel_late(failure: Failure) -> Failure:
            if failure.check(CallTimeout):
                d.addErrback(lambda _f: None)  # its CancelledError is expected
                d.cancel()
            return failure

        bounded.addErrback(cancel_late).addBoth(results.put)

    reactor.callFromThread(start)
    try:
        result = results.get(timeout=timeout + grace)
    except queue.Empty:
        raise ReactorUnavailable("the reactor did not answer in time") from None
    if isinstance(result, Failure):
        result.raiseException()
    return result


class AgentServicer(pb_grpc.AgentServicer):
    """grpcio servicer of C{api.Agent}; builds an L{AgentAPI} from the settings it is given.

    @param call_timeout: seconds a call may take on the reactor (capped by the client's own
        deadline).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        store: IResourceStore,
        *,
        auto_accept_servers: bool = False,
        auto_bmc_setup: bool = True,
        insecure_wipe: bool = True,
        server_reboot_timeout: float = 1200.0,
        events: EventSink | None = None,
        call_timeout: float = 30.0,
    ) -> None:
        self.reactor = reactor
        self.call_timeout = call_timeout
        self.closed = False
        self.api = AgentAPI(
            store, reactor,
            auto_accept_servers=auto_accept_servers, auto_bmc_setup=auto_bmc_setup,
            insecure_wipe=insecure_wipe, server_reboot_timeout=server_reboot_timeout,
            events=events,
        )

    def close(self) -> None:
        """Refuse new calls (UNAVAILABLE) from now on: the reactor is about to stop."""
        self.closed = True

    def _call(self, method: str, context: grpc.ServicerContext,
              f: Callable[[], Coroutine[Any, Any, T]]) -> T:
        if self.closed:
            context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        timeout = call_timeout(context, self.call_timeout)
        code: grpc.StatusCode
        try:
            return call_on_reactor(self.reactor, f, timeout)
        except StoreError as e:
            code, detail = grpc.StatusCode.UNKNOWN, e.message
        except CallTimeout:
            code, detail = grpc.StatusCode.DEADLINE_EXCEEDED, f"{method} took longer than {timeout:g}s"
        except ReactorUnavailable as e:
            code, detail = grpc.StatusCode.UNAVAILABLE, str(e)
        except Exception as e:
            self.log.failure("agent API {method} failed", method=method)
            code, detail = grpc.StatusCode.UNKNOWN, str(e) or type(e).__name__
        self.log.info("agent API {method} failed: {code} {detail}", method=method,
                      code=code.name, detail=detail)
        context.abort(code, detail)
        raise AssertionError("not reached")  # abort() raises

    def CreateServer(self, request: pb.CreateServerRequest,
                     context: grpc.ServicerContext) -> pb.CreateServerResponse:
        return self._call("CreateServer", context, lambda: self.api.create_server(request))

    def MarkServerAsWiped(self, request: pb.MarkServerAsWipedRequest,
                          context: grpc.ServicerContext) -> pb.MarkServerAsWipedResponse:
        return self._call("MarkServerAsWiped", context,
                          lambda: self.api.mark_server_as_wiped(request))

    def ReconcileServerAddresses(
        self, request: pb.ReconcileServerAddressesRequest, context: grpc.ServicerContext,
    ) -> pb.ReconcileServerAddressesResponse:
        return self._call("ReconcileServerAddresses", context,
                          lambda: self.api.reconcile_server_addresses(request))

    def Heartbeat(self, request: pb.HeartbeatRequest,
                  context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        return self._call("Heartbeat", context, lambda: self.api.heartbeat(request))

    def UpdateBMCInfo(self, request: pb.UpdateBMCInfoRequest,
                      context: grpc.ServicerContext) -> pb.UpdateBMCInfoResponse:
        return self._call("UpdateBMCInfo", context, lambda: self.api.update_bmc_info(request))


#: grpc-go's server defaults, set explicitly (grpcio's C core would differ in places): 4 MiB
#: per received message (a larger one fails RESOURCE_EXHAUSTED before any handler runs), 4 MiB
#: sent, 100 concurrent streams per connection, no pings without data answered forever
#: (grpcio's strike counter GOAWAYs a ping flood), and an HTTP/2 header list of 16 KiB.
MAX_MESSAGE = 4 * 1024 * 1024
GRPC_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_concurrent_streams", 100),
    ("grpc.max_metadata_size", 16 * 1024),
    ("grpc.http2.max_ping_strikes", 2),
)


def make_grpc_server(
    servicer: AgentServicer, max_workers: int = 8, interceptors: Sequence[Any] = (),
) -> grpc.Server:
    """An unstarted grpcio server carrying C{servicer}; the API port binds and starts it.

    SO_REUSEPORT is off so an ephemeral loopback port can never be shared with a stranger;
    message and stream limits are L{GRPC_OPTIONS}.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc-agent"),
        options=list(GRPC_OPTIONS),
        interceptors=list(interceptors),
    )
    pb_grpc.add_AgentServicer_to_server(servicer, server)
    return server
