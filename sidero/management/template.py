# -*- test-case-name: tests.management.test_template -*-
"""kubectl's C{-o jsonpath=TEMPLATE}: literal text with C{{expression}} actions.

Actions: a JSONPath (C{{.items[*].metadata.name}}, relative to the current value; C{@} and
C{$} name it and the root), a quoted string (C{{"\\n"}}, C{{"\\t"}}), and
C{{range EXPR}}...C{{end}} to repeat a part per result. Several results of one expression
are printed separated by spaces; maps and lists print as compact JSON, as kubectl does.
Parsing happens before anything is fetched, so a bad template changes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sidero.management.jsonpath import JSONPath, JSONPathError, go_text


class TemplateError(ValueError):
    """A template kubectl would refuse (unclosed brace, stray end, bad expression)."""


@dataclass(frozen=True)
class _Text:
    text: str


@dataclass(frozen=True)
class _Expr:
    path: JSONPath | None  # None: the current value itself (C{@})


@dataclass(frozen=True)
class _Range:
    path: JSONPath | None
    body: tuple[Any, ...]


class Template:
    """A parsed C{jsonpath=} template; L{render} it against an object or a List."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.nodes, _ = _parse(_tokens(source), 0, top=True)

    def render(self, data: Any) -> str:
        return "".join(_render(self.nodes, data, data))


def _tokens(source: str) -> list[tuple[str, str]]:
    """(kind, text) with kind C{text} or C{action}."""
    tokens: list[tuple[str, str]] = []
    i = 0
    while i < len(source):
        start = source.find("{", i)
        if start < 0:
            tokens.append(("text", source[i:]))
            break
        if start > i:
            tokens.append(("text", source[i:start]))
        end = _closing(source, start)
        tokens.append(("action", source[start + 1:end].strip()))
        i = end + 1
    return tokens


def _closing(source: str, start: int) -> int:
    depth = 0
    quote: str | None = None
    i = start
    while i < len(source):
        ch = source[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise TemplateError(f"unclosed action in template {source!r}")


def _path(text: str) -> JSONPath | None:
    text = text.strip()
    if text in ("@", "$", ""):
        return None
    if text.startswith(("@", "$")):
        text = text[1:]
    if not text.startswith((".", "[")):
        raise TemplateError(f"unrecognized identifier {text!r}")
    try:
        return JSONPath(text)
    except JSONPathError as e:
        raise TemplateError(str(e)) from None


def _parse(tokens: list[tuple[str, str]], i: int, top: bool) -> tuple[tuple[Any, ...], int]:
    nodes: list[Any] = []
    while i < len(tokens):
        kind, text = tokens[i]
        if kind == "text":
            nodes.append(_Text(text))
            i += 1
            continue
        if text == "end":
            if top:
                raise TemplateError("unexpected {end}")
            return tuple(nodes), i + 1
        if text.startswith("range ") or text == "range":
            body, i = _parse(tokens, i + 1, top=False)
            nodes.append(_Range(_path(text[5:]), body))
            continue
        if text[:1] in "\"'":
            try:
                inner = text[1:-1]
                literal = json.loads('"' + inner.replace('\\"', '"').replace('"', '\\"') + '"',
                                     strict=False)
            except ValueError:
                raise TemplateError(f"bad string literal {text}") from None
            nodes.append(_Text(str(literal)))
            i += 1
            continue
        nodes.append(_Expr(_path(text)))
        i += 1
    if not top:
        raise TemplateError("{range} without {end}")
    return tuple(nodes), i


def _find(path: JSONPath | None, current: Any) -> list[Any]:
    return [current] if path is None else path.find(current)


def _render(nodes: tuple[Any, ...], current: Any, root: Any) -> list[str]:
    out: list[str] = []
    for node in nodes:
        if isinstance(node, _Text):
            out.append(node.text)
        elif isinstance(node, _Expr):
            out.append(" ".join(go_text(v) for v in _find(node.path, current)))
        else:
            for item in _find(node.path, current):
                out.extend(_render(node.body, item, root))
    return out
