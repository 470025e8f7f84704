# -*- test-case-name: tests.management.test_describe -*-
"""C{sidero describe}: kubectl's generic describer for custom resources, plus a boot timeline.

kubectl prints a CRD object as C{Name}, C{Namespace}, C{Labels}, C{Annotations}, C{API
Version}, C{Kind}, then every other field as an indented tree whose keys are split from
camelCase into words (C{Creation Timestamp}), then the object's Events. For a Server we add
its boot timeline, which no Kubernetes object holds: the service records it in memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from sidero.management.jsonpath import go_text
from sidero.management.printers import human_duration, parse_timestamp, tabwrite

Object = dict[str, Any]

_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")


def title(key: str) -> str:
    """C{creationTimestamp} -> C{Creation Timestamp}, C{uuid} -> C{UUID}-ish, as kubectl."""
    words = _WORD.findall(key) or [key]
    return " ".join(w[:1].upper() + w[1:] for w in words)


def _pairs(mapping: Any, indent: str) -> list[str]:
    if not mapping:
        return ["<none>"]
    items = sorted(mapping.items())
    return [f"{k}={v}" if i == 0 else f"{indent}{k}={v}" for i, (k, v) in enumerate(items)]


def _tree(value: Any, level: int, out: list[str]) -> None:
    pad = "  " * level
    if isinstance(value, dict):
        width = max((len(title(k)) for k in value), default=0) + 1
        for key in sorted(value):
            child = value[key]
            label = (title(key) + ":").ljust(width + 1)
            if isinstance(child, dict):
                if not child:
                    out.append(f"{pad}{title(key)}:")
                    continue
                out.append(f"{pad}{title(key)}:")
                _tree(child, level + 1, out)
            elif isinstance(child, list):
                out.append(f"{pad}{title(key)}:")
                _list(child, level + 1, out)
            else:
                out.append(f"{pad}{label} {_scalar(child)}".rstrip())
    else:
        out.append(f"{pad}{_scalar(value)}")


def _list(items: list[Any], level: int, out: list[str]) -> None:
    """kubectl prints a list of maps as each map's fields in turn, a scalar list one a line."""
    pad = "  " * level
    for item in items:
        if isinstance(item, dict):
            _tree(item, level, out)
        elif isinstance(item, list):
            _list(item, level + 1, out)
        else:
            out.append(f"{pad}{_scalar(item)}")


def _scalar(value: Any) -> str:
    return go_text(value) if not isinstance(value, str) else value


def describe_object(obj: Object, events: Sequence[Object] = (),
                    timeline: Sequence[Object] | None = None,
                    now: datetime | None = None) -> str:
    """The C{kubectl describe} text of C{obj}, its Events and (for Servers) its boot timeline."""
    now = now or datetime.now(UTC)
    meta = dict(obj.get("metadata") or {})
    lines = [
        f"Name:         {meta.get('name', '')}",
        f"Namespace:    {meta.get('namespace', '')}",
    ]
    labels = _pairs(meta.get("labels"), " " * 14)
    lines.append(f"Labels:       {labels[0]}")
    lines.extend(labels[1:])
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items()
                   if k != "kubectl.kubernetes.io/last-applied-configuration"}
    ann = _pairs(annotations, " " * 14)
    lines.append(f"Annotations:  {ann[0]}")
    lines.extend(ann[1:])
    lines.append(f"API Version:  {obj.get('apiVersion', '')}")
    lines.append(f"Kind:         {obj.get('kind', '')}")
    rest_meta = {k: v for k, v in meta.items()
                 if k not in ("name", "namespace", "labels", "annotations", "managedFields")}
    body: dict[str, Any] = {}
    if rest_meta:
        body["metadata"] = rest_meta
    for key, value in sorted(obj.items()):
        if key not in ("apiVersion", "kind", "metadata"):
            body[key] = value
    tree: list[str] = []
    _tree(body, 0, tree)
    lines.extend(tree)
    if timeline is not None:
        lines.append("Boot Timeline:")
        lines.extend(timeline_lines(timeline, now) or ["  <none>"])
    lines.append("Events:" + ("" if events else "  <none>"))
    if events:
        lines.extend(event_lines(events, now))
    return "\n".join(lines) + "\n"


def event_lines(events: Iterable[Object], now: datetime) -> list[str]:
    """kubectl's event table, oldest first, indented two spaces."""
    def when(e: Object) -> str:
        return str(e.get("lastTimestamp") or e.get("eventTime") or e.get("firstTimestamp") or "")

    rows = [["Type", "Reason", "Age", "From", "Message"], ["----", "------", "----", "----", "-------"]]
    for e in sorted(events, key=when):
        age = _age(when(e), now)
        first = _age(str(e.get("firstTimestamp") or ""), now)
        count = int(e.get("count") or 1)
        if count > 1 and first != age:
            age = f"{age} (x{count} over {first})"
        source = (e.get("source") or {}).get("component") or e.get("reportingComponent") or ""
        rows.append([str(e.get("type", "")), str(e.get("reason", "")), age, str(source),
                     str(e.get("message", "")).strip()])
    return ["  " + line for line in tabwrite(rows).splitlines()]


def timeline_lines(entries: Iterable[Object], now: datetime) -> list[str]:
    """One row per recorded boot step: when, what, and the step's details."""
    rows = [["Age", "Step", "Source", "Details"], ["---", "----", "------", "-------"]]
    for entry in entries:
        details = entry.get("details") or {}
        text = " ".join(f"{k}={go_text(v) if not isinstance(v, str) else v}"
                        for k, v in details.items())
        rows.append([_age(str(entry.get("time", "")), now), str(entry.get("step", "")),
                     str(entry.get("source", "")), text])
    if len(rows) == 2:
        return []
    return ["  " + line for line in tabwrite(rows).splitlines()]


def _age(timestamp: str, now: datetime) -> str:
    parsed = parse_timestamp(timestamp) if timestamp else None
    if parsed is None:
        return "<unknown>"
    return human_duration(max(0.0, (now - parsed).total_seconds()))
