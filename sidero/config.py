# -*- test-case-name: tests.service.test_config -*-
"""Every setting of the sidero process, in one table.

The table (L{SETTINGS}) is the single source for three things that must never drift apart:
the twistd command-line options (L{SettingsOptions}), the environment variables read at
start-up, and the README configuration table (C{python -m sidero.config --markdown}).

Resolution (L{resolve}) is a pure function of the flags given, the environment and a few
host facts (L{Host}); for each setting the first source present wins: command-line flag,
then its environment variables in table order, then the default. An invalid value is a
L{ConfigError} whose one-line message names the option, the value, where it came from and
what is accepted. The result is the frozen L{Settings} every service receives.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import IO, Any

from twisted.python import usage

from sidero import TALOS_RELEASES_URL, netinfo

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_STATE_DIR = "/var/lib/sidero"
IPXE_SYSTEM_DIR = "/usr/lib/ipxe"
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107

#: Every service that a C{--disable-<name>} flag can switch off.
SERVICES: tuple[str, ...] = (
    "dhcp-proxy",
    "tftp",
    "http",
    "grpc",
    "siderolink",
    "log-receiver",
    "event-sink",
    "syslog",
    "controllers",
    "webhook",
    "management",
    "dashboard",
    "metrics",
    "health",
)


class ConfigError(Exception):
    """A setting has a value sidero cannot use; C{str()} is the one line shown to the user."""

    def __init__(self, option: str, value: str, source: str, accepted: str) -> None:
        self.option = option
        self.value = value
        self.source = source
        self.accepted = accepted
        super().__init__(
            f'invalid value "{value}" for {option} (from {source}): expected {accepted}'
        )


class StartupError(Exception):
    """Start-up cannot go on for a reason that is not one bad value (one line, too)."""


# --- parsers: str -> value, raising ValueError (the table supplies the message) --------------


def parse_bool(text: str) -> bool:
    """Go's C{strconv.ParseBool} spellings, plus yes/no/on/off for environment files."""
    lowered = text.strip().lower()
    if lowered in ("1", "t", "true", "y", "yes", "on"):
        return True
    if lowered in ("0", "f", "false", "n", "no", "off"):
        return False
    raise ValueError(text)


def parse_port(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", text):
        raise ValueError(text)
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(text)
    return port


_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h)")


def parse_workers(text: str) -> int:
    """A process count from 1 to 64, or C{auto}: one per CPU, at most 4."""
    if text.strip().lower() == "auto":
        return max(1, min(os.cpu_count() or 1, 4))
    if not re.fullmatch(r"[0-9]{1,2}", text) or not 1 <= int(text) <= 64:
        raise ValueError(text)
    return int(text)


def parse_duration(text: str) -> float:
    """A Go C{time.ParseDuration} string (C{20m}, C{1h30m}, C{1.5s}, C{0}) in seconds.

    Negative durations are refused: every duration sidero reads is a timeout.
    """
    if text == "0":
        return 0.0
    if not text or text[0] in "+-":
        raise ValueError(text)
    total = 0.0
    pos = 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None or match.group(1) in ("", "."):
            raise ValueError(text)
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    return total


def parse_probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise ValueError(text)
    return value


def parse_qps(text: str) -> float:
    """Requests per second, 0 for no limit (finite, not negative)."""
    value = float(text)
    if not 0.0 <= value < float("inf"):  # also refuses nan
        raise ValueError(text)
    return value


def parse_burst(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,6}", text) or int(text) < 1:
        raise ValueError(text)
    return int(text)


def parse_cidrs(text: str) -> tuple[IPNetwork, ...]:
    """Comma-separated CIDRs (host bits allowed, as Go's C{net.ParseCIDR}); empty = none."""
    if not text.strip():
        return ()
    networks = []
    for item in text.split(","):
        item = item.strip()
        if "/" not in item:
            raise ValueError(item)
        networks.append(ipaddress.ip_network(item, strict=False))
    return tuple(networks)


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def parse_count(text: str) -> int:
    """A positive whole number (a limit)."""
    value = int(text.strip(), 10)
    if value < 1:
        raise ValueError(text)
    return value


def parse_rate(text: str) -> float:
    """A rate per second: a positive number, or 0 for no limit."""
    value = float(text.strip())
    if not value >= 0 or value == float("inf"):
        raise ValueError(text)
    return value


def parse_host(text: str) -> str:
    """An IP literal (brackets allowed around IPv6) or a DNS name; no scheme, no port."""
    if text == "":
        return ""
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    name = text[:-1] if text.endswith(".") else text
    if len(name) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(text)
    return text


def parse_listen_address(text: str) -> str:
    if text == "":
        return ""
    return str(ipaddress.ip_address(text[1:-1] if text.startswith("[") else text))


def parse_interface(text: str) -> str:
    """A Linux interface name (IFNAMSIZ-1 bytes, no slash, colon or blank), or empty."""
    if text == "":
        return ""
    if len(text.encode()) > 15 or text in (".", "..") or re.search(r"[\s/:]", text):
        raise ValueError(text)
    return text


def parse_interfaces(text: str) -> str:
    """Comma-separated interface names (each as L{parse_interface}), or C{*} for all."""
    if text.strip() == "*":
        return "*"
    names = [parse_interface(item.strip()) for item in text.split(",")]
    if any(not n for n in names) and text:
        raise ValueError(text)
    return ",".join(names)


def parse_path(text: str) -> str:
    if "\0" in text:
        raise ValueError(text)
    return os.path.abspath(text) if text else ""


def parse_output(text: str) -> str:
    """C{-} (standard output) or a file path."""
    return "-" if text in ("", "-") else parse_path(text)


def parse_required_path(text: str) -> str:
    if not text:
        raise ValueError(text)
    return parse_path(text)


def parse_text(text: str) -> str:
    return text


def parse_url(text: str) -> str:
    """An absolute http or https URL with a host; a trailing slash is dropped."""
    parsed = urllib.parse.urlsplit(text)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.query or parsed.fragment:
        raise ValueError(text)
    return text.rstrip("/")


def choice(*values: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        lowered = text.lower()
        if lowered not in values:
            raise ValueError(text)
        return lowered

    return parse


def parse_https_url(text: str) -> str:
    """As L{parse_url}, https only (the Kubernetes API server calls webhooks over TLS)."""
    if not text.lower().startswith("https://"):
        raise ValueError(text)
    return parse_url(text)


def _parse_tls_version(text: str) -> str:
    """Go's crypto/tls constant names, as controller-runtime's --tls-min-version takes them."""
    return {"versiontls12": "VersionTLS12", "versiontls13": "VersionTLS13"}[choice(
        "versiontls12", "versiontls13")(text)]


def _parse_level(text: str) -> str:
    """A level name, or a klog verbosity (C{-v}): 0-3 are info, 4 and more debug."""
    lowered = text.lower()
    if lowered == "warning":
        return "warn"
    if re.fullmatch(r"[0-9]{1,2}", lowered):
        return "debug" if int(lowered) >= 4 else "info"
    return choice("debug", "info", "warn", "error", "critical")(lowered)


#: Go crypto/tls cipher suite names (as component-base's --tls-cipher-suites takes them) ->
#: OpenSSL names. TLS 1.3 suites are accepted and, as in Go, not configurable.
GO_CIPHER_SUITES: dict[str, str | None] = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA256": "AES128-SHA256",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_RSA_WITH_3DES_EDE_CBC_SHA": "DES-CBC3-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA": "ECDHE-RSA-DES-CBC3-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256": "ECDHE-ECDSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256": "ECDHE-RSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_AES_128_GCM_SHA256": None,
    "TLS_AES_256_GCM_SHA384": None,
    "TLS_CHACHA20_POLY1305_SHA256": None,
}


def parse_cipher_suites(text: str) -> tuple[str, ...]:
    """Comma-separated Go cipher suite names (empty: the TLS library's defaults), kept as given."""
    names = tuple(item.strip() for item in text.split(",") if item.strip())
    for name in names:
        if name not in GO_CIPHER_SUITES:
            raise ValueError(name)
    return names


def parse_host_port(text: str) -> tuple[str, int]:
    """Go's C{host:port} listen address (C{:8443}, C{0.0.0.0:8443}, C{[::]:9440}) as
    (IP address or "" for all, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(text)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host in ("", "0.0.0.0", "::"):
        address = "" if host == "" else host
    elif host == "localhost":
        address = "127.0.0.1"
    else:
        address = str(ipaddress.ip_address(host))
    return address, parse_port(port)


# --- the table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One row of the configuration table.

    @ivar name: the L{Settings} field; the flag is C{--name} with dashes.
    @ivar env: environment variables, the first one set wins.
    @ivar default: the default as a user would write it (parsed like any value).
    @ivar default_doc: README text for a default that is computed at start-up.
    @ivar dash_empty: C{-} means "empty" (the Go manager's convention for template defaults).
    @ivar empty_falls_through: an empty value defers to the next source rather than winning.
    """

    name: str
    env: tuple[str, ...]
    default: str
    parse: Callable[[str], Any]
    accepted: str
    help: str
    boolean: bool = False
    default_doc: str | None = None
    dash_empty: bool = False
    empty_falls_through: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


CM = "SIDERO_CONTROLLER_MANAGER_"


def _own(name: str) -> str:
    return "SIDERO_" + name.upper()


def _bool(name: str, env: tuple[str, ...], default: bool, help: str) -> Setting:
    return Setting(
        name, env, "true" if default else "false", parse_bool, "true or false", help, boolean=True
    )


def _port(name: str, env: tuple[str, ...], default: str, help: str, **kw: Any) -> Setting:
    return Setting(name, env, default, parse_port, "a port number from 1 to 65535", help, **kw)


SETTINGS: tuple[Setting, ...] = (
    # Sidero controller manager flags and installation variables (spec 3.13).
    Setting(
        "api_endpoint", (CM + "API_ENDPOINT", "API_ENDPOINT"), "", parse_host,
        "a host name or IP address, or - for the default",
        "Address servers use to reach Sidero (URLs, iPXE script, kernel args, DHCP).",
        default_doc="host's first non-loopback address (global IPv4, else global IPv6)",
        dash_empty=True, empty_falls_through=True,
    ),
    _port("api_port", (CM + "API_PORT",), "8081",
          "External TCP port of the HTTP/gRPC endpoint, used in every URL handed out."),
    _port("http_port", (_own("http_port"), CM + "CONTAINER_API_PORT"), "8081",
          "TCP port the HTTP/gRPC server binds (independent of the API port: behind NAT or a"
          " load balancer the two differ)."),
    Setting(
        "siderolink_endpoint", (CM + "SIDEROLINK_ENDPOINT",), "", parse_host,
        "a host name or IP address, or - for the default",
        "WireGuard endpoint address announced to servers.",
        default_doc="the API endpoint", dash_empty=True,
    ),
    _port("siderolink_port", (CM + "SIDEROLINK_PORT",), "51821", "WireGuard UDP port."),
    Setting(
        "siderolink_wireguard", (_own("siderolink_wireguard"),), "auto",
        choice("auto", "kernel", "userspace"), "one of auto, kernel, userspace",
        "WireGuard implementation of the SideroLink interface: kernel WireGuard over netlink, or"
        " the wireguard-go program; auto = the kernel's when it has the module, else wireguard-go.",
    ),
    Setting(
        "siderolink_interface", (_own("siderolink_interface"),), "siderolink", parse_interface,
        "an interface name",
        "Name of the SideroLink WireGuard interface (wireguard-go's UAPI sockets are shared by"
        " every network namespace of the host, so two instances need two names).",
    ),
    Setting(
        "server_log", (_own("server_log"),), "-", parse_output, "- for standard output, or a file path",
        "Where servers' logs go (the kernel log receiver's and syslog's annotated lines), one JSON"
        " object per line.",
    ),
    _port("syslog_port", (_own("syslog_port"),), "514",
          "Syslog UDP port (RFC 3164 and 5424; agents, iPXE, BMCs)."),
    _port("syslog_tcp_port", (_own("syslog_tcp_port"),), "601",
          "Syslog TCP port (RFC 6587 octet counting or newline framing)."),
    Setting(
        "extra_agent_kernel_args", (CM + "EXTRA_AGENT_KERNEL_ARGS",), "", parse_text,
        "kernel arguments separated by spaces, or - for none",
        "Extra kernel arguments for the agent environment.", dash_empty=True,
    ),
    Setting(
        "boot_from_disk_method", (CM + "BOOT_FROM_DISK_METHOD",), "ipxe-exit",
        choice("ipxe-exit", "http-404", "ipxe-sanboot"),
        "one of ipxe-exit, http-404, ipxe-sanboot",
        "Default way to make an allocated server boot from its disk.",
    ),
    _bool("enable_leader_election", (_own("enable_leader_election"),), True,
          "Run controllers only while holding the leader lease."),
    _bool("auto_accept_servers", (CM + "AUTO_ACCEPT_SERVERS",), False,
          "Create newly registered servers with accepted: true."),
    _bool("insecure_wipe", (CM + "INSECURE_WIPE",), True,
          "Fast wipe (discard, zero first/last MiB) instead of a full wipe."),
    _bool("auto_bmc_setup", (CM + "AUTO_BMC_SETUP",), True,
          "Ask the agent to configure the BMC."),
    Setting(
        "server_reboot_timeout", (CM + "SERVER_REBOOT_TIMEOUT",), "20m", parse_duration,
        "a Go duration such as 20m, 1h30m or 90s",
        "How long a wipe reboot may take before the server is power cycled again.",
    ),
    Setting(
        "ipmi_pxe_method", (CM + "IPMI_PXE_METHOD",), "uefi", choice("uefi", "bios"),
        "one of uefi, bios", "Default PXE boot mode requested over IPMI.",
    ),
    Setting(
        "events_negative_address_filter", (CM + "EVENTS_NEGATIVE_ADDRESS_FILTER",), "",
        parse_cidrs, "comma-separated CIDRs (e.g. 10.0.0.0/8,fd00::/8), or - for none",
        "Addresses never reported in ServerBinding addresses by the event sink.",
        dash_empty=True,
    ),
    Setting(
        "test_power_explicit_failure", (CM + "TEST_POWER_EXPLICIT_FAILURE",), "0",
        parse_probability, "a probability from 0 to 1",
        "Test only: probability that a power operation fails with an error.",
    ),
    Setting(
        "test_power_silent_failure", (CM + "TEST_POWER_SILENT_FAILURE",), "0",
        parse_probability, "a probability from 0 to 1",
        "Test only: probability that a power operation silently does nothing.",
    ),
    _port("webhook_port", (_own("webhook_port"),), "9443",
          "Port of the admission/conversion webhook server (Kubernetes store)."),
    Setting(
        "webhook_cert_dir", (_own("webhook_cert_dir"),), "/tmp/k8s-webhook-server/serving-certs",
        parse_required_path, "a directory path", "Directory holding tls.crt and tls.key for webhooks.",
    ),
    Setting(
        "tls_min_version", (CM + "TLS_MIN_VERSION",), "VersionTLS12",
        _parse_tls_version, "VersionTLS12 or VersionTLS13",
        "Lowest TLS version the webhook server accepts.",
    ),
    _port("metrics_port", (_own("metrics_port"),), "8443", "Prometheus metrics port."),
    _port("health_port", (_own("health_port"),), "9440", "Health/readiness probe port."),
    Setting(
        "metrics_address", (_own("metrics_address"),), "", parse_listen_address,
        "an IP address, or empty for all", "Address the metrics server binds.",
        default_doc="the listen address",
    ),
    Setting(
        "health_address", (_own("health_address"),), "", parse_listen_address,
        "an IP address, or empty for all", "Address the health/readiness probe server binds.",
        default_doc="the listen address",
    ),
    _bool("insecure_diagnostics", (_own("insecure_diagnostics"), "CAPI_INSECURE_DIAGNOSTICS"),
          False, "Metrics over plain HTTP without authentication (Cluster API's"
          " --insecure-diagnostics)."),
    Setting(
        "tls_cipher_suites", (_own("tls_cipher_suites"),), "", parse_cipher_suites,
        "comma-separated Go cipher suite names (e.g. TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256)",
        "TLS 1.2 cipher suites the webhook server offers; TLS 1.3 suites are fixed, as in Go.",
        default_doc="the TLS library's defaults",
    ),
    # Settings of this implementation.
    Setting(
        "leader_election_namespace", (_own("leader_election_namespace"), "POD_NAMESPACE"),
        "sidero-system", parse_host, "a namespace name",
        "Namespace of the leader election Lease (Kubernetes store).",
    ),
    Setting(
        "leader_election_lease_duration", (_own("leader_election_lease_duration"),), "15s",
        parse_duration, "a Go duration such as 15s",
        "How long a leader's Lease is honoured without renewal before another replica takes over.",
    ),
    Setting(
        "leader_election_renew_deadline", (_own("leader_election_renew_deadline"),), "10s",
        parse_duration, "a Go duration shorter than the lease duration",
        "How long the leader keeps trying to renew before it gives up leadership.",
    ),
    Setting(
        "leader_election_retry_period", (_own("leader_election_retry_period"),), "2s",
        parse_duration, "a Go duration shorter than the renew deadline",
        "Interval between attempts to acquire or renew the Lease.",
    ),
    Setting(
        "kube_api_qps", (_own("kube_api_qps"),), "20", parse_qps,
        "requests per second (a decimal number), 0 for no limit",
        "Client-side limit of Kubernetes API requests per second, as controller-runtime's"
        " (Cluster API's --kube-api-qps); Leases have a bucket of their own.",
    ),
    Setting(
        "kube_api_burst", (_own("kube_api_burst"),), "30", parse_burst,
        "a whole number from 1 to 999999",
        "Kubernetes API requests allowed at once above --kube-api-qps (Cluster API's"
        " --kube-api-burst).",
    ),
    _bool("webhook_register", (_own("webhook_register"),), True,
          "With the Kubernetes store, point the CRDs' conversion and a ValidatingWebhookConfiguration"
          " at this webhook server and its own CA; turn off where cert-manager and manifests manage them."),
    Setting(
        "webhook_url", (_own("webhook_url"),), "", parse_https_url,
        "an https URL, or empty for the default",
        "Base URL the Kubernetes API server uses to reach the webhook server.",
        default_doc="https://<api-endpoint>:<webhook-port>",
    ),
    Setting(
        "talos_assets_url", (_own("talos_assets_url"),), TALOS_RELEASES_URL, parse_url,
        "an http or https URL",
        "Base URL of Talos release assets for the default Environment"
        " (<url>/<release>/vmlinuz-amd64); point it at a local mirror on air-gapped sites.",
    ),
    Setting(
        "configdata_access", (_own("configdata_access"),), "owner", choice("owner", "any"),
        "one of owner, any",
        "Who may fetch /configdata?uuid= (it holds the cluster's secrets): owner = only a source"
        " address known to belong to that server (its SideroLink address, the addresses Talos"
        " reported over the tunnel, the boot-NIC addresses its agent registered; never the source"
        " of an /ipxe request, which anyone can send) or one in --configdata-trusted-networks;"
        " any = whoever knows the UUID, as the Go Sidero does.",
    ),
    Setting(
        "configdata_trusted_networks", (_own("configdata_trusted_networks"),), "", parse_cidrs,
        "comma-separated CIDRs (e.g. 10.0.0.0/24), or - for none",
        "Sources allowed any /configdata with --configdata-access owner (a reverse proxy, a NAT"
        " gateway in front of the nodes).", dash_empty=True,
    ),
    Setting(
        "http_header_timeout", (_own("http_header_timeout"),), "10s", parse_duration,
        "a Go duration such as 10s",
        "Time an HTTP/1.1 request on the API port has from its first byte to its last (request"
        " line, headers and body; slowloris) before it is answered 408 and closed.",
    ),
    Setting(
        "http_max_connections", (_own("http_max_connections"),), "1024", parse_count,
        "a positive number", "Open connections the API port accepts in total; more are closed"
        " at once (and counted).",
    ),
    Setting(
        "http_max_connections_per_source", (_own("http_max_connections_per_source"),), "64",
        parse_count, "a positive number",
        "Open connections the API port accepts from one source address; more are closed at once"
        " (and counted).",
    ),
    Setting(
        "dhcp_mac_rate", (_own("dhcp_mac_rate"),), "2", parse_rate,
        "packets per second, or 0 for no limit",
        "DHCP packets answered per second per client MAC (token bucket; the excess is dropped and"
        " counted), so one noisy client cannot starve the others.",
    ),
    Setting(
        "dhcp_mac_burst", (_own("dhcp_mac_burst"),), "10", parse_count, "a positive number",
        "Packets one client MAC may send at once before --dhcp-mac-rate applies.",
    ),
    Setting(
        "max_concurrent_wipes", (_own("max_concurrent_wipes"),), "10", parse_count,
        "a positive number",
        "Servers sent to the agent to be wiped at once (Ironic's max_concurrent_clean); the"
        " rest wait their turn, none is refused.",
    ),
    Setting(
        "max_concurrent_power", (_own("max_concurrent_power"),), "20", parse_count,
        "a positive number",
        "BMC power operations (IPMI, the HTTP power API) in flight at once; the rest queue.",
    ),
    Setting(
        "max_concurrent_downloads", (_own("max_concurrent_downloads"),), "4", parse_count,
        "a positive number",
        "Environment asset downloads (kernels, initrds) at once; the rest queue.",
    ),
    Setting(
        "state_dir", (_own("state_dir"),), DEFAULT_STATE_DIR, parse_required_path, "a directory path",
        "Data directory (state.db, env/, tftp/, ipxe/).",
        default_doc=f"{DEFAULT_STATE_DIR}; when not root and it is not writable,"
        " $XDG_STATE_HOME/sidero or ~/.local/state/sidero",
    ),
    Setting(
        "kubeconfig", (_own("kubeconfig"), "KUBECONFIG"), "", parse_path, "a file path",
        "Kubeconfig for the Kubernetes store.", default_doc="in-cluster configuration",
    ),
    Setting(
        "store", (_own("store"),), "auto", choice("auto", "embedded", "kubernetes"),
        "one of auto, embedded, kubernetes",
        "Where resources live; auto = kubernetes when a kubeconfig or in-cluster"
        " environment is present, else the embedded SQLite store.",
    ),
    Setting(
        "listen_address", (_own("listen_address"),), "", parse_listen_address,
        "an IP address, or empty for all", "Address TCP and UDP services bind.",
        default_doc="all addresses",
    ),
    _port("tftp_port", (_own("tftp_port"),), "69", "TFTP UDP port."),
    Setting(
        "tftp_workers", (_own("tftp_workers"),), "auto", parse_workers,
        "a number from 1 to 64, or auto",
        "Processes serving the TFTP port, each with its own SO_REUSEPORT socket (one Python"
        " thread cannot keep up with a rack booting at once); auto = one per CPU, at most 4.",
    ),
    _port("dhcp_port", (_own("dhcp_port"),), "67", "DHCP proxy UDP port."),
    _port("dhcp_proxy_port", (_own("dhcp_proxy_port"),), "4011", "PXE proxyDHCP (BINL) UDP port."),
    Setting(
        "dhcp_interface", (_own("dhcp_interface"),), "", parse_interfaces,
        "interface names separated by commas, or * for every interface with IPv4",
        "Interfaces the DHCP proxy serves; each network is answered with that interface's"
        " own address (the API endpoint's where it owns it).",
        default_doc="the interface owning the API endpoint address",
    ),
    Setting(
        "ipxe_dir", (_own("ipxe_dir"),), "", parse_path, "a directory path",
        f"Extra directory searched for iPXE binaries before {IPXE_SYSTEM_DIR}.",
        default_doc="none",
    ),
    Setting(
        "management_socket", (_own("management_socket"),), "", parse_path, "a file path",
        "Unix socket of the local management API.", default_doc="<state-dir>/sidero.sock",
    ),
    _port("dashboard_port", (_own("dashboard_port"),), "8082",
          "TCP port of the read-only operator dashboard."),
    Setting(
        "dashboard_address", (_own("dashboard_address"),), "127.0.0.1", parse_listen_address,
        "an IP address, or empty for all",
        "Address the dashboard binds; anything but a loopback address needs"
        " --dashboard-password-file.",
    ),
    Setting(
        "dashboard_password_file", (_own("dashboard_password_file"),), "", parse_path,
        "a file path",
        "File whose first line is the dashboard's login password (with it, a login is asked"
        " on loopback too).", default_doc="none: no login, loopback only",
    ),
    Setting(
        "log_format", (_own("log_format"),), "text", choice("text", "json"), "one of text, json",
        "Log output: readable text or one JSON object per line.",
    ),
    Setting(
        "log_level", (_own("log_level"),), "info", _parse_level,
        "one of debug, info, warn, error, critical", "Lowest level of events logged.",
    ),
) + tuple(
    _bool(
        "disable_" + service.replace("-", "_"),
        (_own("disable_" + service.replace("-", "_")),)
        + ((CM + "DISABLE_DHCP_PROXY",) if service == "dhcp-proxy" else ()),
        False,
        f"Do not run the {service} service.",
    )
    for service in SERVICES
)

SETTINGS_BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


# --- the Go manifests' flags -----------------------------------------------------------------


@dataclass(frozen=True)
class GoFlag:
    """A flag the Go managers' Deployments pass (spec 3.13), accepted with the same meaning.

    @ivar flag: as the manifests spell it.
    @ivar translate: raw text -> {setting name: raw text} (several settings for a host:port),
        raising ValueError for a bad value; an empty mapping means "accepted, no effect".
    """

    flag: str
    translate: Callable[[str], dict[str, str]]
    accepted: str
    meaning: str

    @property
    def attribute(self) -> str:
        return "opt_" + self.flag.lstrip("-").replace("-", "_")


def _to(name: str, parse: Callable[[str], Any] | None = None) -> Callable[[str], dict[str, str]]:
    def translate(text: str) -> dict[str, str]:
        (parse or SETTINGS_BY_NAME[name].parse)(text)
        return {name: text}

    return translate


def _listen(port_setting: str, address_setting: str, disable: str | None = None,
            ) -> Callable[[str], dict[str, str]]:
    def translate(text: str) -> dict[str, str]:
        if text.strip() == "0" and disable is not None:
            return {disable: "true"}  # controller-runtime: a bind address of 0 turns it off
        address, port = parse_host_port(text.strip())
        return {port_setting: str(port), address_setting: address}

    return translate


def _ignored(parse: Callable[[str], Any]) -> Callable[[str], dict[str, str]]:
    def translate(text: str) -> dict[str, str]:
        parse(text)
        return {}

    return translate


GO_FLAGS: tuple[GoFlag, ...] = (
    GoFlag("--test-power-simulated-explicit-failure-prob", _to("test_power_explicit_failure"),
           "a probability from 0 to 1", "`--test-power-explicit-failure`"),
    GoFlag("--test-power-simulated-silent-failure-prob", _to("test_power_silent_failure"),
           "a probability from 0 to 1", "`--test-power-silent-failure`"),
    GoFlag("--diagnostics-address", _listen("metrics_port", "metrics_address", "disable_metrics"),
           "host:port (e.g. :8443), or 0 for no metrics", "`--metrics-port` and `--metrics-address`"),
    GoFlag("--metrics-bind-addr", _listen("metrics_port", "metrics_address", "disable_metrics"),
           "host:port (e.g. :8080), or 0 for no metrics", "`--metrics-port` and `--metrics-address`"),
    GoFlag("--metrics-bind-address", _listen("metrics_port", "metrics_address", "disable_metrics"),
           "host:port (e.g. :8080), or 0 for no metrics", "`--metrics-port` and `--metrics-address`"),
    GoFlag("--health-addr", _listen("health_port", "health_address"),
           "host:port (e.g. :9440)", "`--health-port` and `--health-address`"),
    GoFlag("--health-probe-bind-address", _listen("health_port", "health_address"),
           "host:port (e.g. :9440)", "`--health-port` and `--health-address`"),
    GoFlag("-v", _to("log_level"), "a klog verbosity from 0 (4 and more: debug)",
           "`--log-level` (0-3 info, 4+ debug)"),
    GoFlag("--logging-format", _to("log_format"), "text or json", "`--log-format`"),
    GoFlag("--log-flush-frequency", _ignored(parse_duration), "a Go duration",
           "nothing: every log line is written at once"),
)

GO_FLAGS_BY_ATTRIBUTE: dict[str, GoFlag] = {g.attribute: g for g in GO_FLAGS}


# --- resolved settings -----------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The resolved configuration services receive (built by L{resolve}, or directly in tests).

    Durations are seconds. C{store} is never C{auto} here: L{resolve} decides.
    """

    api_endpoint: str = "127.0.0.1"
    api_port: int = 8081
    http_port: int = 8081
    siderolink_endpoint: str = "127.0.0.1"
    siderolink_port: int = 51821
    siderolink_wireguard: str = "auto"
    siderolink_interface: str = "siderolink"
    server_log: str = "-"
    syslog_port: int = 514
    syslog_tcp_port: int = 601
    extra_agent_kernel_args: str = ""
    boot_from_disk_method: str = "ipxe-exit"
    enable_leader_election: bool = True
    auto_accept_servers: bool = False
    insecure_wipe: bool = True
    auto_bmc_setup: bool = True
    server_reboot_timeout: float = 1200.0
    ipmi_pxe_method: str = "uefi"
    events_negative_address_filter: tuple[IPNetwork, ...] = ()
    test_power_explicit_failure: float = 0.0
    test_power_silent_failure: float = 0.0
    webhook_port: int = 9443
    webhook_cert_dir: str = "/tmp/k8s-webhook-server/serving-certs"
    tls_min_version: str = "VersionTLS12"
    metrics_port: int = 8443
    health_port: int = 9440
    metrics_address: str = ""
    health_address: str = ""
    insecure_diagnostics: bool = False
    tls_cipher_suites: tuple[str, ...] = ()
    leader_election_namespace: str = "sidero-system"
    leader_election_lease_duration: float = 15.0
    leader_election_renew_deadline: float = 10.0
    leader_election_retry_period: float = 2.0
    kube_api_qps: float = 20.0
    kube_api_burst: int = 30
    webhook_register: bool = True
    webhook_url: str = ""
    talos_assets_url: str = TALOS_RELEASES_URL
    configdata_access: str = "owner"
    configdata_trusted_networks: tuple[IPNetwork, ...] = ()
    http_header_timeout: float = 10.0
    http_max_connections: int = 1024
    http_max_connections_per_source: int = 64
    dhcp_mac_rate: float = 2.0
    dhcp_mac_burst: int = 10
    max_concurrent_wipes: int = 10
    max_concurrent_power: int = 20
    max_concurrent_downloads: int = 4
    state_dir: str = DEFAULT_STATE_DIR
    kubeconfig: str = ""
    store: str = "embedded"
    listen_address: str = ""
    tftp_port: int = 69
    tftp_workers: int = 1
    dhcp_port: int = 67
    dhcp_proxy_port: int = 4011
    dhcp_interface: str = ""
    ipxe_dir: str = ""
    management_socket: str = DEFAULT_STATE_DIR + "/sidero.sock"
    dashboard_port: int = 8082
    dashboard_address: str = "127.0.0.1"
    dashboard_password_file: str = ""
    log_format: str = "text"
    log_level: str = "info"
    disabled: frozenset[str] = field(default_factory=frozenset)

    def enabled(self, service: str) -> bool:
        """Whether C{service} (one of L{SERVICES}) should run."""
        if service not in SERVICES:
            raise KeyError(service)
        return service not in self.disabled

    @property
    def ipxe_search_path(self) -> tuple[str, ...]:
        """Directories holding stock iPXE binaries, most specific first."""
        return tuple(d for d in (self.ipxe_dir, IPXE_SYSTEM_DIR) if d)

    @property
    def tftp_roots(self) -> tuple[str, ...]:
        """TFTP search path: patched binaries in C{<state-dir>/tftp}, then stock iPXE."""
        return (os.path.join(self.state_dir, "tftp"), *self.ipxe_search_path)

    @property
    def database_path(self) -> str:
        return os.path.join(self.state_dir, "state.db")


_SETTINGS_FIELDS = {f.name for f in fields(Settings)}


@dataclass(frozen=True)
class Note:
    """Something resolution decided that the operator should see in the log."""

    level: str
    format: str
    fields: Mapping[str, Any]


@dataclass(frozen=True)
class Resolution:
    settings: Settings
    notes: tuple[Note, ...]
    sources: Mapping[str, str]


def _writable_dir(path: str) -> bool:
    """Whether C{path} is, or could be created as, a directory we can write into."""
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return False
        probe = parent
    return os.path.isdir(probe) and os.access(probe, os.W_OK | os.X_OK)


@dataclass(frozen=True)
class Host:
    """Facts about the machine that resolution depends on (injected in tests)."""

    is_root: bool
    home: str
    addresses: Callable[[], Sequence[netinfo.InterfaceAddress]]
    writable: Callable[[str], bool] = _writable_dir

    @classmethod
    def current(cls) -> Host:
        return cls(
            is_root=os.geteuid() == 0,
            home=os.path.expanduser("~"),
            addresses=netinfo.read_addresses,
        )


def _raw_value(
    setting: Setting, flags: Mapping[str, str], environ: Mapping[str, str]
) -> tuple[str, str]:
    """The winning raw text for C{setting} and where it came from."""
    candidates: list[tuple[str, str]] = []
    if setting.name in flags:
        candidates.append((flags[setting.name], setting.flag))
    candidates += [(environ[v], v) for v in setting.env if v in environ]
    for text, source in candidates:
        text = text.strip()
        if setting.dash_empty and text == "-":
            text = ""
        if text == "" and setting.empty_falls_through:
            continue
        if text == "" and source != setting.flag and not setting.dash_empty:
            # An empty variable (common in environment files) means "not set".
            continue
        return text, source
    return setting.default, "default"


def _explicitly_empty(setting: Setting, flags: Mapping[str, str], environ: Mapping[str, str]) -> bool:
    """Whether the flag was given empty (or C{-}), or a variable was set to C{-}.

    An empty variable still means "not set" (environment files keep blank lines).
    """
    if setting.name in flags and flags[setting.name].strip() in ("", "-"):
        return True
    return any(environ.get(v, "").strip() == "-" for v in setting.env)


def resolve(
    flags: Mapping[str, str], environ: Mapping[str, str], host: Host | None = None
) -> Resolution:
    """Resolve every setting: flag, then environment variables, then default.

    @param flags: setting name -> raw text from the command line (booleans as "true"/"false").
    @raise ConfigError: a value is invalid.
    @raise StartupError: no value can be found for something required (the API endpoint).
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    notes: list[Note] = []
    for setting in SETTINGS:
        text, source = _raw_value(setting, flags, environ)
        sources[setting.name] = source
        if text == "" and setting.default_doc is not None and source == "default":
            values[setting.name] = None  # computed below
            continue
        try:
            values[setting.name] = setting.parse(text)
        except ValueError:
            raise ConfigError(setting.flag, text, source, setting.accepted) from None

    if values["api_endpoint"] is None and _explicitly_empty(SETTINGS_BY_NAME["api_endpoint"],
                                                          flags, environ):
        # The Go manager's rule (spec 3.13): an empty --api-endpoint (or -) needs API_ENDPOINT.
        raise StartupError(
            "--api-endpoint is empty and API_ENDPOINT is not set: set one to the address servers"
            " use to reach sidero")
    if values["api_endpoint"] is None:
        host = host or Host.current()
        chosen = netinfo.choose_endpoint(host.addresses())
        if chosen is None:
            raise StartupError(
                "no API endpoint: no non-loopback, non-link-local address on this host;"
                f" set --api-endpoint or {CM}API_ENDPOINT"
            )
        values["api_endpoint"] = str(chosen.address)
        sources["api_endpoint"] = "chosen"
        notes.append(Note("info", "API endpoint {endpoint} chosen: {reason}",
                          {"endpoint": str(chosen.address), "reason": chosen.reason}))
    if not values["siderolink_endpoint"]:
        values["siderolink_endpoint"] = values["api_endpoint"]
    if not values["webhook_url"]:
        host_part = values["api_endpoint"]
        if ":" in host_part:  # an IPv6 literal
            host_part = f"[{host_part}]"
        values["webhook_url"] = f"https://{host_part}:{values['webhook_port']}"

    state_dir = values["state_dir"]
    if sources["state_dir"] == "default":
        host = host or Host.current()
        if not host.is_root and not host.writable(state_dir):
            xdg = environ.get("XDG_STATE_HOME", "").strip()
            base = xdg if os.path.isabs(xdg) else os.path.join(host.home, ".local", "state")
            fallback = os.path.join(base, "sidero")
            notes.append(Note(
                "warn", "State directory {default} is not writable and sidero is not root:"
                " using {state_dir} instead (set --state-dir to choose)",
                {"default": state_dir, "state_dir": fallback},
            ))
            values["state_dir"] = state_dir = fallback
    if values["management_socket"] is None:
        values["management_socket"] = os.path.join(state_dir, "sidero.sock")
    if len(os.fsencode(values["management_socket"])) > UNIX_PATH_MAX:
        if sources["management_socket"] != "default":
            raise ConfigError(
                "--management-socket", values["management_socket"], sources["management_socket"],
                f"a socket path of at most {UNIX_PATH_MAX} bytes",
            )
        notes.append(Note(
            "warn", "Management socket path {path} is longer than {limit} bytes and cannot be"
            " bound; set --management-socket", {"path": values["management_socket"],
                                                "limit": UNIX_PATH_MAX},
        ))
    for name in ("kubeconfig", "ipxe_dir", "dhcp_interface", "listen_address",
                 "dashboard_password_file"):
        if values[name] is None:
            values[name] = ""
    for name in ("metrics_address", "health_address"):
        if values[name] is None:
            values[name] = values["listen_address"]
    if values["tls_cipher_suites"] is None:
        values["tls_cipher_suites"] = ()

    if values["store"] == "auto":
        if values["kubeconfig"]:
            values["store"], why = "kubernetes", f"a kubeconfig is set ({sources['kubeconfig']})"
        elif environ.get("KUBERNETES_SERVICE_HOST") and environ.get("KUBERNETES_SERVICE_PORT"):
            values["store"], why = "kubernetes", "running inside a Kubernetes pod"
        else:
            values["store"], why = "embedded", "no kubeconfig and not inside a Kubernetes pod"
        notes.append(Note("info", "Store {store} chosen: {reason}",
                          {"store": values["store"], "reason": why}))

    disabled = frozenset(
        service for service in SERVICES if values.pop("disable_" + service.replace("-", "_"))
    )
    settings = Settings(disabled=disabled, **{k: v for k, v in values.items() if k in _SETTINGS_FIELDS})
    return Resolution(settings=settings, notes=tuple(notes), sources=sources)


# --- command line ----------------------------------------------------------------------------


def _help_text(setting: Setting) -> str:
    default = setting.default_doc if setting.default_doc is not None else (setting.default or '""')
    env = ", ".join(setting.env)
    return f"{setting.help} Accepts {setting.accepted}. [default: {default}] [env: {env}]"


def rewrite_go_booleans(argv: Sequence[str]) -> list[str]:
    """Turn Go-style flags into what getopt takes: C{--flag=true|false} into C{--flag} /
    C{--no-flag}, and klog's C{--v=4}, C{--v 4} and C{-v=4} into C{-v 4}.

    @raise ConfigError: the value after C{=} is not a boolean.
    """
    booleans = {s.name.replace("_", "-"): s for s in SETTINGS if s.boolean}
    result: list[str] = []
    for index, arg in enumerate(argv):
        if arg == "--":
            return result + list(argv[index:])
        if arg == "--v":
            result.append("-v")
            continue
        if arg.startswith(("--v=", "-v=")):
            result += ["-v", arg.partition("=")[2]]
            continue
        if arg.startswith("--") and "=" in arg:
            name, _, value = arg[2:].partition("=")
            if name in booleans:
                try:
                    result.append(("--" if parse_bool(value) else "--no-") + name)
                except ValueError:
                    setting = booleans[name]
                    raise ConfigError(setting.flag, value, setting.flag, setting.accepted) from None
                continue
        result.append(arg)
    return result


class SettingsOptions(usage.Options):
    """twistd options generated from L{SETTINGS}; C{postOptions} resolves L{Settings}.

    An invalid value prints one line to stderr and exits with status 1 instead of raising
    L{usage.UsageError}, which twistd would answer with the whole usage text.

    @ivar given: setting name -> raw text from the command line, last one wins.
    @ivar environ: the environment resolution reads (C{os.environ} unless injected).
    """

    synopsis = "[options]"
    longdesc = (
        "Every option can also be set through the environment variable shown; a command-line"
        " flag wins over a variable, which wins over the default. Booleans take --x / --no-x"
        " or Go-style --x=true|false."
    )

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        host: Host | None = None,
        stderr: IO[str] | None = None,
    ) -> None:
        super().__init__()
        self.given: dict[str, str] = {}
        self.environ: Mapping[str, str] = os.environ if environ is None else environ
        self.host = host
        self.stderr = stderr
        self.resolution: Resolution | None = None

    @property
    def settings(self) -> Settings:
        assert self.resolution is not None, "parseOptions() has not run"
        return self.resolution.settings

    def fail(self, error: Exception) -> None:
        """Print C{sidero: <error>} on one line and exit with status 1."""
        stream = self.stderr if self.stderr is not None else sys.stderr
        stream.write(f"sidero: {error}\n")
        stream.flush()
        raise SystemExit(1)

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        argv = sys.argv[1:] if options is None else options
        try:
            argv = rewrite_go_booleans(argv)
        except ConfigError as e:
            self.fail(e)
        super().parseOptions(argv)

    def postOptions(self) -> None:
        try:
            self.resolution = resolve(self.given, self.environ, self.host)
        except (ConfigError, StartupError) as e:
            self.fail(e)


def _value_handler(setting: Setting) -> Callable[[SettingsOptions, str], None]:
    def handler(self: SettingsOptions, value: str) -> None:
        self.given[setting.name] = value

    handler.__doc__ = _help_text(setting)
    return handler


def _flag_handler(setting: Setting, value: str) -> Callable[[SettingsOptions], None]:
    def handler(self: SettingsOptions) -> None:
        self.given[setting.name] = value

    handler.__doc__ = (
        _help_text(setting) if value == "true" else f"Turn {setting.flag} off."
    )
    return handler


def _go_flag_handler(go: GoFlag) -> Callable[[SettingsOptions, str], None]:
    def handler(self: SettingsOptions, value: str) -> None:
        try:
            translated = go.translate(value)
        except (ValueError, KeyError):
            self.fail(ConfigError(go.flag, value, go.flag, go.accepted))
        self.given.update(translated)

    handler.__doc__ = f"Go manifests' flag: sets {go.meaning.replace('`', '')}. Accepts {go.accepted}."
    return handler


for _go in GO_FLAGS:
    setattr(SettingsOptions, _go.attribute, _go_flag_handler(_go))
del _go

for _setting in SETTINGS:
    if _setting.boolean:
        setattr(SettingsOptions, "opt_" + _setting.name, _flag_handler(_setting, "true"))
        setattr(SettingsOptions, "opt_no_" + _setting.name, _flag_handler(_setting, "false"))
    else:
        setattr(SettingsOptions, "opt_" + _setting.name, _value_handler(_setting))
del _setting


# --- documentation ---------------------------------------------------------------------------


def markdown_table() -> str:
    """The README configuration table, generated from L{SETTINGS}."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [
        "| Flag | Environment variables | Default | Accepted | Meaning |",
        "|---|---|---|---|---|",
    ]
    for s in SETTINGS:
        flag = f"`{s.flag}` / `--no-{s.flag[2:]}`" if s.boolean else f"`{s.flag}`"
        env = ", ".join(f"`{v}`" for v in s.env)
        if s.default_doc is not None:
            default = s.default_doc
        else:
            default = f"`{s.default}`" if s.default else "empty"
        lines.append(
            f"| {flag} | {env} | {cell(default)} | {cell(s.accepted)} | {cell(s.help)} |"
        )
    lines += [
        "",
        "The Go managers' flags, as their Deployments pass them, are accepted too:",
        "",
        "| Go flag | Accepted | Same as |",
        "|---|---|---|",
    ]
    for go in GO_FLAGS:
        lines.append(f"| `{go.flag}` | {cell(go.accepted)} | {cell(go.meaning)} |")
    return "\n".join(lines) + "\n"


def main(
    argv: Sequence[str] | None = None, stdout: IO[str] | None = None, stderr: IO[str] | None = None
) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--markdown"]:
        (stdout or sys.stdout).write(markdown_table())
        return 0
    (stderr or sys.stderr).write("usage: python -m sidero.config --markdown\n")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
