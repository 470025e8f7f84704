# -*- test-case-name: tests.power.test_credentials -*-
"""BMC user/password resolution (spec §1.1), with Sidero's exact error messages.

Literal C{bmc.user}/C{bmc.pass} win; otherwise C{userFrom}/C{passFrom} point at a key of a
Secret (C{{secretKeyRef: {namespace, name, key}}}) whose C{data} value (base64, as Kubernetes
serialises Secrets) is the credential.  An absent C{*From} resolves to "" (the factory then
falls back to the fake manager: the BMC is not fully described yet).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from sidero.api import registry
from sidero.power.interfaces import CredentialsError


async def resolve_credential(store: Any, source: dict[str, Any] | None) -> str:
    """Resolve one C{userFrom}/C{passFrom}; C{store} provides L{IResourceStore}.

    @raise CredentialsError: C{missing secretKeyRef}, C{error getting secret "<name>": <err>},
        C{secret key "<key>" is missing in secret "<name>"}, or an undecodable value.
    """
    if source is None:
        return ""
    ref = source.get("secretKeyRef") if isinstance(source, dict) else None
    if not ref:
        raise CredentialsError("missing secretKeyRef")
    name = str(ref.get("name", ""))
    namespace = str(ref.get("namespace", ""))
    key = str(ref.get("key", ""))
    try:
        secret = await store.get(registry.SECRET, name, namespace)
    except Exception as e:
        raise CredentialsError(f'error getting secret "{name}": {e}') from e
    data = secret.get("data") or {}
    if key in data:
        raw = data[key]
        try:
            value = base64.b64decode(raw or "", validate=True)
        except (binascii.Error, ValueError, TypeError) as e:
            raise CredentialsError(
                f'secret key "{key}" in secret "{name}" is not valid base64'
            ) from e
    elif key in (secret.get("stringData") or {}):
        # A store that did not fold stringData into data (the API server does) still works.
        value = str(secret["stringData"][key]).encode()
    else:
        raise CredentialsError(f'secret key "{key}" is missing in secret "{name}"')
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CredentialsError(f'secret key "{key}" in secret "{name}" is not valid UTF-8') from e


async def resolve_bmc_credentials(store: Any, bmc: dict[str, Any]) -> tuple[str, str]:
    """C{(user, password)} of a C{spec.bmc}; user first, as Sidero, so its error wins."""
    user = str(bmc.get("user") or "")
    if not user:
        user = await resolve_credential(store, bmc.get("userFrom"))
    password = str(bmc.get("pass") or "")
    if not password:
        password = await resolve_credential(store, bmc.get("passFrom"))
    return user, password
