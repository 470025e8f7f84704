"""The real C{twistd sidero --store kubernetes} against a real kube-apiserver.

One API server of this module's own (it is killed and restarted): the service starts on it,
refuses to start without the CRDs or with a bad kubeconfig (one line, exit 1), serves boot
decisions from its informer caches while the API server is down, and catches up after it
returns without missing a change.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.k8s import apiserver
from tests.k8s.apiserver import KubeAPIServer, crd_manifests
from tests.paths import RUN_SIDERO
from tests.ports import free_port

AGENT_SCRIPT_MARK = b"/env/agent-amd64/vmlinuz"
DISK_BOOT = b"#!ipxe\nexit\n"


def clean_env(**extra: str) -> dict[str, str]:
    """No SIDERO_* or KUBECONFIG of the caller's leaks into the service under test."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SIDERO_", "KUBERNETES_")) and k != "KUBECONFIG"}
    env.update(extra)
    return env


class SideroProcess:
    """C{twistd sidero} on loopback with the Kubernetes store, logging JSON to a file."""

    def __init__(self, kubeconfig: str, workdir: str, *extra: str, name: str = "sidero") -> None:
        self.api_port = free_port()
        self.webhook_port = free_port()
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.args = [
            sys.executable, str(RUN_SIDERO), "--store", "kubernetes", "--kubeconfig", kubeconfig,
            "--state-dir", os.path.join(workdir, name), "--api-endpoint", "127.0.0.1",
            "--listen-address", "127.0.0.1", "--api-port", str(self.api_port),
            "--http-port", str(self.api_port),
            "--disable-dhcp-proxy", "--disable-siderolink", "--disable-syslog",
            "--tftp-port", str(free_port(socket.SOCK_DGRAM)),
            "--webhook-port", str(self.webhook_port),
            "--metrics-port", str(free_port()), "--health-port", str(free_port()),
            "--dashboard-port", str(free_port()),
            "--webhook-cert-dir", os.path.join(workdir, name, "webhook-certs"),
            "--talos-assets-url", "http://127.0.0.1:1", "--log-format", "json", *extra,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                         env=clean_env(), start_new_session=True)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def ready(self) -> bool:
        """/readyz on the API port answers 200."""
        try:
            return self.get("/readyz")[0] == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash) and reap it."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:  # not started yet
            return ""

    def get(self, path: str) -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{self.api_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()


async def eventually(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll C{check} (run in a thread: it may block on HTTP) until it returns a true value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await threads.deferToThread(check)
        except OSError as e:
            last = e
        if last and not isinstance(last, Exception):
            return last
        await deferLater(reactor, 0.3, lambda: None)
    raise AssertionError(f"timed out waiting for {what}; last result {last!r}")


class KubernetesServiceTests(TestCase):
    """The service process on the Kubernetes store (own API server; it gets restarted)."""

    timeout = 400

    async def setUp(self) -> None:  # type: ignore[override]
        self.server = KubeAPIServer(apiserver.require_binary())
        self.addCleanup(lambda: threads.deferToThread(self.server.stop))
        await self.server.start()
        self.workdir = tempfile.mkdtemp(prefix="sidero-k8s-svc-")

    def run_to_exit(self, *extra: str, kubeconfig: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = SideroProcess(kubeconfig or str(self.server.kubeconfig), self.workdir)
        return subprocess.run([*proc.args, *extra], env=clean_env(), capture_output=True,
                              text=True, timeout=120)

    def kubectl_apply(self, obj: dict[str, Any]) -> None:
        path = os.path.join(self.workdir, f"obj-{uuid.uuid4().hex}.json")
        with open(path, "w") as f:
            json.dump(obj, f)
        result = self.server.kubectl("apply", "-f", path)
        self.assertEqual(result.returncode, 0, result.stderr)

    async def test_refuses_to_start_clearly(self) -> None:
        """Missing CRDs, then a kubeconfig that does not exist: exit 1 with one clear line each."""
        result = await threads.deferToThread(self.run_to_exit)
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("install sidero's CRDs", result.stdout + result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)

        missing = os.path.join(self.workdir, "nope.kubeconfig")
        result = await threads.deferToThread(self.run_to_exit, kubeconfig=missing)
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn(f"kubeconfig {missing} does not exist", result.stdout + result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)

    async def test_serves_boots_through_an_outage(self) -> None:
        """Boot decisions come from the cache while the API server is down; no change is lost."""
        await threads.deferToThread(self.server.apply_crds, crd_manifests())
        host = str(uuid.uuid4())
        self.kubectl_apply({
            "apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Server",
            "metadata": {"name": host}, "spec": {"accepted": True},
        })
        self.kubectl_apply({
            "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha3", "kind": "ServerBinding",
            "metadata": {"name": host, "namespace": "default"},
            "spec": {"metalMachineRef": {"name": "m0", "namespace": "default"}},
        })
        sidero = SideroProcess(str(self.server.kubeconfig), self.workdir, "--no-enable-leader-election")
        sidero.start()
        self.addCleanup(lambda: threads.deferToThread(sidero.stop))
        await eventually("sidero to be ready", lambda: sidero.get("/readyz")[0] == 200)
        # The Server controller (leader: election is off) adds its finalizer through the API.
        await eventually("the Server finalizer", lambda: "storage.finalizers.server.k8s.io" in
                         self.server.kubectl("get", "server", host, "-o", "jsonpath={.metadata.finalizers}").stdout)
        # Allocated and installed: the boot decision is "boot from disk".
        patch = json.dumps({"status": {"conditions": [{
            "type": "PXEBooted", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})
        result = self.server.kubectl("patch", "server", host, "--subresource=status", "--type=merge", "-p", patch)
        self.assertEqual(result.returncode, 0, result.stderr)
        await eventually("boot from disk", lambda: sidero.get(f"/ipxe?uuid={host}") == (200, DISK_BOOT))

        await threads.deferToThread(self.server.kill)
        # Down: the same answer, from the cache, with no API server at all.
        for _ in range(3):
            self.assertEqual(await threads.deferToThread(sidero.get, f"/ipxe?uuid={host}"), (200, DISK_BOOT))
            self.assertEqual((await threads.deferToThread(sidero.get, "/boot.ipxe"))[0], 200)
            await deferLater(reactor, 1.0, lambda: None)
        self.assertIsNone(sidero.proc.poll() if sidero.proc else 0, "sidero exited during the outage")

        await self.server.restart()
        # Released right after the restart, maybe before the informers reconnected: the
        # server goes back to the agent environment once the deletion is seen.
        result = self.server.kubectl("delete", "serverbinding", host, "-n", "default", "--wait=false")
        self.assertEqual(result.returncode, 0, result.stderr)
        await eventually("the agent environment after the binding went",
                         lambda: AGENT_SCRIPT_MARK in sidero.get(f"/ipxe?uuid={host}")[1])
        log = sidero.log()
        self.assertNotIn("Traceback", log)
        records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        # The outage is reported (watch failures), never as a crash or a traceback.
        self.assertFalse([r for r in records if r.get("level") == "critical" or "traceback" in r])
        self.assertTrue([r for r in records if "serving cached data" in r.get("msg", "")])

    async def test_two_replicas_elect_one_leader_and_serve_webhooks(self) -> None:
        """Two processes: one leads through the Lease, a killed leader is replaced within the
        lease duration, and the registered webhook converts and validates for kubectl."""
        await threads.deferToThread(self.server.apply_crds, crd_manifests())
        self.assertEqual(self.server.kubectl("create", "namespace", "sidero-system").returncode, 0)
        lease_seconds, retry_seconds = 4.0, 0.5
        timings = ("--leader-election-lease-duration", "4s", "--leader-election-renew-deadline", "3s",
                   "--leader-election-retry-period", "0.5s")
        kubeconfig = str(self.server.kubeconfig)
        # Only "a" registers the webhooks (each would otherwise inject its own CA), and "b"
        # starts first so that it leads: killing the leader must not take the webhook down.
        replicas = {"a": SideroProcess(kubeconfig, self.workdir, *timings, name="a"),
                    "b": SideroProcess(kubeconfig, self.workdir, *timings, "--no-webhook-register", name="b")}
        for replica in replicas.values():
            self.addCleanup(lambda r=replica: threads.deferToThread(r.stop))

        def leaders() -> list[str]:
            return [n for n, r in replicas.items() if "became leader" in r.log()]

        replicas["b"].start()
        await eventually("b to lead", lambda: leaders() == ["b"])
        replicas["a"].start()
        await deferLater(reactor, 2 * lease_seconds, lambda: None)
        self.assertEqual(leaders(), ["b"], "a second replica became leader")
        leader, follower = "b", "a"
        holder = self.server.kubectl(
            "get", "lease", "-n", "sidero-system", "controller-leader-election-sidero-controller-manager",
            "-o", "jsonpath={.spec.holderIdentity}").stdout
        self.assertTrue(holder, "the Lease names no holder")

        # The webhook of "a" (registered at its start) converts and validates for kubectl.
        await eventually("replica a ready", lambda: replicas["a"].get("/readyz")[0] == 200)
        name = str(uuid.uuid4())
        self.kubectl_apply({"apiVersion": "metal.sidero.dev/v1alpha1", "kind": "Server",
                            "metadata": {"name": name}, "spec": {"accepted": False, "hostname": "h1"}})
        stored = json.loads(self.server.kubectl("get", f"servers.v1alpha2.metal.sidero.dev/{name}",
                                                "-o", "json").stdout)
        self.assertEqual(stored["apiVersion"], "metal.sidero.dev/v1alpha2")
        self.assertEqual(stored["spec"]["hostname"], "h1")
        bad = os.path.join(self.workdir, "bad.json")
        with open(bad, "w") as f:
            json.dump({"apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Server",
                       "metadata": {"name": str(uuid.uuid4())},
                       "spec": {"configPatches": [{"op": "error", "path": "/machine"}]}}, f)
        refused = self.server.kubectl("apply", "-f", bad)
        self.assertNotEqual(refused.returncode, 0)
        self.assertIn('Invalid value: "error"', refused.stderr)

        # Kill the leader like a crash: the follower takes over within the lease duration.
        killed_at = time.monotonic()
        leader_proc = replicas[leader].proc
        assert leader_proc is not None
        os.killpg(leader_proc.pid, signal.SIGKILL)
        await threads.deferToThread(leader_proc.wait, 30)
        await eventually("the follower to take over", lambda: "became leader" in replicas[follower].log(),
                         timeout=30)
        took = time.monotonic() - killed_at
        # Lease duration + one retry, plus the polling of this test (0.3 s and a log read).
        self.assertLess(took, lease_seconds + retry_seconds + 1.5, f"takeover took {took:.1f}s")
        # The new leader's controllers run: a new Server gets the Server controller's finalizer.
        other = str(uuid.uuid4())
        self.kubectl_apply({"apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Server",
                            "metadata": {"name": other}, "spec": {"accepted": False}})
        await eventually("the new leader's Server controller", lambda: "storage.finalizers.server.k8s.io" in
                         self.server.kubectl("get", "server", other, "-o", "jsonpath={.metadata.finalizers}").stdout)
