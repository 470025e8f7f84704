"""SideroLink identity derivation (spec §3.8)."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from sidero.siderolink.config import (
    SideroLinkConfig,
    SideroLinkConfigError,
    config_from_secret,
    generate_private_key,
    public_key,
    secret_for,
)


class DerivationTests(SynchronousTestCase):
    def test_subnet_from_installation_id(self) -> None:
        """The /64 is the last 16 digest bytes with byte 0 = 0xfd and byte 7 = 0x03, masked."""
        config = SideroLinkConfig("install-1", generate_private_key())
        tail = hashlib.sha256(b"install-1").digest()[16:]
        expected = bytes([0xFD]) + tail[1:7] + bytes([0x03])
        self.assertEqual(config.subnet.network_address.packed[:8], expected)
        self.assertEqual(config.subnet.network_address.packed[8:], bytes(8))
        self.assertEqual(config.subnet.prefixlen, 64)
        self.assertEqual(int(config.server_address) - int(config.subnet.network_address), 1)
        self.assertTrue(str(config.server_address).startswith("fd"))

    def test_public_key_matches_rfc7748_vector(self) -> None:
        """The X25519 public key of RFC 7748's Alice vector is the one the RFC gives."""
        alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
        alice_pub = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
        self.assertEqual(public_key(base64.b64encode(alice).decode()), base64.b64encode(alice_pub).decode())

    def test_secret_round_trip(self) -> None:
        """A config survives being written to and read back from its Secret."""
        config = SideroLinkConfig(generate_private_key(), generate_private_key())
        secret = secret_for(config)
        self.assertEqual(secret["metadata"]["labels"], {"clusterctl.cluster.x-k8s.io/move": ""})
        self.assertEqual(config_from_secret(secret), config)

    def test_incomplete_secret_refused(self) -> None:
        """A Secret missing a key or holding a bad key is an error naming the problem."""
        secret = secret_for(SideroLinkConfig("id", generate_private_key()))
        del secret["data"]["private-key"]
        e = self.assertRaises(SideroLinkConfigError, config_from_secret, secret)
        self.assertIn('"private-key"', str(e))
        secret["data"]["private-key"] = base64.b64encode(b"short").decode()
        self.assertRaises(SideroLinkConfigError, config_from_secret, secret)


class LoadOrCreateTests(SynchronousTestCase):
    """load_or_create against the embedded store (inline, deterministic)."""

    def setUp(self) -> None:
        from tests.store.test_embedded import inline_store, result_of

        self.store, _ = inline_store()
        self.result_of = result_of
        result_of(self, self.store.open())
        self.addCleanup(lambda: result_of(self, self.store.close()))

    def load(self, store: Any = None) -> SideroLinkConfig:
        from sidero.siderolink.config import load_or_create

        config: SideroLinkConfig = self.result_of(self, load_or_create(store or self.store))
        return config

    def test_created_once_then_read(self) -> None:
        """The first call creates default/siderolink (with the move label); later calls read it."""
        from sidero.api.registry import SECRET

        first = self.load()
        secret = self.result_of(self, self.store.get(SECRET, "siderolink", "default"))
        self.assertEqual(secret["metadata"]["labels"], {"clusterctl.cluster.x-k8s.io/move": ""})
        self.assertEqual(config_from_secret(secret), first)
        self.assertEqual(self.load(), first)

    def test_lost_create_race_rereads(self) -> None:
        """A create that meets AlreadyExists (another replica won) returns the stored identity."""
        from sidero.store.errors import NotFound

        winner = self.load()
        store = self.store

        class LateReader:
            """Says NotFound on the first read, as if the winner had not written yet."""

            def __init__(self) -> None:
                self.reads = 0

            def get(self, *args: Any, **kwargs: Any) -> Any:
                self.reads += 1
                if self.reads == 1:
                    from twisted.internet.defer import fail

                    return fail(NotFound("secrets \"siderolink\" not found"))
                return store.get(*args, **kwargs)

            def create(self, obj: Any) -> Any:
                return store.create(obj)

        late = LateReader()
        self.assertEqual(self.load(late), winner)
        self.assertEqual(late.reads, 2)
