# -*- test-case-name: tests.api.test_environment -*-
"""Environments (spec §1.3): the Talos default kernel arguments, the C{default} Environment,
readiness, and small typed accessors over Server and reference dicts.

Everything here is a pure function of its arguments: the Environment controller and the
iPXE server both call it, so the default environment is the same wherever it is built.
"""

from __future__ import annotations

import re
from typing import Any

from sidero import TALOS_RELEASES_URL
from sidero.api.registry import ENVIRONMENT

Object = dict[str, Any]

DEFAULT_ENVIRONMENT = "default"
AGENT_ENVIRONMENT = "agent"
KERNEL_ASSET = "vmlinuz"
INITRD_ASSET = "initramfs.xz"
DEFAULT_BMC_PORT = 623
DEFAULT_BMC_INTERFACE = "lanplus"

_BASE_ARGS = (
    "init_on_alloc=1",
    "slab_nomerge=",
    "pti=on",
    "consoleblank=0",
    "nvme_core.io_timeout=4294967295",
    "printk.devkmsg=on",
)
_EXTRA_ARGS = (
    "console=tty0",
    "console=ttyS0",
    "earlyprintk=ttyS0",
    f"initrd={INITRD_ASSET}",
    "talos.platform=metal",
)

_VERSION = re.compile(r"^\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?")


def parse_version(version: str) -> tuple[int, int, int] | None:
    """C{"v1.13.0-beta.1"} -> C{(1, 13, 0)}; None when nothing version-like is there.

    Tolerant like Talos' own parsing: a leading C{v}, missing minor/patch and any
    prerelease or build suffix are accepted (the prerelease is ignored).
    """
    m = _VERSION.match(version or "")
    if not m:
        return None
    return (int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0))


def talos_default_args(version: str) -> list[str]:
    """Talos machinery v1.13.0 C{kernel.DefaultArgs} for the given Talos version.

    An empty or unparsable version means the latest Talos: no IMA arguments, and SELinux,
    module signature enforcement and proc_mem protection all on.
    """
    parsed = parse_version(version)
    args = list(_BASE_ARGS)
    if parsed is not None and parsed <= (1, 10, 99):
        args += ["ima_template=ima-ng", "ima_appraise=fix", "ima_hash=sha512"]
    if parsed is None or parsed >= (1, 10, 0):
        args.append("selinux=1")
    if parsed is None or parsed >= (1, 12, 0):
        args.append("module.sig_enforce=1")
    if parsed is None or parsed >= (1, 13, 0):
        args.append("proc_mem.force_override=never")
    return args


def default_kernel_args(talos_release: str) -> list[str]:
    """The kernel arguments of the C{default} Environment, sorted bytewise as Go's sort.Strings."""
    return sorted(talos_default_args(talos_release) + list(_EXTRA_ARGS),
                  key=lambda s: s.encode("utf-8"))


def default_environment(talos_release: str, assets_url: str = TALOS_RELEASES_URL) -> Object:
    """The C{default} Environment object (storage version), booting Talos C{talos_release}
    from C{assets_url} (Talos's GitHub releases, or a mirror with the same layout)."""
    base = f"{assets_url.rstrip('/')}/{talos_release}"
    return {
        "apiVersion": ENVIRONMENT.api_version,
        "kind": ENVIRONMENT.kind,
        "metadata": {"name": DEFAULT_ENVIRONMENT},
        "spec": {
            "kernel": {
                "url": f"{base}/vmlinuz-amd64",
                "args": default_kernel_args(talos_release),
            },
            "initrd": {
                "url": f"{base}/initramfs-amd64.xz",
            },
        },
    }


def asset_urls(env: Object) -> list[str]:
    """The non-empty kernel and initrd URLs, kernel first."""
    spec = env.get("spec") or {}
    urls = []
    for asset in ("kernel", "initrd"):
        url = (spec.get(asset) or {}).get("url") or ""
        if url:
            urls.append(url)
    return urls


def environment_is_ready(env: Object) -> bool:
    """Ready when every non-empty asset URL has a C{Ready=True} condition naming it."""
    remaining = set(asset_urls(env))
    for c in (env.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready" and c.get("status") == "True":
            remaining.discard(c.get("url") or "")
    return not remaining


def not_ready_reasons(env: Object) -> list[str]:
    """Why assets are not ready, from C{Ready=False} conditions that carry a message (a sha512
    mismatch names both digests); empty when no condition says."""
    out = []
    for c in (env.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready" and c.get("status") == "False" and c.get("message"):
            out.append(str(c["message"]))
    return out


def kernel_args(env: Object) -> list[str]:
    return list(((env.get("spec") or {}).get("kernel") or {}).get("args") or [])


# ---- small typed accessors ---------------------------------------------------------------------

def name(obj: Object) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")


def namespace(obj: Object) -> str:
    return str((obj.get("metadata") or {}).get("namespace") or "")


def labels(obj: Object) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("labels") or {})


def ref_name(obj: Object, field: str) -> str:
    """C{spec.<field>.name}, or C{""} (e.g. C{ref_name(server, "environmentRef")})."""
    return str(((obj.get("spec") or {}).get(field) or {}).get("name") or "")


def server_bmc(server: Object) -> Object | None:
    """The Server's BMC with defaults applied (port 623, interface lanplus), or None."""
    bmc = (server.get("spec") or {}).get("bmc")
    if not bmc:
        return None
    out = dict(bmc)
    out["port"] = int(out.get("port") or DEFAULT_BMC_PORT)
    out["interface"] = out.get("interface") or DEFAULT_BMC_INTERFACE
    return out


def server_management_api(server: Object) -> str:
    return str(((server.get("spec") or {}).get("managementApi") or {}).get("endpoint") or "")


def server_accepted(server: Object) -> bool:
    return bool((server.get("spec") or {}).get("accepted"))


def server_cordoned(server: Object) -> bool:
    return bool((server.get("spec") or {}).get("cordoned"))
