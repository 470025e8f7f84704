"""The metadata server's start-up and /configdata on a real kube-apiserver.

The shared test server has sidero's CRDs but not Cluster API's: discovery says Machines are
not served, so a MetalMachine boots through the bootstrap-data-secret annotation.  The
SideroLink identity is loaded or created in C{default/siderolink} there, also by two racing
callers.  Skips loudly without the kube-apiserver binary.
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from sidero.api.registry import (
    CAPI_MACHINE,
    ENVIRONMENT,
    METAL_MACHINE,
    NAMESPACE,
    SECRET,
    SERVER,
    SERVER_BINDING,
    SERVER_CLASS,
)
from sidero.controllers.informer import Informer
from sidero.k8s.store import KubernetesStore
from sidero.protocols.http.ipxe import BootSettings
from sidero.protocols.http.metadata import BOOTSTRAP_SECRET_ANNOTATION
from sidero.protocols.http.service import InformerBootLookup, store_serves
from sidero.protocols.http.site import BootSite
from sidero.siderolink.config import config_from_secret, load_or_create
from sidero.store.errors import NotFound
from sidero.talos.configpatch import load_yaml
from tests.k8s.support import make_store, server_with_crds


class MetadataOnAPIServerTests(TestCase):
    timeout = 300

    async def setUp(self) -> None:  # type: ignore[override]
        server = await server_with_crds()
        self.store: KubernetesStore = await make_store(self, server)

    async def test_discovery(self) -> None:
        """Machines are not served without Cluster API's CRDs; our kinds and Secrets are."""
        self.assertFalse(await store_serves(self.store, CAPI_MACHINE))
        self.assertTrue(await store_serves(self.store, METAL_MACHINE))
        self.assertTrue(await store_serves(self.store, SECRET))

    async def test_identity_load_or_create_races(self) -> None:
        """Two callers at once get one identity, the one stored in default/siderolink (the
        loser of the create re-reads it)."""
        await self.cleanup(SECRET, "siderolink", "default")
        other = await make_store(self, await server_with_crds())
        first, second = await gatherResults([
            Deferred.fromCoroutine(load_or_create(self.store)), Deferred.fromCoroutine(load_or_create(other))])
        self.assertEqual(first, second)
        stored = config_from_secret(await self.store.get(SECRET, "siderolink", "default"))
        self.assertEqual(stored, first)
        self.assertEqual(await load_or_create(self.store), first, "a restart reads it back")

    async def cleanup(self, kind: Any, name: str, namespace: str | None = None) -> None:
        try:
            await self.store.delete(kind, name, namespace)
        except NotFound:
            pass

    async def test_configdata_through_the_annotation(self) -> None:
        """Informers on the API server, BootSite on loopback: a MetalMachine without a Machine
        but with the annotation gets its config from the named Secret."""
        ns = f"md-{uuid.uuid4().hex[:8]}"
        server_name = str(uuid.uuid4())
        await self.store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        self.addCleanup(self.cleanup, NAMESPACE, ns)
        await self.store.create({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "lab", "namespace": ns},
            "data": {"value": base64.b64encode(b"version: v1alpha1\nmachine: {type: worker}\n").decode()}})
        await self.store.create({
            "apiVersion": METAL_MACHINE.api_version, "kind": "MetalMachine",
            "metadata": {"name": "mm", "namespace": ns, "annotations": {BOOTSTRAP_SECRET_ANNOTATION: "lab"}},
            "spec": {}})
        await self.store.create({
            "apiVersion": SERVER.api_version, "kind": "Server", "metadata": {"name": server_name},
            "spec": {"accepted": True, "strategicPatches": ["machine:\n  network:\n    hostname: k8s-node\n"]}})
        self.addCleanup(self.cleanup, SERVER, server_name)
        await self.store.create({
            "apiVersion": SERVER_BINDING.api_version, "kind": "ServerBinding", "metadata": {"name": server_name},
            "spec": {"metalMachineRef": {"kind": "MetalMachine", "namespace": ns, "name": "mm"}}})
        self.addCleanup(self.cleanup, SERVER_BINDING, server_name)

        identity = await load_or_create(self.store)
        informers = {k.kind: Informer(self.store, k, clock=reactor)
                     for k in (SERVER, SERVER_BINDING, SERVER_CLASS, ENVIRONMENT, METAL_MACHINE, SECRET)}
        for informer in informers.values():
            informer.startService()
            self.addCleanup(informer.stopService)
        await DeferredList([i.synced for i in informers.values()])
        lookup = InformerBootLookup(
            informers["Server"], informers["ServerBinding"], informers["ServerClass"], informers["Environment"],
            metal_machines=informers["MetalMachine"], secrets=informers["Secret"], machines_known=False)
        lookup.set_machines(None)  # what the service does when discovery says "not served"
        # About the Kubernetes store's lookups, not who may ask: any source (the Go behaviour).
        site = BootSite(lookup, BootSettings("127.0.0.1", 8081, configdata_access="any"),
                        self.mktemp(), [])
        site.set_siderolink_server_address(str(identity.server_address))
        port = reactor.listenTCP(0, Site(site.resource()), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)

        response = await treq.get(f"http://127.0.0.1:{port.getHost().port}/configdata?uuid={server_name}",
                                  persistent=False)
        body = await response.content()
        self.assertEqual(response.code, 200, body)
        docs = load_yaml(body)
        self.assertEqual(docs[0]["machine"], {
            "type": "worker", "network": {"hostname": "k8s-node"},
            "kubelet": {"extraArgs": {"node-labels": f"metal.sidero.dev/uuid={server_name}"}}})
        self.assertEqual(docs[2]["endpoint"], f"[{identity.server_address}]:4002")
