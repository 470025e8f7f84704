"""Faults around L{KubernetesStore}: API server restarts under an informer, expired watches,
watch renewal and stop, bad configuration and unreachable servers.

Tests that need a real kube-apiserver skip loudly without the binary (see
L{tests.k8s.apiserver.require_binary}); the configuration tests always run.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sidero.api import registry
from sidero.api.registry import SERVER, ResourceType
from sidero.backoff import Backoff
from sidero.controllers.informer import Informer
from sidero.k8s.client import load_api_client
from sidero.k8s.errors import KubeconfigError
from sidero.k8s.store import INITIAL_EVENTS_END, KubernetesStore
from sidero.store import errors
from sidero.store.interfaces import BOOKMARK, MODIFIED, Object, WatchEvent
from tests.k8s import apiserver
from tests.k8s.apiserver import KubeAPIServer, TinyCA, write_kubeconfig
from tests.k8s.support import make_pool, make_store, server_with_crds
from tests.ports import free_port


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll C{predicate} on the real reactor until it holds."""
    step = 0.05
    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        await deferLater(reactor, step, lambda: None)
        waited += step


def server_obj(name: str, run: str, **spec: Any) -> Object:
    return {"apiVersion": SERVER.api_version, "kind": "Server",
            "metadata": {"name": name, "labels": {"faults-run": run}},
            "spec": {"accepted": False, **spec}}


class ConfigurationErrorTests(TestCase):
    """Wrong configuration gives one clear error, before anything waits on a network."""

    def setUp(self) -> None:
        env = {k: v for k, v in os.environ.items()
               if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
        env["HOME"] = self.mktemp()
        self.patch(os, "environ", env)

    def test_missing_kubeconfig_names_the_path(self) -> None:
        """A kubeconfig path that does not exist is refused with that path in the message."""
        with self.assertRaises(KubeconfigError) as ctx:
            load_api_client("/nonexistent/sidero/kubeconfig")
        self.assertEqual(str(ctx.exception),
                         "kubeconfig /nonexistent/sidero/kubeconfig does not exist or is not a file")

    def test_kubeconfig_env_is_used_and_checked(self) -> None:
        """$KUBECONFIG is the fallback and is checked the same way."""
        os.environ["KUBECONFIG"] = "/nonexistent/env-kubeconfig"
        with self.assertRaises(KubeconfigError) as ctx:
            load_api_client(None)
        self.assertIn("/nonexistent/env-kubeconfig", str(ctx.exception))

    def test_malformed_kubeconfig(self) -> None:
        """A file that is not a usable kubeconfig is refused as such, in one line."""
        path = Path(self.mktemp())
        path.write_text("apiVersion: v1\nkind: Config\nclusters: []\n")
        with self.assertRaises(KubeconfigError) as ctx:
            load_api_client(str(path))
        message = str(ctx.exception)
        self.assertTrue(message.startswith(f"kubeconfig {path} is not usable: "), message)
        self.assertNotIn("\n", message)

    def test_no_configuration_at_all(self) -> None:
        """Without a path, $KUBECONFIG, a service account or ~/.kube/config, the error says what to give."""
        with self.assertRaises(KubeconfigError) as ctx:
            load_api_client(None)
        self.assertIn("no Kubernetes configuration", str(ctx.exception))

    def test_valid_kubeconfig_points_at_its_server(self) -> None:
        """A good kubeconfig yields a client for its server, without contacting it."""
        path = Path(self.mktemp())
        ca = TinyCA("ca")
        write_kubeconfig(path, "https://127.0.0.1:1", ca.cert_pem, ca.issue("admin", client=True))
        api_client = load_api_client(str(path))
        self.addCleanup(api_client.close)
        self.assertEqual(api_client.configuration.host, "https://127.0.0.1:1")

    async def test_unreachable_server_fails_open_clearly(self) -> None:
        """open() against a closed loopback port fails with Unavailable naming the server."""
        port = free_port()
        path = Path(self.mktemp())
        ca = TinyCA("ca")
        write_kubeconfig(path, f"https://127.0.0.1:{port}", ca.cert_pem, ca.issue("admin", client=True))
        store = KubernetesStore(reactor, load_api_client(str(path)), make_pool(self))
        self.addCleanup(lambda: Deferred.fromCoroutine(store.close()))
        with self.assertRaises(errors.Unavailable) as ctx:
            await store.open()
        message = str(ctx.exception)
        self.assertTrue(
            message.startswith(f"cannot reach the Kubernetes API server at https://127.0.0.1:{port}: "),
            message)
        self.assertIn("Connection refused", message)
        self.assertNotIn("HTTPSConnection", message)
        self.assertNotIn("\n", message)
        with self.assertRaises(errors.Unavailable):
            await store.get(SERVER, "x")


class StoreShapeTests(SynchronousTestCase):
    """Parts of the store that need no server."""

    def test_delete_result(self) -> None:
        """delete returns the object only while finalizers hold it."""
        held = {"metadata": {"name": "a", "deletionTimestamp": "2026-01-01T00:00:00Z",
                             "finalizers": ["f"]}}
        result = KubernetesStore._deleted((200, held), SERVER)
        assert result is not None
        self.assertEqual(result["kind"], "Server")
        gone = {"metadata": {"name": "a"}}
        self.assertIsNone(KubernetesStore._deleted((200, gone), SERVER))
        status = {"kind": "Status", "status": "Success"}
        self.assertIsNone(KubernetesStore._deleted((200, status), SERVER))


    def test_bad_watch_selector_fails_at_once(self) -> None:
        """watch refuses an unparsable selector with BadRequest before starting any thread."""
        from kubernetes.client import ApiClient
        from twisted.internet.testing import MemoryReactor
        from twisted.python.threadpool import ThreadPool

        store = KubernetesStore(MemoryReactor(), ApiClient(), ThreadPool())
        failure = self.failureResultOf(store.watch(SERVER, lambda e: None, label_selector="a in (b"))
        failure.trap(errors.BadRequest)
        self.assertEqual(store.watch_count(), 0)


class SharedServerFaultTests(TestCase):
    """Watch edge cases on the shared server."""

    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]
        self.server = await server_with_crds()
        self.run_id = uuid.uuid4().hex[:8]

    async def test_expired_resource_version_is_gone(self) -> None:
        """A watch from a resourceVersion the server no longer remembers ends with Gone."""
        store = await make_store(self, self.server)
        events: list[WatchEvent] = []
        w = await store.watch(SERVER, events.append, resource_version="1")
        with self.assertRaises(errors.Gone):
            await w.done
        self.assertEqual(events, [])
        await wait_for(lambda: store.watch_count() == 0, "the watch to be forgotten")

    async def test_watch_renews_and_passes_bookmarks(self) -> None:
        """A watch outlives the server's timeoutSeconds, and server bookmarks come through."""
        store = await make_store(self, self.server, watch_timeout=4)
        created = await store.create(server_obj(f"renew-{self.run_id}", self.run_id))
        name = created["metadata"]["name"]
        self.addCleanup(store.delete, SERVER, name)
        events: list[WatchEvent] = []
        w = await store.watch(SERVER, events.append, resource_version=None,
                              label_selector=f"faults-run={self.run_id}", bookmarks=True)
        self.addCleanup(w.stop)
        await wait_for(lambda: any(e.type == BOOKMARK for e in events), "the initial bookmark")
        first = [e for e in events if e.type == BOOKMARK][0]
        self.assertEqual(first.object["metadata"]["annotations"], {INITIAL_EVENTS_END: "true"})
        self.assertEqual([e.type for e in events], ["ADDED", BOOKMARK])
        # A change outside the selection moves the server's resourceVersion: the server tells
        # the watch with a bookmark (2 s before each timeoutSeconds), which must come through.
        other = await store.create(server_obj(f"other-{self.run_id}", "elsewhere"))
        self.addCleanup(store.delete, SERVER, other["metadata"]["name"])
        other_rv = int(other["metadata"]["resourceVersion"])

        def server_bookmarks() -> list[WatchEvent]:
            return [e for e in events[2:] if e.type == BOOKMARK]

        await wait_for(lambda: any(int(e.object["metadata"]["resourceVersion"]) >= other_rv
                                   for e in server_bookmarks()), "a server bookmark", timeout=15)
        self.assertEqual({e.object["kind"] for e in server_bookmarks()}, {"Server"})
        # Let at least two server-side timeouts pass; the watch is renewed from its last rv.
        await deferLater(reactor, 6.0, lambda: None)
        patched = await store.patch(SERVER, name, {"spec": {"hostname": "after-renewal"}})
        await wait_for(lambda: any(e.type == MODIFIED for e in events), "the change after renewal")
        modified = [e for e in events if e.type == MODIFIED]
        self.assertEqual(len(modified), 1)
        self.assertEqual(modified[0].object["metadata"]["resourceVersion"],
                         patched["metadata"]["resourceVersion"])
        self.assertFalse(w.done.called)

    async def test_stop_ends_the_thread_promptly(self) -> None:
        """stop() on an idle watch fires done at once and its reading thread exits within seconds."""
        store = await make_store(self, self.server)
        listing = await store.list(SERVER, label_selector=f"faults-run={self.run_id}")
        w = await store.watch(SERVER, lambda e: None, resource_version=listing.resource_version)
        await deferLater(reactor, 0.5, lambda: None)  # let it block reading the stream
        thread = w._thread  # type: ignore[attr-defined]
        assert thread is not None
        self.assertTrue(thread.is_alive())
        ended: list[object] = []
        w.done.addBoth(ended.append)
        w.stop()
        self.assertEqual(ended, [None])
        await threads.deferToThread(thread.join, 5.0)
        self.assertFalse(thread.is_alive())
        self.assertEqual(store.watch_count(), 0)

    async def test_objects_have_the_embedded_shape(self) -> None:
        """Objects come back typed and without managedFields, from get, list and watch alike."""
        store = await make_store(self, self.server)
        secret = await store.create({"apiVersion": "v1", "kind": "Secret", "metadata": {
            "name": f"shape-{self.run_id}", "namespace": "default", "labels": {"faults-run": self.run_id}}})
        self.addCleanup(store.delete, registry.SECRET, secret["metadata"]["name"], "default")
        listing = await store.list(registry.SECRET, "default", label_selector=f"faults-run={self.run_id}")
        events: list[WatchEvent] = []
        w = await store.watch(registry.SECRET, events.append, namespace="default",
                              label_selector=f"faults-run={self.run_id}")
        self.addCleanup(w.stop)
        await wait_for(lambda: len(events) == 1, "the initial ADDED event")
        fetched = await store.get(registry.SECRET, secret["metadata"]["name"], "default")
        for obj in (secret, fetched, listing.items[0], events[0].object):
            self.assertEqual((obj["apiVersion"], obj["kind"]), ("v1", "Secret"))
            self.assertNotIn("managedFields", obj["metadata"])
            self.assertEqual(obj["metadata"]["uid"], secret["metadata"]["uid"])

    async def test_open_names_a_missing_kind(self) -> None:
        """open() fails clearly when the server does not serve a kind the store must handle."""
        store = await make_store(self, self.server)
        missing = ResourceType(group="nothing.sidero.dev", kind="Gadget", plural="gadgets",
                               storage_version="v1", namespaced=False)
        with self.assertRaises(errors.NotFound) as ctx:
            await store.open(kinds=(registry.SERVER, missing))
        self.assertIn("does not serve gadgets.nothing.sidero.dev/v1: install sidero's CRDs",
                      str(ctx.exception))


class RestartTests(TestCase):
    """An informer on KubernetesStore across an API server stop and start (own server)."""

    timeout = 300

    async def setUp(self) -> None:  # type: ignore[override]
        self.server = KubeAPIServer(apiserver.require_binary())
        self.addCleanup(lambda: threads.deferToThread(self.server.stop))
        await self.server.start()
        await server_with_crds(self.server)

    async def test_informer_survives_restart(self) -> None:
        """During an outage the informer serves its cache; after restart it misses no change."""
        store = await make_store(self, self.server)
        run = uuid.uuid4().hex[:8]
        for n in ("a", "b"):
            await store.create(server_obj(f"{n}-{run}", run))
        informer = Informer(store, SERVER, label_selector=f"faults-run={run}", clock=reactor,
                            backoff=Backoff(initial=0.2, maximum=1.0))
        seen: list[tuple[str, str]] = []
        informer.add_handler(
            on_add=lambda o: seen.append(("add", o["metadata"]["name"])),
            on_update=lambda old, new: seen.append(("update", new["metadata"]["name"])),
            on_delete=lambda o: seen.append(("delete", o["metadata"]["name"])),
        )
        informer.startService()
        self.addCleanup(informer.stopService)
        await informer.synced
        await wait_for(lambda: informer.debug_state()["watching"], "the informer to watch")
        self.assertEqual(len(informer), 2)

        port = self.server.port
        await threads.deferToThread(self.server.kill)  # like a crash: data, certs, port kept
        self.assertIsNone(self.server.process)
        await wait_for(lambda: not informer.debug_state()["watching"], "the watch to notice the outage")
        # The cache keeps serving, and direct calls fail with one clear error.
        self.assertEqual(informer.get(f"a-{run}")["metadata"]["name"], f"a-{run}")  # type: ignore[index]
        self.assertEqual(len(informer), 2)
        with self.assertRaises(errors.Unavailable) as ctx:
            await store.get(SERVER, f"a-{run}")
        self.assertIn(f"cannot reach the Kubernetes API server at {self.server.url}", str(ctx.exception))
        await deferLater(reactor, 2.0, lambda: None)  # a few failed reconnects
        self.assertEqual(len(informer), 2)

        await self.server.restart()
        self.assertEqual(self.server.port, port)
        self.assertEqual(store.host, self.server.url)  # same port, same client
        seen.clear()
        # Changes right after the restart, possibly before the informer reconnected.
        await store.create(server_obj(f"c-{run}", run))
        await store.patch(SERVER, f"a-{run}", {"spec": {"hostname": "after-restart"}})
        await store.delete(SERVER, f"b-{run}")

        def caught_up() -> bool:
            a = informer.get(f"a-{run}")
            return (a is not None and a["spec"].get("hostname") == "after-restart"
                    and informer.get(f"b-{run}") is None and informer.get(f"c-{run}") is not None)

        await wait_for(caught_up, "the informer to catch up after the restart", timeout=60)
        self.assertEqual(sorted(seen), [("add", f"c-{run}"), ("delete", f"b-{run}"),
                                        ("update", f"a-{run}")])
        await wait_for(lambda: informer.debug_state()["watching"], "the informer to watch again")
        # And it keeps following live changes.
        await store.patch(SERVER, f"c-{run}", {"spec": {"hostname": "live"}})
        await wait_for(lambda: (informer.get(f"c-{run}") or {}).get("spec", {}).get("hostname") == "live",
                       "a live change after reconnecting")
