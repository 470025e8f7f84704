"""BMC credential resolution: literals, Secret references and every error message of §1.1."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sidero.power.credentials import resolve_bmc_credentials, resolve_credential
from sidero.power.interfaces import CredentialsError, PowerError
from sidero.store import errors
from tests.power.helpers import SecretStore, secret
from tests.store.inline import open_inline_store


def ref(name: str = "bmc", key: str = "user", namespace: str = "default") -> dict[str, Any]:
    return {"secretKeyRef": {"namespace": namespace, "name": name, "key": key}}


class ResolveCredentialTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = SecretStore(secret("default", "bmc", user="admin", password="s3cret"))

    def resolve(self, source: Any) -> str:
        return self.successResultOf(ensureDeferred(resolve_credential(self.store, source)))

    def error(self, source: Any) -> str:
        failure = self.failureResultOf(
            ensureDeferred(resolve_credential(self.store, source)), CredentialsError
        )
        return failure.getErrorMessage()

    def test_absent_source_is_empty(self) -> None:
        """No userFrom at all resolves to the empty string without touching the store."""
        self.assertEqual(self.resolve(None), "")
        self.assertEqual(self.store.gets, [])

    def test_secret_value_is_base64_decoded(self) -> None:
        """The Secret's data value is decoded from base64, read from the referenced namespace."""
        self.assertEqual(self.resolve(ref(key="password")), "s3cret")
        self.assertEqual(self.store.gets, [("Secret", "bmc", "default")])

    def test_missing_secret_key_ref(self) -> None:
        """A userFrom without secretKeyRef fails with Sidero's "missing secretKeyRef"."""
        self.assertEqual(self.error({}), "missing secretKeyRef")

    def test_missing_secret(self) -> None:
        """A Secret that does not exist fails with error getting secret "<name>": <store error>."""
        self.assertEqual(
            self.error(ref(name="nope")), 'error getting secret "nope": secrets "nope" not found'
        )

    def test_secret_in_other_namespace_is_not_found(self) -> None:
        """The namespace of the reference is honoured: the same name elsewhere is not used."""
        self.assertEqual(
            self.error(ref(namespace="other")), 'error getting secret "bmc": secrets "bmc" not found'
        )

    def test_missing_key(self) -> None:
        """A key absent from the Secret fails with secret key "<key>" is missing in secret "<name>"."""
        self.assertEqual(
            self.error(ref(key="token")), 'secret key "token" is missing in secret "bmc"'
        )

    def test_store_failure_is_wrapped(self) -> None:
        """Any store failure (API server down) is reported with the secret's name."""
        self.store.error = errors.Unavailable("the store is closed")
        self.assertEqual(self.error(ref()), 'error getting secret "bmc": the store is closed')

    def test_invalid_base64(self) -> None:
        """A value that is not base64 is a clear error rather than garbage credentials."""
        self.store.objects[("default", "bmc")]["data"]["user"] = "***"
        self.assertEqual(self.error(ref()), 'secret key "user" in secret "bmc" is not valid base64')

    def test_credentials_error_is_a_power_error(self) -> None:
        """Callers that handle PowerError also handle credential failures."""
        self.assertTrue(issubclass(CredentialsError, PowerError))


class ResolveBMCCredentialsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = SecretStore(secret("ns", "creds", user="root", password="calvin"))

    def resolve(self, bmc: dict[str, Any]) -> tuple[str, str]:
        return self.successResultOf(ensureDeferred(resolve_bmc_credentials(self.store, bmc)))

    def test_literals_win_over_references(self) -> None:
        """Literal user and pass are used even when userFrom/passFrom are also set."""
        bmc = {"endpoint": "x", "user": "u", "pass": "p",
               "userFrom": ref("creds", "user", "ns"), "passFrom": ref("creds", "password", "ns")}
        self.assertEqual(self.resolve(bmc), ("u", "p"))
        self.assertEqual(self.store.gets, [])

    def test_both_from_secret(self) -> None:
        """userFrom and passFrom each read their own key."""
        bmc = {"endpoint": "x", "userFrom": ref("creds", "user", "ns"),
               "passFrom": ref("creds", "password", "ns")}
        self.assertEqual(self.resolve(bmc), ("root", "calvin"))

    def test_mixed(self) -> None:
        """A literal user with a password from a Secret."""
        bmc = {"endpoint": "x", "user": "admin", "passFrom": ref("creds", "password", "ns")}
        self.assertEqual(self.resolve(bmc), ("admin", "calvin"))

    def test_nothing_given_resolves_empty(self) -> None:
        """No credentials at all resolve to empty strings (the factory then uses the fake)."""
        self.assertEqual(self.resolve({"endpoint": "x"}), ("", ""))

    def test_user_error_reported_first(self) -> None:
        """When both references are broken, the user's error is the one reported, as in Sidero."""
        bmc = {"endpoint": "x", "userFrom": {}, "passFrom": ref("gone", "password", "ns")}
        failure = self.failureResultOf(
            ensureDeferred(resolve_bmc_credentials(self.store, bmc)), CredentialsError
        )
        self.assertEqual(failure.getErrorMessage(), "missing secretKeyRef")


class EmbeddedStoreCredentialTests(TestCase):
    """Against the real embedded store, so the NotFound wording is the store's own."""

    async def test_real_store_messages(self) -> None:
        """Missing secret and missing key read exactly as in Sidero when the store is real."""
        store, _ = open_inline_store(self)
        await store.create(secret("default", "bmc", user="admin"))
        self.assertEqual(await resolve_credential(store, ref()), "admin")
        with self.assertRaises(CredentialsError) as missing:
            await resolve_credential(store, ref(name="absent"))
        self.assertEqual(
            str(missing.exception), 'error getting secret "absent": secrets "absent" not found'
        )
        with self.assertRaises(CredentialsError) as no_key:
            await resolve_credential(store, ref(key="pass"))
        self.assertEqual(str(no_key.exception), 'secret key "pass" is missing in secret "bmc"')
