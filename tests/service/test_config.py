"""Settings table: precedence, parsing, one-line errors, Go-style booleans, README table."""

from __future__ import annotations

import io
import ipaddress
from dataclasses import fields
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from sidero import config
from sidero.config import (
    SERVICES,
    SETTINGS,
    ConfigError,
    Host,
    Settings,
    SettingsOptions,
    StartupError,
    parse_duration,
    resolve,
)
from sidero.netinfo import IFF_LOOPBACK, IFF_UP, InterfaceAddress

CM = "SIDERO_CONTROLLER_MANAGER_"


def addr(text: str, interface: str = "eth0", index: int = 2, **kw: Any) -> InterfaceAddress:
    return InterfaceAddress(interface, index, ipaddress.ip_address(text), 24, **kw)


HOST_ADDRESSES = [
    addr("127.0.0.1", "lo", 1, link_flags=IFF_UP | IFF_LOOPBACK),
    addr("192.0.2.10"),
]


def host(root: bool = True, writable: bool = True, addresses: list[InterfaceAddress] | None = None) -> Host:
    found = HOST_ADDRESSES if addresses is None else addresses
    return Host(is_root=root, home="/home/op", addresses=lambda: found, writable=lambda p: writable)


def settings(flags: dict[str, str] | None = None, env: dict[str, str] | None = None, **kw: Any) -> Settings:
    return resolve(flags or {}, env or {}, host(**kw)).settings


# One sample per kind of setting: (name, flag text, env var, env text, expected from flag,
# expected from env, expected default).
SAMPLES: list[tuple[str, str, str, str, Any, Any, Any]] = [
    ("api_port", "9000", CM + "API_PORT", "9001", 9000, 9001, 8081),
    ("boot_from_disk_method", "http-404", CM + "BOOT_FROM_DISK_METHOD", "ipxe-sanboot",
     "http-404", "ipxe-sanboot", "ipxe-exit"),
    ("auto_accept_servers", "true", CM + "AUTO_ACCEPT_SERVERS", "true", True, True, False),
    ("insecure_wipe", "false", CM + "INSECURE_WIPE", "false", False, False, True),
    ("server_reboot_timeout", "90s", CM + "SERVER_REBOOT_TIMEOUT", "1h30m", 90.0, 5400.0, 1200.0),
    ("ipmi_pxe_method", "bios", CM + "IPMI_PXE_METHOD", "BIOS", "bios", "bios", "uefi"),
    ("test_power_explicit_failure", "0.5", CM + "TEST_POWER_EXPLICIT_FAILURE", "1", 0.5, 1.0, 0.0),
    ("test_power_silent_failure", "0.25", CM + "TEST_POWER_SILENT_FAILURE", "0.75", 0.25, 0.75, 0.0),
    ("events_negative_address_filter", "10.0.0.0/8", CM + "EVENTS_NEGATIVE_ADDRESS_FILTER",
     "10.5.0.0/16, fd00::/8", (ipaddress.ip_network("10.0.0.0/8"),),
     (ipaddress.ip_network("10.5.0.0/16"), ipaddress.ip_network("fd00::/8")), ()),
    ("extra_agent_kernel_args", "console=ttyS0", CM + "EXTRA_AGENT_KERNEL_ARGS", "-",
     "console=ttyS0", "", ""),
    ("siderolink_port", "51000", CM + "SIDEROLINK_PORT", "51001", 51000, 51001, 51821),
    ("state_dir", "/srv/a", "SIDERO_STATE_DIR", "/srv/b", "/srv/a", "/srv/b", "/var/lib/sidero"),
    ("store", "embedded", "SIDERO_STORE", "embedded", "embedded", "embedded", "embedded"),
    ("listen_address", "127.0.0.1", "SIDERO_LISTEN_ADDRESS", "::1", "127.0.0.1", "::1", ""),
    ("tftp_port", "6969", "SIDERO_TFTP_PORT", "7070", 6969, 7070, 69),
    ("dhcp_port", "6767", "SIDERO_DHCP_PORT", "6768", 6767, 6768, 67),
    ("dhcp_proxy_port", "4012", "SIDERO_DHCP_PROXY_PORT", "4013", 4012, 4013, 4011),
    ("dhcp_interface", "br0", "SIDERO_DHCP_INTERFACE", "eth1", "br0", "eth1", ""),
    ("ipxe_dir", "/opt/ipxe", "SIDERO_IPXE_DIR", "/srv/ipxe", "/opt/ipxe", "/srv/ipxe", ""),
    ("log_format", "json", "SIDERO_LOG_FORMAT", "json", "json", "json", "text"),
    ("log_level", "debug", "SIDERO_LOG_LEVEL", "warning", "debug", "warn", "info"),
    ("enable_leader_election", "false", "SIDERO_ENABLE_LEADER_ELECTION", "0", False, False, True),
    ("webhook_port", "9444", "SIDERO_WEBHOOK_PORT", "9445", 9444, 9445, 9443),
    ("metrics_port", "8444", "SIDERO_METRICS_PORT", "8445", 8444, 8445, 8443),
    ("kubeconfig", "/etc/k.yaml", "KUBECONFIG", "/root/.kube/config", "/etc/k.yaml",
     "/root/.kube/config", ""),
]


class TableTests(SynchronousTestCase):
    """The settings table itself."""

    def test_every_setting_reaches_settings(self) -> None:
        """Every row is a Settings field or a --disable-<service> flag, and vice versa."""
        names = {s.name for s in SETTINGS}
        field_names = {f.name for f in fields(Settings)} - {"disabled"}
        disables = {"disable_" + s.replace("-", "_") for s in SERVICES}
        self.assertEqual(names, field_names | disables)

    def test_every_setting_has_a_variable(self) -> None:
        """Every setting can be set from the environment, with a SIDERO_ name first."""
        for s in SETTINGS:
            self.assertTrue(s.env, s.name)
            self.assertTrue(s.env[0].startswith("SIDERO_") or s.name == "kubeconfig", s.name)

    def test_defaults_parse(self) -> None:
        """Every literal default is valid for its own parser."""
        for s in SETTINGS:
            if s.default:
                s.parse(s.default)

    def test_markdown_lists_every_flag_and_variable(self) -> None:
        """The README table has one row per setting naming its flag and variables."""
        table = config.markdown_table()
        rows = table.strip().splitlines()
        self.assertEqual(len(rows), len(SETTINGS) + 2 + 5 + len(config.GO_FLAGS))
        for s in SETTINGS:
            self.assertIn(f"`{s.flag}`", table)
            for v in s.env:
                self.assertIn(f"`{v}`", table)

    def test_main_prints_markdown(self) -> None:
        """C{python -m sidero.config --markdown} exits 0; anything else is a usage error."""
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(config.main(["--markdown"], out, err), 0)
        self.assertEqual(out.getvalue(), config.markdown_table())
        self.assertEqual(config.main([], out, err), 2)
        self.assertIn("usage", err.getvalue())


class PrecedenceTests(SynchronousTestCase):
    """Flag wins over variable wins over default, for every kind of setting."""

    def test_samples(self) -> None:
        """Each sample resolves to the flag value, else the variable value, else the default."""
        for name, flag_text, var, env_text, from_flag, from_env, default in SAMPLES:
            with self.subTest(name=name):
                both = settings({name: flag_text}, {var: env_text})
                self.assertEqual(getattr(both, name), from_flag)
                only_env = settings({}, {var: env_text})
                self.assertEqual(getattr(only_env, name), from_env)
                self.assertEqual(getattr(settings(), name), default)

    def test_sources_recorded(self) -> None:
        """Resolution records where each value came from."""
        r = resolve({"api_port": "1"}, {CM + "IPMI_PXE_METHOD": "bios"}, host())
        self.assertEqual(r.sources["api_port"], "--api-port")
        self.assertEqual(r.sources["ipmi_pxe_method"], CM + "IPMI_PXE_METHOD")
        self.assertEqual(r.sources["tftp_port"], "default")

    def test_http_port_sources(self) -> None:
        """The bind port is 8081 unless CONTAINER_API_PORT or --http-port is set (spec 3.13)."""
        self.assertEqual(settings({"api_port": "9000"}).http_port, 8081)
        self.assertEqual(settings({}, {CM + "API_PORT": "9100"}).http_port, 8081)
        self.assertEqual(settings({}, {CM + "CONTAINER_API_PORT": "8080"}).http_port, 8080)
        self.assertEqual(
            settings({"http_port": "7000"}, {CM + "CONTAINER_API_PORT": "8080"}).http_port, 7000
        )
        self.assertEqual(
            settings({}, {"SIDERO_HTTP_PORT": "7001", CM + "CONTAINER_API_PORT": "8080"}).http_port,
            7001,
        )

    def test_api_endpoint_sources(self) -> None:
        """Flag, then SIDERO_CONTROLLER_MANAGER_API_ENDPOINT, then API_ENDPOINT, then chosen."""
        env = {CM + "API_ENDPOINT": "10.1.1.1", "API_ENDPOINT": "10.2.2.2"}
        self.assertEqual(settings({"api_endpoint": "sidero.lan"}, env).api_endpoint, "sidero.lan")
        self.assertEqual(settings({}, env).api_endpoint, "10.1.1.1")
        self.assertEqual(settings({}, {CM + "API_ENDPOINT": "-", "API_ENDPOINT": "10.2.2.2"}).api_endpoint,
                         "10.2.2.2")
        self.assertEqual(settings({"api_endpoint": "-"}, {"API_ENDPOINT": "10.2.2.2"}).api_endpoint,
                         "10.2.2.2")
        self.assertEqual(settings().api_endpoint, "192.0.2.10")

    def test_api_endpoint_choice_is_noted(self) -> None:
        """A chosen endpoint is reported with the reason for the log."""
        r = resolve({}, {}, host())
        (note,) = [n for n in r.notes if "endpoint" in n.fields]
        self.assertEqual(note.fields["endpoint"], "192.0.2.10")
        self.assertIn("eth0", note.fields["reason"])

    def test_no_endpoint_is_one_line_error(self) -> None:
        """With only loopback addresses and nothing configured, start-up fails clearly."""
        with self.assertRaises(StartupError) as caught:
            resolve({}, {}, host(addresses=[HOST_ADDRESSES[0]]))
        self.assertIn("--api-endpoint", str(caught.exception))
        self.assertNotIn("\n", str(caught.exception))

    def test_ipv6_endpoint_brackets_removed(self) -> None:
        """A bracketed IPv6 literal is stored bare."""
        self.assertEqual(settings({"api_endpoint": "[fd00::1]"}).api_endpoint, "fd00::1")

    def test_siderolink_endpoint_defaults_to_api_endpoint(self) -> None:
        """An empty or - SideroLink endpoint means the API endpoint."""
        self.assertEqual(settings({"api_endpoint": "10.9.9.9"}).siderolink_endpoint, "10.9.9.9")
        s = settings({"api_endpoint": "10.9.9.9"}, {CM + "SIDEROLINK_ENDPOINT": "-"})
        self.assertEqual(s.siderolink_endpoint, "10.9.9.9")
        s = settings({"api_endpoint": "10.9.9.9"}, {CM + "SIDEROLINK_ENDPOINT": "wg.example"})
        self.assertEqual(s.siderolink_endpoint, "wg.example")

    def test_webhook_url_defaults_to_api_endpoint(self) -> None:
        """The webhook URL is https://<api-endpoint>:<webhook-port> unless given; https only."""
        self.assertEqual(settings({"api_endpoint": "10.9.9.9"}).webhook_url, "https://10.9.9.9:9443")
        self.assertEqual(settings({"api_endpoint": "fd00::1", "webhook_port": "8443"}).webhook_url,
                         "https://[fd00::1]:8443")
        s = settings({"api_endpoint": "10.9.9.9", "webhook_url": "https://sidero.example:9443/"})
        self.assertEqual(s.webhook_url, "https://sidero.example:9443")
        with self.assertRaises(ConfigError):
            settings({"api_endpoint": "10.9.9.9", "webhook_url": "http://sidero.example:9443"})

    def test_talos_assets_url(self) -> None:
        """Talos assets come from GitHub releases unless a mirror URL (http or https) is given."""
        self.assertEqual(settings({"api_endpoint": "10.9.9.9"}).talos_assets_url,
                         "https://github.com/siderolabs/talos/releases/download")
        s = settings({"api_endpoint": "10.9.9.9"}, {"SIDERO_TALOS_ASSETS_URL": "http://mirror.lan/talos/"})
        self.assertEqual(s.talos_assets_url, "http://mirror.lan/talos")
        for bad in ("mirror.lan/talos", "ftp://mirror.lan", "http:///x", "http://m/x?a=b"):
            with self.assertRaises(ConfigError):
                settings({"api_endpoint": "10.9.9.9", "talos_assets_url": bad})

    def test_tls_min_version_takes_go_names(self) -> None:
        """--tls-min-version takes Go's constant names in any case and keeps their spelling."""
        self.assertEqual(settings({"api_endpoint": "10.9.9.9"}).tls_min_version, "VersionTLS12")
        self.assertEqual(settings({"api_endpoint": "10.9.9.9", "tls_min_version": "versiontls13"})
                         .tls_min_version, "VersionTLS13")
        with self.assertRaises(ConfigError):
            settings({"api_endpoint": "10.9.9.9", "tls_min_version": "VersionTLS10"})

    def test_empty_variable_is_unset(self) -> None:
        """An empty variable (as environment files write them) leaves the default in place."""
        self.assertEqual(settings({}, {CM + "API_PORT": ""}).api_port, 8081)
        self.assertEqual(settings({}, {"SIDERO_LOG_LEVEL": " "}).log_level, "info")

    def test_disable_flags(self) -> None:
        """Each --disable-<service> flag or variable removes that service from Settings."""
        for service in SERVICES:
            name = "disable_" + service.replace("-", "_")
            with self.subTest(service=service):
                s = settings({name: "true"})
                self.assertFalse(s.enabled(service))
                self.assertEqual(s.disabled, {service})
                s = settings({}, {"SIDERO_" + name.upper(): "true"})
                self.assertFalse(s.enabled(service))
        self.assertFalse(settings({}, {CM + "DISABLE_DHCP_PROXY": "true"}).enabled("dhcp-proxy"))
        self.assertTrue(settings().enabled("tftp"))
        self.assertRaises(KeyError, settings().enabled, "nope")

    def test_store_auto(self) -> None:
        """auto picks kubernetes with a kubeconfig or in a pod, embedded otherwise."""
        self.assertEqual(settings().store, "embedded")
        self.assertEqual(settings({}, {"KUBECONFIG": "/k"}).store, "kubernetes")
        pod = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
        self.assertEqual(settings({}, pod).store, "kubernetes")
        self.assertEqual(settings({"store": "embedded"}, pod).store, "embedded")

    def test_management_socket_follows_state_dir(self) -> None:
        """The management socket defaults into the state directory."""
        s = settings({"state_dir": "/srv/sidero"})
        self.assertEqual(s.management_socket, "/srv/sidero/sidero.sock")
        self.assertEqual(s.database_path, "/srv/sidero/state.db")

    def test_management_socket_too_long(self) -> None:
        """A socket path longer than sun_path allows is refused when set, warned when derived."""
        long_path = "/" + "x" * 120
        with self.assertRaises(ConfigError) as caught:
            resolve({"management_socket": long_path + "/s.sock"}, {}, host())
        self.assertIn("--management-socket", str(caught.exception))
        r = resolve({"state_dir": long_path}, {}, host())
        self.assertTrue(any("Management socket" in n.format for n in r.notes))

    def test_state_dir_fallback_when_not_root(self) -> None:
        """Not root and /var/lib/sidero not writable: XDG_STATE_HOME or ~/.local/state, noted."""
        r = resolve({}, {"XDG_STATE_HOME": "/xdg"}, host(root=False, writable=False))
        self.assertEqual(r.settings.state_dir, "/xdg/sidero")
        self.assertTrue(any(n.level == "warn" for n in r.notes))
        s = settings(root=False, writable=False)
        self.assertEqual(s.state_dir, "/home/op/.local/state/sidero")
        self.assertEqual(s.management_socket, "/home/op/.local/state/sidero/sidero.sock")

    def test_state_dir_kept_when_root_or_writable_or_explicit(self) -> None:
        """The fallback only replaces the default, and only when it cannot be used."""
        self.assertEqual(settings(root=True, writable=False).state_dir, "/var/lib/sidero")
        self.assertEqual(settings(root=False, writable=True).state_dir, "/var/lib/sidero")
        self.assertEqual(settings({"state_dir": "/x"}, root=False, writable=False).state_dir, "/x")

    def test_paths(self) -> None:
        """TFTP roots: patched binaries first, then --ipxe-dir, then Debian's iPXE."""
        s = settings({"state_dir": "/s", "ipxe_dir": "/i"})
        self.assertEqual(s.tftp_roots, ("/s/tftp", "/i", "/usr/lib/ipxe"))
        self.assertEqual(settings({"state_dir": "/s"}).tftp_roots, ("/s/tftp", "/usr/lib/ipxe"))


# (setting name, bad text, accepted text fragment)
INVALID: list[tuple[str, str, str]] = [
    ("api_endpoint", "http://x:8081", "a host name or IP address"),
    ("api_port", "0", "a port number from 1 to 65535"),
    ("api_port", "65536", "a port number"),
    ("http_port", "eighty", "a port number"),
    ("siderolink_endpoint", "a b", "a host name"),
    ("boot_from_disk_method", "pxe", "one of ipxe-exit, http-404, ipxe-sanboot"),
    ("auto_accept_servers", "maybe", "true or false"),
    ("server_reboot_timeout", "20", "a Go duration"),
    ("server_reboot_timeout", "-5m", "a Go duration"),
    ("ipmi_pxe_method", "foo", "one of uefi, bios"),
    ("events_negative_address_filter", "10.0.0.0", "comma-separated CIDRs"),
    ("events_negative_address_filter", "10.0.0.0/33", "comma-separated CIDRs"),
    ("test_power_explicit_failure", "1.5", "a probability from 0 to 1"),
    ("test_power_silent_failure", "nan", "a probability"),
    ("store", "etcd", "one of auto, embedded, kubernetes"),
    ("listen_address", "localhost", "an IP address"),
    ("dhcp_interface", "a/b", "interface names separated by commas"),
    ("dhcp_interface", "averyveryverylongname", "interface names separated by commas"),
    ("log_format", "xml", "one of text, json"),
    ("log_level", "loud", "one of debug"),
    ("state_dir", "", "a directory path"),
    ("tftp_port", "-1", "a port number"),
    ("disable_tftp", "yesplease", "true or false"),
]


class InvalidValueTests(SynchronousTestCase):
    """Every invalid value gives one line naming option, value, source and what is accepted."""

    def test_invalid_from_flag(self) -> None:
        """A bad flag value names the flag as its source."""
        for name, bad, accepted in INVALID:
            setting = config.SETTINGS_BY_NAME[name]
            with self.subTest(name=name, bad=bad):
                with self.assertRaises(ConfigError) as caught:
                    resolve({name: bad}, {}, host())
                message = str(caught.exception)
                self.assertEqual(
                    message.partition(": expected")[0],
                    f'invalid value "{bad}" for {setting.flag} (from {setting.flag})',
                )
                self.assertIn("expected " + accepted, message)
                self.assertNotIn("\n", message)

    def test_invalid_from_variable(self) -> None:
        """A bad variable value names the variable as its source."""
        for name, bad, accepted in INVALID:
            setting = config.SETTINGS_BY_NAME[name]
            if not bad.strip():
                continue  # an empty variable means "unset"
            with self.subTest(name=name, bad=bad):
                var = setting.env[-1]
                with self.assertRaises(ConfigError) as caught:
                    resolve({}, {var: bad}, host())
                self.assertIn(f"(from {var}): expected {accepted}", str(caught.exception))

    def test_example_message(self) -> None:
        """The message reads exactly as documented."""
        with self.assertRaises(ConfigError) as caught:
            resolve({}, {CM + "IPMI_PXE_METHOD": "foo"}, host())
        self.assertEqual(
            str(caught.exception),
            'invalid value "foo" for --ipmi-pxe-method (from '
            "SIDERO_CONTROLLER_MANAGER_IPMI_PXE_METHOD): expected one of uefi, bios",
        )


class DurationTests(SynchronousTestCase):
    """Go duration strings."""

    def test_valid(self) -> None:
        """Go's spellings give seconds."""
        cases = {"20m": 1200.0, "1h30m": 5400.0, "90s": 90.0, "0": 0.0, "1.5s": 1.5,
                 "500ms": 0.5, "2h": 7200.0, "1m30.5s": 90.5, "10us": 1e-5, "3µs": 3e-6,
                 "100ns": 1e-7, ".5m": 30.0}
        for text, seconds in cases.items():
            with self.subTest(text=text):
                self.assertAlmostEqual(parse_duration(text), seconds)

    def test_invalid(self) -> None:
        """Bare numbers, unknown units, signs and junk are refused."""
        for text in ["", "20", "1d", "m", "-1s", "+1s", "1h 30m", "1.s.", "h1", "1hm", "."]:
            with self.subTest(text=text):
                self.assertRaises(ValueError, parse_duration, text)


class OptionsTests(SynchronousTestCase):
    """The generated twistd options."""

    def parse(self, argv: list[str], env: dict[str, str] | None = None) -> SettingsOptions:
        options = SettingsOptions(environ=env or {}, host=host(), stderr=io.StringIO())
        options.parseOptions(argv)
        return options

    def fails(self, argv: list[str], env: dict[str, str] | None = None) -> str:
        stderr = io.StringIO()
        options = SettingsOptions(environ=env or {}, host=host(), stderr=stderr)
        with self.assertRaises(SystemExit) as caught:
            options.parseOptions(argv)
        self.assertEqual(caught.exception.code, 1)
        return stderr.getvalue()

    def test_every_setting_is_an_option(self) -> None:
        """Every row becomes --flag (and --no-flag for booleans) in the usage text."""
        usage_text = str(SettingsOptions(environ={}))
        for s in SETTINGS:
            self.assertIn(s.flag, usage_text)
            if s.boolean:
                self.assertIn("--no-" + s.flag[2:], usage_text)

    def test_flags_parse(self) -> None:
        """Values, flags and --no- flags reach Settings."""
        o = self.parse(["--api-endpoint", "10.0.0.5", "--api-port=9000", "--auto-accept-servers",
                        "--no-insecure-wipe", "--disable-dhcp-proxy", "--disable-tftp"])
        s = o.settings
        self.assertEqual((s.api_endpoint, s.api_port, s.http_port), ("10.0.0.5", 9000, 8081))
        self.assertTrue(s.auto_accept_servers)
        self.assertFalse(s.insecure_wipe)
        self.assertEqual(s.disabled, {"dhcp-proxy", "tftp"})

    def test_go_style_booleans(self) -> None:
        """--x=true / --x=false work like --x / --no-x, last one winning."""
        s = self.parse(["--auto-accept-servers=true", "--insecure-wipe=false",
                        "--enable-leader-election=0", "--disable-http=True"]).settings
        self.assertTrue(s.auto_accept_servers)
        self.assertFalse(s.insecure_wipe)
        self.assertFalse(s.enable_leader_election)
        self.assertFalse(s.enabled("http"))
        s = self.parse(["--auto-accept-servers", "--auto-accept-servers=false"]).settings
        self.assertFalse(s.auto_accept_servers)

    def test_go_style_rewrite_stops_at_double_dash(self) -> None:
        """Arguments after -- are left alone."""
        self.assertEqual(
            config.rewrite_go_booleans(["--insecure-wipe=false", "--", "--insecure-wipe=true"]),
            ["--no-insecure-wipe", "--", "--insecure-wipe=true"],
        )

    def test_flag_beats_environment(self) -> None:
        """A flag wins over the variable for the same setting."""
        s = self.parse(["--no-auto-bmc-setup"], {CM + "AUTO_BMC_SETUP": "true"}).settings
        self.assertFalse(s.auto_bmc_setup)
        s = self.parse([], {CM + "AUTO_BMC_SETUP": "false"}).settings
        self.assertFalse(s.auto_bmc_setup)

    def test_bad_go_boolean_is_one_line(self) -> None:
        """--x=maybe stops with one line, not the usage text."""
        out = self.fails(["--auto-accept-servers=maybe"])
        self.assertEqual(
            out,
            'sidero: invalid value "maybe" for --auto-accept-servers (from --auto-accept-servers):'
            " expected true or false\n",
        )

    def test_bad_variable_is_one_line(self) -> None:
        """A bad variable stops with one line naming the variable."""
        out = self.fails([], {CM + "IPMI_PXE_METHOD": "foo"})
        self.assertEqual(out.count("\n"), 1)
        self.assertIn("SIDERO_CONTROLLER_MANAGER_IPMI_PXE_METHOD", out)

    def test_bad_flag_is_one_line(self) -> None:
        """A bad flag value stops with one line naming the flag."""
        out = self.fails(["--server-reboot-timeout", "soon"])
        self.assertEqual(out.count("\n"), 1)
        self.assertIn('"soon" for --server-reboot-timeout (from --server-reboot-timeout)', out)
