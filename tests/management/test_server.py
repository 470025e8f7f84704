"""The management API: routing, request checks, the socket file's safety, and the HTTP API
served on a real UNIX socket from an in-memory embedded store (driven by the real client)."""

from __future__ import annotations

import http.client
import os
import socket
import stat
import tempfile
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase

from sidero.api import registry
from sidero.management.client import ManagementClient, resource_path
from sidero.management.server import (
    MAX_BODY_BYTES,
    ManagementService,
    Route,
    UnsafeSocketPath,
    default_socket_path,
    incoming,
    merge_patch,
    parse_path,
    prepare_socket_path,
)
from sidero.store.errors import BadRequest, Conflict, Invalid, NotFound, StoreError
from tests.management.fixtures import ServerTestCase, server_manifest


class ParsePathTests(SynchronousTestCase):
    def test_cluster_scoped_collection_and_object(self) -> None:
        """Cluster-scoped kinds resolve without a namespace, with name and status."""
        r = parse_path("/apis/metal.sidero.dev/v1alpha2/servers")
        self.assertEqual((r.kind, r.name, r.namespace), (registry.SERVER, None, None))
        r = parse_path("/apis/metal.sidero.dev/v1alpha1/servers/abc/status")
        self.assertEqual((r.kind, r.version, r.name, r.subresource), (registry.SERVER, "v1alpha1", "abc", "status"))

    def test_namespaced_paths(self) -> None:
        """Namespaced kinds resolve under namespaces/{ns}, and list across namespaces without."""
        r = parse_path("/apis/infrastructure.cluster.x-k8s.io/v1alpha3/namespaces/ns1/metalmachines/m")
        self.assertEqual((r.kind, r.namespace, r.name), (registry.METAL_MACHINE, "ns1", "m"))
        r = parse_path("/apis/infrastructure.cluster.x-k8s.io/v1alpha3/metalmachines")
        self.assertEqual((r.kind, r.namespace), (registry.METAL_MACHINE, None))

    def test_core_group_and_namespace_objects(self) -> None:
        """/api/v1 serves core kinds; namespaces/{name} and its status are the Namespace itself."""
        r = parse_path("/api/v1/namespaces/default/secrets/s")
        self.assertEqual((r.kind, r.namespace, r.name), (registry.SECRET, "default", "s"))
        r = parse_path("/api/v1/namespaces/default")
        self.assertEqual((r.kind, r.name), (registry.NAMESPACE, "default"))
        r = parse_path("/api/v1/namespaces/default/status")
        self.assertEqual((r.kind, r.name, r.subresource), (registry.NAMESPACE, "default", "status"))

    def test_discovery_route(self) -> None:
        """A bare group/version path is the discovery document."""
        self.assertEqual(parse_path("/apis/metal.sidero.dev/v1alpha2"), Route("metal.sidero.dev", "v1alpha2"))

    def test_unknown_paths_are_not_found(self) -> None:
        """Unknown groups, versions, plurals, subresources and mis-scoped paths are 404s."""
        for path in (
            "/apis/metal.sidero.dev/v9/servers", "/apis/nope.io/v1/servers", "/apis/metal.sidero.dev/v1alpha2/nope",
            "/apis/metal.sidero.dev/v1alpha2/servers/x/scale", "/apis/metal.sidero.dev/v1alpha2/namespaces/a/servers",
            "/apis/infrastructure.cluster.x-k8s.io/v1alpha3/metalmachines/x", "/other",
            "/apis/infrastructure.cluster.x-k8s.io/v1alpha3/namespaces/a/metalmachinetemplates/x/status",
            "/apis/metal.sidero.dev/v1alpha2/servers/a/status/more",
        ):
            self.assertRaises(NotFound, parse_path, path)


class IncomingTests(SynchronousTestCase):
    route = Route("metal.sidero.dev", "v1alpha2", registry.SERVER, None, "s1")

    def test_name_filled_from_url_and_namespace_dropped(self) -> None:
        """A body without a name takes the URL's; a namespace on a cluster-scoped kind is dropped."""
        obj = incoming(self.route, {"apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Server",
                                    "metadata": {"namespace": "x"}}, name="s1")
        self.assertEqual(obj["metadata"], {"name": "s1"})

    def test_mismatches_are_bad_requests(self) -> None:
        """Mismatched name, kind, group or a missing apiVersion are rejected."""
        bodies = [
            {"apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Server", "metadata": {"name": "other"}},
            {"apiVersion": "metal.sidero.dev/v1alpha2", "kind": "ServerClass", "metadata": {"name": "s1"}},
            {"apiVersion": "v1", "kind": "Server", "metadata": {"name": "s1"}},
            {"kind": "Server", "metadata": {"name": "s1"}},
            {"apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Server", "metadata": "s1"},
        ]
        for body in bodies:
            self.assertRaises(BadRequest, incoming, self.route, body, name="s1")

    def test_namespace_mismatch(self) -> None:
        """A namespaced object whose namespace differs from the URL's is rejected."""
        route = Route("infrastructure.cluster.x-k8s.io", "v1alpha3", registry.METAL_MACHINE, "a")
        body = {"apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha3", "kind": "MetalMachine",
                "metadata": {"name": "m", "namespace": "b"}}
        self.assertRaises(BadRequest, incoming, route, body)

    def test_merge_patch(self) -> None:
        """RFC 7386: nested merge, null deletes, lists replace."""
        self.assertEqual(
            merge_patch({"a": {"b": 1, "c": 2}, "l": [1, 2], "d": 1}, {"a": {"b": None, "e": 3}, "l": [3], "d": None}),
            {"a": {"c": 2, "e": 3}, "l": [3]},
        )

    def test_default_socket_path(self) -> None:
        """The environment variable overrides the default socket path."""
        self.assertEqual(default_socket_path({}), "/var/lib/sidero/sidero.sock")
        self.assertEqual(default_socket_path({"SIDERO_MANAGEMENT_SOCKET": "/x.sock"}), "/x.sock")


class SocketPathTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="sidero-sock-")
        os.chmod(self.tmp, 0o700)
        self.addCleanup(lambda: __import__("shutil").rmtree(self.tmp, True))

    def test_refuses_non_socket_and_leaves_it(self) -> None:
        """An existing regular file at the path is refused and left untouched."""
        path = os.path.join(self.tmp, "s.sock")
        with open(path, "w") as f:
            f.write("precious")
        e = self.assertRaises(UnsafeSocketPath, prepare_socket_path, path)
        self.assertIn("not a socket", str(e))
        with open(path) as f:
            self.assertEqual(f.read(), "precious")

    def test_refuses_world_writable_directory(self) -> None:
        """A world-writable parent directory is refused."""
        d = os.path.join(self.tmp, "open")
        os.mkdir(d)
        os.chmod(d, 0o777)
        e = self.assertRaises(UnsafeSocketPath, prepare_socket_path, os.path.join(d, "s.sock"))
        self.assertIn("world-writable", str(e))

    def test_removes_stale_socket(self) -> None:
        """A socket nobody listens on (its process died) is removed."""
        path = os.path.join(self.tmp, "s.sock")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.close()  # bound, never listening, now closed: a stale socket file
        self.assertTrue(stat.S_ISSOCK(os.lstat(path).st_mode))
        prepare_socket_path(path)
        self.assertFalse(os.path.exists(path))

    def test_refuses_live_socket(self) -> None:
        """A socket another process is serving is not stolen."""
        path = os.path.join(self.tmp, "s.sock")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.listen(1)
        self.addCleanup(s.close)
        e = self.assertRaises(UnsafeSocketPath, prepare_socket_path, path)
        self.assertIn("already serving", str(e))
        self.assertTrue(os.path.exists(path))

    def test_creates_missing_parent_privately(self) -> None:
        """A missing parent directory is created with mode 0700."""
        parent = os.path.join(self.tmp, "run", "sidero")
        prepare_socket_path(os.path.join(parent, "s.sock"))
        self.assertEqual(stat.S_IMODE(os.stat(parent).st_mode), 0o700)

    def test_refuses_too_long_path(self) -> None:
        """A path longer than sun_path allows is a clear error, not a bind failure."""
        self.assertRaises(UnsafeSocketPath, prepare_socket_path, os.path.join(self.tmp, "x" * 120))

    def test_world_accessible_mode_rejected(self) -> None:
        """A mode granting access to other users is refused at construction."""
        self.assertRaises(ValueError, ManagementService, global_reactor, None, "/x", 0o666)


class ServiceTests(ServerTestCase):
    def test_socket_mode_and_removal(self) -> None:
        """The socket is created 0600, owned by us, and removed when the service stops."""
        info = os.lstat(self.socket_path)
        self.assertTrue(stat.S_ISSOCK(info.st_mode))
        self.assertEqual(stat.S_IMODE(info.st_mode), 0o600)
        self.assertEqual(info.st_uid, os.getuid())
        self.assertEqual(self.service.name, "management")
        d = self.service.stopService()

        def gone(_: object) -> None:
            self.assertFalse(os.path.exists(self.socket_path))

        return d.addCallback(gone)

    def test_second_service_on_same_path_refused(self) -> None:
        """Starting another service on a live socket fails and leaves the first one serving."""
        other = ManagementService(global_reactor, self.store, self.socket_path)
        self.assertRaises(UnsafeSocketPath, other.startService)
        self.assertFalse(other.running)
        return deferToThread(ManagementClient(self.socket_path).request, "GET", "/healthz").addCallback(
            self.assertEqual, "ok")

    def test_start_refuses_non_socket_path(self) -> None:
        """A service whose path is a regular file refuses to start and leaves the file alone."""
        path = os.path.join(self.tmp, "file.sock")
        with open(path, "w") as f:
            f.write("keep")
        svc = ManagementService(global_reactor, self.store, path)
        self.assertRaises(UnsafeSocketPath, svc.startService)
        self.assertFalse(svc.running)
        with open(path) as f:
            self.assertEqual(f.read(), "keep")

    def test_start_replaces_stale_socket(self) -> None:
        """A socket file left by a dead process is replaced and the new service answers."""
        path = os.path.join(self.tmp, "stale.sock")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.close()
        svc = ManagementService(global_reactor, self.store, path)
        svc.startService()
        self.addCleanup(svc.stopService)
        return deferToThread(ManagementClient(path).request, "GET", "/healthz").addCallback(
            self.assertEqual, "ok")

    def test_group_mode(self) -> None:
        """With a group, the socket gets that group and mode 0660."""
        path = os.path.join(self.tmp, "group.sock")
        gid = os.getgid()
        svc = ManagementService(global_reactor, self.store, path, 0o660, group=gid)
        svc.startService()
        self.addCleanup(svc.stopService)
        info = os.lstat(path)
        self.assertEqual((stat.S_IMODE(info.st_mode), info.st_gid), (0o660, gid))


class APITests(ServerTestCase):
    def call(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        client = ManagementClient(self.socket_path)
        return deferToThread(client.request, method, path, body, content_type)

    def raw(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> Any:
        def go() -> tuple[int, bytes]:
            conn = http.client.HTTPConnection("localhost")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self.socket_path)
            conn.sock = sock
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
            conn.close()
            return r.status, data
        return deferToThread(go)

    async def expect_error(self, cls: type[StoreError], method: str, path: str, body: Any = None,
                           content_type: str = "application/json") -> StoreError:
        try:
            await self.call(method, path, body, content_type)
        except cls as e:
            return e
        self.fail(f"{method} {path} did not fail with {cls.__name__}")

    servers = resource_path(registry.SERVER)

    async def test_create_get_list_with_selectors(self) -> None:
        """POST creates (201 body), GET returns it, lists honour label and field selectors."""
        created = await self.call("POST", self.servers, server_manifest("s1", {"rack": "a"}, hostname="h1"))
        self.assertEqual(created["metadata"]["name"], "s1")
        self.assertTrue(created["metadata"]["resourceVersion"])
        await self.call("POST", self.servers, server_manifest("s2", {"rack": "b"}))
        got = await self.call("GET", self.servers + "/s1")
        self.assertEqual(got["spec"]["hostname"], "h1")
        listed = await self.call("GET", self.servers + "?labelSelector=rack%3Db")
        self.assertEqual(listed["kind"], "ServerList")
        self.assertEqual([i["metadata"]["name"] for i in listed["items"]], ["s2"])
        listed = await self.call("GET", self.servers + "?fieldSelector=metadata.name%3Ds1")
        self.assertEqual([i["metadata"]["name"] for i in listed["items"]], ["s1"])
        self.assertTrue(listed["metadata"]["resourceVersion"])

    async def test_bad_selector_is_400(self) -> None:
        """A malformed label selector is a BadRequest."""
        await self.expect_error(BadRequest, "GET", self.servers + "?labelSelector=a%20in%20(")

    async def test_served_versions_convert(self) -> None:
        """An object written as v1alpha1 is stored and returned in whichever version is asked."""
        v1 = server_manifest("old", hostname="h")
        v1["apiVersion"] = "metal.sidero.dev/v1alpha1"
        await self.call("POST", resource_path(registry.SERVER, version="v1alpha1"), v1)
        as_v2 = await self.call("GET", self.servers + "/old")
        self.assertEqual(as_v2["apiVersion"], "metal.sidero.dev/v1alpha2")
        as_v1 = await self.call("GET", resource_path(registry.SERVER, version="v1alpha1", name="old"))
        self.assertEqual(as_v1["apiVersion"], "metal.sidero.dev/v1alpha1")
        self.assertEqual(as_v1["spec"]["hostname"], "h")

    async def test_update_conflict_and_status(self) -> None:
        """PUT with a stale resourceVersion conflicts; PUT status changes only status."""
        created = await self.call("POST", self.servers, server_manifest("s1"))
        fresh = dict(created, spec={"hostname": "new"})
        updated = await self.call("PUT", self.servers + "/s1", fresh)
        self.assertEqual(updated["spec"]["hostname"], "new")
        await self.expect_error(Conflict, "PUT", self.servers + "/s1", dict(created, spec={"hostname": "stale"}))
        updated["status"] = {"power": "on"}
        with_status = await self.call("PUT", self.servers + "/s1/status", updated)
        self.assertEqual(with_status["status"]["power"], "on")
        self.assertEqual(with_status["spec"]["hostname"], "new")
        ignored = dict(with_status, status={"power": "off"})
        after = await self.call("PUT", self.servers + "/s1", ignored)
        self.assertEqual(after["status"]["power"], "on")

    async def test_merge_patch_in_both_versions(self) -> None:
        """A merge patch works against the storage version and against another served version."""
        await self.call("POST", self.servers, server_manifest("p", {"a": "1"}, hostname="h"))
        patched = await self.call("PATCH", self.servers + "/p", {"metadata": {"labels": {"a": None, "b": "2"}}},
                                  "application/merge-patch+json")
        self.assertEqual(patched["metadata"]["labels"], {"b": "2"})
        v1 = resource_path(registry.SERVER, version="v1alpha1", name="p")
        patched = await self.call("PATCH", v1, {"spec": {"hostname": "h2"}}, "application/merge-patch+json")
        self.assertEqual(patched["apiVersion"], "metal.sidero.dev/v1alpha1")
        self.assertEqual((await self.call("GET", self.servers + "/p"))["spec"]["hostname"], "h2")

    async def test_json_patch_and_unsupported_patch_type(self) -> None:
        """A JSON patch applies; a strategic merge patch is 415."""
        await self.call("POST", self.servers, server_manifest("j", hostname="h"))
        patched = await self.call("PATCH", self.servers + "/j", [{"op": "replace", "path": "/spec/hostname",
                                                                  "value": "jp"}], "application/json-patch+json")
        self.assertEqual(patched["spec"]["hostname"], "jp")
        e = await self.expect_error(StoreError, "PATCH", self.servers + "/j", {"spec": {}},
                                    "application/strategic-merge-patch+json")
        self.assertEqual((e.code, e.reason), (415, "UnsupportedMediaType"))

    async def test_invalid_object_is_422_with_causes(self) -> None:
        """Admission failures come back as Invalid with their causes, and nothing is stored."""
        e = await self.expect_error(Invalid, "POST", self.servers, server_manifest("bad", accepted="yes"))
        self.assertEqual(e.causes[0]["field"], "spec.accepted")
        await self.expect_error(NotFound, "GET", self.servers + "/bad")

    async def test_malformed_bodies_change_nothing(self) -> None:
        """Malformed JSON and YAML bodies are 400 Status answers and create nothing."""
        status, data = await self.raw("POST", self.servers, b"{not json", {"Content-Type": "application/json"})
        self.assertEqual(status, 400)
        self.assertIn(b'"reason": "BadRequest"', data)
        status, _ = await self.raw("POST", self.servers, b"a: [unclosed", {"Content-Type": "application/yaml"})
        self.assertEqual(status, 400)
        status, _ = await self.raw("POST", self.servers, b"- a list", {"Content-Type": "application/yaml"})
        self.assertEqual(status, 400)
        listed = await self.call("GET", self.servers)
        self.assertEqual(listed["items"], [])

    async def test_yaml_body_accepted_and_aliases_refused(self) -> None:
        """A YAML body creates an object; a YAML alias (expansion bomb) is refused."""
        body = b"apiVersion: metal.sidero.dev/v1alpha2\nkind: Server\nmetadata: {name: y}\nspec: {hostname: yh}\n"
        status, _ = await self.raw("POST", self.servers, body, {"Content-Type": "application/yaml"})
        self.assertEqual(status, 201)
        bomb = b"a: &x [1, 2]\nb: [*x, *x]\n"
        status, _ = await self.raw("POST", self.servers, bomb, {"Content-Type": "application/yaml"})
        self.assertEqual(status, 400)

    async def test_oversized_body_is_413(self) -> None:
        """A body over the limit is refused with 413 and nothing is stored."""
        obj = server_manifest("big", hostname="x" * (MAX_BODY_BYTES + 10))
        e = await self.expect_error(StoreError, "POST", self.servers, obj)
        self.assertEqual(e.code, 413)
        self.assertEqual((await self.call("GET", self.servers))["items"], [])

    async def test_delete_and_not_found(self) -> None:
        """DELETE removes the object (Success Status); deleting again is NotFound with kubectl wording."""
        await self.call("POST", self.servers, server_manifest("d"))
        result = await self.call("DELETE", self.servers + "/d")
        self.assertEqual((result["kind"], result["status"]), ("Status", "Success"))
        e = await self.expect_error(NotFound, "DELETE", self.servers + "/d")
        self.assertEqual(e.message, 'servers.metal.sidero.dev "d" not found')

    async def test_namespaced_kinds(self) -> None:
        """Namespaced objects are created under their namespace and listed per namespace or all."""
        base = "/apis/infrastructure.cluster.x-k8s.io/v1alpha3"
        mm = {"apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha3", "kind": "MetalMachine",
              "metadata": {"name": "m"}, "spec": {}}
        created = await self.call("POST", base + "/namespaces/ns1/metalmachines", mm)
        self.assertEqual(created["metadata"]["namespace"], "ns1")
        await self.call("POST", base + "/namespaces/ns2/metalmachines", mm)
        one = await self.call("GET", base + "/namespaces/ns1/metalmachines")
        self.assertEqual(len(one["items"]), 1)
        every = await self.call("GET", base + "/metalmachines")
        self.assertEqual(sorted(i["metadata"]["namespace"] for i in every["items"]), ["ns1", "ns2"])
        e = await self.expect_error(StoreError, "POST", base + "/metalmachines", mm)
        self.assertEqual(e.code, 405)
        await self.expect_error(BadRequest, "POST", base + "/namespaces/ns3/metalmachines",
                                dict(mm, metadata={"name": "x", "namespace": "ns1"}))

    async def test_version_health_and_discovery(self) -> None:
        """/healthz, /version and discovery documents answer."""
        self.assertEqual(await self.call("GET", "/healthz"), "ok")
        self.assertIn("gitVersion", await self.call("GET", "/version"))
        groups = await self.call("GET", "/apis")
        self.assertIn("metal.sidero.dev", [g["name"] for g in groups["groups"]])
        resources = await self.call("GET", "/apis/metal.sidero.dev/v1alpha2")
        self.assertIn("servers", [r["name"] for r in resources["resources"]])

    async def test_unknown_path_and_method(self) -> None:
        """Unknown paths are 404 and unsupported methods 405, both as Status objects."""
        e = await self.expect_error(NotFound, "GET", "/apis/metal.sidero.dev/v1alpha2/widgets")
        self.assertEqual(e.message, "the server could not find the requested resource")
        e = await self.expect_error(StoreError, "DELETE", self.servers)
        self.assertEqual(e.code, 405)
