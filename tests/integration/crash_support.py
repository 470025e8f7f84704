"""Crash tests' drivers: real C{twistd sidero} processes SIGKILLed at random moments while the
test plays users, operators and machines against them, on either store.

Nothing here knows which store is under test.  A test hands a driver:

  - a L{ManagementClient} (the embedded store's management socket, served by the process that
    gets killed) or a L{KubeClient} (the API server, which stays up): L{Hands} wraps it and
    turns "the service is not there right now" into L{Down}, which the loops ride out;
  - the L{Replica}s to kill (one embedded process, or two Kubernetes replicas with leader
    election), and for registration the agent endpoint of each.

L{Killer} kills one replica with SIGKILL (the whole process group) at random moments and
starts it again after a random pause; every kill counts as one kill point.

L{AllocationCrash} (MetalMachines allocated and released) and L{RegistrationCrash} (real
agents registering, being accepted, wiped and deleted) check their invariants at every
observation and once everything is quiet.  L{scaled} multiplies their sizes by
C{SIDERO_CRASH_SCALE} (default 1) for the larger runs the README reports.
"""

from __future__ import annotations

import copy
import os
import random
import socket
import time
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.python.threadpool import ThreadPool

from sidero.api.admission import Admission
from sidero.api.registry import METAL_MACHINE, SERVER, SERVER_BINDING, SERVER_CLASS, ResourceType
from sidero.management.client import ManagementClient, ServiceUnreachable, resource_path
from sidero.store.errors import AlreadyExists, NotFound, StoreError, Unavailable
from tests.integration.lifecycle_support import AgentRun, Machine, run_agent

BOOTSTRAP_ANNOTATION = "metal.sidero.dev/bootstrap-data-secret"
#: How long an agent keeps retrying a call (its --retry-timeout): a few restarts in a row on a
#: loaded machine, not the real agent's 5 minutes.
AGENT_RETRY = 90.0


def scaled(n: int) -> int:
    """C{n} times C{SIDERO_CRASH_SCALE} (a larger run for the figures the README reports)."""
    return max(1, round(n * float(os.environ.get("SIDERO_CRASH_SCALE") or "1")))


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


class Replica(Protocol):
    """A sidero process the test may kill."""

    def start(self) -> None: ...

    def kill(self) -> None:
        """SIGKILL its whole process group and reap it."""

    def log(self) -> str: ...

    def ready(self) -> bool:
        """It answers (may raise while it does not)."""


def _ready(replica: Replica) -> bool:
    try:
        return bool(replica.ready())
    except Exception:
        return False


class Down(Exception):
    """The service that answers for the store is not there (killed, restarting)."""


class Hands:
    """Blocking store calls through the management API (socket or API server); run them in
    threads.  An unreachable service, or one answering that it is not ready, is L{Down}."""

    def __init__(self, client: ManagementClient) -> None:
        self.client = client

    def _call(self, f: Any, *args: Any) -> Any:
        try:
            return f(*args)
        except ServiceUnreachable as e:
            raise Down(str(e)) from None
        except Unavailable as e:
            raise Down(e.message) from None
        except StoreError as e:
            if e.code in (500, 502, 503, 504) and not isinstance(e, NotFound | AlreadyExists):
                raise Down(e.message) from None
            raise

    def list(self, kind: ResourceType, namespace: str | None = None,
             selector: str | None = None) -> list[dict[str, Any]]:
        out = self._call(self.client.list, kind, namespace, selector)
        return list(out.get("items") or [])

    def create(self, kind: ResourceType, body: dict[str, Any]) -> None:
        try:
            self._call(self.client.create, kind, body)
        except AlreadyExists:
            pass  # an earlier attempt was written before its answer was lost to a kill

    def patch(self, kind: ResourceType, name: str, body: dict[str, Any],
              namespace: str | None = None) -> None:
        self._call(self.client.patch, kind, name, body, namespace)

    def patch_status(self, kind: ResourceType, name: str, body: dict[str, Any],
                     namespace: str | None = None) -> None:
        path = resource_path(kind, namespace=namespace, name=name, subresource="status")
        self._call(self.client.request, "PATCH", path, body, "application/merge-patch+json")

    def delete(self, kind: ResourceType, name: str, namespace: str | None = None) -> None:
        try:
            self._call(self.client.delete, kind, name, namespace)
        except NotFound:
            pass


class Killer:
    """Kills a random replica at random moments and restarts it after a random pause;
    C{kills} counts the kill points.

    After a restart, with probability C{during_startup} the next kill comes 0.1-2 s after the
    process was spawned (the store opening, informers listing, garbage collection resuming);
    otherwise it waits until the restarted replica is ready and comes C{interval} seconds
    after that, so the service does work between kills however slow start-up is on a loaded
    machine.
    """

    def __init__(self, replicas: Sequence[Replica], rng: random.Random,
                 interval: tuple[float, float], pause: tuple[float, float] = (0.0, 1.0),
                 during_startup: float = 0.25) -> None:
        self.replicas = list(replicas)
        self.rng = rng
        self.interval = interval
        self.pause = pause
        self.during_startup = during_startup
        self.kills = 0
        self.startup_kills = 0
        self.next: float | None = time.monotonic() + rng.uniform(*interval)
        self._starting: Replica | None = None
        self._startup_kill = False

    async def tick(self) -> bool:
        """Kill (and restart) one replica if it is time; True when it did."""
        now = time.monotonic()
        if self.next is None:
            assert self._starting is not None
            if await threads.deferToThread(_ready, self._starting):
                self.next = time.monotonic() + self.rng.uniform(*self.interval)
            return False
        if now < self.next:
            return False
        victim = self._starting if self._startup_kill and self._starting else self.rng.choice(self.replicas)
        await threads.deferToThread(victim.kill)
        self.kills += 1
        self.startup_kills += self._startup_kill
        await sleep(self.rng.uniform(*self.pause))
        victim.start()
        self._starting = victim
        self._startup_kill = self.rng.random() < self.during_startup
        self.next = time.monotonic() + self.rng.uniform(0.1, 2.0) if self._startup_kill else None
        return True

    def logs(self, chars: int = 3000) -> str:
        return "".join(f"\n--- replica {i} log tail:\n{r.log()[-chars:]}" for i, r in enumerate(self.replicas))


async def until_up(hands: Hands, what: str, f: Any, *args: Any, timeout: float = 60.0) -> Any:
    """C{f(*args)} in a thread, again while the service is L{Down}."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await threads.deferToThread(f, *args)
        except Down as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"the service stayed down for {timeout:g}s ({what}): {e}") from None
            await sleep(0.3)


def _ref(mm: dict[str, Any]) -> str | None:
    name = ((mm.get("spec") or {}).get("serverRef") or {}).get("name")
    return str(name) if name else None


@dataclass
class Figures:
    """What a run did, for the log line and the README."""

    kills: int = 0
    startup_kills: int = 0
    allocations: int = 0
    registrations: int = 0
    wipes: int = 0
    deletions: int = 0
    seconds: float = 0.0
    extra: dict[str, int] = field(default_factory=dict)


# --- allocation and release --------------------------------------------------------------------

class AllocationCrash:
    """A server is never bound twice while the processes are killed.

    The test plays the users and the agent: it keeps C{pool} MetalMachines wanting servers from
    one ServerClass of C{servers} accepted, clean Servers, deletes each some time after it is
    bound (releasing its server), and marks released servers clean again as the agent would
    after a wipe.  At every observation: no server is named by two MetalMachines, no
    MetalMachine holds two bindings.  At the end: every remaining MetalMachine is bound to a
    server whose binding names it, no binding is orphaned, and deleting them all releases every
    server.
    """

    def __init__(self, hands: Hands, killer: Killer, namespace: str, run_id: str,
                 rng: random.Random, servers: int = 24, pool: int = 16) -> None:
        self.hands = hands
        self.killer = killer
        self.ns = namespace
        self.run_id = run_id
        self.label = f"crash-test={run_id}"
        self.rng = rng
        self.servers = servers
        self.pool = pool

    def seed(self) -> None:
        labels = {"crash-test": self.run_id}
        for i in range(self.servers):
            name = f"{self.run_id}-{i:04d}"
            self.hands.create(SERVER, {"apiVersion": SERVER.api_version, "kind": "Server",
                                       "metadata": {"name": name, "labels": labels},
                                       "spec": {"accepted": True}})
            self.hands.patch_status(SERVER, name, {"status": {"isClean": True}})
        self.hands.create(SERVER_CLASS, {
            "apiVersion": SERVER_CLASS.api_version, "kind": "ServerClass", "metadata": {"name": self.ns},
            "spec": {"selector": {"matchLabels": labels}},
        })

    def new_machine(self, n: int) -> None:
        self.hands.create(METAL_MACHINE, {
            "apiVersion": METAL_MACHINE.api_version, "kind": "MetalMachine",
            "metadata": {"name": f"mm-{n:05d}", "namespace": self.ns,
                         "labels": {"crash-test": self.run_id},
                         "annotations": {BOOTSTRAP_ANNOTATION: "unused"}},
            "spec": {"serverClassRef": {"apiVersion": SERVER_CLASS.api_version, "kind": "ServerClass",
                                        "name": self.ns}},
        })

    def observe(self) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        """MetalMachines by name, bindings and servers of this run, checking the invariants."""
        machines = {m["metadata"]["name"]: m for m in self.hands.list(METAL_MACHINE, self.ns)}
        bindings = self.hands.list(SERVER_BINDING, selector=self.label)
        servers = self.hands.list(SERVER, selector=self.label)
        refs: dict[str, str] = {}
        for name, mm in machines.items():
            ref = _ref(mm)
            if ref:
                if ref in refs:
                    raise AssertionError(f"server {ref} named by {refs[ref]} and {name}")
                refs[ref] = name
        held: dict[str, str] = {}
        for b in bindings:
            mm_name = b["spec"]["metalMachineRef"]["name"]
            if mm_name in held:
                raise AssertionError(f"{mm_name} holds bindings {held[mm_name]} and {b['metadata']['name']}")
            held[mm_name] = b["metadata"]["name"]
        return machines, bindings, servers

    def play_users(self, machines: dict[str, dict[str, Any]], bindings: list[dict[str, Any]],
                   bound_since: dict[str, float], next_machine: int, now: float) -> int:
        """Bound machines go away after a while; the pool is topped up.  Returns how many were
        created."""
        bound = {b["spec"]["metalMachineRef"]["name"] for b in bindings}
        live = {n for n, m in machines.items() if not m["metadata"].get("deletionTimestamp")}
        for name in sorted(live & bound):
            since = bound_since.setdefault(name, now)
            if now - since > self.rng.uniform(0.5, 3.0):
                self.hands.delete(METAL_MACHINE, name, self.ns)
                live.discard(name)
        created = 0
        for _ in range(self.pool - len(live)):
            self.new_machine(next_machine + created)
            created += 1
        return created

    def play_agent(self, bindings: list[dict[str, Any]], servers: list[dict[str, Any]]) -> None:
        """A released server is wiped and clean again."""
        binding_names = {b["metadata"]["name"] for b in bindings}
        for s in servers:
            st = s.get("status") or {}
            name = s["metadata"]["name"]
            if not st.get("inUse") and not st.get("isClean") and name not in binding_names:
                self.hands.patch_status(SERVER, name, {"status": {"isClean": True}})

    async def run(self, target_allocations: int, min_kills: int, time_limit: float) -> Figures:
        """Allocate and release under kills until both targets are met, then converge and
        release everything; raises AssertionError on a broken invariant."""
        figures = Figures()
        await until_up(self.hands, "seeding servers", self.seed)
        allocations: set[str] = set()   # binding uids seen
        bound_since: dict[str, float] = {}
        next_machine = 0
        started = time.monotonic()
        while len(allocations) < target_allocations or self.killer.kills < min_kills:
            if time.monotonic() - started > time_limit:
                raise AssertionError(f"only {len(allocations)} allocations and {self.killer.kills} kills "
                                     f"in {time_limit:g}s" + self.killer.logs())
            try:
                machines, bindings, servers = await threads.deferToThread(self.observe)
                for b in bindings:
                    allocations.add(b["metadata"]["uid"])
                next_machine += await threads.deferToThread(
                    self.play_users, machines, bindings, bound_since, next_machine, time.monotonic())
                await threads.deferToThread(self.play_agent, bindings, servers)
            except Down:
                pass
            await self.killer.tick()
            await sleep(0.2)
        figures.kills, figures.allocations = self.killer.kills, len(allocations)
        figures.startup_kills = self.killer.startup_kills

        # Quiet: every live machine gets bound, nothing is orphaned.
        deadline = time.monotonic() + 120
        while True:
            try:
                machines, bindings, servers = await threads.deferToThread(self.observe)
            except Down:
                machines, bindings, servers = {}, [], []
            else:
                by_name = {b["metadata"]["name"]: b for b in bindings}
                unbound = [n for n, m in machines.items() if not _ref(m)]
                orphans = [b["metadata"]["name"] for b in bindings
                           if b["spec"]["metalMachineRef"]["name"] not in machines
                           or _ref(machines[b["spec"]["metalMachineRef"]["name"]]) != b["metadata"]["name"]]
                mismatched = [n for n, m in machines.items()
                              if (ref := _ref(m))
                              and (ref not in by_name or by_name[ref]["spec"]["metalMachineRef"]["name"] != n)]
                if not unbound and not orphans and not mismatched and len(machines) >= min(self.pool, self.servers):
                    break
                # Released servers still need the "agent".
                try:
                    await threads.deferToThread(self.play_agent, bindings, servers)
                except Down:
                    pass
            if time.monotonic() > deadline:
                raise AssertionError(f"no convergence: unbound {unbound}, orphans {orphans}, "
                                     f"mismatched {mismatched}" + self.killer.logs())
            await sleep(0.5)

        # Everything released: deleting every machine removes every binding.
        def delete_all() -> None:
            for name in machines:
                self.hands.delete(METAL_MACHINE, name, self.ns)

        await until_up(self.hands, "deleting machines", delete_all)
        deadline = time.monotonic() + 60
        while True:
            machines, bindings, _ = await until_up(self.hands, "observing", self.observe)
            if not machines and not bindings:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"left behind: machines {sorted(machines)}, bindings "
                                     f"{[b['metadata']['name'] for b in bindings]}")
            await sleep(0.5)
        figures.seconds = time.monotonic() - started
        return figures


# --- registration and wipe ---------------------------------------------------------------------

@dataclass
class _Slot:
    """One physical machine slot: the machine in it now (a new identity per cycle)."""

    index: int
    machine: Machine
    endpoint: str
    registered: bool = False   # an agent run got its CreateServer answer
    accepted_at: float | None = None
    wiped: bool = False        # an agent run got its MarkServerAsWiped answer
    deleting: bool = False
    running: Deferred[AgentRun] | None = None
    cycles: int = 0


class RegistrationCrash:
    """Machines register, are accepted, wiped and deleted while the processes are killed.

    The test plays the machines (the real agent, C{python -m sidero.agent}, against recorded
    SMBIOS tables, sysfs and a disk file: L{Machine}) and the operator: a machine with no
    Server boots the agent, which registers it; the operator accepts it a little later; the
    accepted, dirty machine boots the agent again, which wipes its disk and says so; once the
    Server is clean and ready the operator deletes it, and the slot gets a new machine.

    Invariants at every observation: every machine whose agent was answered has exactly one
    Server (none lost; none under another name with its UUID); a Server the test saw deleted
    never comes back; every Server passes admission and carries the whole inventory its agent
    sent; a Server whose wipe was acknowledged is clean.  At the end, with no more kills: every
    slot's machine gets registered, wiped, clean and ready, and nothing is stuck.
    """

    def __init__(self, hands: Hands, killer: Killer, endpoints: Sequence[str], work: str,
                 rng: random.Random, slots: int = 6, concurrency: int = 3) -> None:
        self.hands = hands
        self.killer = killer
        self.endpoints = list(endpoints)
        self.work = work
        self.rng = rng
        self.nslots = slots
        self.pool = ThreadPool(minthreads=0, maxthreads=concurrency, name="crash-agents")
        self.admission = Admission()
        self.hostname = socket.gethostname()
        self.template: dict[str, Any] | None = None   # spec.hardware of a reference machine
        self.known: dict[str, Machine] = {}           # every machine ever made, by uuid
        self.gone: set[str] = set()                   # Servers seen deleted
        self.slots: list[_Slot] = []
        self.failures: list[str] = []
        self.figures = Figures()
        self.delete_clean = True   # the operator deletes clean Servers (until the quiet phase)

    def _machine(self, index: int, cycle: int) -> Machine:
        m = Machine(uuid=str(uuidlib.uuid4()), index=index + 1,
                    work=os.path.join(self.work, f"slot{index}-{cycle}"))
        m.make()
        self.known[m.uuid] = m
        return m

    def expected_hardware(self, machine: Machine) -> dict[str, Any]:
        """The reference machine's inventory with this machine's UUID and disk serial (the
        only things L{Machine.make} varies)."""
        assert self.template is not None
        hw = copy.deepcopy(self.template)
        hw["system"]["uuid"] = machine.uuid
        hw["storage"]["devices"][0]["serialNumber"] = f"DISK-{machine.index:04d}"
        return hw

    async def reference(self) -> None:
        """Register one machine with every process up (no kill yet): its Server is the
        template every other inventory is compared with; then delete it."""
        m = await threads.deferToThread(self._machine, 0, -1)
        run = await threads.deferToThreadPool(reactor, self.pool, run_agent, m, self.endpoints[0], AGENT_RETRY)
        if run.wipe:
            raise AssertionError("an unaccepted machine was told to wipe")
        server = await until_up(self.hands, "reading the reference Server", self._get, m.uuid)
        if server is None:
            raise AssertionError("the reference machine registered but has no Server")
        hw = server["spec"]["hardware"]
        if (hw["system"]["uuid"], hw["system"]["manufacturer"], hw["storage"]["devices"][0]["serialNumber"]) \
                != (m.uuid, "Acme Compute", "DISK-0001"):
            raise AssertionError(f"unexpected reference inventory: {hw}")
        self.template = hw
        await until_up(self.hands, "deleting the reference Server", self.hands.delete, SERVER, m.uuid)
        self.known.pop(m.uuid)

    def _get(self, name: str) -> dict[str, Any] | None:
        for s in self.hands.list(SERVER):
            if s["metadata"]["name"] == name:
                return s
        return None

    def observe(self) -> dict[str, dict[str, Any]]:
        """This run's Servers by name, checking the invariants."""
        ours: dict[str, dict[str, Any]] = {}
        by_uuid: dict[str, list[str]] = {}
        for s in self.hands.list(SERVER):
            name = s["metadata"]["name"]
            system_uuid = (((s.get("spec") or {}).get("hardware") or {}).get("system") or {}).get("uuid")
            if system_uuid in self.known:
                by_uuid.setdefault(system_uuid, []).append(name)
            if name in self.known:
                ours[name] = s
        for u, names in by_uuid.items():
            if names != [u]:
                raise AssertionError(f"machine {u} has Servers {names}")
        for name in ours:
            if name in self.gone:
                raise AssertionError(f"Server {name} was deleted and came back")
        for slot in self.slots:
            u = slot.machine.uuid
            if slot.registered and u not in ours and not slot.deleting:
                raise AssertionError(f"Server {u} was registered (its agent was answered) and is lost")
            if slot.wiped and u in ours and not (ours[u].get("status") or {}).get("isClean") \
                    and not slot.deleting:
                raise AssertionError(f"Server {u}'s wipe was acknowledged but it is not clean: "
                                     f"{ours[u].get('status')}")
        for name, s in ours.items():
            try:
                self.admission.admit(SERVER, "UPDATE", copy.deepcopy(s), copy.deepcopy(s))
            except StoreError as e:
                raise AssertionError(f"Server {name} is not a valid Server: {e.message}") from None
            spec = s.get("spec") or {}
            if spec.get("hardware") != self.expected_hardware(self.known[name]) \
                    or spec.get("hostname") != self.hostname:
                raise AssertionError(f"Server {name} is not whole: {spec}")
        return ours

    def _boot(self, slot: _Slot) -> None:
        """Start the slot's machine's agent (in the agent pool)."""
        endpoint = slot.endpoint
        d = threads.deferToThreadPool(reactor, self.pool, run_agent, slot.machine, endpoint,
                                       AGENT_RETRY)
        slot.running = d
        machine = slot.machine

        def done(result: Any) -> None:
            slot.running = None
            if slot.machine is not machine:
                return
            if not isinstance(result, AgentRun):
                self.failures.append(f"agent of {machine.uuid}: {result.getErrorMessage()}")
                return
            if not slot.registered:
                slot.registered = True
                self.figures.registrations += 1
            if result.wipe:
                if not result.wiped:
                    self.failures.append(f"agent of {machine.uuid} was told to wipe and did not")
                elif not machine.disk_head_is_zero():
                    self.failures.append(f"agent of {machine.uuid} said it wiped but the disk is not zero")
                else:
                    slot.wiped = True
                    self.figures.wipes += 1

        d.addBoth(done)

    def step(self, servers: dict[str, dict[str, Any]], now: float) -> None:
        """Play each slot's machine and the operator one step (blocking store calls)."""
        for slot in self.slots:
            if slot.running is not None:
                continue
            u = slot.machine.uuid
            server = servers.get(u)
            if slot.deleting:
                if server is None:
                    self.gone.add(u)
                    self.figures.deletions += 1
                    slot.cycles += 1
                    slot.machine = self._machine(slot.index, slot.cycles)
                    slot.registered = slot.wiped = slot.deleting = False
                    slot.accepted_at = None
                    slot.endpoint = self.rng.choice(self.endpoints)
                continue
            if server is None:
                self._boot(slot)   # unknown machine: PXE boots the agent, which registers it
                continue
            spec, status = server.get("spec") or {}, server.get("status") or {}
            if not spec.get("accepted"):
                if slot.accepted_at is None:
                    slot.accepted_at = now + self.rng.uniform(0.0, 2.0)
                elif now >= slot.accepted_at:
                    self.hands.patch(SERVER, u, {"spec": {"accepted": True}})
                continue
            if not status.get("isClean"):
                self._boot(slot)   # accepted and dirty: the agent environment, which wipes
                continue
            if status.get("ready") and slot.wiped and self.delete_clean:
                self.hands.delete(SERVER, u)
                slot.deleting = True

    async def run(self, target_registrations: int, min_kills: int, time_limit: float) -> Figures:
        self.pool.start()
        try:
            return await self._run(target_registrations, min_kills, time_limit)
        finally:
            await threads.deferToThread(self.pool.stop)

    async def _run(self, target: int, min_kills: int, time_limit: float) -> Figures:
        started = time.monotonic()
        await self.reference()
        for i in range(self.nslots):
            m = await threads.deferToThread(self._machine, i, 0)
            self.slots.append(_Slot(i, m, self.rng.choice(self.endpoints)))
        while self.figures.registrations < target or self.figures.wipes < target \
                or self.killer.kills < min_kills:
            if time.monotonic() - started > time_limit:
                raise AssertionError(f"only {self.figures} in {time_limit:g}s; failures {self.failures}"
                                     + self.killer.logs())
            self._check_failures()
            try:
                servers = await threads.deferToThread(self.observe)
                await threads.deferToThread(self.step, servers, time.monotonic())
            except Down:
                pass
            await self.killer.tick()
            await sleep(0.2)
        self.figures.kills, self.figures.startup_kills = self.killer.kills, self.killer.startup_kills
        self.delete_clean = False

        # Quiet: every slot's current machine ends registered, wiped, clean and ready.
        deadline = time.monotonic() + 120
        while True:
            self._check_failures()
            try:
                servers = await threads.deferToThread(self.observe)
            except Down:
                servers = {}
            else:
                pending = {}
                for slot in self.slots:
                    st = (servers.get(slot.machine.uuid) or {}).get("status") or {}
                    if slot.deleting or slot.running is not None or not (
                            slot.wiped and st.get("isClean") and st.get("ready")):
                        pending[slot.machine.uuid] = (slot.registered, slot.wiped, slot.deleting,
                                                      st.get("isClean"), st.get("ready"))
                if not pending:
                    break
                try:
                    await threads.deferToThread(self.step, servers, time.monotonic())
                except Down:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"stuck (registered, wiped, deleting, isClean, ready): {pending}"
                                         + self.killer.logs())
            await sleep(0.3)
        self.figures.seconds = time.monotonic() - started
        return self.figures

    def _check_failures(self) -> None:
        if self.failures:
            raise AssertionError("; ".join(self.failures) + self.killer.logs())
