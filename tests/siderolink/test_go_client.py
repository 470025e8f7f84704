"""Wire compatibility with the Go code Talos uses: a client built from siderolabs/siderolink
v0.3.15's generated API and Talos machinery v1.13.0's machine and common packages (nobody here
wrote them; C{goclient/}) calls Provision on the API port and Publishes events to the sink.

Our .proto files were written from the spec; if a field number, type or package differed from
upstream's, these calls would fail or the binding would come out wrong.  The client is built
with the machine's Go from the module proxy on first use (about a minute, cached after).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import grpc
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.resource import Resource

from sidero.api import conditions
from sidero.api.admission import Admission
from sidero.api.registry import SERVER_BINDING
from sidero.protocols.grpc.port import make_api_port_service
from sidero.protocols.grpc.server import AgentServicer, make_grpc_server
from sidero.siderolink.annotator import Annotation
from sidero.siderolink.config import generate_private_key, public_key
from sidero.siderolink.eventsink import EventSinkAPI, EventSinkServicer, make_event_sink_server
from sidero.siderolink.provision import ProvisionAPI, ProvisionServicer, add_to_server
from sidero.store.embedded import EmbeddedStore
from tests.siderolink.support import UUID, binding
from tests.siderolink.test_provision import IDENTITY, Link

SOURCE = Path(__file__).parent / "goclient"
CACHE = Path(os.environ.get("SIDERO_CACHE_DIR", "/var/cache/sidero-test"))


def go() -> str:
    found = shutil.which("go") or ("/usr/local/go/bin/go" if os.path.exists("/usr/local/go/bin/go") else None)
    if found is None:
        raise SkipTest("LOUD SKIP: Go is not installed; the upstream Go client cannot be built")
    return found


def build_client() -> Path:
    """The client binary for the current sources, built once into the cache."""
    digest = hashlib.sha256(b"".join((SOURCE / f).read_bytes()
                                     for f in ("go.mod", "go.sum", "main.go"))).hexdigest()[:16]
    base = CACHE if os.access(CACHE, os.W_OK) or not CACHE.exists() else Path("/tmp")
    binary = base / f"siderolink-goclient-{digest}" / "goclient"
    if binary.exists():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, GOTOOLCHAIN="local", GOFLAGS="-mod=mod",
               GOMODCACHE=os.environ.get("GOMODCACHE", str(CACHE / "go" / "mod")),
               GOCACHE=os.environ.get("GOCACHE", str(CACHE / "go" / "build")), CGO_ENABLED="0")
    result = subprocess.run([go(), "build", "-trimpath", "-o", str(binary) + ".tmp", "."],
                            cwd=SOURCE, env=env, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        raise AssertionError(f"building the Go client failed:\n{result.stderr[-3000:]}")
    os.replace(str(binary) + ".tmp", binary)
    return binary


class GoClientTests(TestCase):
    timeout = 1500

    async def setUp(self) -> None:  # type: ignore[override]
        go()
        self.client = await deferToThread(build_client)
        self.store = EmbeddedStore(global_reactor, ":memory:", Admission())
        await self.store.open()
        self.addCleanup(lambda: Deferred.fromCoroutine(self.store.close()))

    def run_client(self, *args: str) -> dict[str, Any]:
        out = subprocess.run([str(self.client), *args], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise AssertionError(f"goclient {args[0]} failed: {out.stderr}")
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    async def test_provision_from_go(self) -> None:
        """Talos' Provision call (with a join token) over h2c: the answer decodes into the
        upstream types with the right values, and the binding keeps the address and key."""
        await self.store.create(binding(address=None))
        servicer = ProvisionServicer(global_reactor, ProvisionAPI(self.store, Link()))

        def server() -> grpc.Server:
            s = make_grpc_server(AgentServicer(global_reactor, self.store))
            add_to_server(servicer, s)
            return s

        service = make_api_port_service(global_reactor, Resource(), server, 0, interface="127.0.0.1")
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        port = service.getServiceNamed("listener")._port.getHost().port  # type: ignore[attr-defined]
        key = public_key(generate_private_key())
        answer = await deferToThread(self.run_client, "provision", f"127.0.0.1:{port}", UUID, key)
        self.assertEqual(answer["server_endpoint"], ["192.0.2.1:51821"])
        self.assertEqual((answer["server_public_key"], answer["server_address"], answer["grpc_peer_addr_port"]),
                         (IDENTITY.public_key, str(IDENTITY.server_address), ""))
        stored = await self.store.get(SERVER_BINDING, UUID)
        self.assertEqual(stored["spec"]["siderolink"], {"address": answer["node_address_prefix"],
                                                        "publicKey": key})
        missing = await deferToThread(self.run_client, "provision", f"127.0.0.1:{port}", "nobody", key)
        self.assertEqual(missing, {"error": 'server binding "nobody" not found', "code": "NotFound"})

    async def test_publish_from_go(self) -> None:
        """Talos' events packed by the upstream Go types change the binding as they should."""
        await self.store.create(binding(address="::1/128"))
        api = EventSinkAPI(self.store, global_reactor,
                           lambda ip: Annotation(server_uuid=UUID) if ip == "::1" else None)
        server = make_event_sink_server(EventSinkServicer(global_reactor, api, call_timeout=10))
        port = server.add_insecure_port("[::1]:0")
        server.start()
        self.addCleanup(lambda: server.stop(0))
        answer = await deferToThread(self.run_client, "publish", f"[::1]:{port}")
        self.assertEqual(answer, {"published": 6})
        stored = await self.store.get(SERVER_BINDING, UUID)
        self.assertEqual((stored["spec"]["addresses"], stored["spec"]["hostname"]),
                         (["192.0.2.31", "198.51.100.7"], "talos-go"))
        validated = conditions.get(stored, "TalosConfigValidated")
        installed = conditions.get(stored, "TalosInstalled")
        assert validated is not None and installed is not None
        self.assertEqual((validated["status"], validated["reason"], validated["message"]),
                         ("False", "TalosConfigValidationFailed", "machine.network: invalid"))
        self.assertEqual((installed["status"], installed["reason"], installed["message"]),
                         ("False", "TalosInstallationFailed", "failed to install: disk not found"))
        self.assertEqual(api.counters, {"events": 6, "unknown_types": 0, "errors": 0})
