"""A real management service on a real UNIX socket, backed by an in-memory embedded store."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from sidero.api.admission import Admission
from sidero.management.server import ManagementService
from sidero.store.embedded import EmbeddedStore


def server_manifest(name: str, labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Server", "metadata": meta, "spec": spec}


class ServerTestCase(TestCase):
    """Starts the service in setUp on a socket inside a private temporary directory."""

    socket_mode = 0o600

    def setUp(self) -> Deferred[None]:
        self.tmp = tempfile.mkdtemp(prefix="sidero-mgmt-")
        os.chmod(self.tmp, 0o700)
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.socket_path = os.path.join(self.tmp, "sidero.sock")
        self.store = EmbeddedStore(global_reactor, ":memory:", Admission())
        return ensureDeferred(self._start())

    async def _start(self) -> None:
        await self.store.open()
        self.addCleanup(lambda: ensureDeferred(self.store.close()))
        self.service = ManagementService(global_reactor, self.store, self.socket_path, self.socket_mode)
        self.service.startService()
        self.addCleanup(self._stop)

    def _stop(self) -> Deferred[None] | None:
        if self.service.running:
            return self.service.stopService()
        return None
