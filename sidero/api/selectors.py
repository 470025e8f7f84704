"""Kubernetes label and field selectors: parsing and matching, with no I/O.

Two spellings exist and both are needed: the string form of list calls and kubectl
(C{zone in (east,west),!gpu,tier=db}) and the structured C{LabelSelector} of resources
(C{matchLabels} / C{matchExpressions}, used by ServerClass C{spec.selector}).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class SelectorError(ValueError):
    """A selector that cannot be parsed or is not valid."""


OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist", "Equals", "NotEquals")


@dataclass(frozen=True)
class Requirement:
    """One clause of a selector: C{key <operator> values}."""

    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.operator == "Exists":
            return present
        if self.operator == "DoesNotExist":
            return not present
        if self.operator in ("In", "Equals"):
            return present and labels[self.key] in self.values
        if self.operator in ("NotIn", "NotEquals"):
            return not present or labels[self.key] not in self.values
        raise SelectorError(f"unknown operator {self.operator!r}")


@dataclass(frozen=True)
class LabelSelector:
    """A conjunction of requirements; the empty selector matches everything."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        labels = labels or {}
        return all(r.matches(labels) for r in self.requirements)

    @property
    def empty(self) -> bool:
        return not self.requirements

    @classmethod
    def parse(cls, text: str | None) -> LabelSelector:
        """Parse the string form used by list calls and C{kubectl -l}."""
        return cls(tuple(_parse_requirements(text or "")))

    @classmethod
    def from_object(cls, selector: Mapping[str, Any] | None) -> LabelSelector:
        """Build from a C{metav1.LabelSelector} dict (C{matchLabels}, C{matchExpressions}).

        @raise SelectorError: an unknown operator, values given to Exists/DoesNotExist, or no
            values given to In/NotIn (the same rules as apimachinery's LabelSelectorAsSelector).
        """
        if not selector:
            return cls()
        requirements: list[Requirement] = []
        for key, value in sorted((selector.get("matchLabels") or {}).items()):
            _check_key(key)
            requirements.append(Requirement(key, "In", (str(value),)))
        for expr in selector.get("matchExpressions") or []:
            key = expr.get("key", "")
            _check_key(key)
            op = expr.get("operator", "")
            values = tuple(str(v) for v in (expr.get("values") or []))
            if op in ("In", "NotIn"):
                if not values:
                    raise SelectorError(f"{key}: for 'in', 'notin' operators, values set can't be empty")
            elif op in ("Exists", "DoesNotExist"):
                if values:
                    raise SelectorError(f"{key}: values set must be empty for exists and does not exist")
            else:
                raise SelectorError(f'"{op}" is not a valid label selector operator')
            requirements.append(Requirement(key, op, values))
        return cls(tuple(requirements))

    def __str__(self) -> str:
        parts = []
        for r in self.requirements:
            if r.operator == "Exists":
                parts.append(r.key)
            elif r.operator == "DoesNotExist":
                parts.append("!" + r.key)
            elif r.operator in ("In", "Equals") and len(r.values) == 1:
                parts.append(f"{r.key}={r.values[0]}")
            elif r.operator in ("NotIn", "NotEquals") and len(r.values) == 1:
                parts.append(f"{r.key}!={r.values[0]}")
            else:
                word = "in" if r.operator == "In" else "notin"
                parts.append(f"{r.key} {word} ({','.join(r.values)})")
        return ",".join(parts)


_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


def _check_key(key: str) -> None:
    if not key or not _KEY.match(key):
        raise SelectorError(f"invalid label key {key!r}")


_TOKEN = re.compile(
    r"\s*(?:(?P<set>\((?P<setbody>[^)]*)\))|(?P<op>!=|==|=|,|!)|(?P<word>[^\s,=!()]+))"
)


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise SelectorError(f"unable to parse requirement: {text[pos:]!r}")
        if m.group("set") is not None:
            tokens.append(("set", m.group("setbody")))
        elif m.group("op") is not None:
            tokens.append(("op", m.group("op")))
        else:
            tokens.append(("word", m.group("word")))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return tokens


def _parse_requirements(text: str) -> list[Requirement]:
    tokens = _tokenize(text)
    requirements: list[Requirement] = []
    i = 0
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "op" and value == "!":
            if i + 1 >= len(tokens) or tokens[i + 1][0] != "word":
                raise SelectorError("'!' must be followed by a label key")
            key = tokens[i + 1][1]
            _check_key(key)
            requirements.append(Requirement(key, "DoesNotExist"))
            i += 2
        elif kind == "word":
            key = tokens[i][1]
            _check_key(key)
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            if nxt is None or nxt == ("op", ","):
                requirements.append(Requirement(key, "Exists"))
                i += 1
            elif nxt[0] == "op" and nxt[1] in ("=", "==", "!="):
                val = tokens[i + 2] if i + 2 < len(tokens) else ("word", "")
                if val[0] != "word":
                    val = ("word", "")
                    consumed = 2
                else:
                    consumed = 3
                op = "NotEquals" if nxt[1] == "!=" else "Equals"
                requirements.append(Requirement(key, op, (val[1],)))
                i += consumed
            elif nxt[0] == "word" and nxt[1] in ("in", "notin"):
                if i + 2 >= len(tokens) or tokens[i + 2][0] != "set":
                    raise SelectorError(f"expected a '(values)' set after {nxt[1]!r}")
                values = tuple(v.strip() for v in tokens[i + 2][1].split(",") if v.strip())
                if not values:
                    raise SelectorError(f"{key}: for 'in', 'notin' operators, values set can't be empty")
                requirements.append(Requirement(key, "In" if nxt[1] == "in" else "NotIn", values))
                i += 3
            else:
                raise SelectorError(f"unable to parse requirement near {nxt[1]!r}")
        else:
            raise SelectorError(f"unexpected {value!r} in selector")
        if i < len(tokens):
            if tokens[i] != ("op", ","):
                raise SelectorError(f"expected ',' but found {tokens[i][1]!r}")
            i += 1
            if i == len(tokens):
                raise SelectorError("selector ends with ','")
    return requirements


@dataclass(frozen=True)
class FieldSelector:
    """Field selectors: C{path=value} / C{path!=value} terms joined by commas.

    Paths are dotted JSON paths such as C{metadata.name} or C{spec.metalMachineRef.name};
    a missing field compares as the empty string, as in Kubernetes.
    """

    terms: tuple[tuple[str, bool, str], ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> FieldSelector:
        terms = []
        for part in (text or "").split(","):
            part = part.strip()
            if not part:
                continue
            m = re.match(r"^([A-Za-z0-9_.\-]+)\s*(!=|==|=)\s*(.*)$", part)
            if not m:
                raise SelectorError(f"invalid field selector: {part!r}")
            terms.append((m.group(1), m.group(2) != "!=", m.group(3)))
        return cls(tuple(terms))

    def matches(self, obj: Mapping[str, Any]) -> bool:
        for path, equal, value in self.terms:
            actual = field_value(obj, path)
            if (actual == value) != equal:
                return False
        return True

    @property
    def empty(self) -> bool:
        return not self.terms


def field_value(obj: Mapping[str, Any], path: str) -> str:
    """The string value at a dotted path, C{""} when any step is missing."""
    current: Any = obj
    for step in path.split("."):
        if not isinstance(current, Mapping) or step not in current:
            return ""
        current = current[step]
    if current is None:
        return ""
    if isinstance(current, bool):
        return "true" if current else "false"
    return str(current)
