# -*- test-case-name: tests.dashboard.test_views -*-
"""What the dashboard shows, as HTML, from plain objects (pure: no I/O, no reactor).

Every value from a resource or a log goes through L{esc}: names, hostnames and inventory come
from machines nobody vouches for.  Rows carry C{id} and C{data-key} so the browser script can
replace, insert (in key order) or remove one row when the server pushes it (L{sidero.dashboard.live}).
The page holds no inline script or style: the Content-Security-Policy forbids them.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

Object = dict[str, Any]


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def name_of(obj: Object) -> str:
    return str(_get(obj, "metadata", "name") or "")


def server_url(name: str) -> str:
    return "/servers/" + quote(name, safe="")


# --- servers ---------------------------------------------------------------------------------


def server_state(server: Object, binding: Object | None) -> dict[str, Any]:
    """The flags an operator scans for: accepted, clean, allocated, cordoned, power."""
    spec = server.get("spec") or {}
    status = server.get("status") or {}
    return {
        "accepted": bool(spec.get("accepted")),
        "clean": bool(status.get("isClean")),
        "allocated": bool(status.get("inUse")) or binding is not None,
        "cordoned": bool(spec.get("cordoned")),
        "power": str(status.get("power") or "unknown"),
    }


def inventory(server: Object) -> dict[str, str]:
    """One short cell each: CPU, memory, storage, NICs, system."""
    hw = _get(server, "spec", "hardware") or {}
    compute = hw.get("compute") or {}
    processors = compute.get("processors") or []
    model = next((str(p.get("productName") or p.get("manufacturer") or "") for p in processors
                  if isinstance(p, dict) and (p.get("productName") or p.get("manufacturer"))), "")
    cores = compute.get("totalCoreCount")
    count = compute.get("processorCount") or len(processors)
    cpu = " ".join(p for p in (f"{count}×" if count else "", model,
                               f"({cores} cores)" if cores else "") if p)
    storage = hw.get("storage") or {}
    disks = storage.get("deviceCount") or len(storage.get("devices") or [])
    interfaces = (hw.get("network") or {}).get("interfaces") or []
    system = hw.get("system") or {}
    return {
        "cpu": cpu,
        "memory": str((hw.get("memory") or {}).get("totalSize") or ""),
        "storage": " ".join(p for p in ((f"{disks} disk" + ("s" if disks != 1 else "")) if disks else "",
                                        str(storage.get("totalSize") or "")) if p),
        "nics": ", ".join(str(i.get("mac")) for i in interfaces if isinstance(i, dict) and i.get("mac")),
        "system": " ".join(str(system.get(k)) for k in ("manufacturer", "productName")
                           if system.get(k)),
    }


def _badge(label: str, on: bool, kind: str = "") -> str:
    cls = f"badge {'on' if on else 'off'} {kind}".strip()
    return f'<span class="{esc(cls)}">{esc(label if on else "not " + label)}</span>'


def state_badges(state: Mapping[str, Any]) -> str:
    badges = [_badge("accepted", state["accepted"]), _badge("clean", state["clean"]),
              _badge("allocated", state["allocated"])]
    if state["cordoned"]:
        badges.append('<span class="badge warn">cordoned</span>')
    power = esc(state["power"])
    badges.append(f'<span class="badge power-{power}">power {power}</span>')
    return " ".join(badges)


def server_row(server: Object, binding: Object | None, classes: Sequence[str]) -> str:
    name = name_of(server)
    inv = inventory(server)
    state = server_state(server, binding)
    hostname = _get(server, "spec", "hostname") or ""
    addresses = ", ".join(str(a.get("address")) for a in (_get(server, "status", "addresses") or [])
                          if isinstance(a, dict) and a.get("address"))
    return (
        f'<tr id="server:{esc(name)}" data-key="{esc(name)}" class="server">'
        f'<td><a href="{esc(server_url(name))}">{esc(name)}</a></td>'
        f"<td>{esc(hostname)}</td><td>{state_badges(state)}</td>"
        f'<td>{esc(", ".join(classes))}</td>'
        f"<td>{esc(inv['system'])}</td><td>{esc(inv['cpu'])}</td><td>{esc(inv['memory'])}</td>"
        f"<td>{esc(inv['storage'])}</td><td>{esc(addresses)}</td></tr>"
    )


SERVER_HEAD = ("Server", "Hostname", "State", "Classes", "System", "CPU", "Memory", "Storage",
               "Addresses")


def classes_of_servers(classes: Iterable[Object]) -> dict[str, list[str]]:
    """Server name -> names of the ServerClasses holding it (from their status lists)."""
    out: dict[str, list[str]] = {}
    for sc in classes:
        status = sc.get("status") or {}
        for server in [*(status.get("serversAvailable") or []), *(status.get("serversInUse") or [])]:
            out.setdefault(str(server), []).append(name_of(sc))
    return out


# --- classes and environments ----------------------------------------------------------------


def class_row(sc: Object) -> str:
    name = name_of(sc)
    status = sc.get("status") or {}
    available = len(status.get("serversAvailable") or [])
    in_use = len(status.get("serversInUse") or [])
    env = _get(sc, "spec", "environmentRef", "name") or ""
    return (f'<tr id="class:{esc(name)}" data-key="{esc(name)}" class="serverclass">'
            f"<td>{esc(name)}</td><td class=num>{available}</td><td class=num>{in_use}</td>"
            f"<td class=num>{available + in_use}</td><td>{esc(env)}</td></tr>")


CLASS_HEAD = ("ServerClass", "Available", "In use", "Total", "Environment")


def asset_readiness(env: Object) -> list[tuple[str, bool, str]]:
    """(asset, ready, why) for the kernel and the initrd, from the status conditions by URL."""
    spec = env.get("spec") or {}
    conditions = [c for c in (_get(env, "status", "conditions") or []) if isinstance(c, dict)]
    out = []
    for asset in ("kernel", "initrd"):
        url = _get(spec, asset, "url")
        found = next((c for c in conditions if c.get("url") == url), None) if url else None
        if not url:
            out.append((asset, False, "no URL"))
        elif found is None:
            out.append((asset, False, "not fetched yet"))
        else:
            ready = str(found.get("status")) == "True"
            out.append((asset, ready, "" if ready else str(found.get("message") or found.get("reason") or "")))
    return out


def environment_row(env: Object) -> str:
    name = name_of(env)
    cells = []
    assets = asset_readiness(env)
    for _asset, ready, why in assets:
        cells.append(f"<td>{_badge('ready', ready)}"
                     + (f' <span class="why">{esc(why)}</span>' if why else "") + "</td>")
    overall = all(ready for _, ready, _ in assets)
    return (f'<tr id="environment:{esc(name)}" data-key="{esc(name)}" class="environment">'
            f"<td>{esc(name)}</td><td>{_badge('ready', overall)}</td>{''.join(cells)}</tr>")


ENVIRONMENT_HEAD = ("Environment", "Ready", "Kernel", "Initrd")


# --- the boot timeline -----------------------------------------------------------------------


def _time(seconds: float) -> str:
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def timeline_row(entry: Any, known_servers: Any = ()) -> str:
    """One timeline step (a L{sidero.timeline.Entry}); the machine links to its server page
    when a Server of that name is known."""
    machine = entry.uuid or entry.mac or entry.ip or ""
    who = (f'<a href="{esc(server_url(machine))}">{esc(machine)}</a>'
           if entry.uuid and entry.uuid in known_servers else esc(machine))
    details = " ".join(f"{k}={v}" for k, v in sorted(entry.details.items()) if v not in (None, ""))
    return (f'<tr class="step" data-step="{esc(entry.step)}"><td>{esc(_time(entry.time))}</td>'
            f"<td>{who}</td><td>{esc(entry.step)}</td><td>{esc(entry.source)}</td>"
            f"<td>{esc(details)}</td></tr>")


TIMELINE_HEAD = ("Time (UTC)", "Machine", "Step", "Source", "Details")


# --- pages -----------------------------------------------------------------------------------


def _table(head: Sequence[str], body_id: str, rows: Iterable[str], empty: str) -> str:
    cols = "".join(f"<th>{esc(h)}</th>" for h in head)
    return (f'<table><thead><tr>{cols}</tr></thead><tbody id="{esc(body_id)}" '
            f'data-empty="{esc(empty)}">{"".join(rows)}</tbody></table>')


def page(title: str, body: str, *, stream: str | None = None, logged_in: bool = False) -> str:
    """The shared frame; C{stream} is the server-sent events URL the script follows."""
    live = (f'<span id="live" class="live off" data-stream="{esc(stream)}">connecting</span>'
            if stream else "")
    logout = ('<form method="post" action="/logout" class="logout"><button>Log out</button></form>'
              if logged_in else "")
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>{esc(title)}</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="stylesheet" href="/static/dashboard.css">'
        '<script src="/static/dashboard.js" defer></script></head><body>'
        f'<header><a href="/" class="home">sidero</a> <h1>{esc(title)}</h1>{live}{logout}</header>'
        f"<main>{body}</main></body></html>\n"
    )


def overview_page(sections: Mapping[str, str], *, logged_in: bool = False) -> str:
    body = (
        "<section><h2>Servers</h2>"
        + _table(SERVER_HEAD, "servers", [sections["servers"]], "No servers registered yet.")
        + "</section><section><h2>Server classes</h2>"
        + _table(CLASS_HEAD, "serverclasses", [sections["serverclasses"]], "No server classes.")
        + "</section><section><h2>Environments</h2>"
        + _table(ENVIRONMENT_HEAD, "environments", [sections["environments"]], "No environments.")
        + "</section><section><h2>Recent boot steps</h2>"
        + _table(TIMELINE_HEAD, "timeline", [sections["timeline"]], "Nothing booted yet.")
        + "</section>"
    )
    return page("Sidero dashboard", body, stream="/events", logged_in=logged_in)


def _pairs(rows: Iterable[tuple[str, Any]]) -> str:
    return "<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in rows
                            if v not in (None, "", [])) + "</dl>"


def server_details(server: Object | None, binding: Object | None, classes: Sequence[str]) -> str:
    """The server page's state and inventory section (what changes when the Server does)."""
    if server is None:
        return '<p class="gone">No such server (yet): this page fills in when it registers.</p>'
    state = server_state(server, binding)
    spec = server.get("spec") or {}
    hw = spec.get("hardware") or {}
    system = hw.get("system") or {}
    inv = inventory(server)
    out = [f"<p>{state_badges(state)}</p>", _pairs([
        ("Hostname", spec.get("hostname")), ("Classes", ", ".join(classes)),
        ("Manufacturer", system.get("manufacturer")), ("Product", system.get("productName")),
        ("Serial", system.get("serialNumber")), ("SKU", system.get("skuNumber")),
        ("CPU", inv["cpu"]), ("Memory", inv["memory"]), ("Storage", inv["storage"]),
        ("BMC", _get(spec, "bmc", "endpoint")), ("Power API", _get(spec, "managementApi", "endpoint")),
        ("Addresses", ", ".join(str(a.get("address")) for a in (_get(server, "status", "addresses") or [])
                                if isinstance(a, dict))),
    ])]
    if binding is not None:
        bspec = binding.get("spec") or {}
        mm = bspec.get("metalMachineRef") or {}
        conditions = ", ".join(f"{c.get('type')}={c.get('status')}"
                               for c in (_get(binding, "status", "conditions") or [])
                               if isinstance(c, dict))
        out.append("<h3>Allocation</h3>" + _pairs([
            ("MetalMachine", f"{mm.get('namespace', '')}/{mm.get('name', '')}"),
            ("Cluster", _get(binding, "metadata", "labels", "cluster.x-k8s.io/cluster-name")),
            ("SideroLink address", _get(bspec, "siderolink", "address")),
            ("Talos hostname", bspec.get("hostname")),
            ("Talos addresses", ", ".join(str(a) for a in bspec.get("addresses") or [])),
            ("Conditions", conditions),
        ]))
    devices = (hw.get("storage") or {}).get("devices") or []
    if devices:
        out.append("<h3>Disks</h3><table><thead><tr><th>Device</th><th>Model</th><th>Type</th>"
                   "<th>Size (bytes)</th><th>Serial</th></tr></thead><tbody>" + "".join(
                       f"<tr><td>{esc(d.get('deviceName'))}</td><td>{esc(d.get('productName'))}</td>"
                       f"<td>{esc(d.get('type'))}</td><td class=num>{esc(d.get('size'))}</td>"
                       f"<td>{esc(d.get('serialNumber'))}</td></tr>"
                       for d in devices if isinstance(d, dict)) + "</tbody></table>")
    nics = (hw.get("network") or {}).get("interfaces") or []
    if nics:
        out.append("<h3>Network</h3><table><thead><tr><th>Name</th><th>MAC</th><th>Addresses</th>"
                   "<th>MTU</th></tr></thead><tbody>" + "".join(
                       f"<tr><td>{esc(n.get('name'))}</td><td>{esc(n.get('mac'))}</td>"
                       f"<td>{esc(', '.join(str(a) for a in n.get('addresses') or []))}</td>"
                       f"<td class=num>{esc(n.get('mtu'))}</td></tr>"
                       for n in nics if isinstance(n, dict)) + "</tbody></table>")
    return "".join(out)


def server_page(name: str, details: str, steps: Sequence[Any], lines: Sequence[str], *,
                logged_in: bool = False) -> str:
    body = (
        f'<section><h2>State and inventory</h2><div id="details">{details}</div></section>'
        "<section><h2>Boot timeline</h2>"
        + _table(TIMELINE_HEAD, "timeline", (timeline_row(e) for e in reversed(steps)),
                 "No boot steps recorded.")
        + '</section><section><h2>Logs <small>(kernel and syslog, live)</small></h2>'
        f'<pre id="logs" class="logs">{esc("".join(line + chr(10) for line in lines))}</pre></section>'
    )
    return page(f"Server {name}", body, stream="/events?server=" + quote(name, safe=""),
                logged_in=logged_in)


def login_page(error: str = "") -> str:
    message = f'<p class="error">{esc(error)}</p>' if error else ""
    body = (f'<form method="post" action="/login" class="login">{message}'
            '<label>Password <input type="password" name="password" id="password" '
            'autocomplete="current-password" autofocus required></label>'
            '<button type="submit" id="login">Log in</button></form>')
    return page("Sidero dashboard: log in", body)
