"""The C{/configdata} decision over an in-memory lookup: every status and message of spec
§3.6, the §7 TestMetadataService fixtures, the bootstrap-data-secret annotation, and the
Warning Event asked for when a patch fails."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from sidero.protocols.http.ipxe import BootSettings, LookupFailed
from sidero.protocols.http.metadata import (
    BOOTSTRAP_SECRET_ANNOTATION,
    PATCH_EVENT_REASON,
    configdata,
)
from sidero.talos.configpatch import load_yaml

SETTINGS = BootSettings("192.168.1.1", 8081, siderolink_server_address="192.168.1.1")
SIDEROLINK = [
    {"apiVersion": "v1alpha1", "kind": "SideroLinkConfig", "apiUrl": "grpc://192.168.1.1:8081"},
    {"apiVersion": "v1alpha1", "kind": "EventSinkConfig", "endpoint": "192.168.1.1:4002"},
    {"apiVersion": "v1alpha1", "kind": "KmsgLogConfig", "name": "remote-log", "url": "tcp://192.168.1.1:4001"},
]
NS = "default"


class MemoryLookup:
    """Objects in dicts keyed by (namespace, name); names in C{failing} raise LookupFailed."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {
            k: {} for k in ("server", "binding", "class", "environment", "metalmachine", "machine", "secret")}
        self.failing: set[tuple[str, str]] = set()

    def add(self, kind: str, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        self.objects[kind][(meta.get("namespace", ""), meta["name"])] = obj

    def _get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        if (kind, name) in self.failing:
            raise LookupFailed(f"{kind} cache has not synced yet")
        return self.objects[kind].get((namespace, name))

    def server(self, name: str) -> dict[str, Any] | None:
        return self._get("server", "", name)

    def server_binding(self, name: str) -> dict[str, Any] | None:
        return self._get("binding", "", name)

    def server_class(self, name: str) -> dict[str, Any] | None:
        return self._get("class", "", name)

    def environment(self, name: str) -> dict[str, Any] | None:
        return self._get("environment", "", name)

    def metal_machine(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get("metalmachine", namespace, name)

    def machine(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get("machine", namespace, name)

    def secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get("secret", namespace, name)


def bound_server(lookup: MemoryLookup, uuid: str, index: int, config: str | None,
                 server_spec: dict[str, Any] | None = None, server_class: dict[str, Any] | None = None,
                 machine: bool = True) -> None:
    """The §7 fixture shape: ServerBinding → MetalMachine (owned by Machine) → Machine →
    Secret bootstrap<index>, and the Server (and ServerClass) with patches."""
    binding: dict[str, Any] = {"metadata": {"name": uuid},
                               "spec": {"metalMachineRef": {"namespace": NS, "name": f"metal-machine-{index}"}}}
    if server_class is not None:
        binding["spec"]["serverClassRef"] = {"name": f"server-class-{index}"}
        lookup.add("class", {"metadata": {"name": f"server-class-{index}"}, "spec": server_class})
    lookup.add("binding", binding)
    owner = [{"apiVersion": "cluster.x-k8s.io/v1beta1", "kind": "Machine", "name": f"machine-{index}"}]
    lookup.add("metalmachine", {"metadata": {"namespace": NS, "name": f"metal-machine-{index}",
                                             "ownerReferences": owner if machine else []}})
    lookup.add("machine", {"metadata": {"namespace": NS, "name": f"machine-{index}"},
                           "spec": {"bootstrap": {"dataSecretName": f"bootstrap{index}"}}})
    if config is not None:
        lookup.add("secret", {"metadata": {"namespace": NS, "name": f"bootstrap{index}"},
                              "data": {"value": base64.b64encode(config.encode()).decode()}})
    lookup.add("server", {"apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Server",
                          "metadata": {"name": uuid}, "spec": server_spec or {}})


def fixtures() -> MemoryLookup:
    lookup = MemoryLookup()
    bound_server(lookup, "0000-1111-2222", 1, "version: v1alpha1\nmachine:\n  kubelet: {}\n")
    bound_server(lookup, "1111-2222-3333", 2, "version: v1alpha1\nmachine:\n  kubelet:\n    extraArgs:\n      foo: bar\n",
                 {"configPatches": [{"op": "add", "path": "/machine/network", "value": {"hostname": "example2"}}]})
    bound_server(lookup, "2222-3333-4444", 3,
                 "version: v1alpha1\nmachine:\n  kubelet:\n    extraArgs:\n      node-labels: foo=bar\n",
                 {"configPatches": [{"op": "replace", "path": "/machine/network/hostname", "value": "example3"}]},
                 {"configPatches": [{"op": "add", "path": "/machine/network", "value": {"hostname": "invalid3"}}]})
    bound_server(lookup, "4444-5555-6666", 4, "version: v1alpha1\nmachine:\n  unsupported: {}\n")
    bound_server(lookup, "5555-6666-7777", 5, "version: v1alpha1\ncluster: {}\n")
    bound_server(lookup, "6666-7777-8888", 6,
                 "version: v1alpha1\nmachine:\n  kubelet:\n    extraArgs:\n      node-labels: foo=bar\n",
                 {"strategicPatches": ["machine:\n  network:\n    hostname: example6\n---\n"
                                       "apiVersion: v1alpha1\nkind: ExtensionServiceConfig\nname: frr\n"
                                       "environment:\n  - TESTKEY=TESTVALUE\n"]},
                 {"strategicPatches": ["machine:\n  network:\n    hostname: invalid6"]})
    bound_server(lookup, "4444-0000-0000", 7, "version: v1alpha1\nmachine:\n")
    return lookup


class ReferenceCaseTests(SynchronousTestCase):
    """§7 TestMetadataService: same fixtures, same expectations (parsed, not as text)."""

    def setUp(self) -> None:
        self.lookup = fixtures()

    def ok(self, uuid: str) -> list[Any]:
        result = configdata(uuid, self.lookup, SETTINGS)
        self.assertEqual(result.status, 200, result.body)
        self.assertIsNone(result.event)
        docs = load_yaml(result.body)
        self.assertEqual(docs[-3:], SIDEROLINK, "every OK response ends with the SideroLink documents")
        return docs

    def test_invalid(self) -> None:
        """No uuid: 500 with the spec's message."""
        self.assertEqual(configdata("", self.lookup, SETTINGS)[:2],
                         (500, b"received metadata request with empty uuid\n"))

    def test_not_found(self) -> None:
        """No ServerBinding: 404 with Kubernetes' NotFound wording."""
        self.assertEqual(configdata("xxx-yyy", self.lookup, SETTINGS)[:2], (404, (
            b"server is not allocated (missing serverbinding): "
            b'serverbindings.infrastructure.cluster.x-k8s.io "xxx-yyy" not found\n')))

    def test_no_patches(self) -> None:
        docs = self.ok("0000-1111-2222")
        self.assertEqual(docs[0], {"version": "v1alpha1", "machine": {"kubelet": {"extraArgs": {
            "node-labels": "metal.sidero.dev/uuid=0000-1111-2222"}}}})

    def test_server_patch(self) -> None:
        docs = self.ok("1111-2222-3333")
        self.assertEqual(docs[0]["machine"], {
            "kubelet": {"extraArgs": {"foo": "bar", "node-labels": "metal.sidero.dev/uuid=1111-2222-3333"}},
            "network": {"hostname": "example2"}})

    def test_server_and_server_class_patch(self) -> None:
        docs = self.ok("2222-3333-4444")
        self.assertEqual(docs[0]["machine"], {
            "kubelet": {"extraArgs": {"node-labels": "foo=bar,metal.sidero.dev/uuid=2222-3333-4444"}},
            "network": {"hostname": "example3"}})

    def test_machine_config_without_kubelet(self) -> None:
        for uuid, expected in (("4444-5555-6666", {"unsupported": {}}), ("4444-0000-0000", {})):
            with self.subTest(uuid=uuid):
                docs = self.ok(uuid)
                self.assertEqual(docs[0]["machine"], {
                    **expected, "kubelet": {"extraArgs": {"node-labels": f"metal.sidero.dev/uuid={uuid}"}}})

    def test_machine_config_without_machine(self) -> None:
        docs = self.ok("5555-6666-7777")
        self.assertEqual(docs[0], {"version": "v1alpha1", "cluster": {}, "machine": {"kubelet": {
            "extraArgs": {"node-labels": "metal.sidero.dev/uuid=5555-6666-7777"}}}})

    def test_strategic_merge_patches(self) -> None:
        docs = self.ok("6666-7777-8888")
        self.assertEqual(len(docs), 5)
        self.assertEqual(docs[0]["machine"], {
            "kubelet": {"extraArgs": {"node-labels": "foo=bar,metal.sidero.dev/uuid=6666-7777-8888"}},
            "network": {"hostname": "example6"}})
        self.assertEqual(docs[1], {"apiVersion": "v1alpha1", "kind": "ExtensionServiceConfig",
                                   "name": "frr", "environment": ["TESTKEY=TESTVALUE"]})


class ErrorTests(SynchronousTestCase):
    """Each other status and message of §3.6."""

    UUID = "0000-1111-2222"

    def setUp(self) -> None:
        self.lookup = fixtures()

    def answer(self) -> tuple[int, str]:
        result = configdata(self.UUID, self.lookup, SETTINGS)
        return result.status, result.body.decode()

    def test_lookup_failures_are_500(self) -> None:
        """A lookup that cannot answer (cache not synced) is a 500 naming the step."""
        cases = [
            ("binding", self.UUID, "failure getting server binding: binding cache has not synced yet\n"),
            ("metalmachine", "metal-machine-1", "failure getting metalmachine: metalmachine cache has not synced yet\n"),
            ("machine", "machine-1", "failure fetching owner machine from metal machine default/metal-machine-1: "
                                     "machine cache has not synced yet\n"),
            ("secret", "bootstrap1", "failure fetching bootstrap secret data from secret default/bootstrap1: "
                                     "secret cache has not synced yet\n"),
            ("server", self.UUID, f"failure fetching server {self.UUID}: server cache has not synced yet\n"),
        ]
        for kind, name, message in cases:
            with self.subTest(kind=kind):
                self.lookup.failing = {(kind, name)}
                self.assertEqual(self.answer(), (500, message))

    def test_missing_metal_machine(self) -> None:
        self.lookup.objects["metalmachine"].clear()
        self.assertEqual(self.answer(), (500, "failure getting metalmachine: metalmachines.infrastructure."
                                              'cluster.x-k8s.io "metal-machine-1" not found\n'))

    def test_missing_owner_machine(self) -> None:
        """An owner reference to a Machine that does not exist, or no owner at all: 500."""
        self.lookup.objects["machine"].clear()
        self.assertEqual(self.answer(), (500, "failure fetching owner machine from metal machine "
                                              'default/metal-machine-1: machines.cluster.x-k8s.io "machine-1" not found\n'))
        self.lookup.objects["metalmachine"][(NS, "metal-machine-1")]["metadata"]["ownerReferences"] = [
            {"apiVersion": "apps/v1", "kind": "Machine", "name": "machine-1"}]  # wrong group
        status, body = self.answer()
        self.assertEqual(status, 500)
        self.assertTrue(body.startswith("failure fetching owner machine from metal machine default/metal-machine-1: "))

    def test_no_data_secret_name(self) -> None:
        self.lookup.objects["machine"][(NS, "machine-1")]["spec"] = {"bootstrap": {}}
        self.assertEqual(self.answer(), (404, "no dataSecretName present for machine default/machine-1\n"))

    def test_missing_secret_or_value(self) -> None:
        secret = self.lookup.objects["secret"].pop((NS, "bootstrap1"))
        self.assertEqual(self.answer(), (404, "bootstrap secret default/bootstrap1 not found\n"))
        secret["data"] = {"other": "eA=="}
        self.lookup.add("secret", secret)
        self.assertEqual(self.answer(), (404, "value key not found in bootstrap data: default/bootstrap1\n"))

    def test_string_data_accepted(self) -> None:
        """A hand-written Secret with stringData.value works like data.value."""
        self.lookup.objects["secret"][(NS, "bootstrap1")] = {
            "metadata": {"namespace": NS, "name": "bootstrap1"},
            "stringData": {"value": "version: v1alpha1\nmachine: {type: worker}\n"}}
        status, body = self.answer()
        self.assertEqual(status, 200)
        self.assertEqual(load_yaml(body)[0]["machine"]["type"], "worker")

    def test_missing_server_or_class(self) -> None:
        self.lookup.objects["server"].clear()
        self.assertEqual(self.answer(), (500, f"failure fetching server {self.UUID}: "
                                              f'servers.metal.sidero.dev "{self.UUID}" not found\n'))
        self.lookup = fixtures()
        self.lookup.objects["binding"][("", self.UUID)]["spec"]["serverClassRef"] = {"name": "gone"}
        self.assertEqual(self.answer(), (500, 'failure fetching serverclass gone: '
                                              'serverclasses.metal.sidero.dev "gone" not found\n'))
        self.lookup.failing = {("class", "gone")}
        self.assertEqual(self.answer(), (500, "failure fetching serverclass gone: class cache has not synced yet\n"))

    def test_node_label_errors(self) -> None:
        """A config of another version is `unknown config type`; garbage cannot be parsed."""
        secret = self.lookup.objects["secret"][(NS, "bootstrap1")]
        secret["data"]["value"] = base64.b64encode(b"version: v2\nmachine: {}\n").decode()
        self.assertEqual(self.answer(), (500, "unknown config type\n"))
        secret["data"]["value"] = base64.b64encode(b"machine: [\n").decode()
        status, body = self.answer()
        self.assertEqual(status, 500)
        self.assertTrue(body.startswith("failure creating config struct: "), body)

    def test_siderolink_identity_needed(self) -> None:
        """Without the tunnel address there is no complete config to give: 500."""
        result = configdata(self.UUID, self.lookup, BootSettings("192.168.1.1", 8081))
        self.assertEqual(result.status, 500)
        self.assertIn(b"SideroLink", result.body)


class PatchFailureTests(SynchronousTestCase):
    """A patch that cannot be loaded or applied: 500 with its error and a Warning Event on the
    Server; the objects read are not modified."""

    def setUp(self) -> None:
        self.lookup = fixtures()
        self.before = copy.deepcopy(self.lookup.objects)

    def set_patches(self, uuid: str, kind: str, spec: dict[str, Any]) -> None:
        if kind == "server":
            self.lookup.objects["server"][("", uuid)]["spec"] = spec
        else:
            name = self.lookup.objects["binding"][("", uuid)]["spec"]["serverClassRef"]["name"]
            self.lookup.objects["class"][("", name)]["spec"] = spec
        self.before = copy.deepcopy(self.lookup.objects)

    def check(self, uuid: str, prefix: str, contains: str) -> None:
        result = configdata(uuid, self.lookup, SETTINGS)
        body = result.body.decode()
        self.assertEqual(result.status, 500)
        self.assertTrue(body.startswith(prefix), body)
        self.assertIn(contains, body)
        assert result.event is not None
        self.assertEqual(result.event.reason, PATCH_EVENT_REASON)
        self.assertEqual(result.event.message + "\n", body)
        self.assertEqual(result.event.obj, self.lookup.objects["server"][("", uuid)],
                         "the event is about the Server")
        self.assertEqual(self.lookup.objects, self.before, "nothing read was modified")

    def test_malformed_strategic_patch(self) -> None:
        self.set_patches("6666-7777-8888", "server", {"strategicPatches": ["machine: [\n"]})
        self.check("6666-7777-8888", 'failure loading patches from server: server "6666-7777-8888" '
                                     "strategicPatches[0]: ", "line")

    def test_malformed_class_json_patch(self) -> None:
        self.set_patches("2222-3333-4444", "class", {"configPatches": [{"op": "frobnicate", "path": "/a"}]})
        self.check("2222-3333-4444", 'failure loading patches from server: serverclass "server-class-3" '
                                     "configPatches: ", "frobnicate")

    def test_patch_that_does_not_apply(self) -> None:
        self.set_patches("1111-2222-3333", "server",
                         {"configPatches": [{"op": "replace", "path": "/machine/nothing", "value": 1}]})
        self.check("1111-2222-3333", 'failure applying patches server "1111-2222-3333" configPatches '
                                     "to machine config: ", "nothing")

    def test_json_patch_on_multi_document_config(self) -> None:
        """A class strategic patch adding a document, then a server RFC 6902 patch: refused."""
        self.set_patches("2222-3333-4444", "class", {"strategicPatches": [
            "apiVersion: v1alpha1\nkind: ExtensionServiceConfig\nname: x\n"]})
        self.check("2222-3333-4444", "failure applying patches server", "JSON6902 patches are not supported "
                                                                       "for multi-document machine configuration")

    def test_delete_of_missing_path(self) -> None:
        self.set_patches("0000-1111-2222", "server", {"strategicPatches": [
            "machine:\n  network:\n    hostname:\n      $patch: delete\n"]})
        self.check("0000-1111-2222", "failure applying patches", "lookup failed")

    def test_config_patch_fields_as_go_marshals_them(self) -> None:
        """configPatches keep only op, path and value (Go's ConfigPatches), as one JSON patch."""
        self.set_patches("0000-1111-2222", "server", {"configPatches": [
            {"op": "add", "path": "/machine/network", "value": {"hostname": "h"}, "extra": 1},
            {"op": "remove", "path": "/machine/network/hostname"}]})
        result = configdata("0000-1111-2222", self.lookup, SETTINGS)
        self.assertEqual(result.status, 200, result.body)
        self.assertEqual(load_yaml(result.body)[0]["machine"]["network"], {})


class AnnotationExtensionTests(SynchronousTestCase):
    """A MetalMachine without an owner Machine but with the annotation reads that Secret."""

    UUID = "7777-8888-9999"

    def setUp(self) -> None:
        self.lookup = MemoryLookup()
        bound_server(self.lookup, self.UUID, 8, None, machine=False)
        self.lookup.objects["machine"].clear()
        self.metal_machine = self.lookup.objects["metalmachine"][(NS, "metal-machine-8")]

    def annotate(self, secret: str) -> None:
        self.metal_machine["metadata"]["annotations"] = {BOOTSTRAP_SECRET_ANNOTATION: secret}

    def test_annotation_secret_used(self) -> None:
        self.annotate("lab-config")
        self.lookup.add("secret", {"metadata": {"namespace": NS, "name": "lab-config"},
                                   "data": {"value": base64.b64encode(b"version: v1alpha1\nmachine: {}\n").decode()}})
        result = configdata(self.UUID, self.lookup, SETTINGS)
        self.assertEqual(result.status, 200, result.body)
        docs = load_yaml(result.body)
        self.assertEqual(docs[0]["machine"]["kubelet"]["extraArgs"]["node-labels"],
                         f"metal.sidero.dev/uuid={self.UUID}")
        self.assertEqual(docs[1:], SIDEROLINK)

    def test_annotation_secret_missing(self) -> None:
        """The named Secret follows the spec's Secret rules (404 when missing)."""
        self.annotate("lab-config")
        self.assertEqual(configdata(self.UUID, self.lookup, SETTINGS)[:2],
                         (404, b"bootstrap secret default/lab-config not found\n"))

    def test_neither_owner_nor_annotation(self) -> None:
        result = configdata(self.UUID, self.lookup, SETTINGS)
        self.assertEqual(result.status, 500)
        self.assertTrue(result.body.startswith(
            b"failure fetching owner machine from metal machine default/metal-machine-8: "), result.body)

    def test_owner_machine_wins_over_annotation(self) -> None:
        """With an owner Machine, the annotation is ignored (Cluster API decides)."""
        self.annotate("lab-config")
        self.metal_machine["metadata"]["ownerReferences"] = [
            {"apiVersion": "cluster.x-k8s.io/v1beta1", "kind": "Machine", "name": "machine-8"}]
        self.assertEqual(configdata(self.UUID, self.lookup, SETTINGS)[:2], (500, (
            b"failure fetching owner machine from metal machine default/metal-machine-8: "
            b'machines.cluster.x-k8s.io "machine-8" not found\n')))

    def test_machine_lookup_none_when_cluster_api_absent(self) -> None:
        """Machines not served (lookup None) with the annotation: the annotation applies; the
        secret must be in the MetalMachine's namespace."""
        self.annotate("lab-config")
        self.lookup.add("secret", {"metadata": {"namespace": "elsewhere", "name": "lab-config"},
                                   "data": {"value": base64.b64encode(b"version: v1alpha1\n").decode()}})
        self.assertEqual(configdata(self.UUID, self.lookup, SETTINGS).status, 404)


class JSONShapeTests(SynchronousTestCase):
    def test_body_is_yaml_stream(self) -> None:
        """A 200 body is a YAML stream Talos can read, with the v1alpha1 document first."""
        result = configdata("6666-7777-8888", fixtures(), SETTINGS)
        docs = load_yaml(result.body)
        self.assertEqual(docs[0]["version"], "v1alpha1")
        self.assertEqual(result.body.count(b"\n---\n"), 4)
        json.dumps(docs)  # plain JSON-like values only
