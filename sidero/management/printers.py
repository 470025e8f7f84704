# -*- test-case-name: tests.management.test_printers -*-
"""Render resources the way kubectl does, with no I/O: tables, YAML, JSON and names.

The table follows the API server's CRD table convertor cell by cell (the first JSONPath
match only; string columns print through JSONPath so lists and maps show as compact JSON;
typed columns keep only values of their type; a missing value is an empty cell) and kubectl's
printer (upper-case headers, C{NAMESPACE} first with C{-A}, priority>0 columns only with
C{-o wide}, tabwriter alignment with minimum width 6 and padding 3).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import yaml

from sidero.api.registry import PrinterColumn, ResourceType
from sidero.management.jsonpath import JSONPath, go_float, go_text

TAB_MIN_WIDTH = 6
TAB_PADDING = 3

_paths: dict[str, JSONPath] = {}


def _path(expr: str) -> JSONPath:
    p = _paths.get(expr)
    if p is None:
        p = _paths[expr] = JSONPath(expr)
    return p


def human_duration(seconds: float) -> str:
    """apimachinery's C{duration.HumanDuration}: about two significant figures (C{5m},
    C{3m20s}, C{2d}, C{4h10m})."""
    whole = int(seconds)
    if whole < -1:
        return "<invalid>"
    if whole < 0:
        return "0s"
    if whole < 120:
        return f"{whole}s"
    minutes = whole // 60
    if minutes < 10:
        s = whole % 60
        return f"{minutes}m" if s == 0 else f"{minutes}m{s}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = whole // 3600
    if hours < 8:
        m = minutes % 60
        return f"{hours}h" if m == 0 else f"{hours}h{m}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        h = hours % 24
        return f"{hours // 24}d" if h == 0 else f"{hours // 24}d{h}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        dy = (hours // 24) % 365
        years = hours // 24 // 365
        return f"{years}y" if dy == 0 else f"{years}y{dy}d"
    return f"{hours // 24 // 365}y"


def parse_timestamp(value: str) -> datetime | None:
    """An RFC 3339 timestamp as Kubernetes writes it, or None when it is not one."""
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def cell(column: PrinterColumn, obj: dict[str, Any], now: datetime) -> str:
    """The text kubectl shows for one printer column of one object."""
    found, value = _path(column.json_path).first(obj)
    if not found:
        return ""
    if column.type == "string":
        return go_text(value)
    if value is None:
        return ""
    if column.type == "integer":
        if isinstance(value, bool) or not isinstance(value, int | float):
            return ""
        return str(int(value))
    if column.type == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            return ""
        return go_float(float(value))
    if column.type == "boolean":
        return ("true" if value else "false") if isinstance(value, bool) else ""
    if column.type == "date":
        if not isinstance(value, str):
            return ""
        ts = parse_timestamp(value)
        if ts is None:
            return "<invalid>"
        return human_duration((now - ts).total_seconds())
    return ""


_CONTROL = re.compile(r"[\x00-\x08\x0b\x1b\x7f]")


def escape_cell(text: str) -> str:
    """Cut at the first line break (adding C{...}) and neutralise terminal control
    characters, so a hostname reported by a machine cannot rewrite the operator's screen."""
    for i, ch in enumerate(text):
        if ch in "\n\r\f":
            text = text[:i] + "..."
            break
    return _CONTROL.sub(lambda m: f"^{chr(ord(m.group()) ^ 0x40)}", text)


def columns_for(kind: ResourceType, wide: bool) -> list[PrinterColumn]:
    return [c for c in kind.printer_columns if wide or c.priority == 0]


def table(
    kind: ResourceType,
    objects: Iterable[dict[str, Any]],
    *,
    wide: bool = False,
    with_namespace: bool = False,
    no_headers: bool = False,
    now: datetime | None = None,
) -> list[list[str]]:
    """Header plus one row per object: [NAMESPACE,] NAME, then the printer columns."""
    now = now or datetime.now(UTC)
    cols = columns_for(kind, wide)
    rows: list[list[str]] = []
    if not no_headers:
        header = ["NAME"] + [c.name.upper() for c in cols]
        rows.append((["NAMESPACE"] if with_namespace else []) + header)
    for obj in objects:
        meta = obj.get("metadata") or {}
        row = [escape_cell(str(meta.get("name", "")))]
        row += [escape_cell(cell(c, obj, now)) for c in cols]
        if with_namespace:
            row.insert(0, escape_cell(str(meta.get("namespace", ""))))
        rows.append(row)
    return rows


def tabwrite(rows: Sequence[Sequence[str]]) -> str:
    """Go's C{text/tabwriter} as kubectl configures it: every cell but the last of a line
    is padded to its column's width (widest cell + 3, at least 6)."""
    if not rows:
        return ""
    ncols = max(len(r) for r in rows)
    widths = [TAB_MIN_WIDTH] * ncols
    for r in rows:
        for i, text in enumerate(r[:-1]):
            widths[i] = max(widths[i], len(text) + TAB_PADDING)
    out = []
    for r in rows:
        parts = [text.ljust(widths[i]) for i, text in enumerate(r[:-1])]
        parts.append(r[-1] if r else "")
        out.append("".join(parts) + "\n")
    return "".join(out)


def resource_prefix(kind: ResourceType) -> str:
    """C{server.metal.sidero.dev}, or C{secret} for the core group, as C{-o name} prints."""
    return f"{kind.kind.lower()}.{kind.group}" if kind.group else kind.kind.lower()


def name_of(kind: ResourceType, obj: dict[str, Any]) -> str:
    return f"{resource_prefix(kind)}/{(obj.get('metadata') or {}).get('name', '')}"


def as_list(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The C{v1 List} kubectl prints for several objects with C{-o yaml|json}."""
    return {"apiVersion": "v1", "items": items, "kind": "List", "metadata": {"resourceVersion": ""}}


class _Dumper(yaml.SafeDumper):
    """Block style, no sequence indentation, double quotes: what kubectl's YAML looks like."""

    def choose_scalar_style(self) -> str:
        style: str = super().choose_scalar_style()
        return '"' if style == "'" else style


def _str_presenter(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_Dumper.add_representer(str, _str_presenter)


def to_yaml(obj: Any) -> str:
    return yaml.dump(
        obj, Dumper=_Dumper, sort_keys=True, default_flow_style=False, allow_unicode=True,
        width=1 << 30,
    )


def to_json(obj: Any) -> str:
    """Four-space indented, keys sorted, as C{kubectl -o json}."""
    return json.dumps(obj, indent=4, sort_keys=True, ensure_ascii=False) + "\n"
