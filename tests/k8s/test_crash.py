"""Crash consistency on the Kubernetes store: two real C{twistd sidero} replicas (leader
election on short timings) on the real API server, one of them SIGKILLed at random moments
and started again, while MetalMachines are allocated and released, and while real agents
register, get accepted, wiped and deleted (the drivers and their invariants:
L{tests.integration.crash_support}).
"""

from __future__ import annotations

import random
import tempfile
import uuid

from twisted.internet import threads
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from sidero.api.registry import METAL_MACHINE, SERVER, SERVER_BINDING, SERVER_CLASS
from sidero.management.kubeclient import KubeClient
from tests.integration.crash_support import (
    AllocationCrash,
    Hands,
    Killer,
    RegistrationCrash,
    scaled,
)
from tests.k8s.support import server_with_crds
from tests.k8s.test_service_kubernetes import SideroProcess

log = Logger()


class KubernetesCrashTestCase(TestCase):
    timeout = 900

    async def setUp(self) -> None:  # type: ignore[override]
        self.server = await server_with_crds()
        self.hands = Hands(KubeClient(str(self.server.kubeconfig), timeout=10))
        self.run_id = uuid.uuid4().hex[:8]
        self.ns = f"crash-{self.run_id}"
        self.label = f"crash-test={self.run_id}"
        self.workdir = tempfile.mkdtemp(prefix="sidero-crash-")
        self.rng = random.Random(int(self.run_id, 16))
        await threads.deferToThread(self.server.kubectl, "create", "namespace", self.ns)
        self.addCleanup(self.cleanup)
        lease = ["--leader-election-namespace", self.ns, "--leader-election-lease-duration", "3s",
                 "--leader-election-renew-deadline", "2s", "--leader-election-retry-period", "500ms"]
        self.replicas = [
            SideroProcess(str(self.server.kubeconfig), self.workdir, "--no-webhook-register",
                          # No client-side rate limit: replicas are killed every few seconds, and
                          # at the default 20 requests/s a new leader's start-up pass would take
                          # longer, so the limit would be measured instead of crash safety.
                          "--disable-webhook", "--kube-api-qps", "0", *lease, name=f"replica-{i}")
            for i in range(2)
        ]
        self.killer = Killer(self.replicas, self.rng, interval=(0.5, 3.0))

    async def cleanup(self) -> None:
        for replica in self.replicas:
            replica.stop()

        def remove() -> None:
            hands = self.hands
            for mm in hands.list(METAL_MACHINE, self.ns):
                hands.patch(METAL_MACHINE, mm["metadata"]["name"], {"metadata": {"finalizers": None}}, self.ns)
            for binding in hands.list(SERVER_BINDING, selector=self.label):
                hands.delete(SERVER_BINDING, binding["metadata"]["name"])
            for s in hands.list(SERVER):
                labels = s["metadata"].get("labels") or {}
                if labels.get("crash-test") == self.run_id or s["metadata"]["name"] in self.ours:
                    hands.patch(SERVER, s["metadata"]["name"], {"metadata": {"finalizers": None}})
                    hands.delete(SERVER, s["metadata"]["name"])
            hands.delete(SERVER_CLASS, self.ns)
            self.server.kubectl("delete", "namespace", self.ns, "--wait=false")

        await threads.deferToThread(remove)

    #: the Servers the agents registered (the registration test's machines), removed at cleanup
    ours: dict[str, object] = {}

    def report(self, what: str, figures: object) -> None:
        logs = "".join(r.log() for r in self.replicas)
        log.info("kubernetes store, {what}: {figures}; {gains} leadership changes, {readopted} re-adoptions",
                 what=what, figures=figures, gains=logs.count("leadership gained"),
                 readopted=logs.count("reconciled missing server ref"))
        self.assertNotIn("Traceback", logs)


class AllocationCrashTests(KubernetesCrashTestCase):
    async def test_kill_during_allocations(self) -> None:
        """No double binding, no orphan, everything released, with >= 40 kills in 200
        allocations (times SIDERO_CRASH_SCALE)."""
        driver = AllocationCrash(self.hands, self.killer, self.ns, self.run_id, self.rng)
        for replica in self.replicas:
            replica.start()
        figures = await driver.run(target_allocations=scaled(200), min_kills=scaled(40), time_limit=600)
        self.report("allocation", figures)


class RegistrationCrashTests(KubernetesCrashTestCase):
    async def test_kill_during_registration_and_wipe(self) -> None:
        """No lost, duplicated, resurrected or partial Server, every acknowledged wipe kept,
        nothing stuck, with >= 30 kills in 24 registrations and wipes (times
        SIDERO_CRASH_SCALE)."""
        for replica in self.replicas:
            replica.start()
        endpoints = [f"127.0.0.1:{r.api_port}" for r in self.replicas]
        driver = RegistrationCrash(self.hands, self.killer, endpoints, self.workdir, self.rng)
        self.ours = driver.known
        figures = await driver.run(target_registrations=scaled(24), min_kills=scaled(30), time_limit=600)
        self.report("registration and wipe", figures)
