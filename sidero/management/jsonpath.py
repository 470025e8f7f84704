# -*- test-case-name: tests.management.test_jsonpath -*-
"""The subset of kubectl JSONPath that CRD printer columns use, with no I/O.

CRD C{additionalPrinterColumns} name a value by a bare JSONPath (C{.spec.hostname},
C{.metadata.labels.cluster\\.x-k8s\\.io/cluster-name},
C{.status.conditions[?(@.type=="Ready")].status}); the table printer evaluates them against
each object exactly as the API server's table convertor does, so C{sidero get} shows what
C{kubectl get} would.

Supported: C{.field} (with C{\\.} escaping a dot inside a key), C{['key']}, C{[N]} (negative
counts from the end), C{[start:end]}, C{[*]}, C{..field} (recursive descent) and filters
C{[?(@.path OP literal)]} with C{== != < <= > >=} or a bare C{[?(@.path)]} existence test.
Like the API server (C{allowMissingKeys}), a missing key yields no result rather than an
error; a malformed expression raises L{JSONPathError} when it is parsed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class JSONPathError(ValueError):
    """An expression outside the supported grammar."""


@dataclass(frozen=True)
class Field:
    name: str


@dataclass(frozen=True)
class Recursive:
    name: str


@dataclass(frozen=True)
class Wildcard:
    pass


@dataclass(frozen=True)
class Index:
    index: int


@dataclass(frozen=True)
class Slice:
    start: int | None
    end: int | None


@dataclass(frozen=True)
class Filter:
    """C{[?(@.left OP right)]}; C{op} is None for a bare existence test."""

    left: tuple[Step, ...]
    op: str | None
    right: Any = None
    right_path: tuple[Step, ...] | None = None


Step = Field | Recursive | Wildcard | Index | Slice | Filter

_OPS = ("==", "!=", "<=", ">=", "<", ">")
_NAME_END = set(".[")


class JSONPath:
    """A parsed expression; L{find} returns every match, in document order."""

    def __init__(self, expression: str) -> None:
        self.expression = expression
        text = expression.strip()
        if text.startswith("{") and text.endswith("}"):
            text = text[1:-1].strip()
        if text.startswith("$"):
            text = text[1:]
        self.steps: tuple[Step, ...] = _Parser(text, expression).parse_steps(stop="")

    def find(self, data: Any) -> list[Any]:
        return evaluate(self.steps, [data])

    def first(self, data: Any) -> tuple[bool, Any]:
        """C{(found, value)} for the first match, as the table convertor takes only that one."""
        results = self.find(data)
        if not results:
            return False, None
        return True, results[0]

    def __repr__(self) -> str:
        return f"JSONPath({self.expression!r})"


class _Parser:
    def __init__(self, text: str, original: str) -> None:
        self.text = text
        self.pos = 0
        self.original = original

    def error(self, why: str) -> JSONPathError:
        return JSONPathError(f"invalid JSONPath {self.original!r}: {why} at offset {self.pos}")

    def peek(self, n: int = 1) -> str:
        return self.text[self.pos:self.pos + n]

    def parse_steps(self, stop: str) -> tuple[Step, ...]:
        steps: list[Step] = []
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if stop and c in stop:
                break
            if self.peek(2) == "..":
                self.pos += 2
                name = self.read_name()
                if not name:
                    raise self.error("recursive descent needs a field name")
                steps.append(Recursive(name))
            elif c == ".":
                self.pos += 1
                if self.peek() == "*":
                    self.pos += 1
                    steps.append(Wildcard())
                    continue
                name = self.read_name()
                if not name:
                    if self.pos >= len(self.text) and not steps:
                        break  # "." alone: the whole object
                    raise self.error("empty field name")
                steps.append(Field(name))
            elif c == "[":
                steps.append(self.read_bracket())
            elif not steps and c not in " \t":
                # kubectl accepts a leading name without a dot ("spec.x") inside {}.
                name = self.read_name()
                steps.append(Field(name))
            else:
                raise self.error(f"unexpected {c!r}")
        return tuple(steps)

    def read_name(self) -> str:
        out: list[str] = []
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c == "\\" and self.pos + 1 < len(self.text):
                out.append(self.text[self.pos + 1])
                self.pos += 2
                continue
            if c in _NAME_END or c in " \t)=!<>":
                break
            out.append(c)
            self.pos += 1
        return "".join(out)

    def read_bracket(self) -> Step:
        end = self._matching_bracket()
        inner = self.text[self.pos + 1:end].strip()
        start = self.pos
        self.pos = end + 1
        if inner == "*":
            return Wildcard()
        if inner.startswith("?"):
            return self._filter(inner[1:].strip(), start)
        if len(inner) >= 2 and inner[0] == inner[-1] and inner[0] in "'\"":
            return Field(inner[1:-1])
        if ":" in inner:
            parts = inner.split(":")
            if len(parts) > 3:
                raise self.error(f"bad slice [{inner}]")
            try:
                lo = int(parts[0]) if parts[0].strip() else None
                hi = int(parts[1]) if parts[1].strip() else None
            except ValueError:
                raise self.error(f"bad slice [{inner}]") from None
            return Slice(lo, hi)
        try:
            return Index(int(inner))
        except ValueError:
            raise self.error(f"bad subscript [{inner}]") from None

    def _matching_bracket(self) -> int:
        depth = 0
        quote = ""
        i = self.pos
        while i < len(self.text):
            c = self.text[i]
            if quote:
                if c == "\\":
                    i += 2
                    continue
                if c == quote:
                    quote = ""
            elif c in "'\"":
                quote = c
            elif c == "[":
                depth += 1
            elif c == "]":
                depth -= 1
                if depth == 0:
                    return i
            i += 1
        raise self.error("unterminated [")

    def _filter(self, body: str, start: int) -> Filter:
        if not (body.startswith("(") and body.endswith(")")):
            raise self.error("a filter must be ?(...)")
        body = body[1:-1].strip()
        if not body.startswith("@"):
            raise self.error("a filter must start with @")
        sub = _Parser(body[1:], self.original)
        left = sub.parse_steps(stop=" \t=!<>")
        rest = sub.text[sub.pos:].strip()
        if not rest:
            return Filter(left, None)
        for op in _OPS:
            if rest.startswith(op):
                operand = rest[len(op):].strip()
                break
        else:
            raise self.error(f"unknown filter operator in {body!r}")
        if operand.startswith("@"):
            rp = _Parser(operand[1:], self.original)
            return Filter(left, op, right_path=rp.parse_steps(stop=""))
        return Filter(left, op, _literal(operand, self))


def _literal(text: str, parser: _Parser) -> Any:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if text in ("true", "false"):
        return text == "true"
    if text == "null":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise parser.error(f"bad literal {text!r}") from None


def evaluate(steps: Sequence[Step], values: list[Any]) -> list[Any]:
    """Apply C{steps} to each of C{values}; missing keys drop out silently."""
    current = values
    for step in steps:
        nxt: list[Any] = []
        for value in current:
            nxt.extend(_apply(step, value))
        current = nxt
    return current


def _apply(step: Step, value: Any) -> list[Any]:
    if value is None:
        return []  # like template.Indirect on a nil: nothing below it
    if isinstance(step, Field):
        if isinstance(value, Mapping) and step.name in value:
            return [value[step.name]]
        return []
    if isinstance(step, Wildcard):
        if isinstance(value, Mapping):
            return [value[k] for k in sorted(value)]
        if isinstance(value, list):
            return list(value)
        return []
    if isinstance(step, Index):
        if isinstance(value, list) and -len(value) <= step.index < len(value):
            return [value[step.index]]
        return []
    if isinstance(step, Slice):
        if isinstance(value, list):
            return value[step.start:step.end]
        return []
    if isinstance(step, Recursive):
        return _recursive(step.name, value)
    # Filter
    items = value if isinstance(value, list) else []
    return [item for item in items if _filter_matches(step, item)]


def _recursive(name: str, value: Any) -> list[Any]:
    out: list[Any] = []
    if isinstance(value, Mapping):
        if name in value:
            out.append(value[name])
        for k in sorted(value):
            out.extend(_recursive(name, value[k]))
    elif isinstance(value, list):
        for item in value:
            out.extend(_recursive(name, item))
    return out


def _filter_matches(f: Filter, item: Any) -> bool:
    lefts = evaluate(f.left, [item])
    if f.op is None:
        return bool(lefts)
    if not lefts:
        return False
    rights = evaluate(f.right_path, [item]) if f.right_path is not None else [f.right]
    if not rights:
        return False
    left, right = lefts[0], rights[0]
    if f.op == "==":
        return _equal(left, right)
    if f.op == "!=":
        return not _equal(left, right)
    if _is_number(left) and _is_number(right) or isinstance(left, str) and isinstance(right, str):
        if f.op == "<":
            return bool(left < right)
        if f.op == "<=":
            return bool(left <= right)
        if f.op == ">":
            return bool(left > right)
        return bool(left >= right)
    return False


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _equal(a: Any, b: Any) -> bool:
    if _is_number(a) and _is_number(b):
        return bool(a == b)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return bool(type(a) is type(b) and a == b)


def go_text(value: Any) -> str:
    """Render one value the way kubectl's JSONPath C{PrintResults} does: maps and lists as
    compact JSON, booleans as C{true}/C{false}, floats like Go's C{%v}, JSON null as
    C{<no value>} (Go's template for a nil interface)."""
    if value is None:
        return "<no value>"
    if isinstance(value, Mapping | list):
        return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return go_float(value)
    return str(value)


def go_float(value: float) -> str:
    """Go's C{fmt.Print} of a float64: shortest digits, exponent form when the decimal
    exponent is below -4 or at least 6 (C{%v} is C{%g} with the shortest precision)."""
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "0"
    digits = repr(value)  # shortest round-trip representation
    mantissa, _, exp_text = digits.partition("e")
    sign = "-" if mantissa.startswith("-") else ""
    mantissa = mantissa.lstrip("-")
    int_part, _, frac = mantissa.partition(".")
    frac = frac.rstrip("0")
    all_digits = (int_part + frac).lstrip("0")
    exponent = int(exp_text or 0) + len(int_part) - 1
    if int_part.strip("0") == "":
        # 0.000123 -> leading zeros in frac shift the exponent
        stripped = frac.lstrip("0")
        exponent = int(exp_text or 0) - (len(frac) - len(stripped)) - 1
        all_digits = stripped
    all_digits = all_digits.rstrip("0") or "0"
    if exponent < -4 or exponent >= 6:
        body = all_digits[0] + ("." + all_digits[1:] if len(all_digits) > 1 else "")
        return f"{sign}{body}e{'-' if exponent < 0 else '+'}{abs(exponent):02d}"
    if exponent >= 0:
        whole = all_digits[:exponent + 1].ljust(exponent + 1, "0")
        rest = all_digits[exponent + 1:]
        return sign + whole + ("." + rest if rest else "")
    return sign + "0." + "0" * (-exponent - 1) + all_digits
