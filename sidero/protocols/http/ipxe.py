"""The iPXE side of network boot, with no I/O: the chain script and the C{/ipxe} decision.

C{boot_script} is what every iPXE client runs first (spec §3.3); C{decide} answers its
C{GET /ipxe} with the environment to boot or the way to boot from disk (spec §3.2).
Lookups go through L{BootLookup}, so the decision is a pure function of the caches.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sidero.api.environment import (
    INITRD_ASSET,
    KERNEL_ASSET,
    environment_is_ready,
    not_ready_reasons,
    talos_default_args,
)

AGENT_ENVIRONMENT_PREFIX = "agent-"
BOOT_FROM_DISK_METHODS = ("ipxe-exit", "http-404", "ipxe-sanboot")
LOG_RECEIVER_PORT = 4001
EVENT_SINK_PORT = 4002

# The script is deliberately plain iPXE of 2019 vintage (Debian's ROMs): no iflinkwait, no
# "--timeout" on ifopen.  "dhcp" waits for link itself; "isset", "inc" and typed settings exist
# in every build since 2013.
_SCRIPT = """#!ipxe
prompt --key 0x02 --timeout 2000 Ctrl-B for the iPXE shell... && shell ||
ifstat
set round:int32 0
:round
set i:int32 0
:nic
isset ${{net${{i}}/mac}} || goto nics_done
ifclose
echo Trying net${{i}} (${{net${{i}}/mac}})
dhcp net${{i}} || goto next_nic
route
chain --replace http://{endpoint}:{port}/ipxe?uuid=${{uuid}}&mac=${{net${{i}}/mac:hexhyp}}&domain=${{domain}}&hostname=${{hostname}}&serial=${{serial}}&arch=${{buildarch}} || goto next_nic
:next_nic
inc i
goto nic
:nics_done
echo No interface booted (round ${{round}})
inc round
iseq ${{round}} 10 || goto round
echo Boot failed, rebooting in 5 seconds
sleep 5
reboot
"""

MAX_SCRIPT_BYTES = 1000


def boot_script(endpoint: str, port: int) -> bytes:
    """The chain script served at C{/boot.ipxe}; the endpoint is used verbatim (spec §8).

    @raise ValueError: the rendered script would not fit the 1000-byte limit of §3.3.
    """
    script = _SCRIPT.format(endpoint=endpoint, port=port).encode("utf-8")
    if len(script) >= MAX_SCRIPT_BYTES:
        raise ValueError(f"iPXE script is {len(script)} bytes, the limit is {MAX_SCRIPT_BYTES}")
    return script


@dataclass(frozen=True)
class BootQuery:
    """The query of C{GET /ipxe}, normalised as §3.2 says."""

    uuid: str = ""
    mac: str = ""
    arch: str = "amd64"
    hostname: str = ""
    domain: str = ""
    serial: str = ""

    @classmethod
    def from_args(cls, args: Mapping[bytes, Sequence[bytes]]) -> BootQuery:
        """Build from twisted.web's C{request.args}: first value wins, names case-sensitive."""

        def first(name: str) -> str:
            values = args.get(name.encode())
            return values[0].decode("utf-8", "replace") if values else ""

        return cls(
            uuid=first("uuid"),
            mac=normalize_mac(first("mac")),
            arch="arm64" if first("arch") == "arm64" else "amd64",
            hostname=first("hostname"),
            domain=first("domain"),
            serial=first("serial"),
        )


_MAC_PATTERNS = (
    re.compile(r"^([0-9a-fA-F]{2})([-:])([0-9a-fA-F]{2})(\2[0-9a-fA-F]{2}){4}$"),
    re.compile(r"^[0-9a-fA-F]{4}\.[0-9a-fA-F]{4}\.[0-9a-fA-F]{4}$"),
)


def normalize_mac(value: str) -> str:
    """C{52-54-00-12-34-56} → C{52:54:00:12:34:56}; anything that is not a 48-bit MAC → C{""}."""
    if not any(p.match(value) for p in _MAC_PATTERNS):
        return ""
    digits = re.sub(r"[^0-9a-fA-F]", "", value).lower()
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


@dataclass(frozen=True)
class BootSettings:
    """What the decision needs from the configuration."""

    api_endpoint: str
    api_port: int
    boot_from_disk_method: str = "ipxe-exit"
    extra_agent_kernel_args: str = ""
    siderolink_server_address: str = ""
    #: who may fetch /configdata: "owner" (its server's addresses, L{metadata.access}) or "any".
    configdata_access: str = "owner"
    #: sources allowed any /configdata in "owner" mode (a proxy, a NAT gateway).
    configdata_trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


class LookupFailed(Exception):
    """A lookup failed for a reason other than absence (the API is unreachable...): answer 500."""


class BootLookup(Protocol):
    """Read access to the resources the decision needs; C{None} means not found."""

    def server(self, name: str) -> dict[str, Any] | None: ...

    def server_binding(self, name: str) -> dict[str, Any] | None: ...

    def server_class(self, name: str) -> dict[str, Any] | None: ...

    def environment(self, name: str) -> dict[str, Any] | None: ...


@dataclass(frozen=True)
class BootEvent:
    """A Warning Event to record about C{obj} (the Server) for an answer that is an error."""

    obj: dict[str, Any]
    reason: str
    message: str


@dataclass(frozen=True)
class BootResponse:
    """An HTTP answer to C{/ipxe}: status, body, what was decided (for the log), and an Event
    to record on the Server when the operator must act."""

    status: int
    body: bytes
    decision: str
    environment: str = ""
    event: BootEvent | None = None


#: Event reasons of /ipxe answers.
SERVER_CLASS_MISSING_REASON = "BootFromDiskFailed"
ENVIRONMENT_NOT_READY_REASON = "EnvironmentNotReady"


def join_host_port(host: str, port: int) -> str:
    """C{host:port}, bracketing a bare IPv6 literal (Go's net.JoinHostPort)."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _cmdline_append(args: list[tuple[str, str | None]], item: str) -> None:
    key, sep, value = item.partition("=")
    args.append((key, value if sep and value else None))


def agent_kernel_args(settings: BootSettings, mac: str) -> list[str]:
    """The agent's kernel command line (§3.2 "Agent environment").

    Keys keep their first-occurrence order and value-less args render bare; each key given in
    C{extra_agent_kernel_args} replaces every value of that key in place, or is appended.
    """
    base = [
        *talos_default_args(""),
        "console=tty0", "console=ttyS0", "initrd=initramfs.xz", "panic=30",
        f"sidero.mac={mac}", f"sidero.endpoint={settings.api_endpoint}:{settings.api_port}",
    ]
    ordered: dict[str, list[str | None]] = {}
    for item in base:
        key, sep, value = item.partition("=")
        ordered.setdefault(key, []).append(value if sep and value else None)
    extra: dict[str, list[str | None]] = {}
    for item in settings.extra_agent_kernel_args.split():
        key, sep, value = item.partition("=")
        extra.setdefault(key, []).append(value if sep and value else None)
    for key, values in extra.items():
        ordered[key] = values  # replaces in place when present, appends otherwise
    rendered: list[str] = []
    for key, values in ordered.items():
        rendered.extend(key if v is None else f"{key}={v}" for v in values)
    return rendered


_MAC_MARK = "\0mac\0"  # cannot occur in a setting or a MAC


@functools.lru_cache(maxsize=16)
def _agent_args_template(settings: BootSettings) -> tuple[str, ...]:
    return tuple(agent_kernel_args(settings, _MAC_MARK))


def agent_kernel_args_for(settings: BootSettings, mac: str) -> list[str]:
    """L{agent_kernel_args}, computed once per settings (every unknown machine's /ipxe asks)."""
    if not mac:  # an empty value renders the key bare: not a substitution
        return agent_kernel_args(settings, mac)
    return [a.replace(_MAC_MARK, mac) for a in _agent_args_template(settings)]


def talos_kernel_args(settings: BootSettings, args: Sequence[str]) -> list[str]:
    """Append the Talos/SideroLink args of §3.2 unless an arg with that key is already there.

    Every Talos boot gets all four: the config URL, the SideroLink API (this port, h2c), and
    the kernel-log receiver and event sink at this host's tunnel address.

    @raise ValueError: the tunnel address is not known (the SideroLink identity is not loaded).
    """
    tunnel = settings.siderolink_server_address
    if not tunnel:
        raise ValueError("no SideroLink server address: the SideroLink identity is not loaded")
    result = list(args)
    endpoint = join_host_port(settings.api_endpoint, settings.api_port)
    wanted = [
        ("talos.config", f"talos.config=http://{endpoint}/configdata?uuid="),
        ("siderolink.api", f"siderolink.api={endpoint}"),
        ("talos.logging.kernel", f"talos.logging.kernel=tcp://{join_host_port(tunnel, LOG_RECEIVER_PORT)}"),
        ("talos.events.sink", f"talos.events.sink={join_host_port(tunnel, EVENT_SINK_PORT)}"),
    ]
    for prefix, arg in wanted:
        if not any(a.startswith(prefix + "=") for a in result):
            result.append(arg)
    return result


def render_environment_script(name: str, args: Sequence[str]) -> bytes:
    """The script that boots an environment's kernel and initrd (§3.2 step 4)."""
    kernel_line = f"kernel /env/{name}/{KERNEL_ASSET} " + "".join(f" {a}" for a in args)
    return (
        f"#!ipxe\n{kernel_line}\ninitrd /env/{name}/{INITRD_ASSET}\nboot\n"
    ).encode()


_DISK_SCRIPTS = {
    "ipxe-exit": b"#!ipxe\nexit\n",
    "ipxe-sanboot": b"#!ipxe\nsanboot --no-describe --drive 0x80\n",
}


def _spec(obj: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return (obj or {}).get("spec") or {}


def _ref_name(ref: Any) -> str:
    return str(ref.get("name") or "") if isinstance(ref, Mapping) else ""


def decide(query: BootQuery, lookup: BootLookup, settings: BootSettings) -> BootResponse:
    """Answer C{GET /ipxe} (§3.2).  Never raises except L{LookupFailed}, which means 500."""
    server = lookup.server(query.uuid) if query.uuid else None
    binding = lookup.server_binding(query.uuid) if query.uuid else None
    if server is None or binding is None:
        name = AGENT_ENVIRONMENT_PREFIX + query.arch
        args = agent_kernel_args_for(settings, query.mac)
        reason = "unknown server" if server is None else "server not allocated"
        return BootResponse(200, render_environment_script(name, args), f"agent ({reason})", name)

    server_spec = _spec(server)
    binding_spec = _spec(binding)
    class_name = _ref_name(binding_spec.get("serverClassRef"))
    conditions = (server.get("status") or {}).get("conditions") or []
    pxe_booted = any(c.get("type") == "PXEBooted" for c in conditions if isinstance(c, Mapping))

    if pxe_booted and not server_spec.get("pxeBootAlways"):
        method = server_spec.get("bootFromDiskMethod") or ""
        if not method and class_name:
            server_class = lookup.server_class(class_name)
            if server_class is None:
                # Spec 3.2 step 2.3: the class lookup failing is a 500, never a silent default.
                message = (f'serverclass "{class_name}" of server {query.uuid} not found: cannot'
                           " choose its boot-from-disk method")
                return BootResponse(500, (message + "\n").encode(), "boot from disk failed",
                                    event=BootEvent(server, SERVER_CLASS_MISSING_REASON, message))
            method = _spec(server_class).get("bootFromDiskMethod") or ""
        method = method or settings.boot_from_disk_method
        if method == "http-404":
            return BootResponse(404, b"", "boot from disk (http-404)")
        body = _DISK_SCRIPTS.get(method, _DISK_SCRIPTS["ipxe-exit"])
        return BootResponse(200, body, f"boot from disk ({method if method in _DISK_SCRIPTS else 'ipxe-exit'})")

    env_name = _ref_name(server_spec.get("environmentRef"))
    if not env_name and class_name:
        server_class = lookup.server_class(class_name)
        if server_class is None:
            return BootResponse(404, b"", f"serverclass {class_name!r} not found")
        env_name = _ref_name(_spec(server_class).get("environmentRef"))
    env_name = env_name or "default"
    environment = lookup.environment(env_name)
    if environment is None:
        return BootResponse(404, b"", f"environment {env_name!r} not found", env_name)
    if not environment_is_ready(environment):
        reasons = not_ready_reasons(environment)
        message = f'environment "{env_name}" is not ready'
        if not reasons:
            return BootResponse(412, message.encode(), "environment not ready", env_name)
        # The body starts as Sidero's; the reason (both digests of a sha512 mismatch) follows.
        message += ": " + "; ".join(reasons)
        return BootResponse(
            412, (message + "\n").encode(), "environment not ready", env_name,
            event=BootEvent(server, ENVIRONMENT_NOT_READY_REASON, message),
        )
    if not settings.siderolink_server_address:
        # Booting Talos without the SideroLink args would leave it without logs and events.
        raise LookupFailed("the SideroLink identity is not loaded yet")
    kernel_args = list((_spec(environment).get("kernel") or {}).get("args") or [])
    args = talos_kernel_args(settings, [str(a) for a in kernel_args])
    return BootResponse(200, render_environment_script(env_name, args), "talos", env_name)

