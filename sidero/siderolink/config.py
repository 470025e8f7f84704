"""SideroLink installation identity: the WireGuard key and the /64 every node tunnel lives in.

Both are derived from the C{default/siderolink} Secret (spec §3.8), created on first start, so
the tunnel addresses stay the same across restarts and across hosts sharing one cluster.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from sidero.api.registry import SECRET
from sidero.store.errors import AlreadyExists, NotFound
from sidero.store.interfaces import IResourceStore

SECRET_NAMESPACE = "default"
SECRET_NAME = "siderolink"
MOVE_LABEL = "clusterctl.cluster.x-k8s.io/move"


class SideroLinkConfigError(ValueError):
    """The Secret exists but lacks a key or holds an unusable value."""


def generate_private_key() -> str:
    """A new WireGuard private key, base64 as C{wg genkey} prints it."""
    raw = X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return base64.b64encode(raw).decode()


def public_key(private_key: str) -> str:
    """The WireGuard public key of a base64 private key (C{wg pubkey})."""
    try:
        raw = base64.b64decode(private_key, validate=True)
        key = X25519PrivateKey.from_private_bytes(raw)
    except ValueError as e:
        raise SideroLinkConfigError(f"invalid WireGuard private key: {e}") from e
    return base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


class InvalidKey(ValueError):
    """A WireGuard key that is not 32 bytes of standard base64."""


def parse_key(text: str) -> str:
    """A WireGuard key (base64 of 32 bytes) in its canonical spelling, as Go's C{wgtypes.ParseKey}
    accepts it; the messages say what is wrong without echoing the key.

    @raise InvalidKey: not standard base64, or not 32 bytes.
    """
    try:
        raw = base64.b64decode(text.encode("ascii", "strict"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise InvalidKey("wgtypes: failed to parse base64-encoded key: illegal base64 data") from None
    if len(raw) != 32:
        raise InvalidKey(f"wgtypes: incorrect key size: {len(raw)}")
    return base64.b64encode(raw).decode()


def key_hex(key: str) -> str:
    """The hex spelling of a base64 WireGuard key (what the UAPI protocol speaks)."""
    return base64.b64decode(parse_key(key)).hex()


def key_from_hex(text: str) -> str:
    """The base64 spelling of a hex WireGuard key."""
    return base64.b64encode(bytes.fromhex(text)).decode()


@dataclass(frozen=True)
class SideroLinkConfig:
    installation_id: str
    private_key: str

    @property
    def public_key(self) -> str:
        return public_key(self.private_key)

    @property
    def subnet(self) -> ipaddress.IPv6Network:
        """SHA-256 of the installation id, last 16 bytes, byte 0 = 0xfd, byte 7 = 0x03, /64."""
        digest = bytearray(hashlib.sha256(self.installation_id.encode()).digest()[16:])
        digest[0] = 0xFD
        digest[7] = 0x03
        return ipaddress.IPv6Network((bytes(digest[:8]) + bytes(8), 64))

    @property
    def server_address(self) -> ipaddress.IPv6Address:
        """The tunnel address of this host: the subnet's C{::1}."""
        return self.subnet.network_address + 1

    @property
    def server_interface(self) -> ipaddress.IPv6Interface:
        """The server address with the subnet's prefix (what the tunnel interface carries)."""
        return ipaddress.IPv6Interface((self.server_address, self.subnet.prefixlen))

    def new_node_address(
        self, random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> ipaddress.IPv6Interface:
        """A fresh node address: the subnet's first 8 bytes, then 8 random ones, /64 (§3.8)."""
        raw = self.subnet.network_address.packed[:8] + random_bytes(8)
        return ipaddress.IPv6Interface((raw, self.subnet.prefixlen))


def config_from_secret(secret: dict[str, Any]) -> SideroLinkConfig:
    data = secret.get("data") or {}
    values = {}
    for key in ("installation-id", "private-key"):
        if key not in data:
            raise SideroLinkConfigError(f'secret {SECRET_NAMESPACE}/{SECRET_NAME} has no key "{key}"')
        values[key] = base64.b64decode(data[key]).decode()
    config = SideroLinkConfig(values["installation-id"], values["private-key"])
    public_key(config.private_key)  # validate now, not on first use
    return config


def secret_for(config: SideroLinkConfig) -> dict[str, Any]:
    def b64(s: str) -> str:
        return base64.b64encode(s.encode()).decode()

    return {
        "apiVersion": SECRET.api_version,
        "kind": SECRET.kind,
        "metadata": {"name": SECRET_NAME, "namespace": SECRET_NAMESPACE, "labels": {MOVE_LABEL: ""}},
        "data": {"installation-id": b64(config.installation_id), "private-key": b64(config.private_key)},
    }


async def load_or_create(store: IResourceStore) -> SideroLinkConfig:
    """Read the Secret, or create it with fresh keys; a concurrent creator wins and is re-read."""
    try:
        return config_from_secret(await store.get(SECRET, SECRET_NAME, SECRET_NAMESPACE))
    except NotFound:
        pass
    config = SideroLinkConfig(installation_id=generate_private_key(), private_key=generate_private_key())
    try:
        await store.create(secret_for(config))
    except AlreadyExists:
        return config_from_secret(await store.get(SECRET, SECRET_NAME, SECRET_NAMESPACE))
    return config
