"""Environment controller (§2.1) against a real twisted.web server on loopback, the real
embedded store and a real thread pool (real reactor)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from sidero.api.registry import ENVIRONMENT
from sidero.controllers.environment import (
    AssetError,
    Downloader,
    EnvironmentReconciler,
    make_environment_controller,
)
from sidero.controllers.runtime import ControllerManager
from sidero.store import errors
from sidero.store.embedded import EmbeddedStore
from sidero.store.interfaces import Object
from sidero.threads import ThreadPoolService

KERNEL = os.urandom(3 * 1024 * 1024 + 17)
INITRD = b"initrd-" * 1000
OTHER = b"another kernel" * 100


def sha(data: bytes) -> str:
    return hashlib.sha512(data).hexdigest()


class Assets(Resource):
    """Serves files by path; /redirect → /kernel; /cut sends part of a body and drops the
    connection; /hang never answers; /flaky fails with 503 until C{flaky_failures} run out."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[bytes, bytes] = {b"/kernel": KERNEL, b"/initrd": INITRD, b"/other": OTHER}
        self.requests: list[bytes] = []
        self.flaky_failures = 0

    def render_GET(self, request: Request) -> bytes | int:
        path = request.path
        self.requests.append(path)
        if path in self.files:
            return self.files[path]
        if path == b"/redirect":
            request.redirect(b"/kernel")
            return b""
        if path == b"/flaky":
            if self.flaky_failures > 0:
                self.flaky_failures -= 1
                request.setResponseCode(503)
                return b"busy"
            return INITRD
        if path == b"/cut":
            request.setHeader(b"content-length", b"100000")
            request.write(b"x" * 1000)
            reactor.callLater(0.05, request.transport.abortConnection)  # type: ignore[union-attr]
            return NOT_DONE_YET
        if path == b"/hang":
            return NOT_DONE_YET
        request.setResponseCode(404)
        return b"not found"


def environment(name: str, kernel: str, initrd: str, kernel_sha: str = "") -> Object:
    kernel_spec: dict[str, Any] = {"url": kernel, "args": ["console=ttyS0"]}
    if kernel_sha:
        kernel_spec["sha512"] = kernel_sha
    return {"apiVersion": ENVIRONMENT.api_version, "kind": "Environment", "metadata": {"name": name},
            "spec": {"kernel": kernel_spec, "initrd": {"url": initrd}}}


async def wait_for(predicate: Callable[[], Any], timeout: float = 20.0) -> None:
    waited = 0.0
    while not await predicate():
        if waited >= timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await deferLater(reactor, 0.05, lambda: None)
        waited += 0.05


class EnvironmentTests(TestCase):
    timeout = 60

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        self.assets = Assets()
        self.port = reactor.listenTCP(0, Site(self.assets), interface="127.0.0.1")  # type: ignore[arg-type]
        self.addCleanup(self.port.stopListening)
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"  # type: ignore[attr-defined]
        self.state_dir = self.mktemp()
        os.makedirs(self.state_dir)
        self.pool = ThreadPoolService(reactor, "test-environment", max_threads=2)
        self.pool.startService()
        self.addCleanup(self.pool.stopService)
        self.store = EmbeddedStore(reactor, ":memory:")
        self.downloader = Downloader(reactor, self.pool, timeout=5.0)
        self.reconciler = EnvironmentReconciler(self.store, self.state_dir, self.downloader, self.pool,
                                                talos_release="v1.13.0")

        async def open_() -> None:
            await self.store.open()
            self.addCleanup(lambda: ensureDeferred(self.store.close()))

        return ensureDeferred(open_())

    def path(self, name: str, filename: str) -> str:
        return os.path.join(self.state_dir, "env", name, filename)

    def read(self, name: str, filename: str) -> bytes:
        with open(self.path(name, filename), "rb") as f:
            return f.read()

    def leftovers(self, name: str) -> list[str]:
        return sorted(e for e in os.listdir(os.path.join(self.state_dir, "env", name)) if e.endswith(".part"))

    async def conditions(self, name: str) -> list[dict[str, str]]:
        env = await self.store.get(ENVIRONMENT, name)
        return list((env.get("status") or {}).get("conditions") or [])

    async def test_success(self) -> None:
        """Both assets are downloaded (sha512 verified, redirect followed) and Ready conditions set."""
        await self.store.create(environment("e1", f"{self.base}/redirect", f"{self.base}/initrd",
                                            kernel_sha=sha(KERNEL).upper()))
        await self.reconciler.reconcile("e1")
        self.assertEqual(self.read("e1", "vmlinuz"), KERNEL)
        self.assertEqual(self.read("e1", "initramfs.xz"), INITRD)
        self.assertEqual(self.leftovers("e1"), [])
        self.assertEqual(await self.conditions("e1"), [
            {"url": f"{self.base}/redirect", "sha512": sha(KERNEL).upper(), "status": "True", "type": "Ready"},
            {"url": f"{self.base}/initrd", "status": "True", "type": "Ready"},
        ])

    async def test_no_redownload(self) -> None:
        """A present file whose URL is in the conditions is not fetched again."""
        await self.store.create(environment("e1", f"{self.base}/kernel", f"{self.base}/initrd"))
        await self.reconciler.reconcile("e1")
        self.assertEqual(len(self.assets.requests), 2)
        await self.reconciler.reconcile("e1")
        self.assertEqual(len(self.assets.requests), 2)
        os.unlink(self.path("e1", "vmlinuz"))
        await self.reconciler.reconcile("e1")
        self.assertEqual(self.assets.requests[2:], [b"/kernel"])
        self.assertEqual(self.read("e1", "vmlinuz"), KERNEL)

    async def test_404(self) -> None:
        """A 404 fails the reconcile with the Go message; status is not updated and no file is left."""
        await self.store.create(environment("e1", f"{self.base}/missing", f"{self.base}/initrd"))
        with self.assertRaises(AssetError) as caught:
            await self.reconciler.reconcile("e1")
        self.assertIn("kernel: failed to download asset: 404", str(caught.exception))
        self.assertEqual(await self.conditions("e1"), [])
        self.assertFalse(os.path.exists(self.path("e1", "vmlinuz")))
        self.assertEqual(self.leftovers("e1"), [])

    async def test_sha512_mismatch_keeps_old_file(self) -> None:
        """A checksum mismatch fails the download and keeps the previous file; the asset's
        condition turns Ready=False with both digests (the other asset stays ready), and a
        corrected checksum makes it ready again."""
        await self.store.create(environment("e1", f"{self.base}/kernel", f"{self.base}/initrd"))
        await self.reconciler.reconcile("e1")
        before = await self.conditions("e1")
        env = await self.store.get(ENVIRONMENT, "e1")
        wrong = sha(b"something else")
        env["spec"]["kernel"] = {"url": f"{self.base}/other", "sha512": wrong}
        await self.store.update(env)
        for _ in range(2):  # still reported, not mistaken for ready, on the retry
            with self.assertRaises(AssetError) as caught:
                await self.reconciler.reconcile("e1")
            self.assertIn("sha512 mismatch", str(caught.exception))
            self.assertIn(sha(OTHER), str(caught.exception))
            self.assertEqual(self.read("e1", "vmlinuz"), KERNEL)
            self.assertEqual(self.leftovers("e1"), [])
            kernel, initrd = await self.conditions("e1")
            self.assertEqual(initrd, before[1])
            self.assertEqual({k: kernel[k] for k in ("url", "sha512", "status", "type", "reason")},
                             {"url": f"{self.base}/other", "sha512": wrong, "status": "False",
                              "type": "Ready", "reason": "Sha512Mismatch"})
            self.assertIn(f"expected {wrong}, got {sha(OTHER)}", kernel["message"])
        env = await self.store.get(ENVIRONMENT, "e1")
        env["spec"]["kernel"]["sha512"] = sha(OTHER)
        await self.store.update(env)
        await self.reconciler.reconcile("e1")
        self.assertEqual(self.read("e1", "vmlinuz"), OTHER)
        self.assertEqual([c["status"] for c in await self.conditions("e1")], ["True", "True"])

    async def test_url_change_redownloads(self) -> None:
        """Changing the kernel URL downloads the new file in place of the old and updates status."""
        await self.store.create(environment("e1", f"{self.base}/kernel", f"{self.base}/initrd"))
        await self.reconciler.reconcile("e1")
        env = await self.store.get(ENVIRONMENT, "e1")
        env["spec"]["kernel"]["url"] = f"{self.base}/other"
        await self.store.update(env)
        await self.reconciler.reconcile("e1")
        self.assertEqual(self.read("e1", "vmlinuz"), OTHER)
        self.assertEqual([c["url"] for c in await self.conditions("e1")],
                         [f"{self.base}/other", f"{self.base}/initrd"])
        self.assertEqual(self.assets.requests.count(b"/initrd"), 1)

    async def test_interrupted_download(self) -> None:
        """A body cut short fails and leaves nothing under the final name (nor a temporary file)."""
        await self.store.create(environment("e1", f"{self.base}/cut", f"{self.base}/initrd"))
        with self.assertRaises(AssetError) as caught:
            await self.reconciler.reconcile("e1")
        self.assertIn("kernel: failed to download asset: ResponseFailed", str(caught.exception))
        self.assertFalse(os.path.exists(self.path("e1", "vmlinuz")))
        self.assertEqual(self.leftovers("e1"), [])
        self.assertEqual(await self.conditions("e1"), [])

    async def test_timeout(self) -> None:
        """A server that never answers is given up on after the timeout, leaving nothing behind."""
        self.downloader.timeout = 0.3
        await self.store.create(environment("e1", f"{self.base}/hang", f"{self.base}/initrd"))
        with self.assertRaises(AssetError) as caught:
            await self.reconciler.reconcile("e1")
        self.assertIn("timed out after 0.3s", str(caught.exception))
        self.assertFalse(os.path.exists(self.path("e1", "vmlinuz")))
        self.assertEqual(self.leftovers("e1"), [])

    async def test_missing_url(self) -> None:
        """An asset without URL fails with "missing URL"."""
        await self.store.create(environment("e1", f"{self.base}/kernel", ""))
        with self.assertRaises(AssetError) as caught:
            await self.reconciler.reconcile("e1")
        self.assertIn("initrd: missing URL", str(caught.exception))

    async def test_stale_temporary_files_removed(self) -> None:
        """Temporary files left by a crash are removed before downloading."""
        directory = os.path.join(self.state_dir, "env", "e1")
        os.makedirs(directory)
        with open(os.path.join(directory, ".vmlinuz.abc.part"), "wb") as f:
            f.write(b"junk")
        await self.store.create(environment("e1", f"{self.base}/kernel", f"{self.base}/initrd"))
        await self.reconciler.reconcile("e1")
        self.assertEqual(self.leftovers("e1"), [])

    async def test_reserved_and_missing(self) -> None:
        """A missing Environment is done; an agent-* name is refused (it would clobber shipped files)."""
        self.assertIsNone(await self.reconciler.reconcile("nothing"))
        await self.store.create(environment("agent-amd64", f"{self.base}/kernel", f"{self.base}/initrd"))
        with self.assertRaises(AssetError):
            await self.reconciler.reconcile("agent-amd64")
        self.assertEqual(self.assets.requests, [])

    async def test_default_is_ensured(self) -> None:
        """Reconciling "default" re-creates the default Environment (downloads go to its URLs)."""
        fetched: list[str] = []

        class Refuse(Downloader):
            async def fetch(self, url: str, directory: str, filename: str, sha512: str = "") -> Any:
                fetched.append(url)
                raise AssetError("no network in tests")

        reconciler = EnvironmentReconciler(self.store, self.state_dir, Refuse(reactor, self.pool), self.pool,
                                           talos_release="v1.13.0")
        with self.assertRaises(AssetError):
            await reconciler.reconcile("default")
        env = await self.store.get(ENVIRONMENT, "default")
        self.assertIn("/v1.13.0/vmlinuz-amd64", env["spec"]["kernel"]["url"])
        self.assertEqual(sorted(fetched), sorted([env["spec"]["kernel"]["url"], env["spec"]["initrd"]["url"]]))

    async def test_controller_retries_until_ready(self) -> None:
        """Through the controller, a failing asset is retried with backoff until it downloads."""
        self.assets.flaky_failures = 2
        warnings: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(warnings.append)
        self.addCleanup(globalLogPublisher.removeObserver, warnings.append)
        manager = ControllerManager(self.store, reactor)
        make_environment_controller(manager, self.store, self.state_dir, reactor, pool=self.pool,
                                    talos_release="v1.13.0")
        manager.startService()
        self.addCleanup(manager.stopService)
        await self.store.create(environment("e2", f"{self.base}/kernel", f"{self.base}/flaky"))

        async def ready() -> bool:
            try:
                return len(await self.conditions("e2")) == 2
            except errors.NotFound:
                return False

        await wait_for(ready)
        self.assertEqual(self.read("e2", "initramfs.xz"), INITRD)
        self.assertEqual(self.assets.flaky_failures, 0)
        self.assertGreaterEqual(self.assets.requests.count(b"/flaky"), 3)
        # Expected failures are one warning line each, never a logged traceback.
        self.assertEqual(self.flushLoggedErrors(AssetError), [])
        failed = [e for e in warnings if e.get("controller") == "environment" and e.get("outcome") == "error"]
        self.assertEqual(len(failed), 2)
        self.assertTrue(all(e["log_level"] == LogLevel.warn and "failure" not in e for e in failed))
        self.assertIn("failed to download asset: 503", failed[0]["error"])
