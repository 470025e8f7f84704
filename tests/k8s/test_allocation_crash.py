"""A server is never bound twice: two real C{twistd sidero} replicas on the real API server,
killed with SIGKILL at random moments while MetalMachines come and go.

The test plays the users and the agent: it keeps a pool of MetalMachines wanting servers from
one ServerClass, deletes them some time after they are bound (releasing their servers), and
marks released servers clean again as the agent would after a wipe.  Meanwhile it kills one of
the two replicas (leader election on short timings) every few seconds and starts it again.
At every observation: no server is named by two MetalMachines, no MetalMachine holds two
bindings.  At the end: at least 200 allocations happened, every remaining MetalMachine is bound
to a server whose binding names it, no binding is orphaned, and deleting them all releases
every server.
"""

from __future__ import annotations

import os
import random
import signal
import tempfile
import time
import uuid
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from sidero.api.registry import METAL_MACHINE, SERVER, SERVER_BINDING, SERVER_CLASS
from tests.k8s.apiserver import KubeAPIServer
from tests.k8s.support import server_with_crds
from tests.k8s.test_service_kubernetes import SideroProcess

SERVERS = 24
POOL = 16  # MetalMachines wanting a server at any time
TARGET_ALLOCATIONS = 200
MIN_KILLS = 40
BOOTSTRAP_ANNOTATION = "metal.sidero.dev/bootstrap-data-secret"
log = Logger()


class Kube:
    """Blocking calls to the API server through the official client (run in threads)."""

    def __init__(self, server: KubeAPIServer) -> None:
        from kubernetes import client

        self.api = client.CustomObjectsApi(server.api_client())

    def list(self, kind: Any, namespace: str | None = None, selector: str | None = None) -> list[dict[str, Any]]:
        kw: dict[str, Any] = {"label_selector": selector} if selector else {}
        if namespace:
            out = self.api.list_namespaced_custom_object(kind.group, kind.storage_version, namespace,
                                                         kind.plural, **kw)
        else:
            out = self.api.list_cluster_custom_object(kind.group, kind.storage_version, kind.plural, **kw)
        return list(out["items"])

    def create(self, kind: Any, body: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        if namespace:
            return dict(self.api.create_namespaced_custom_object(kind.group, kind.storage_version,
                                                                 namespace, kind.plural, body))
        return dict(self.api.create_cluster_custom_object(kind.group, kind.storage_version, kind.plural, body))

    def patch_status(self, kind: Any, name: str, body: dict[str, Any]) -> None:
        self.api.patch_cluster_custom_object_status(kind.group, kind.storage_version, kind.plural, name, body)

    def patch(self, kind: Any, name: str, body: dict[str, Any], namespace: str | None = None) -> None:
        if namespace:
            self.api.patch_namespaced_custom_object(kind.group, kind.storage_version, namespace,
                                                    kind.plural, name, body)
        else:
            self.api.patch_cluster_custom_object(kind.group, kind.storage_version, kind.plural, name, body)

    def delete(self, kind: Any, name: str, namespace: str | None = None) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            if namespace:
                self.api.delete_namespaced_custom_object(kind.group, kind.storage_version, namespace,
                                                         kind.plural, name)
            else:
                self.api.delete_cluster_custom_object(kind.group, kind.storage_version, kind.plural, name)
        except ApiException as e:
            if e.status != 404:
                raise


class AllocationCrashTests(TestCase):
    timeout = 900

    async def setUp(self) -> None:  # type: ignore[override]
        self.server = await server_with_crds()
        self.kube = Kube(self.server)
        self.run_id = uuid.uuid4().hex[:8]
        self.ns = f"crash-{self.run_id}"
        self.label = f"crash-test={self.run_id}"
        self.workdir = tempfile.mkdtemp(prefix="sidero-crash-")
        self.rng = random.Random(int(self.run_id, 16))
        await threads.deferToThread(self.server.kubectl, "create", "namespace", self.ns)
        self.addCleanup(self.cleanup)
        lease = ["--leader-election-namespace", self.ns, "--leader-election-lease-duration", "3s",
                 "--leader-election-renew-deadline", "2s", "--leader-election-retry-period", "500ms"]
        # No client-side rate limit: a replica is killed every 0.5-3 s, and at the default 20
        # requests/s a new leader would spend longer than that on its start-up pass over every
        # object, so the test would measure the limit instead of crash safety (the limit only
        # delays requests; it cannot change what is written).
        self.replicas = [
            SideroProcess(str(self.server.kubeconfig), self.workdir, "--no-webhook-register",
                          "--disable-webhook", "--kube-api-qps", "0", *lease, name=f"replica-{i}")
            for i in range(2)
        ]

    async def cleanup(self) -> None:
        for replica in self.replicas:
            replica.stop()

        def remove() -> None:
            for mm in self.kube.list(METAL_MACHINE, self.ns):
                self.kube.patch(METAL_MACHINE, mm["metadata"]["name"], {"metadata": {"finalizers": None}},
                                self.ns)
            for binding in self.kube.list(SERVER_BINDING, selector=self.label):
                self.kube.delete(SERVER_BINDING, binding["metadata"]["name"])
            for s in self.kube.list(SERVER, selector=self.label):
                self.kube.patch(SERVER, s["metadata"]["name"], {"metadata": {"finalizers": None}})
                self.kube.delete(SERVER, s["metadata"]["name"])
            self.kube.delete(SERVER_CLASS, self.ns)
            self.server.kubectl("delete", "namespace", self.ns, "--wait=false")

        await threads.deferToThread(remove)

    def seed(self) -> None:
        labels = {"crash-test": self.run_id}
        for i in range(SERVERS):
            name = f"{self.run_id}-{i:04d}"
            self.kube.create(SERVER, {"apiVersion": SERVER.api_version, "kind": "Server",
                                      "metadata": {"name": name, "labels": labels},
                                      "spec": {"accepted": True}})
            self.kube.patch_status(SERVER, name, {"status": {"isClean": True}})
        self.kube.create(SERVER_CLASS, {
            "apiVersion": SERVER_CLASS.api_version, "kind": "ServerClass", "metadata": {"name": self.ns},
            "spec": {"selector": {"matchLabels": labels}},
        })

    def new_machine(self, n: int) -> str:
        name = f"mm-{n:05d}"
        self.kube.create(METAL_MACHINE, {
            "apiVersion": METAL_MACHINE.api_version, "kind": "MetalMachine",
            "metadata": {"name": name, "namespace": self.ns,
                         "labels": {"crash-test": self.run_id},
                         "annotations": {BOOTSTRAP_ANNOTATION: "unused"}},
            "spec": {"serverClassRef": {"apiVersion": SERVER_CLASS.api_version, "kind": "ServerClass",
                                        "name": self.ns}},
        }, self.ns)
        return name

    def observe(self) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        """MetalMachines by name, bindings and servers of this run, checking the invariants."""
        machines = {m["metadata"]["name"]: m for m in self.kube.list(METAL_MACHINE, self.ns)}
        bindings = self.kube.list(SERVER_BINDING, selector=self.label)
        servers = self.kube.list(SERVER, selector=self.label)
        refs: dict[str, str] = {}
        for name, mm in machines.items():
            ref = ((mm.get("spec") or {}).get("serverRef") or {}).get("name")
            if ref:
                self.assertNotIn(ref, refs, f"server {ref} named by {refs.get(ref)} and {name}")
                refs[ref] = name
        held: dict[str, str] = {}
        for b in bindings:
            mm_name = b["spec"]["metalMachineRef"]["name"]
            self.assertNotIn(mm_name, held,
                             f"{mm_name} holds bindings {held.get(mm_name)} and {b['metadata']['name']}")
            held[mm_name] = b["metadata"]["name"]
        return machines, bindings, servers

    def play_users(self, machines: dict[str, dict[str, Any]], bindings: list[dict[str, Any]],
                   bound_since: dict[str, float], next_machine: int, now: float) -> int:
        """Bound machines go away after a while; the pool is topped up. Returns how many were
        created."""
        bound = {b["spec"]["metalMachineRef"]["name"] for b in bindings}
        live = {n for n, m in machines.items() if not m["metadata"].get("deletionTimestamp")}
        for name in sorted(live & bound):
            since = bound_since.setdefault(name, now)
            if now - since > self.rng.uniform(0.5, 3.0):
                self.kube.delete(METAL_MACHINE, name, self.ns)
                live.discard(name)
        created = 0
        for _ in range(POOL - len(live)):
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
                self.kube.patch_status(SERVER, name, {"status": {"isClean": True}})

    async def test_kill_during_allocations(self) -> None:
        await threads.deferToThread(self.seed)
        for replica in self.replicas:
            replica.start()
        allocations: set[str] = set()   # binding uids seen
        bound_since: dict[str, float] = {}
        next_machine = 0
        kills = 0
        next_kill = time.monotonic() + self.rng.uniform(0.5, 3.0)
        started = time.monotonic()
        while len(allocations) < TARGET_ALLOCATIONS or kills < MIN_KILLS:
            self.assertLess(time.monotonic() - started, 600,
                            f"only {len(allocations)} allocations and {kills} kills in 600 s;\n"
                            + self.replicas[0].log()[-3000:])
            machines, bindings, servers = await threads.deferToThread(self.observe)
            for b in bindings:
                allocations.add(b["metadata"]["uid"])
            now = time.monotonic()

            next_machine += await threads.deferToThread(
                self.play_users, machines, bindings, bound_since, next_machine, now)
            await threads.deferToThread(self.play_agent, bindings, servers)
            if now >= next_kill:
                victim = self.rng.choice(self.replicas)
                assert victim.proc is not None
                os.killpg(victim.proc.pid, signal.SIGKILL)
                victim.proc.wait(10)
                kills += 1
                await deferLater(reactor, self.rng.uniform(0.0, 1.0), lambda: None)
                victim.start()
                next_kill = time.monotonic() + self.rng.uniform(0.5, 3.0)
            await deferLater(reactor, 0.2, lambda: None)

        # Quiet: every live machine gets bound, nothing is orphaned.
        deadline = time.monotonic() + 120
        while True:
            machines, bindings, _ = await threads.deferToThread(self.observe)
            by_name = {b["metadata"]["name"]: b for b in bindings}
            unbound = [n for n, m in machines.items()
                       if not ((m.get("spec") or {}).get("serverRef") or {}).get("name")]
            orphans = [b["metadata"]["name"] for b in bindings
                       if b["spec"]["metalMachineRef"]["name"] not in machines
                       or ((machines[b["spec"]["metalMachineRef"]["name"]].get("spec") or {})
                           .get("serverRef") or {}).get("name") != b["metadata"]["name"]]
            mismatched = [n for n, m in machines.items()
                          if (ref := ((m.get("spec") or {}).get("serverRef") or {}).get("name"))
                          and (ref not in by_name or by_name[ref]["spec"]["metalMachineRef"]["name"] != n)]
            if not unbound and not orphans and not mismatched and len(machines) >= min(POOL, SERVERS):
                break
            # Released servers still need the "agent".
            await threads.deferToThread(self.play_agent, bindings, self.kube.list(SERVER, selector=self.label))
            if time.monotonic() > deadline:
                self.fail(f"no convergence: unbound {unbound}, orphans {orphans}, mismatched {mismatched}\n"
                          + self.replicas[0].log()[-3000:] + self.replicas[1].log()[-3000:])
            await deferLater(reactor, 0.5, lambda: None)

        # Everything released: deleting every machine removes every binding.
        def delete_all() -> None:
            for name in machines:
                self.kube.delete(METAL_MACHINE, name, self.ns)

        await threads.deferToThread(delete_all)
        deadline = time.monotonic() + 60
        while True:
            machines, bindings, _ = await threads.deferToThread(self.observe)
            if not machines and not bindings:
                break
            if time.monotonic() > deadline:
                self.fail(f"left behind: machines {sorted(machines)}, bindings "
                          f"{[b['metadata']['name'] for b in bindings]}")
            await deferLater(reactor, 0.5, lambda: None)
        self.assertGreaterEqual(len(allocations), TARGET_ALLOCATIONS)
        self.assertGreaterEqual(kills, MIN_KILLS)
        logs = "".join(r.log() for r in self.replicas)
        log.info("{allocations} allocations, {kills} kills, {gains} leadership changes, {readopted} "
                 "re-adoptions in {seconds:.0f}s", allocations=len(allocations), kills=kills,
                 gains=logs.count("leadership gained"), readopted=logs.count("reconciled missing server ref"),
                 seconds=time.monotonic() - started)
        self.assertNotIn("Traceback", logs)
