"""JSONPath evaluation for printer columns, and Go-compatible rendering of the values."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from sidero.management.jsonpath import JSONPath, JSONPathError, go_float, go_text

OBJ = {
    "metadata": {
        "name": "m1",
        "labels": {"cluster.x-k8s.io/cluster-name": "prod", "plain": "yes"},
        "ownerReferences": [
            {"kind": "MachineSet", "name": "ms"},
            {"kind": "Machine", "name": "machine-7"},
        ],
    },
    "spec": {"list": ["a", "b", "c"], "n": 3, "empty": None, "nested": {"x": {"y": 1}}},
    "status": {
        "conditions": [
            {"type": "Synced", "status": "False", "order": 1},
            {"type": "Ready", "status": "True", "order": 2},
        ],
        "ready": True,
    },
}


class JSONPathTests(SynchronousTestCase):
    def find(self, expr: str) -> list[object]:
        return JSONPath(expr).find(OBJ)

    def test_dotted_fields(self) -> None:
        """A plain dotted path walks nested maps."""
        self.assertEqual(self.find(".spec.nested.x.y"), [1])

    def test_escaped_dots_in_label_key(self) -> None:
        """A backslash-escaped dot stays inside the key, as in the Cluster column."""
        self.assertEqual(self.find(r".metadata.labels.cluster\.x-k8s\.io/cluster-name"), ["prod"])

    def test_missing_key_yields_nothing(self) -> None:
        """A missing key is no match rather than an error (allowMissingKeys)."""
        self.assertEqual(self.find(".spec.nothere.deeper"), [])
        self.assertEqual(self.find(".metadata.labels.absent"), [])

    def test_null_value_is_a_match_but_nothing_below_it(self) -> None:
        """An explicit null is found, and paths through it find nothing."""
        self.assertEqual(self.find(".spec.empty"), [None])
        self.assertEqual(self.find(".spec.empty.x"), [])

    def test_filter_by_equality(self) -> None:
        """C{[?(@.type=="Ready")]} selects the matching list element."""
        self.assertEqual(self.find('.status.conditions[?(@.type=="Ready")].status'), ["True"])
        self.assertEqual(self.find('.metadata.ownerReferences[?(@.kind=="Machine")].name'), ["machine-7"])

    def test_filter_with_single_quotes_and_inequality(self) -> None:
        """Filters accept single-quoted literals, != and numeric comparisons."""
        self.assertEqual(self.find(".status.conditions[?(@.type!='Ready')].type"), ["Synced"])
        self.assertEqual(self.find(".status.conditions[?(@.order>1)].type"), ["Ready"])
        self.assertEqual(self.find(".status.conditions[?(@.order<=1)].type"), ["Synced"])

    def test_filter_existence(self) -> None:
        """A bare C{[?(@.field)]} keeps the elements that have the field."""
        self.assertEqual(len(self.find(".status.conditions[?(@.order)]")), 2)
        self.assertEqual(self.find(".status.conditions[?(@.nope)]"), [])

    def test_indexes_slices_and_wildcards(self) -> None:
        """Index, negative index, slice and wildcard subscripts behave as in kubectl."""
        self.assertEqual(self.find(".spec.list[0]"), ["a"])
        self.assertEqual(self.find(".spec.list[-1]"), ["c"])
        self.assertEqual(self.find(".spec.list[5]"), [])
        self.assertEqual(self.find(".spec.list[0:2]"), ["a", "b"])
        self.assertEqual(self.find(".spec.list[*]"), ["a", "b", "c"])
        self.assertEqual(self.find(".status.conditions[*].type"), ["Synced", "Ready"])

    def test_field_on_a_list_finds_nothing(self) -> None:
        """Fields are not mapped over lists implicitly (client-go evalField)."""
        self.assertEqual(self.find(".status.conditions.type"), [])

    def test_bracket_key_and_braces(self) -> None:
        """C{['key']} names a key and a template in braces is accepted."""
        self.assertEqual(self.find("{.metadata.labels['plain']}"), ["yes"])

    def test_recursive_descent(self) -> None:
        """C{..name} finds the key at any depth."""
        self.assertEqual(sorted(map(str, self.find("..name"))), ["m1", "machine-7", "ms"])

    def test_first_reports_presence(self) -> None:
        """first() tells a null value apart from a missing one."""
        self.assertEqual(JSONPath(".spec.empty").first(OBJ), (True, None))
        self.assertEqual(JSONPath(".spec.absent").first(OBJ), (False, None))

    def test_malformed_expressions_raise(self) -> None:
        """Unterminated brackets, bad subscripts and bad filters are parse errors."""
        for expr in (".spec[", ".spec[abc]", ".a[?(@.x ~ 1)]", ".a[?(x==1)]", ".a..", ".a[1:2:3:4]"):
            self.assertRaises(JSONPathError, JSONPath, expr)


class GoTextTests(SynchronousTestCase):
    def test_scalars(self) -> None:
        """Strings print raw, booleans lower-case, integers plain, null as <no value>."""
        self.assertEqual(go_text("x y"), "x y")
        self.assertEqual(go_text(True), "true")
        self.assertEqual(go_text(False), "false")
        self.assertEqual(go_text(42), "42")
        self.assertEqual(go_text(None), "<no value>")

    def test_collections_are_compact_json(self) -> None:
        """Lists and maps print as compact JSON, as JSONPath PrintResults does."""
        self.assertEqual(go_text(["a", "b"]), '["a","b"]')
        self.assertEqual(go_text({"b": 1, "a": [True]}), '{"a":[true],"b":1}')

    def test_floats_like_go(self) -> None:
        """Floats follow Go's %v: shortest digits, exponent from 1e6 up and below 1e-4."""
        cases = {
            1e6: "1e+06", 1234567.5: "1.2345675e+06", 1.5: "1.5", 3.0: "3", 1e21: "1e+21",
            0.00001: "1e-05", 123456789.0: "1.23456789e+08", 123456.7: "123456.7",
            100000.0: "100000", 0.0001: "0.0001", 0.00012345: "0.00012345", -2.5e-7: "-2.5e-07",
            1e100: "1e+100", 0.0: "0",
        }
        for value, expected in cases.items():
            self.assertEqual(go_float(value), expected, value)
