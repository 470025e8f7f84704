"""The annotator (spec §3.9): tunnel and LAN addresses to server, MetalMachine, cluster, Machine."""

from __future__ import annotations

from sidero.api.registry import SERVER, SERVER_BINDING
from sidero.siderolink.annotator import Annotation, Annotator
from tests.siderolink.support import TUNNEL, UUID, StoreTestCase, binding, server


class AnnotatorTests(StoreTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.annotator = Annotator(self.informers["ServerBinding"], self.informers["MetalMachine"],
                                   self.informers["Server"])

    def test_tunnel_address(self) -> None:
        """The binding holding the address names server, namespace, MetalMachine, cluster and,
        through the MetalMachine's owner, the Machine; any spelling of the address works."""
        self.create_owned_metal_machine()
        self.create(binding())
        expected = Annotation(server_uuid=UUID, namespace="cluster-a", metal_machine="mm-0",
                              cluster="cluster-a", machine="machine-0")
        self.assertEqual(self.annotator.for_tunnel_ip(TUNNEL), expected)
        self.assertEqual(self.annotator.for_tunnel_ip(f"[{TUNNEL.upper()}]"), expected)
        self.assertEqual(expected.fields(), {"server_uuid": UUID, "cluster": "cluster-a",
                                             "namespace": "cluster-a", "metal_machine": "mm-0",
                                             "machine": "machine-0"})
        self.assertIsNone(self.annotator.for_tunnel_ip("fdae::99"))

    def test_follows_changes(self) -> None:
        """A moved address, a deleted binding, a MetalMachine without a Machine owner: the
        next lookup says so (no stale map)."""
        self.create(binding())
        self.assertEqual(self.annotator.for_tunnel_ip(TUNNEL).machine, "")  # type: ignore[union-attr]
        self.assertEqual(self.annotator.for_tunnel_ip(TUNNEL).fields().keys(),  # type: ignore[union-attr]
                         {"server_uuid", "cluster", "namespace", "metal_machine"})
        self.ok(self.store.patch(SERVER_BINDING, UUID, {"spec": {"siderolink": {
            "address": "fdae::2/64"}}}))
        self.assertIsNone(self.annotator.for_tunnel_ip(TUNNEL))
        self.assertEqual(self.annotator.for_tunnel_ip("fdae::2").server_uuid, UUID)  # type: ignore[union-attr]
        self.ok(self.store.delete(SERVER_BINDING, UUID))
        self.assertIsNone(self.annotator.for_tunnel_ip("fdae::2"))

    def test_lan_addresses(self) -> None:
        """For syslog: a Server's reported address or BMC endpoint names the server, and its
        binding (when bound) the rest."""
        self.create(server(bmc="192.0.2.50"))
        self.ok(self.store.patch(SERVER, UUID, {"status": {"addresses": [
            {"type": "InternalIP", "address": "192.0.2.10"}]}}, subresource="status"))
        self.assertEqual(self.annotator.for_source_ip("192.0.2.10"), Annotation(server_uuid=UUID))
        self.assertEqual(self.annotator.for_source_ip("192.0.2.50"), Annotation(server_uuid=UUID))
        self.assertIsNone(self.annotator.for_source_ip("192.0.2.11"))
        self.create(binding())
        self.assertEqual(self.annotator.for_source_ip("192.0.2.10").metal_machine, "mm-0")  # type: ignore[union-attr]
        self.assertEqual(self.annotator.for_source_ip(TUNNEL).server_uuid, UUID)  # type: ignore[union-attr]
        # What Talos reported through the event sink maps too.
        self.ok(self.store.patch(SERVER_BINDING, UUID, {"spec": {"addresses": ["172.20.0.9"]}}))
        self.assertEqual(self.annotator.for_source_ip("172.20.0.9").cluster, "cluster-a")  # type: ignore[union-attr]
        self.assertIsNone(self.annotator.for_source_ip("not an address"))
