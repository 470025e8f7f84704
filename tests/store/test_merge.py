"""RFC 7386 merge patch and the diff that produces one."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sidero.store.merge import merge_diff, merge_patch

# RFC 7386 Appendix A: (original, patch, result).
APPENDIX_A: list[tuple[Any, Any, Any]] = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]

json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=3)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner, max_size=3),
    max_leaves=10,
)
# Documents without nulls: a merge patch cannot produce a null member.
no_null = st.recursive(
    st.booleans() | st.integers() | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner, max_size=3),
    max_leaves=10,
)


class MergePatchTests(SynchronousTestCase):
    def test_rfc7386_appendix_a(self) -> None:
        """Every example of RFC 7386 Appendix A gives the documented result."""
        for original, patch, result in APPENDIX_A:
            self.assertEqual(merge_patch(original, patch), result, (original, patch))

    def test_inputs_untouched(self) -> None:
        """merge_patch modifies neither the target nor the patch, nor shares their members."""
        target = {"a": {"b": [1]}, "c": 1}
        patch = {"a": {"d": {"e": 1}}, "c": None}
        result = merge_patch(target, patch)
        result["a"]["b"].append(2)
        result["a"]["d"]["e"] = 5
        self.assertEqual(target, {"a": {"b": [1]}, "c": 1})
        self.assertEqual(patch, {"a": {"d": {"e": 1}}, "c": None})

    @given(st.dictionaries(st.text(max_size=2), no_null, max_size=4),
           st.dictionaries(st.text(max_size=2), no_null, max_size=4))
    def test_diff_round_trip(self, original: dict[str, Any], modified: dict[str, Any]) -> None:
        """Applying merge_diff(a, b) to a gives b (for documents without nulls)."""
        self.assertEqual(merge_patch(original, merge_diff(original, modified)), modified)

    def test_diff_of_equal_documents_is_empty(self) -> None:
        """Two equal documents give the empty patch."""
        doc = {"a": {"b": [1, {"c": 2}]}}
        self.assertEqual(merge_diff(doc, {"a": {"b": [1, {"c": 2}]}}), {})

    @given(json_values, json_values)
    def test_patch_is_idempotent(self, target: Any, patch: Any) -> None:
        """Applying the same merge patch twice changes nothing more."""
        once = merge_patch(target, patch)
        self.assertEqual(merge_patch(once, patch), once)
