# -*- test-case-name: tests.controllers.test_environment -*-
"""Environment controller (spec §2.1): fetch each Environment's kernel and initrd to disk.

Files land in C{<state-dir>/env/<name>/vmlinuz} and C{initramfs.xz}, where the HTTP server
serves them (§3.2).  Unlike Sidero (which writes straight into the final file and never checks
C{sha512}), a download streams into a temporary file beside the final one, hashing as it goes,
is verified against C{spec.<asset>.sha512} when that is set, then fsynced and renamed into
place: a half-finished or corrupt download is never served, and a failed one leaves the
previous file untouched.  Every disk operation runs in a thread pool; the body is written
with back-pressure (the HTTP transport is paused while writes are pending).

An asset is downloaded when its file is missing, or when no C{Ready=True} status condition
names its current URL (the URL changed) and checksum.  Any failure fails the reconcile (so the
controller retries it with backoff).  A download that does not match its C{sha512} is also
written to C{status}: that asset's condition becomes C{Ready=False} with reason
C{Sha512Mismatch} and a message naming both digests, which C{/ipxe} answers (412) and records
on the Servers that try to boot it.  Other failures leave C{status} unchanged, as in Sidero.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, RedirectAgent, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from sidero import TALOS_RELEASE, TALOS_RELEASES_URL
from sidero.api.environment import DEFAULT_ENVIRONMENT, INITRD_ASSET, KERNEL_ASSET
from sidero.api.registry import ENVIRONMENT
from sidero.controllers.runtime import (
    Controller,
    ControllerManager,
    ReconcileError,
    Result,
    split_key,
)
from sidero.controllers.startup import ensure_default_environment
from sidero.limits import ConcurrencyLimit
from sidero.store.errors import NotFound
from sidero.store.interfaces import IResourceStore
from sidero.threads import ThreadPoolService

T = TypeVar("T")

#: Whole-download time limit, as Sidero's http.Client timeout.
DOWNLOAD_TIMEOUT = 300.0
#: Bytes of body buffered for the disk before the HTTP transport is paused.
HIGH_WATER = 4 * 1024 * 1024
LOW_WATER = 1 * 1024 * 1024

#: (spec field, file name) of each asset, kernel first (the order of status.conditions).
ASSETS = (("kernel", KERNEL_ASSET), ("initrd", INITRD_ASSET))

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
#: Directories shipped with sidero for the synthetic agent environments (§2.1): never written.
RESERVED_NAMES = frozenset({"agent-amd64", "agent-arm64"})


class AssetError(ReconcileError):
    """A download that failed; the message is what the operator sees in the logs."""


class ChecksumMismatch(AssetError):
    """The downloaded bytes do not have the Environment's C{sha512}."""

    reason = "Sha512Mismatch"

    def __init__(self, url: str, expected: str, got: str) -> None:
        super().__init__(f"sha512 mismatch for {url}: expected {expected}, got {got}")
        self.url = url
        self.expected = expected
        self.got = got


class BlockingRunner(Protocol):
    """What the controller needs of a thread pool (L{ThreadPoolService} provides it)."""

    def run(self, f: Callable[..., T], *args: Any) -> Deferred[T]: ...


# ---- blocking helpers (run in the pool) ---------------------------------------------------


def _prepare_dir(directory: str) -> None:
    """Create the environment directory and drop temporary files a crash left behind."""
    os.makedirs(directory, mode=0o777, exist_ok=True)
    for entry in os.listdir(directory):
        if entry.startswith(".") and entry.endswith(".part"):
            try:
                os.unlink(os.path.join(directory, entry))
            except FileNotFoundError:
                pass


def _open_temp(directory: str, filename: str) -> tuple[IO[bytes], str]:
    import tempfile

    fd, path = tempfile.mkstemp(dir=directory, prefix=f".{filename}.", suffix=".part")
    return os.fdopen(fd, "wb"), path


def _commit(f: IO[bytes], tmp: str, final: str) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()
    os.chmod(tmp, 0o644)
    os.replace(tmp, final)
    dir_fd = os.open(os.path.dirname(final) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _discard(f: IO[bytes], tmp: str) -> None:
    try:
        f.close()
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


# ---- streaming body to disk ---------------------------------------------------------------


class _Discard(TwistedProtocol):
    """Reads and drops an error response's body so the connection is released."""

    def dataReceived(self, data: bytes) -> None:
        pass


class _FileSink(TwistedProtocol):
    """Receives a response body and writes it, in order, through the pool, hashing each chunk
    there too; pauses the transport while more than L{HIGH_WATER} bytes wait for the disk."""

    def __init__(self, pool: BlockingRunner, f: IO[bytes]) -> None:
        self.pool = pool
        self.file = f
        self.hash = hashlib.sha512()
        self.size = 0
        self.done: Deferred[None] = Deferred()
        self._chain: Deferred[None] = succeed(None)
        self._outstanding = 0
        self._paused = False
        self._failed = False

    def _write(self, data: bytes) -> None:
        self.hash.update(data)
        self.file.write(data)

    def dataReceived(self, data: bytes) -> None:
        if self._failed:
            return
        n = len(data)
        self.size += n
        self._outstanding += n
        self._chain.addCallback(lambda _: self.pool.run(self._write, data))
        self._chain.addCallbacks(lambda _: self._written(n), self._write_failed)
        if self._outstanding > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def _written(self, n: int) -> None:
        self._outstanding -= n
        if self._paused and self._outstanding < LOW_WATER and self.transport is not None:
            self._paused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def _write_failed(self, failure: Failure) -> Failure:
        if not self._failed:
            self._failed = True
            self.abort()
        return failure

    def abort(self) -> None:
        """Stop receiving: the transport closes and L{done} fails."""
        transport = self.transport
        if transport is not None and IPushProducer.providedBy(transport):
            transport.stopProducing()

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        # PotentialDataLoss: the server closed a body without Content-Length, its normal end.
        if reason.check(ResponseDone, PotentialDataLoss):
            self._chain.chainDeferred(self.done)
        else:
            def fail(_: object) -> None:
                self.done.errback(reason)

            self._chain.addBoth(fail)


def _describe(e: BaseException) -> str:
    """Readable text for Agent errors, which wrap a list of Failures."""
    reasons = getattr(e, "reasons", None)
    if isinstance(reasons, list) and reasons:
        inner = "; ".join(
            (r.getErrorMessage() or getattr(r.type, "__name__", "error")) if isinstance(r, Failure) else str(r)
            for r in reasons
        )
        return f"{type(e).__name__}: {inner}"
    return str(e) or type(e).__name__


@dataclass(frozen=True)
class Downloaded:
    sha512: str
    size: int


class Downloader:
    """Atomic, verified HTTP(S) downloads of one file each (see the module docstring)."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        pool: BlockingRunner,
        agent: IAgent | None = None,
        timeout: float = DOWNLOAD_TIMEOUT,
        limit: ConcurrencyLimit | None = None,
    ) -> None:
        self.clock: IReactorTime = reactor
        self.pool = pool
        self.agent: IAgent = agent if agent is not None else RedirectAgent(Agent(reactor))
        self.timeout = timeout
        #: downloads at once (C{--max-concurrent-downloads}); the rest queue.
        self.limit = limit

    async def fetch(self, url: str, directory: str, filename: str, sha512: str = "") -> Downloaded:
        """Download C{url} to C{directory/filename}; verify C{sha512} (hex) when given.

        Waits for a slot of C{limit} first (the time limit starts with the download).

        @raise AssetError: on any failure; nothing under the final name changed then.
        """
        if self.limit is not None:
            result: Downloaded = await self.limit.run(self._fetch, url, directory, filename, sha512)
            return result
        return await self._fetch(url, directory, filename, sha512)

    async def _fetch(self, url: str, directory: str, filename: str, sha512: str) -> Downloaded:
        if not url:
            raise AssetError("missing URL")
        expected = sha512.strip().lower()
        final = os.path.join(directory, filename)
        f, tmp = await self.pool.run(_open_temp, directory, filename)
        try:
            result = await self._stream(url, f)
            if expected and result.sha512 != expected:
                raise ChecksumMismatch(url, expected, result.sha512)
            await self.pool.run(_commit, f, tmp, final)
        except BaseException:
            await self.pool.run(_discard, f, tmp)
            raise
        self.log.info("downloaded {url} to {path} ({size} bytes, sha512 {sha512})",
                      url=url, path=final, size=result.size, sha512=result.sha512)
        return result

    async def _stream(self, url: str, f: IO[bytes]) -> Downloaded:
        timed_out = False
        sink: _FileSink | None = None
        request = self.agent.request(b"GET", url.encode("utf-8"),
                                     Headers({b"User-Agent": [b"sidero-controller-manager"]}))

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            if sink is None:
                request.cancel()
            else:
                sink.abort()

        timer: IDelayedCall = self.clock.callLater(self.timeout, expire)
        try:
            try:
                response: IResponse = await request
            except Exception as e:
                if timed_out:
                    raise AssetError(f"download of {url} timed out after {self.timeout:g}s") from None
                raise AssetError(f"failed to download asset: {_describe(e)}") from e
            if not 200 <= response.code < 300:
                response.deliverBody(_Discard())
                raise AssetError(f"failed to download asset: {response.code}")
            sink = _FileSink(self.pool, f)
            response.deliverBody(sink)
            try:
                await sink.done
            except Exception as e:
                if timed_out:
                    raise AssetError(f"download of {url} timed out after {self.timeout:g}s") from e
                raise AssetError(f"failed to download asset: {_describe(e)}") from e
            return Downloaded(sink.hash.hexdigest(), sink.size)
        finally:
            if timer.active():
                timer.cancel()


class EnvironmentReconciler:
    """Reconcile one Environment by name."""

    log = Logger()

    def __init__(
        self,
        store: IResourceStore,
        state_dir: str,
        downloader: Downloader,
        pool: BlockingRunner,
        talos_release: str = TALOS_RELEASE,
        assets_url: str = TALOS_RELEASES_URL,
    ) -> None:
        self.store = store
        self.assets_url = assets_url
        self.state_dir = state_dir
        self.downloader = downloader
        self.pool = pool
        self.talos_release = talos_release

    def directory(self, name: str) -> str:
        return os.path.join(self.state_dir, "env", name)

    async def reconcile(self, key: str) -> Result | None:
        _, name = split_key(key)
        if name == DEFAULT_ENVIRONMENT:
            await ensure_default_environment(self.store, self.talos_release, self.assets_url)
        try:
            env = await self.store.get(ENVIRONMENT, name)
        except NotFound:
            return None
        if (env.get("metadata") or {}).get("deletionTimestamp"):
            return None
        if not _NAME.match(name) or ".." in name:
            raise AssetError(f"Environment name {name!r} cannot be used as a directory name")
        if name in RESERVED_NAMES:
            raise AssetError(f"Environment {name!r} collides with the built-in agent environment")
        directory = self.directory(name)
        await self.pool.run(_prepare_dir, directory)
        spec = env.get("spec") or {}
        existing = list((env.get("status") or {}).get("conditions") or [])
        outcomes = await DeferredList(
            [Deferred.fromCoroutine(self._asset(spec.get(field) or {}, directory, filename, existing))
             for field, filename in ASSETS],
            consumeErrors=True,
        )
        errors: list[str] = []
        wanted: list[dict[str, str]] = []
        mismatched = False
        for (field, _), (ok, value) in zip(ASSETS, outcomes, strict=True):
            if ok:
                wanted.append(value)
            elif isinstance(value, Failure):
                errors.append(f"{field}: {value.getErrorMessage()}")
                mismatched = mismatched or bool(value.check(ChecksumMismatch))
                wanted.append(self._failed_condition(spec.get(field) or {}, field, value))
                if not value.check(AssetError):
                    self.log.failure("environment {name}: {asset} failed", value, name=name, asset=field)
        if errors:
            if mismatched and existing != wanted:
                # The operator must see this one: on the Environment, and through /ipxe.
                await self.store.patch(ENVIRONMENT, name, {"status": {"conditions": wanted}},
                                       subresource="status")
            raise AssetError(f"environment {name}: " + "; ".join(errors))
        if existing != wanted:
            await self.store.patch(ENVIRONMENT, name, {"status": {"conditions": wanted}}, subresource="status")
            self.log.info("environment {name} is ready", name=name)
        return None

    @staticmethod
    def _failed_condition(asset: dict[str, Any], field: str, failure: Failure) -> dict[str, str]:
        condition = {"url": str(asset.get("url") or ""), "status": "False", "type": "Ready"}
        if asset.get("sha512"):
            condition["sha512"] = str(asset["sha512"])
        condition["reason"] = ChecksumMismatch.reason if failure.check(ChecksumMismatch) else "DownloadFailed"
        condition["message"] = f"{field}: {failure.getErrorMessage()}"
        return condition

    async def _asset(
        self, asset: dict[str, Any], directory: str, filename: str, existing: list[dict[str, Any]]
    ) -> dict[str, str]:
        url = str(asset.get("url") or "")
        sha512 = str(asset.get("sha512") or "")
        if not url:
            raise AssetError("missing URL")
        condition = {"url": url, "status": "True", "type": "Ready"}
        if sha512:
            condition = {"url": url, "sha512": sha512, "status": "True", "type": "Ready"}
        path = os.path.join(directory, filename)
        present = await self.pool.run(os.path.isfile, path)
        if present and any(
            c.get("url") == url and c.get("status") == "True"
            and (not sha512 or c.get("sha512") == sha512) for c in existing
        ):
            return condition
        self.log.info("downloading {url} to {path}", url=url, path=path)
        await self.downloader.fetch(url, directory, filename, sha512)
        return condition


def make_environment_controller(
    manager: ControllerManager,
    store: IResourceStore,
    state_dir: str,
    clock: IReactorTime | None = None,
    *,
    reactor: Any = None,
    pool: BlockingRunner | None = None,
    agent: IAgent | None = None,
    talos_release: str = TALOS_RELEASE,
    assets_url: str = TALOS_RELEASES_URL,
    timeout: float = DOWNLOAD_TIMEOUT,
    downloads: ConcurrencyLimit | None = None,
) -> Controller:
    """Build the Environment controller, register it with C{manager} and return it.

    C{reactor} (default: C{clock}) makes the HTTP connections.  Without C{pool} a 4-thread
    pool for the file work is created as a child service of C{manager}.
    """
    clock = clock if clock is not None else manager.clock
    reactor = reactor if reactor is not None else clock
    if pool is None:
        service = ThreadPoolService(reactor, "environment", max_threads=4)
        service.setServiceParent(manager)
        pool = service
    downloader = Downloader(reactor, pool, agent=agent, timeout=timeout, limit=downloads)
    reconciler = EnvironmentReconciler(store, state_dir, downloader, pool, talos_release, assets_url)
    controller = Controller("environment", ENVIRONMENT, reconciler.reconcile, clock=clock)
    manager.add_controller(controller)
    return controller
