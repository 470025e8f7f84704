"""Table, YAML, JSON and name output, compared with what kubectl prints."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import yaml
from twisted.trial.unittest import SynchronousTestCase

from sidero.api import registry
from sidero.api.registry import PrinterColumn
from sidero.management import printers

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def stamp(delta: timedelta) -> str:
    return (NOW - delta).strftime("%Y-%m-%dT%H:%M:%SZ")


def server(name: str, age: timedelta = timedelta(minutes=5), **spec: object) -> dict[str, object]:
    return {
        "apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Server",
        "metadata": {"name": name, "creationTimestamp": stamp(age)},
        "spec": dict(spec),
    }


class HumanDurationTests(SynchronousTestCase):
    def test_table_of_durations(self) -> None:
        """Durations render with apimachinery's HumanDuration rules."""
        cases = {
            -5: "<invalid>", -1: "0s", 0: "0s", 59: "59s", 119: "119s", 120: "2m", 200: "3m20s",
            300: "5m", 600: "10m", 179 * 60: "179m", 3 * 3600: "3h", 3 * 3600 + 600: "3h10m",
            8 * 3600: "8h", 47 * 3600: "47h", 2 * 86400: "2d", 2 * 86400 + 3600: "2d1h",
            8 * 86400: "8d", 400 * 86400: "400d", 730 * 86400: "2y", 800 * 86400: "2y70d",
            9 * 365 * 86400: "9y",
        }
        for seconds, expected in cases.items():
            self.assertEqual(printers.human_duration(seconds), expected, seconds)


class CellTests(SynchronousTestCase):
    def cell(self, type_: str, path: str, obj: dict[str, object]) -> str:
        return printers.cell(PrinterColumn("X", type_, path), obj, NOW)

    def test_missing_value_is_empty(self) -> None:
        """A column whose path finds nothing is an empty cell, as kubectl prints for CRDs."""
        self.assertEqual(self.cell("string", ".spec.hostname", {"spec": {}}), "")
        self.assertEqual(self.cell("boolean", ".status.inUse", {}), "")

    def test_boolean_column(self) -> None:
        """Booleans print true/false; a non-boolean in a boolean column is empty."""
        self.assertEqual(self.cell("boolean", ".spec.a", {"spec": {"a": True}}), "true")
        self.assertEqual(self.cell("boolean", ".spec.a", {"spec": {"a": False}}), "false")
        self.assertEqual(self.cell("boolean", ".spec.a", {"spec": {"a": "yes"}}), "")

    def test_string_column_prints_any_json_value(self) -> None:
        """A string column prints booleans, numbers and lists through JSONPath."""
        self.assertEqual(self.cell("string", ".status.ready", {"status": {"ready": True}}), "true")
        self.assertEqual(self.cell("string", ".s.n", {"s": {"n": 2}}), "2")
        self.assertEqual(
            self.cell("string", ".status.serversAvailable", {"status": {"serversAvailable": ["a", "b"]}}),
            '["a","b"]',
        )

    def test_string_column_null_is_no_value(self) -> None:
        """An explicit null in a string column prints <no value>, as Go's template does."""
        self.assertEqual(self.cell("string", ".spec.a", {"spec": {"a": None}}), "<no value>")
        self.assertEqual(self.cell("boolean", ".spec.a", {"spec": {"a": None}}), "")

    def test_integer_and_number_columns(self) -> None:
        """Integer columns truncate floats; number columns print like Go floats."""
        self.assertEqual(self.cell("integer", ".a", {"a": 3.9}), "3")
        self.assertEqual(self.cell("integer", ".a", {"a": "3"}), "")
        self.assertEqual(self.cell("number", ".a", {"a": 2}), "2")
        self.assertEqual(self.cell("number", ".a", {"a": 2.5}), "2.5")

    def test_date_column(self) -> None:
        """Dates print as an age; a bad timestamp prints <invalid>."""
        self.assertEqual(self.cell("date", ".t", {"t": stamp(timedelta(days=2))}), "2d")
        self.assertEqual(self.cell("date", ".t", {"t": "yesterday"}), "<invalid>")

    def test_first_match_only(self) -> None:
        """With several matches only the first is shown, like the API server's convertor."""
        obj = {"c": [{"t": "A", "s": "1"}, {"t": "A", "s": "2"}]}
        self.assertEqual(self.cell("string", '.c[?(@.t=="A")].s', obj), "1")

    def test_control_characters_are_neutralised(self) -> None:
        """Terminal escapes are made visible and a newline cuts the cell with ..."""
        self.assertEqual(printers.escape_cell("a\x1b[2Jb"), "a^[[2Jb")
        self.assertEqual(printers.escape_cell("line1\nline2"), "line1...")


class TableTests(SynchronousTestCase):
    def test_default_table_matches_kubectl_layout(self) -> None:
        """Headers are upper-case, NAME first, wide-only columns hidden, tabwriter spacing."""
        objs = [server("s1", hostname="node-1", accepted=True), server("server-two", accepted=False)]
        text = printers.tabwrite(printers.table(registry.SERVER, objs, now=NOW))
        self.assertEqual(
            text,
            "NAME         HOSTNAME   ACCEPTED   CORDONED   ALLOCATED   CLEAN   POWER   AGE\n"
            "s1           node-1     true                                              5m\n"
            "server-two              false                                             5m\n",
        )

    def test_wide_adds_priority_columns(self) -> None:
        """-o wide shows priority>0 columns in their declared position."""
        obj = server("s1", bmc={"endpoint": "10.0.0.9"})
        rows = printers.table(registry.SERVER, [obj], wide=True, now=NOW)
        self.assertEqual(rows[0][:3], ["NAME", "HOSTNAME", "BMC IP"])
        self.assertEqual(rows[1][2], "10.0.0.9")

    def test_namespace_column_first(self) -> None:
        """With all namespaces, NAMESPACE is the first column."""
        mm = {
            "metadata": {"name": "mm", "namespace": "ns1", "creationTimestamp": stamp(timedelta(hours=3)),
                         "labels": {"cluster.x-k8s.io/cluster-name": "c1"}},
            "status": {"ready": True},
        }
        rows = printers.table(registry.METAL_MACHINE, [mm], with_namespace=True, now=NOW)
        self.assertEqual(rows, [["NAMESPACE", "NAME", "READY", "AGE"], ["ns1", "mm", "true", "3h"]])
        wide = printers.table(registry.METAL_MACHINE, [mm], with_namespace=True, wide=True, now=NOW)
        self.assertEqual(wide[0], ["NAMESPACE", "NAME", "READY", "CLUSTER", "MACHINE", "SERVER", "AGE"])
        self.assertEqual(wide[1][3], "c1")

    def test_no_headers(self) -> None:
        """--no-headers drops the header row."""
        rows = printers.table(registry.SERVER, [server("s1")], no_headers=True, now=NOW)
        self.assertEqual(len(rows), 1)

    def test_environment_ready_condition_column(self) -> None:
        """The Environment Ready column reads the Ready condition through a filter."""
        env = {"metadata": {"name": "default"}, "spec": {"kernel": {"url": "http://k"}},
               "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
        rows = printers.table(registry.ENVIRONMENT, [env], now=NOW)
        self.assertEqual(rows[1], ["default", "http://k", "", "True", ""])

    def test_tabwriter_minimum_width_and_last_column_unpadded(self) -> None:
        """Columns are at least 6 wide, padded by 3, and the last cell is not padded."""
        self.assertEqual(printers.tabwrite([["A", "B"], ["xy", "z"]]), "A     B\nxy    z\n")
        self.assertEqual(printers.tabwrite([["LONGNAME", "B"]]), "LONGNAME   B\n")


class OutputTests(SynchronousTestCase):
    def test_name_output(self) -> None:
        """-o name uses kind.group/name, or kind/name for core kinds."""
        self.assertEqual(printers.name_of(registry.SERVER, {"metadata": {"name": "x"}}),
                         "server.metal.sidero.dev/x")
        self.assertEqual(printers.name_of(registry.SECRET, {"metadata": {"name": "s"}}), "secret/s")

    def test_yaml_is_sorted_block_style_and_round_trips(self) -> None:
        """YAML output has sorted keys, unindented lists, double quotes, and loads back equal."""
        obj = {"spec": {"b": ["x", "y"], "a": "2024-01-01T00:00:00Z", "multi": "l1\nl2\n"}, "kind": "K"}
        text = printers.to_yaml(obj)
        self.assertEqual(text.splitlines()[:5],
                         ["kind: K", "spec:", '  a: "2024-01-01T00:00:00Z"', "  b:", "  - x"])
        self.assertEqual(yaml.safe_load(text), obj)

    def test_json_indent_and_list(self) -> None:
        """JSON output is indented by four spaces; several objects come as a v1 List."""
        text = printers.to_json(printers.as_list([{"a": 1}]))
        self.assertIn('\n    "items": [\n        {\n            "a": 1', text)
        self.assertEqual(json.loads(text)["kind"], "List")
