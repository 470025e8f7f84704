"""Which power manager a Server gets (spec §3.12), and failure-injection wrapping."""

from __future__ import annotations

import random
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from sidero.config import Settings
from sidero.power.api import APIPowerManager
from sidero.power.factory import PowerManagerFactory
from sidero.power.fake import FailureDice, FailureInjectingPowerManager, FakeFleet, FakePowerManager
from sidero.power.interfaces import ConfigurationError, CredentialsError
from sidero.power.ipmi import IPMIExecutor, IPMIPowerManager
from sidero.threads import ThreadPoolService
from tests.power.helpers import ManualPool, RecordingSession, SecretStore, secret


def server(name: str = "4c4c4544-0000-1000-8000-000000000001", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Server",
            "metadata": {"name": name}, "spec": {"accepted": True, **spec}}


def ref(key: str) -> dict[str, Any]:
    return {"secretKeyRef": {"namespace": "default", "name": "bmc", "key": key}}


class FactoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = SecretStore(secret("default", "bmc", user="admin", password="secret"))
        self.pool = ManualPool()
        self.executor = IPMIExecutor(self.clock, self.pool.run, lambda e: RecordingSession())
        self.fleet = FakeFleet()
        self.factory = PowerManagerFactory(
            self.clock, self.store, self.executor, http=StubTreq(Resource()),  # type: ignore[arg-type]
            fleet=self.fleet,
        )

    def build(self, obj: dict[str, Any]) -> Any:
        return self.successResultOf(self.factory.for_server(obj))

    def test_nothing_configured_is_fake(self) -> None:
        """A Server with neither bmc nor managementApi gets the fake manager."""
        m = self.build(server())
        self.assertIsInstance(m, FakePowerManager)
        self.assertTrue(m.is_fake)
        self.assertEqual(m.name, "4c4c4544-0000-1000-8000-000000000001")

    def test_bmc_with_literals(self) -> None:
        """A BMC with literal credentials gets IPMI with port 623 and lanplus by default."""
        m = self.build(server(bmc={"endpoint": "10.0.0.9", "user": "u", "pass": "p"}))
        self.assertIsInstance(m, IPMIPowerManager)
        self.assertFalse(m.is_fake)
        self.assertEqual((m.endpoint.host, m.endpoint.port, m.endpoint.user, m.endpoint.password,
                          m.endpoint.interface), ("10.0.0.9", 623, "u", "p", "lanplus"))
        self.assertIs(m.executor, self.executor)

    def test_bmc_port_and_interface_kept(self) -> None:
        """An explicit port and interface are used as given."""
        m = self.build(server(bmc={"endpoint": "h", "port": 6230, "interface": "lan",
                                   "user": "u", "pass": "p"}))
        self.assertEqual((m.endpoint.port, m.endpoint.interface), (6230, "lan"))

    def test_bmc_from_secret(self) -> None:
        """userFrom/passFrom are resolved from the Secret."""
        m = self.build(server(bmc={"endpoint": "h", "userFrom": ref("user"), "passFrom": ref("password")}))
        self.assertEqual((m.endpoint.user, m.endpoint.password), ("admin", "secret"))

    def test_incomplete_bmc_is_fake(self) -> None:
        """A BMC without a user or without a password is not usable yet: fake manager."""
        for bmc in ({"endpoint": "h"}, {"endpoint": "h", "user": "u"}, {"endpoint": "h", "pass": "p"}):
            self.assertIsInstance(self.build(server(bmc=bmc)), FakePowerManager, bmc)

    def test_secret_errors_fail_the_build(self) -> None:
        """A broken secret reference fails with the §1.1 message (reported by the controller)."""
        f = self.failureResultOf(self.factory.for_server(
            server(bmc={"endpoint": "h", "user": "u", "passFrom": ref("nope")})), CredentialsError)
        self.assertEqual(f.getErrorMessage(), 'secret key "nope" is missing in secret "bmc"')

    def test_unsupported_interface_fails_the_build(self) -> None:
        """An IPMI interface we cannot speak fails the build with a clear message."""
        f = self.failureResultOf(self.factory.for_server(
            server(bmc={"endpoint": "h", "user": "u", "pass": "p", "interface": "open"})),
            ConfigurationError)
        self.assertIn('unsupported IPMI interface "open"', f.getErrorMessage())

    def test_bad_port_fails_the_build(self) -> None:
        """A non-integer port is refused rather than sent to pyghmi."""
        self.failureResultOf(self.factory.for_server(
            server(bmc={"endpoint": "h", "user": "u", "pass": "p", "port": "623"})), ConfigurationError)

    def test_management_api(self) -> None:
        """managementApi gets the HTTP API manager on that endpoint."""
        m = self.build(server(managementApi={"endpoint": "10.5.0.2:8001"}))
        self.assertIsInstance(m, APIPowerManager)
        self.assertEqual(m.base, "http://10.5.0.2:8001")

    def test_bmc_wins_over_api(self) -> None:
        """With both set, the BMC is used (it is checked first)."""
        m = self.build(server(bmc={"endpoint": "h", "user": "u", "pass": "p"},
                              managementApi={"endpoint": "x:1"}))
        self.assertIsInstance(m, IPMIPowerManager)

    def test_incomplete_bmc_does_not_fall_back_to_api(self) -> None:
        """An incomplete BMC means fake even when a managementApi is also set, as in Sidero."""
        m = self.build(server(bmc={"endpoint": "h"}, managementApi={"endpoint": "x:1"}))
        self.assertIsInstance(m, FakePowerManager)

    def test_fakes_share_the_fleet(self) -> None:
        """Fakes built on successive reconciles record into the same per-server state."""
        self.successResultOf(self.build(server("a")).power_on())
        self.successResultOf(self.build(server("a")).power_off())
        self.assertEqual(self.fleet.machine("a").operations, ["power_on", "power_off"])

    def test_managers_of_one_bmc_share_its_lock(self) -> None:
        """Managers built separately for the same BMC still never run together."""
        spec = {"endpoint": "10.0.0.9", "user": "u", "pass": "p"}
        first = self.build(server(bmc=spec)).power_on()
        second = self.build(server(bmc=spec)).power_off()
        self.assertEqual(len(self.pool.pending), 1)
        self.pool.complete()
        self.successResultOf(first)
        self.assertNoResult(second)
        self.pool.complete()
        self.successResultOf(second)


class FailureWrappingTests(SynchronousTestCase):
    def make(self, explicit: float, silent: float) -> PowerManagerFactory:
        return PowerManagerFactory(
            Clock(), SecretStore(), IPMIExecutor(Clock(), ManualPool().run),
            dice=FailureDice(explicit, silent, random.Random(1)),
        )

    def test_wrapped_when_probabilities_set(self) -> None:
        """With a failure probability, every kind is wrapped and keeps its kind and fakeness."""
        factory = self.make(0.1, 0)
        cases: tuple[tuple[dict[str, Any], str, bool], ...] = (({}, "fake", True),
                                 ({"bmc": {"endpoint": "h", "user": "u", "pass": "p"}}, "ipmi", False),
                                 ({"managementApi": {"endpoint": "x:1"}}, "api", False))
        for spec, kind, fake in cases:
            m = self.successResultOf(factory.for_server(server(**spec)))
            self.assertIsInstance(m, FailureInjectingPowerManager)
            self.assertEqual((m.kind, m.is_fake), (kind, fake))

    def test_not_wrapped_when_zero(self) -> None:
        """All-zero probabilities leave the manager unwrapped."""
        m = self.successResultOf(self.make(0, 0).for_server(server()))
        self.assertIsInstance(m, FakePowerManager)

    def test_from_settings(self) -> None:
        """Production wiring reads both test probabilities from Settings and uses the IPMI pool."""
        pool = ThreadPoolService(Clock(), "ipmi", max_threads=4)
        factory = PowerManagerFactory.from_settings(
            Clock(), SecretStore(), pool,
            Settings(test_power_explicit_failure=0.25, test_power_silent_failure=0.5),
        )
        assert factory.dice is not None
        self.assertEqual((factory.dice.explicit, factory.dice.silent), (0.25, 0.5))
        self.assertEqual(factory.ipmi.run, pool.run)
        self.assertIsNone(PowerManagerFactory.from_settings(Clock(), SecretStore(), pool, Settings()).dice)
