"""The HTTP service around the site: prepare-before-start, the informer lookup, discovery, and
the twistd tree's HTTP service loading the SideroLink identity before it starts."""

from __future__ import annotations

import os
from typing import Any

import treq
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sidero import tap
from sidero.api.registry import CAPI_MACHINE, SECRET, SERVER
from sidero.app import OrderedMultiService
from sidero.config import StartupError
from sidero.controllers.informer import Informer
from sidero.protocols.http.ipxe import LookupFailed
from sidero.protocols.http.service import InformerBootLookup, PreparedService, store_serves
from sidero.siderolink.config import config_from_secret
from sidero.store.errors import Forbidden, NotFound, Unavailable
from tests.ports import free_port
from tests.service.test_tap import Recorder, settings_for
from tests.store.test_embedded import inline_store, result_of


class PreparedServiceTests(SynchronousTestCase):
    def test_children_start_after_prepare(self) -> None:
        """No child starts before prepare() has finished; the start Deferred fires after them."""
        journal: list[str] = []
        gate: Deferred[None] = Deferred()

        async def prepare() -> None:
            journal.append("prepare")
            await gate
            journal.append("prepared")

        service = PreparedService(Clock(), prepare)
        Recorder("a", journal).setServiceParent(service)
        started = service.startService()
        self.assertEqual(journal, ["prepare"])
        self.assertNoResult(started)
        gate.callback(None)
        self.assertEqual(journal, ["prepare", "prepared", "start a"])
        self.successResultOf(started)

    def test_failed_prepare_fails_the_parent(self) -> None:
        """A failing prepare starts no child and fails an ordered parent's start."""
        journal: list[str] = []

        async def prepare() -> None:
            raise StartupError("no identity")

        failures: list[Any] = []
        root = OrderedMultiService(Clock())
        root.on_start_failure = failures.append  # type: ignore[method-assign]
        service = PreparedService(Clock(), prepare)
        service.setName("http")
        Recorder("a", journal).setServiceParent(service)
        service.setServiceParent(root)
        root.startService()
        self.assertEqual(journal, [])
        self.assertEqual(len(failures), 1)
        self.assertTrue(failures[0].check(StartupError))
        self.failureResultOf(root.when_started(), StartupError)


class LookupTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store, self.clock = inline_store()
        result_of(self, self.store.open())
        self.addCleanup(lambda: result_of(self, self.store.close()))

    def informer(self, kind: Any) -> Informer:
        informer = Informer(self.store, kind, clock=self.clock)
        informer.startService()
        self.addCleanup(informer.stopService)
        return informer

    def lookup(self, **kwargs: Any) -> InformerBootLookup:
        s = self.informer(SERVER)
        return InformerBootLookup(s, s, s, s, **kwargs)

    def test_machines_unknown_then_absent(self) -> None:
        """Until discovery is done Machine lookups fail; when not served they find nothing."""
        lookup = self.lookup(machines_known=False)
        self.assertRaises(LookupFailed, lookup.machine, "default", "m")
        lookup.set_machines(None)
        self.assertIsNone(lookup.machine("default", "m"))

    def test_namespaced_reads_from_synced_caches(self) -> None:
        """Secrets and Machines are read by namespace and name from their informers."""
        result_of(self, self.store.create({"apiVersion": "v1", "kind": "Secret",
                                           "metadata": {"name": "s", "namespace": "ns1"}, "data": {}}))
        secrets = self.informer(SECRET)
        lookup = self.lookup(secrets=secrets, machines=self.informer(CAPI_MACHINE))
        self.assertEqual(lookup.secret("ns1", "s")["metadata"]["name"], "s")  # type: ignore[index]
        self.assertIsNone(lookup.secret("ns2", "s"))
        self.assertIsNone(lookup.machine("ns1", "m"))
        self.assertRaises(LookupFailed, lookup.metal_machine, "ns1", "mm")  # not watched


class StoreServesTests(SynchronousTestCase):
    class Listing:
        def __init__(self, error: Exception | None) -> None:
            self.error = error

        def list(self, kind: Any) -> Deferred[Any]:
            return fail(self.error) if self.error else succeed(None)

    def test_answers(self) -> None:
        """A listing is served; NotFound and Forbidden mean absent; other errors propagate."""
        def served(error: Exception | None) -> Any:
            return result_of(self, Deferred.fromCoroutine(store_serves(self.Listing(error), CAPI_MACHINE)))

        self.assertTrue(served(None))
        self.assertFalse(served(NotFound("the server could not find the requested resource")))
        self.assertFalse(served(Forbidden("machines is forbidden")))
        d = Deferred.fromCoroutine(store_serves(self.Listing(Unavailable("down")), CAPI_MACHINE))
        self.failureResultOf(d, Unavailable)


class TreeTests(TestCase):
    """The real tree (embedded store, real reactor): the HTTP service's start-up."""

    timeout = 60

    async def test_identity_created_before_http_starts(self) -> None:
        """Starting creates default/siderolink, hands its address to the site and serves
        /configdata; a restart on the same state keeps the identity."""
        state_dir = os.path.abspath(self.mktemp())
        identities = []
        for _ in range(2):
            port = free_port()
            settings = settings_for(state_dir, "disable_dhcp_proxy", "disable_tftp", "disable_controllers",
                                    "disable_siderolink", "disable_syslog",
                                    api_port=str(port), http_port=str(port), listen_address="127.0.0.1",
                                    # the spec's 404 for an unknown server, as anyone gets it from Go
                                    configdata_access="any")
            root = tap.build_service(settings, global_reactor)
            root.exit_on_start_failure = False
            root.startService()
            try:
                await root.when_started()
                secret = await root.context.store.get(SECRET, "siderolink", "default")
                identity = config_from_secret(secret)
                self.assertEqual(root.context.siderolink_config, identity)
                response = await treq.get(f"http://127.0.0.1:{port}/configdata?uuid=nope", persistent=False)
                self.assertEqual(response.code, 404)
                self.assertIn(b"missing serverbinding", await response.content())
                identities.append(identity)
            finally:
                await root.stopService()
        self.assertEqual(identities[0], identities[1])
