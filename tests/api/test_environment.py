"""Talos default kernel args, the default Environment and readiness (sidero.api.environment)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from sidero.api import environment as env

V1_13_ARGS = (
    "console=tty0 console=ttyS0 consoleblank=0 earlyprintk=ttyS0 init_on_alloc=1 initrd=initramfs.xz "
    "module.sig_enforce=1 nvme_core.io_timeout=4294967295 printk.devkmsg=on proc_mem.force_override=never "
    "pti=on selinux=1 slab_nomerge= talos.platform=metal"
)
BASE = ["init_on_alloc=1", "slab_nomerge=", "pti=on", "consoleblank=0",
        "nvme_core.io_timeout=4294967295", "printk.devkmsg=on"]
IMA = ["ima_template=ima-ng", "ima_appraise=fix", "ima_hash=sha512"]


class TalosDefaultArgsTests(SynchronousTestCase):
    def test_old_release_has_ima_only(self) -> None:
        """Before 1.10 only IMA is added."""
        self.assertEqual(env.talos_default_args("v1.9.5"), BASE + IMA)

    def test_1_10_has_ima_and_selinux(self) -> None:
        """1.10.x is both <= 1.10.99 (IMA) and >= 1.10.0 (selinux)."""
        self.assertEqual(env.talos_default_args("v1.10.3"), BASE + IMA + ["selinux=1"])

    def test_1_12(self) -> None:
        """1.12 drops IMA and adds module signature enforcement."""
        self.assertEqual(env.talos_default_args("1.12.0"), BASE + ["selinux=1", "module.sig_enforce=1"])

    def test_1_13_prerelease(self) -> None:
        """A prerelease of 1.13 counts as 1.13 and gets proc_mem."""
        self.assertEqual(env.talos_default_args("v1.13.0-beta.1"),
                         BASE + ["selinux=1", "module.sig_enforce=1", "proc_mem.force_override=never"])

    def test_empty_and_garbage_mean_latest(self) -> None:
        """Unparsable or empty versions get every modern argument and no IMA."""
        latest = BASE + ["selinux=1", "module.sig_enforce=1", "proc_mem.force_override=never"]
        self.assertEqual(env.talos_default_args(""), latest)
        self.assertEqual(env.talos_default_args("latest"), latest)

    def test_parse_version(self) -> None:
        """Leading v, short versions and suffixes are tolerated."""
        self.assertEqual(env.parse_version("v1.13"), (1, 13, 0))
        self.assertEqual(env.parse_version("1.2.3+build"), (1, 2, 3))
        self.assertIsNone(env.parse_version("main"))


class DefaultEnvironmentTests(SynchronousTestCase):
    def test_v1_13_exact_args(self) -> None:
        """The default environment for v1.13.0 has exactly the §1.3 command line."""
        e = env.default_environment("v1.13.0")
        self.assertEqual(" ".join(e["spec"]["kernel"]["args"]), V1_13_ARGS)

    def test_urls_and_identity(self) -> None:
        """Kernel and initrd come from the Talos release; the object is named default."""
        e = env.default_environment("v1.13.0")
        self.assertEqual(e["metadata"]["name"], "default")
        self.assertEqual(e["apiVersion"], "metal.sidero.dev/v1alpha2")
        self.assertEqual(e["spec"]["kernel"]["url"],
                         "https://github.com/siderolabs/talos/releases/download/v1.13.0/vmlinuz-amd64")
        self.assertEqual(e["spec"]["initrd"]["url"],
                         "https://github.com/siderolabs/talos/releases/download/v1.13.0/initramfs-amd64.xz")

    def test_asset_names(self) -> None:
        """Assets are stored as vmlinuz and initramfs.xz."""
        self.assertEqual((env.KERNEL_ASSET, env.INITRD_ASSET), ("vmlinuz", "initramfs.xz"))


class ReadinessTests(SynchronousTestCase):
    def env(self, conditions: list[dict[str, str]]) -> dict:
        return {"spec": {"kernel": {"url": "http://k"}, "initrd": {"url": "http://i"}},
                "status": {"conditions": conditions}}

    def test_ready_when_every_url_is_true(self) -> None:
        """Both assets Ready=True make the environment ready."""
        self.assertTrue(env.environment_is_ready(self.env([
            {"type": "Ready", "status": "True", "url": "http://k"},
            {"type": "Ready", "status": "True", "url": "http://i"}])))

    def test_not_ready_when_one_is_false_or_missing(self) -> None:
        """A False or missing asset condition keeps it not ready."""
        self.assertFalse(env.environment_is_ready(self.env([
            {"type": "Ready", "status": "True", "url": "http://k"},
            {"type": "Ready", "status": "False", "url": "http://i"}])))
        self.assertFalse(env.environment_is_ready(self.env([
            {"type": "Ready", "status": "True", "url": "http://k"}])))

    def test_no_urls_is_ready(self) -> None:
        """An environment without URLs (the agent one) is always ready."""
        self.assertTrue(env.environment_is_ready({"spec": {"kernel": {"args": ["a"]}}}))


class AccessorTests(SynchronousTestCase):
    def test_bmc_defaults(self) -> None:
        """Port 0 means 623 and the interface defaults to lanplus."""
        bmc = env.server_bmc({"spec": {"bmc": {"endpoint": "10.0.0.1", "port": 0}}})
        assert bmc is not None
        self.assertEqual((bmc["port"], bmc["interface"]), (623, "lanplus"))
        self.assertIsNone(env.server_bmc({"spec": {}}))

    def test_refs(self) -> None:
        """ref_name reads spec.<ref>.name and tolerates absence."""
        self.assertEqual(env.ref_name({"spec": {"environmentRef": {"name": "e"}}}, "environmentRef"), "e")
        self.assertEqual(env.ref_name({}, "environmentRef"), "")
