"""The iPXE chain script and the C{/ipxe} decision table (spec §3.2, §3.3, §7)."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from sidero.protocols.http.ipxe import (
    BootQuery,
    BootSettings,
    LookupFailed,
    agent_kernel_args,
    boot_script,
    decide,
    normalize_mac,
    talos_kernel_args,
)

UUID = "11111111-2222-3333-4444-555555555555"
TUNNEL = "fdae:41e4:649b:9303::1"
SETTINGS = BootSettings(api_endpoint="10.5.0.2", api_port=8081, siderolink_server_address=TUNNEL)


class DictLookup:
    """Lookups from dicts; a name in C{failing} raises like an unreachable API."""

    def __init__(self, **kinds: dict[str, dict[str, Any]]) -> None:
        self.kinds = kinds
        self.failing: set[str] = set()

    def _get(self, kind: str, name: str) -> dict[str, Any] | None:
        if name in self.failing:
            raise LookupFailed(f"{kind} {name}: connection refused")
        return self.kinds.get(kind, {}).get(name)

    def server(self, name: str) -> dict[str, Any] | None:
        return self._get("servers", name)

    def server_binding(self, name: str) -> dict[str, Any] | None:
        return self._get("bindings", name)

    def server_class(self, name: str) -> dict[str, Any] | None:
        return self._get("classes", name)

    def environment(self, name: str) -> dict[str, Any] | None:
        return self._get("environments", name)


def ready_env(name: str, args: list[str]) -> dict[str, Any]:
    kernel, initrd = f"http://assets/{name}/vmlinuz", f"http://assets/{name}/initramfs.xz"
    return {
        "metadata": {"name": name},
        "spec": {"kernel": {"url": kernel, "args": args}, "initrd": {"url": initrd}},
        "status": {"conditions": [
            {"type": "Ready", "status": "True", "url": kernel},
            {"type": "Ready", "status": "True", "url": initrd},
        ]},
    }


def server(**spec: Any) -> dict[str, Any]:
    conditions = spec.pop("conditions", [])
    return {"metadata": {"name": UUID}, "spec": {"accepted": True, **spec},
            "status": {"conditions": conditions}}


def binding(server_class: str | None = "workers") -> dict[str, Any]:
    spec: dict[str, Any] = {"metalMachineRef": {"name": "mm", "namespace": "default"}}
    if server_class:
        spec["serverClassRef"] = {"name": server_class}
    return {"metadata": {"name": UUID}, "spec": spec}


PXE_BOOTED = [{"type": "PXEBooted", "status": "True"}]


class BootScriptTests(SynchronousTestCase):
    def test_ipv6_endpoint_fits(self) -> None:
        """The §7 reference case: a bracketed IPv6 endpoint and port 12345 render under 1000 bytes."""
        script = boot_script("[2001:470:6d:30e:e5b8:903e:3701:7332]", 12345)
        self.assertLess(len(script), 1000)
        self.assertIn(b"http://[2001:470:6d:30e:e5b8:903e:3701:7332]:12345/ipxe?uuid=${uuid}", script)

    def test_script_shape(self) -> None:
        """The script starts with the magic, asks for every query parameter and reboots at the end."""
        script = boot_script("10.5.0.2", 8081).decode()
        self.assertTrue(script.startswith("#!ipxe\n"))
        for param in ("mac=${net${i}/mac:hexhyp}", "domain=${domain}", "hostname=${hostname}",
                      "serial=${serial}", "arch=${buildarch}"):
            self.assertIn(param, script)
        self.assertIn("chain --replace", script)
        self.assertTrue(script.rstrip().endswith("reboot"))
        self.assertNotIn("iflinkwait", script, "Debian's 2019 iPXE ROMs lack iflinkwait")

    def test_too_long_refused(self) -> None:
        """An endpoint that makes the script exceed the limit is refused rather than truncated."""
        self.assertRaises(ValueError, boot_script, "x" * 800, 8081)


class QueryTests(SynchronousTestCase):
    def test_mac_forms(self) -> None:
        """Hyphen, colon and dot MACs normalise to lowercase colon form; garbage becomes empty."""
        self.assertEqual(normalize_mac("52-54-00-12-34-5A"), "52:54:00:12:34:5a")
        self.assertEqual(normalize_mac("52:54:00:12:34:56"), "52:54:00:12:34:56")
        self.assertEqual(normalize_mac("5254.0012.3456"), "52:54:00:12:34:56")
        self.assertEqual(normalize_mac("52-54:00-12-34-56"), "")
        self.assertEqual(normalize_mac("zz"), "")

    def test_first_value_wins_and_arch(self) -> None:
        """Repeated keys keep the first value; only arm64 maps to arm64, all else to amd64."""
        q = BootQuery.from_args({b"uuid": [b"a", b"b"], b"arch": [b"arm64"], b"UUID": [b"c"]})
        self.assertEqual((q.uuid, q.arch), ("a", "arm64"))
        self.assertEqual(BootQuery.from_args({b"arch": [b"i386"]}).arch, "amd64")


class DecisionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.lookup = DictLookup(
            servers={}, bindings={}, classes={"workers": {"spec": {}}},
            environments={"default": ready_env("default", ["console=ttyS0"])},
        )

    def ask(self, uuid: str = UUID, mac: str = "52:54:00:12:34:56", arch: str = "amd64") -> Any:
        return decide(BootQuery(uuid=uuid, mac=mac, arch=arch), self.lookup, SETTINGS)

    def test_unknown_server_gets_agent(self) -> None:
        """An unknown UUID boots the agent environment of its architecture."""
        r = self.ask(arch="arm64")
        self.assertEqual((r.status, r.environment), (200, "agent-arm64"))
        self.assertIn(b"kernel /env/agent-arm64/vmlinuz  init_on_alloc=1", r.body)
        self.assertIn(b"sidero.mac=52:54:00:12:34:56 sidero.endpoint=10.5.0.2:8081\n", r.body)
        self.assertTrue(r.body.endswith(b"initrd /env/agent-arm64/initramfs.xz\nboot\n"))

    def test_missing_uuid_gets_agent(self) -> None:
        """No uuid behaves like an unknown server."""
        self.assertEqual(self.ask(uuid="").environment, "agent-amd64")

    def test_unallocated_server_gets_agent(self) -> None:
        """A known server without a ServerBinding boots the agent (to register or wipe)."""
        self.lookup.kinds["servers"][UUID] = server()
        self.assertEqual(self.ask().environment, "agent-amd64")

    def test_allocated_gets_default_with_talos_args(self) -> None:
        """An allocated, not yet installed server boots `default` with the Talos args appended."""
        self.lookup.kinds["servers"][UUID] = server()
        self.lookup.kinds["bindings"][UUID] = binding()
        r = self.ask()
        self.assertEqual((r.status, r.environment), (200, "default"))
        self.assertEqual(
            r.body,
            b"#!ipxe\nkernel /env/default/vmlinuz  console=ttyS0 "
            b"talos.config=http://10.5.0.2:8081/configdata?uuid= "
            b"siderolink.api=10.5.0.2:8081 "
            b"talos.logging.kernel=tcp://[fdae:41e4:649b:9303::1]:4001 "
            b"talos.events.sink=[fdae:41e4:649b:9303::1]:4002\n"
            b"initrd /env/default/initramfs.xz\nboot\n",
        )

    def test_talos_boot_needs_the_siderolink_identity(self) -> None:
        """Before the SideroLink identity is loaded a Talos boot is a LookupFailed (500, iPXE
        retries) rather than a boot without the tunnel args; the agent is still served."""
        self.lookup.kinds["servers"][UUID] = server()
        self.lookup.kinds["bindings"][UUID] = binding()
        early = BootSettings(api_endpoint="10.5.0.2", api_port=8081)
        self.assertRaises(LookupFailed, decide, BootQuery(uuid=UUID), self.lookup, early)
        r = decide(BootQuery(uuid="unknown"), self.lookup, early)
        self.assertEqual((r.status, r.environment), (200, "agent-amd64"))

    def test_environment_precedence(self) -> None:
        """Server environmentRef beats the ServerClass's, which beats `default`."""
        envs = self.lookup.kinds["environments"]
        envs["from-class"] = ready_env("from-class", [])
        envs["from-server"] = ready_env("from-server", [])
        self.lookup.kinds["classes"]["workers"] = {"spec": {"environmentRef": {"name": "from-class"}}}
        self.lookup.kinds["bindings"][UUID] = binding()
        self.lookup.kinds["servers"][UUID] = server()
        self.assertEqual(self.ask().environment, "from-class")
        self.lookup.kinds["servers"][UUID] = server(environmentRef={"name": "from-server"})
        self.assertEqual(self.ask().environment, "from-server")

    def test_missing_environment_or_class_is_404(self) -> None:
        """A referenced Environment or ServerClass that does not exist answers 404 with no body."""
        self.lookup.kinds["servers"][UUID] = server(environmentRef={"name": "nope"})
        self.lookup.kinds["bindings"][UUID] = binding()
        self.assertEqual((self.ask().status, self.ask().body), (404, b""))
        self.lookup.kinds["servers"][UUID] = server()
        self.lookup.kinds["bindings"][UUID] = binding("gone")
        self.assertEqual(self.ask().status, 404)

    def test_not_ready_is_412(self) -> None:
        """An environment whose assets are not downloaded answers 412 naming it."""
        env = ready_env("default", [])
        env["status"]["conditions"][1]["status"] = "False"
        self.lookup.kinds["environments"]["default"] = env
        self.lookup.kinds["servers"][UUID] = server()
        self.lookup.kinds["bindings"][UUID] = binding()
        r = self.ask()
        self.assertEqual((r.status, r.body), (412, b'environment "default" is not ready'))

    def test_boot_from_disk_methods(self) -> None:
        """PXEBooted servers boot from disk by server method, then class method, then default."""
        self.lookup.kinds["bindings"][UUID] = binding()
        self.lookup.kinds["servers"][UUID] = server(conditions=PXE_BOOTED)
        self.assertEqual(self.ask().body, b"#!ipxe\nexit\n")
        self.lookup.kinds["classes"]["workers"] = {"spec": {"bootFromDiskMethod": "ipxe-sanboot"}}
        self.assertEqual(self.ask().body, b"#!ipxe\nsanboot --no-describe --drive 0x80\n")
        self.lookup.kinds["servers"][UUID] = server(conditions=PXE_BOOTED, bootFromDiskMethod="http-404")
        self.assertEqual((self.ask().status, self.ask().body), (404, b""))
        self.lookup.kinds["servers"][UUID] = server(conditions=PXE_BOOTED, bootFromDiskMethod="bogus")
        self.assertEqual(self.ask().body, b"#!ipxe\nexit\n")

    def test_boot_from_disk_with_missing_class_is_500(self) -> None:
        """Spec 3.2 step 2.3: a missing ServerClass is a 500 with the reason and an Event on
        the Server, not a silent fall-back to the default method."""
        self.lookup.kinds["bindings"][UUID] = binding("gone")
        self.lookup.kinds["servers"][UUID] = server(conditions=PXE_BOOTED)
        r = self.ask()
        self.assertEqual(r.status, 500)
        self.assertEqual(r.body, f'serverclass "gone" of server {UUID} not found: cannot choose'
                                 " its boot-from-disk method\n".encode())
        assert r.event is not None
        self.assertEqual((r.event.obj["metadata"]["name"], r.event.reason),
                         (UUID, "BootFromDiskFailed"))
        self.assertEqual(r.event.message + "\n", r.body.decode())
        # The Server's own method needs no class: no error then.
        self.lookup.kinds["servers"][UUID] = server(conditions=PXE_BOOTED,
                                                    bootFromDiskMethod="ipxe-sanboot")
        self.assertEqual(self.ask().status, 200)

    def test_sha512_mismatch_is_412_with_both_digests(self) -> None:
        """A Ready=False condition with a message (the Environment controller's sha512
        mismatch) is named in the 412 and recorded on the Server."""
        env = ready_env("default", [])
        env["status"]["conditions"][0] = {
            "type": "Ready", "status": "False", "url": env["spec"]["kernel"]["url"],
            "sha512": "aa", "reason": "Sha512Mismatch",
            "message": "kernel: sha512 mismatch for http://assets/default/vmlinuz: expected aa, got bb"}
        self.lookup.kinds["environments"]["default"] = env
        self.lookup.kinds["servers"][UUID] = server()
        self.lookup.kinds["bindings"][UUID] = binding()
        r = self.ask()
        self.assertEqual(r.status, 412)
        self.assertEqual(r.body, b'environment "default" is not ready: kernel: sha512 mismatch for'
                                 b" http://assets/default/vmlinuz: expected aa, got bb\n")
        assert r.event is not None
        self.assertEqual(r.event.reason, "EnvironmentNotReady")
        self.assertIn("expected aa, got bb", r.event.message)

    def test_pxe_boot_always(self) -> None:
        """pxeBootAlways keeps serving the OS environment after installation."""
        self.lookup.kinds["bindings"][UUID] = binding()
        self.lookup.kinds["servers"][UUID] = server(conditions=PXE_BOOTED, pxeBootAlways=True)
        self.assertEqual(self.ask().environment, "default")

    def test_lookup_failure_propagates(self) -> None:
        """A lookup that fails for another reason than absence is a LookupFailed (HTTP 500)."""
        self.lookup.failing.add(UUID)
        self.assertRaises(LookupFailed, self.ask)


class KernelArgsTests(SynchronousTestCase):
    def test_agent_args_exact(self) -> None:
        """The agent command line is exactly the one of §3.2."""
        args = agent_kernel_args(SETTINGS, "52:54:00:12:34:56")
        self.assertEqual(
            " ".join(args),
            "init_on_alloc=1 slab_nomerge pti=on consoleblank=0 nvme_core.io_timeout=4294967295 "
            "printk.devkmsg=on selinux=1 module.sig_enforce=1 proc_mem.force_override=never "
            "console=tty0 console=ttyS0 initrd=initramfs.xz panic=30 sidero.mac=52:54:00:12:34:56 "
            "sidero.endpoint=10.5.0.2:8081",
        )

    def test_extra_args_replace_in_place(self) -> None:
        """A key in the extra args replaces every value of that key where it stood; new keys append."""
        settings = BootSettings("10.5.0.2", 8081, extra_agent_kernel_args="console=tty1 console=ttyS1 foo=bar")
        args = agent_kernel_args(settings, "")
        i = args.index("console=tty1")
        self.assertEqual(args[i : i + 3], ["console=tty1", "console=ttyS1", "initrd=initramfs.xz"])
        self.assertEqual(args[-1], "foo=bar")
        self.assertNotIn("console=ttyS0", args)

    def test_every_talos_boot_gets_the_siderolink_args(self) -> None:
        """talos.config, siderolink.api, talos.logging.kernel and talos.events.sink are always
        appended, in that order (IPv6 endpoint and tunnel bracketed)."""
        settings = BootSettings("fd00::2", 8081, siderolink_server_address="fdae:1::1")
        self.assertEqual(talos_kernel_args(settings, ["console=ttyS0"]), [
            "console=ttyS0",
            "talos.config=http://[fd00::2]:8081/configdata?uuid=",
            "siderolink.api=[fd00::2]:8081",
            "talos.logging.kernel=tcp://[fdae:1::1]:4001",
            "talos.events.sink=[fdae:1::1]:4002",
        ])
        self.assertRaises(ValueError, talos_kernel_args, BootSettings("fd00::2", 8081), [])

    def test_talos_args_not_duplicated(self) -> None:
        """A Talos arg already present in the environment is not appended again."""
        settings = BootSettings("fd00::2", 8081, siderolink_server_address="fdae:1::1")
        args = talos_kernel_args(settings, ["talos.config=http://elsewhere/"])
        self.assertEqual(args, [
            "talos.config=http://elsewhere/",
            "siderolink.api=[fd00::2]:8081",
            "talos.logging.kernel=tcp://[fdae:1::1]:4001",
            "talos.events.sink=[fdae:1::1]:4002",
        ])


class AgentArgsCacheTests(SynchronousTestCase):
    def test_cached_template_is_the_same_answer(self) -> None:
        """The per-settings template gives exactly agent_kernel_args, for any MAC and extras."""
        from sidero.protocols.http.ipxe import agent_kernel_args, agent_kernel_args_for

        for extra in ("", "console=ttyS1 sidero.mac=00:11:22:33:44:55", "quiet talos.platform=x"):
            settings = BootSettings("10.0.0.1", 8081, extra_agent_kernel_args=extra)
            for mac in ("", "52:54:00:12:34:56", "aa:bb:cc:dd:ee:ff"):
                self.assertEqual(agent_kernel_args_for(settings, mac), agent_kernel_args(settings, mac))
