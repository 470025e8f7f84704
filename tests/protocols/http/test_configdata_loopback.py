"""/configdata end to end on loopback: the embedded store (real SQLite thread, sidero's
admission), informers, the SideroLink identity loaded or created in the store, BootSite on a
real listening port, and real HTTP clients (treq and curl) fetching a bound server's config.

/configdata is served only to its server's addresses by default (--configdata-access owner):
the Server's agent-registered address is 127.0.0.1 here, as the agent's
ReconcileServerAddresses would record it for a node on this host; the tests about the spec's
error statuses for unknown servers switch to C{any} (the Go behaviour), and
L{ConfigDataLoopbackTests.test_stranger_refused} checks the refusal itself."""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import json
import shutil
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from sidero.api import registry
from sidero.api.admission import Admission
from sidero.controllers.events import EventRecorder
from sidero.controllers.informer import Informer
from sidero.protocols.http.ipxe import BootSettings
from sidero.protocols.http.service import InformerBootLookup
from sidero.protocols.http.site import BootSite
from sidero.siderolink.config import load_or_create
from sidero.store.embedded import EmbeddedStore
from sidero.talos.configpatch import load_yaml

UUID = "4c4c4544-0047-3010-8030-b4c04f4e3332"
CLASS = "workers"
NS = "cluster-a"
BOOTSTRAP = """\
version: v1alpha1
machine:
  type: worker
  token: c2VjcmV0LXRva2Vu
  kubelet:
    extraArgs:
      node-labels: role=worker
  network:
    interfaces:
      - interface: eth0
        dhcp: true
cluster:
  network:
    podSubnets: [10.244.0.0/16]
"""


def objects() -> list[dict[str, Any]]:
    """A bound server: class and server each carry an RFC 6902 and a strategic patch."""
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
        {"apiVersion": registry.SERVER_CLASS.api_version, "kind": "ServerClass", "metadata": {"name": CLASS},
         "spec": {
             "configPatches": [{"op": "add", "path": "/machine/install", "value": {"disk": "/dev/sda"}}],
             "strategicPatches": ["cluster:\n  network:\n    podSubnets: [10.32.0.0/12]\n"
                                  "machine:\n  network:\n    interfaces:\n      - interface: eth0\n"
                                  "        mtu: 9000\n"]}},
        {"apiVersion": registry.SERVER.api_version, "kind": "Server", "metadata": {"name": UUID},
         "spec": {
             "accepted": True,
             "configPatches": [{"op": "replace", "path": "/machine/install/disk", "value": "/dev/nvme0n1"}],
             "strategicPatches": ["machine:\n  network:\n    hostname: node-1\n---\n"
                                  "apiVersion: v1alpha1\nkind: ExtensionServiceConfig\nname: frr\n"
                                  "environment:\n  - TESTKEY=TESTVALUE\n"]}},
        {"apiVersion": registry.CAPI_MACHINE.api_version, "kind": "Machine",
         "metadata": {"name": "machine-0", "namespace": NS},
         "spec": {"clusterName": "a", "bootstrap": {"dataSecretName": "bootstrap-0"}}},
        {"apiVersion": registry.METAL_MACHINE.api_version, "kind": "MetalMachine",
         "metadata": {"name": "metal-0", "namespace": NS, "ownerReferences": [
             {"apiVersion": "cluster.x-k8s.io/v1beta1", "kind": "Machine", "name": "machine-0",
              "uid": "(the Machine's)"}]},
         "spec": {"serverClassRef": {"name": CLASS}}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bootstrap-0", "namespace": NS},
         "data": {"value": base64.b64encode(BOOTSTRAP.encode()).decode()}},
        {"apiVersion": registry.SERVER_BINDING.api_version, "kind": "ServerBinding", "metadata": {"name": UUID},
         "spec": {"metalMachineRef": {"kind": "MetalMachine", "namespace": NS, "name": "metal-0"},
                  "serverClassRef": {"apiVersion": registry.SERVER_CLASS.api_version, "kind": "ServerClass",
                                     "name": CLASS}}},
    ]


KINDS = (registry.SERVER, registry.SERVER_BINDING, registry.SERVER_CLASS, registry.ENVIRONMENT,
         registry.METAL_MACHINE, registry.SECRET, registry.CAPI_MACHINE)


class ConfigDataLoopbackTests(TestCase):
    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        self.store = EmbeddedStore(reactor, ":memory:", admission=Admission())
        await self.store.open()
        self.addCleanup(lambda: Deferred.fromCoroutine(self.store.close()))
        uids: dict[str, str] = {}
        for obj in objects():
            for ref in obj["metadata"].get("ownerReferences", []):
                ref["uid"] = uids[ref["name"]]  # a dangling owner would be garbage-collected
            created = await self.store.create(obj)
            uids[created["metadata"]["name"]] = created["metadata"]["uid"]
        await self.set_server_addresses("127.0.0.1")
        self.identity = await load_or_create(self.store)
        self.informers = {kind.kind: Informer(self.store, kind, clock=reactor) for kind in KINDS}
        for informer in self.informers.values():
            informer.startService()
            self.addCleanup(informer.stopService)
        await DeferredList([i.synced for i in self.informers.values()])
        i = self.informers
        lookup = InformerBootLookup(
            i["Server"], i["ServerBinding"], i["ServerClass"], i["Environment"],
            metal_machines=i["MetalMachine"], secrets=i["Secret"], machines=i["Machine"])
        self.recorder = EventRecorder(self.store, reactor)
        self.site = BootSite(lookup, BootSettings("127.0.0.1", 8081), self.mktemp(), [],
                             events=self.recorder)
        self.site.set_siderolink_server_address(str(self.identity.server_address))
        self.port = reactor.listenTCP(0, Site(self.site.resource()), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(self.port.stopListening)
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"

    async def set_server_addresses(self, *addresses: str) -> None:
        """What the agent's ReconcileServerAddresses writes (status.addresses)."""
        server = await self.store.get(registry.SERVER, UUID)
        server.setdefault("status", {})["addresses"] = [
            {"type": "InternalIP", "address": a} for a in addresses]
        await self.store.update_status(server)

    def allow_any(self) -> None:
        self.site.settings = dataclasses.replace(self.site.settings, configdata_access="any")

    async def curl6(self, url: str) -> tuple[int, bytes]:
        """curl over IPv6 loopback (treq's URL handling cannot take [::1])."""
        if shutil.which("curl") is None:
            self.skipTest("LOUD SKIP: curl is not installed")
        out, err, code = await getProcessOutputAndValue(
            "curl", ["-sS", "-g", "-w", "\n%{http_code}", url])
        self.assertEqual(code, 0, err)
        body, _, status = out.rpartition(b"\n")
        return int(status), body

    async def fetch(self, path: str) -> tuple[int, bytes, str]:
        response = await treq.get(self.base + path, persistent=False)
        body = await response.content()
        return response.code, body, (response.headers.getRawHeaders("content-type") or [""])[0]

    async def snapshot(self) -> dict[str, Any]:
        out = {}
        for kind in registry.ALL_KINDS:
            listing = await self.store.list(kind)
            out[kind.kind] = sorted(json.dumps(o, sort_keys=True) for o in listing.items)
        return out

    async def wait_for_cache(self, kind: str, predicate: Any) -> None:
        for _ in range(200):
            if predicate(self.informers[kind]):
                return
            await deferLater(reactor, 0.02, lambda: None)
        self.fail(f"{kind} cache never caught up")

    async def test_bound_server_config(self) -> None:
        """Both kinds of patches of class and server, the node label and the SideroLink
        documents at this store's tunnel address, as YAML over a real socket."""
        status, body, content_type = await self.fetch(f"/configdata?uuid={UUID}")
        self.assertEqual(status, 200, body)
        self.assertEqual(content_type, "text/plain; charset=utf-8")
        docs = load_yaml(body)
        machine = docs[0]["machine"]
        self.assertEqual(machine["install"], {"disk": "/dev/nvme0n1"})
        self.assertEqual(machine["network"], {
            "hostname": "node-1", "interfaces": [{"interface": "eth0", "dhcp": True, "mtu": 9000}]})
        self.assertEqual(machine["kubelet"]["extraArgs"]["node-labels"], f"role=worker,metal.sidero.dev/uuid={UUID}")
        self.assertEqual(machine["token"], "c2VjcmV0LXRva2Vu")
        self.assertEqual(docs[0]["cluster"]["network"]["podSubnets"], ["10.32.0.0/12"])
        tunnel = str(self.identity.server_address)
        self.assertEqual(docs[1:], [
            {"apiVersion": "v1alpha1", "kind": "ExtensionServiceConfig", "name": "frr",
             "environment": ["TESTKEY=TESTVALUE"]},
            {"apiVersion": "v1alpha1", "kind": "SideroLinkConfig", "apiUrl": "grpc://127.0.0.1:8081"},
            {"apiVersion": "v1alpha1", "kind": "EventSinkConfig", "endpoint": f"[{tunnel}]:4002"},
            {"apiVersion": "v1alpha1", "kind": "KmsgLogConfig", "name": "remote-log",
             "url": f"tcp://[{tunnel}]:4001"},
        ])

    async def test_requests_logged_without_config(self) -> None:
        """Each request is logged with its uuid and status; the config (secrets) never is."""
        from twisted.logger import capturedLogs, formatEvent

        self.allow_any()
        with capturedLogs() as events:
            await self.fetch(f"/configdata?uuid={UUID}")
            await self.fetch("/configdata?uuid=xxx-yyy")
        logged = [e for e in events if e.get("log_format", "").startswith("HTTP ")]
        self.assertEqual([(e["uuid"], e["status"]) for e in logged], [(UUID, 200), ("xxx-yyy", 404)])
        text = "\n".join(formatEvent(e) + repr(e) for e in events)
        self.assertNotIn("c2VjcmV0LXRva2Vu", text)

    async def test_curl(self) -> None:
        """curl (Talos' own client is Go's net/http; curl stands in) gets the same config."""
        if shutil.which("curl") is None:
            self.skipTest("LOUD SKIP: curl is not installed")
        out, err, code = await getProcessOutputAndValue(
            "curl", ["-sS", "-w", "\n%{http_code}", f"{self.base}/configdata?uuid={UUID}"])
        self.assertEqual(code, 0, err)
        body, _, status = out.rpartition(b"\n")
        self.assertEqual(status, b"200")
        self.assertEqual(load_yaml(body)[0]["machine"]["network"]["hostname"], "node-1")

    async def test_not_found_and_errors(self) -> None:
        """No uuid, an unknown uuid, a missing bootstrap Secret (the spec's statuses, as any
        client gets them from the Go Sidero: C{--configdata-access any})."""
        self.allow_any()
        self.assertEqual((await self.fetch("/configdata"))[:2], (500, b"received metadata request with empty uuid\n"))
        self.assertEqual((await self.fetch("/configdata?uuid=xxx-yyy"))[:2], (404, (
            b"server is not allocated (missing serverbinding): "
            b'serverbindings.infrastructure.cluster.x-k8s.io "xxx-yyy" not found\n')))
        await self.store.delete(registry.SECRET, "bootstrap-0", NS)
        await self.wait_for_cache("Secret", lambda i: i.get("bootstrap-0", NS) is None)
        self.assertEqual((await self.fetch(f"/configdata?uuid={UUID}"))[:2],
                         (404, f"bootstrap secret {NS}/bootstrap-0 not found\n".encode()))

    async def test_bad_patch_is_500_and_one_warning_event(self) -> None:
        """A server patch that does not apply: 500 naming it, a Warning Event on the Server,
        and nothing else written to the store."""
        server = await self.store.get(registry.SERVER, UUID)
        server["spec"]["configPatches"] = [{"op": "remove", "path": "/machine/nonexistent"}]
        await self.store.update(server)
        await self.wait_for_cache("Server", lambda i: i.get(UUID)["spec"]["configPatches"][0]["op"] == "remove")
        before = await self.snapshot()
        status, body, _ = await self.fetch(f"/configdata?uuid={UUID}")
        self.assertEqual(status, 500)
        self.assertTrue(body.startswith(f'failure applying patches server "{UUID}" configPatches to machine config: '
                                        .encode()), body)
        for _ in range(200):
            events = (await self.store.list(registry.EVENT)).items
            if events:
                break
            await deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(len(events), 1)
        event = events[0]
        self.assertEqual((event["type"], event["reason"]), ("Warning", "Config Patch"))
        self.assertEqual(event["involvedObject"]["kind"], "Server")
        self.assertEqual(event["involvedObject"]["name"], UUID)
        self.assertIn("nonexistent", event["message"])
        after = await self.snapshot()
        after.pop("Event"), before.pop("Event")
        self.assertEqual(after, before)

    async def test_stranger_refused(self) -> None:
        """A source that is not one of the server's addresses gets 403 and no config, whether
        or not the uuid exists (so a refusal discloses nothing); a Warning Event names the
        source on the Server.  Trusted networks and the Talos-reported addresses of the
        ServerBinding (over IPv6 loopback here) are let through."""
        await self.set_server_addresses("10.1.2.3")
        await self.wait_for_cache(
            "Server", lambda i: i.get(UUID)["status"]["addresses"][0]["address"] == "10.1.2.3")
        for path in (f"/configdata?uuid={UUID}", "/configdata?uuid=xxx-yyy", "/configdata"):
            status, body, _ = await self.fetch(path)
            self.assertEqual((status, body), (403, b"forbidden: configdata is served only to its server\n"))
        for _ in range(200):
            events = (await self.store.list(registry.EVENT)).items
            if events:
                break
            await deferLater(reactor, 0.02, lambda: None)
        self.assertEqual([(e["type"], e["reason"], e["involvedObject"]["name"]) for e in events],
                         [("Warning", "ConfigDataRefused", UUID)])
        self.assertIn("refused to 127.0.0.1", events[0]["message"])

        self.site.settings = dataclasses.replace(
            self.site.settings, configdata_trusted=(ipaddress.ip_network("127.0.0.0/8"),))
        self.assertEqual((await self.fetch(f"/configdata?uuid={UUID}"))[0], 200)
        self.site.settings = dataclasses.replace(self.site.settings, configdata_trusted=())

        port6 = reactor.listenTCP(0, Site(self.site.resource()), interface="::1")  # type: ignore[attr-defined]
        self.addCleanup(port6.stopListening)
        base6 = f"http://[::1]:{port6.getHost().port}"
        self.assertEqual((await self.curl6(f"{base6}/configdata?uuid={UUID}"))[0], 403)
        binding = await self.store.get(registry.SERVER_BINDING, UUID)
        binding["spec"]["addresses"] = ["::1"]
        await self.store.update(binding)
        await self.wait_for_cache("ServerBinding", lambda i: i.get(UUID)["spec"].get("addresses"))
        status, body = await self.curl6(f"{base6}/configdata?uuid={UUID}")
        self.assertEqual(status, 200, body)
        self.assertEqual(load_yaml(body)[0]["machine"]["token"], "c2VjcmV0LXRva2Vu")
        self.assertEqual((await self.fetch(f"/configdata?uuid={UUID}"))[0], 403)
