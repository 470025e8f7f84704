# -*- test-case-name: tests.dashboard.test_auth -*-
"""The dashboard's login: one shared password (a file), sessions in HttpOnly cookies.

The dashboard is read-only, but what it shows (hardware inventory, BMC addresses, kernel logs)
is not for everyone on the provisioning network, where booting machines reach sidero.  So it
binds loopback by default, where no login is asked (reach it through an SSH tunnel or a
TLS-terminating proxy that authenticates), and elsewhere it needs C{--dashboard-password-file}.
Passwords are compared in constant time over their SHA-256 digests (so not even the length
leaks); a session is a random 256-bit token kept only as its digest, with a fixed lifetime,
and the number of sessions is bounded (the oldest go first).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
from collections import OrderedDict
from collections.abc import Callable

COOKIE = b"sidero_dashboard"
#: Seconds a session lasts from login.
SESSION_LIFETIME = 12 * 3600.0
#: Sessions kept at most (a login past this forgets the oldest).
MAX_SESSIONS = 256
#: Longest password file read (a password, not a document).
MAX_PASSWORD_FILE = 4096


class PasswordFileError(ValueError):
    """The password file cannot be used (missing, empty, too long)."""


def read_password_file(path: str) -> bytes:
    """The password: the file's first line without surrounding blanks (blocking read; the tap
    calls this before the reactor runs).

    @raise PasswordFileError: unreadable, empty or longer than L{MAX_PASSWORD_FILE}.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PASSWORD_FILE + 1)
    except OSError as e:
        raise PasswordFileError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > MAX_PASSWORD_FILE:
        raise PasswordFileError(f"{path} is longer than {MAX_PASSWORD_FILE} bytes")
    password = data.split(b"\n", 1)[0].strip()
    if not password:
        raise PasswordFileError(f"{path} holds no password on its first line")
    return password


def loosely_readable(path: str) -> bool:
    """Whether group or others may read C{path} (worth a warning)."""
    try:
        return bool(os.stat(path).st_mode & 0o077)
    except OSError:
        return False


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def password_matches(given: bytes, expected: bytes) -> bool:
    """Constant-time comparison that does not leak the length either."""
    return hmac.compare_digest(_digest(given), _digest(expected))


def is_loopback_address(address: str) -> bool:
    """Whether a listen address only accepts local connections (empty means all: no)."""
    if not address:
        return False
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def host_header_is_local(host: bytes | None) -> bool:
    """Whether a Host header names this machine by a loopback name.

    Without a login, a page on another site could read a loopback dashboard through DNS
    rebinding (its own name resolving to 127.0.0.1); the browser then sends that name as
    Host, so only loopback names are answered.
    """
    if not host:
        return False
    text = host.decode("ascii", "replace").strip().lower()
    if text.startswith("["):
        name = text[1:text.find("]")] if "]" in text else text
    else:
        name = text.rsplit(":", 1)[0] if text.count(":") == 1 else text
    if name in ("localhost", "localhost."):
        return True
    return is_loopback_address(name)


class Sessions:
    """Logged-in browsers: token digests with an expiry, bounded, on an injected clock."""

    def __init__(self, clock: Callable[[], float], lifetime: float = SESSION_LIFETIME,
                 limit: int = MAX_SESSIONS,
                 token: Callable[[], str] = lambda: secrets.token_urlsafe(32)) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.limit = limit
        self.token = token
        self._expiry: OrderedDict[bytes, float] = OrderedDict()

    def create(self) -> str:
        """A new session's token (for the cookie)."""
        token = self.token()
        self._expiry[_digest(token.encode())] = self.clock() + self.lifetime
        while len(self._expiry) > self.limit:
            self._expiry.popitem(last=False)
        return token

    def valid(self, token: bytes | None) -> bool:
        if not token:
            return False
        key = _digest(token)
        expiry = self._expiry.get(key)
        if expiry is None:
            return False
        if expiry <= self.clock():
            del self._expiry[key]
            return False
        return True

    def drop(self, token: bytes | None) -> None:
        if token:
            self._expiry.pop(_digest(token), None)

    def __len__(self) -> int:
        return len(self._expiry)
