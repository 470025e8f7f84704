"""Decoding manifests and request bodies."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from sidero.management.codec import DecodeError, load_body, load_documents


class LoadDocumentsTests(SynchronousTestCase):
    def test_multi_document_yaml_skips_empty_documents(self) -> None:
        """Every non-empty document of a YAML stream is returned in order."""
        docs = load_documents("a: 1\n---\n# only a comment\n---\nb: 2\n")
        self.assertEqual(docs, [{"a": 1}, {"b": 2}])

    def test_json_object_and_array(self) -> None:
        """A JSON object or a JSON array of objects is accepted."""
        self.assertEqual(load_documents('{"a": 1}'), [{"a": 1}])
        self.assertEqual(load_documents('[{"a": 1}, {"b": 2}]'), [{"a": 1}, {"b": 2}])

    def test_list_kind_is_expanded(self) -> None:
        """A kind: List document contributes its items."""
        docs = load_documents("kind: List\napiVersion: v1\nitems:\n- {a: 1}\n- {b: 2}\n")
        self.assertEqual(docs, [{"a": 1}, {"b": 2}])

    def test_rejections(self) -> None:
        """Malformed YAML/JSON, non-object documents and aliases are DecodeErrors."""
        for text in ("a: [1", '{"a": ', "- just\n- a list\n", "a: &x 1\nb: *x\n", "42\n"):
            self.assertRaises(DecodeError, load_documents, text)

    def test_deep_nesting_is_a_decode_error(self) -> None:
        """JSON or YAML nested past the parsers' recursion is a DecodeError, not a
        RecursionError (found by bench/fuzz; the inputs are in its management corpus)."""
        for text in ("[" * 5000, "a: " + "[" * 5000, "- " * 3000 + "x", '{"a":' * 5000):
            with self.subTest(text=text[:10]):
                self.assertRaises(DecodeError, load_documents, text)
        self.assertRaises(DecodeError, load_body, b"[" * 5000)
        self.assertRaises(DecodeError, load_body, b"a: " + b"[" * 5000, "application/yaml")

    def test_yaml_depth_is_bounded(self) -> None:
        """YAML nested deeper than MAX_YAML_DEPTH, in flow or block style, is refused by the
        bound (the scanner's cost grows with the open flow levels: 5 000 "[" took seconds,
        bench/fuzz corpus/management/crash-yaml-deep-flow-slow); 99 levels still load."""
        from sidero.management.codec import MAX_YAML_DEPTH

        for text in ("a: " + "[" * 5000, "a: " + "[" * (MAX_YAML_DEPTH + 1), "- " * 3000 + "x"):
            with self.subTest(text=text[:10]):
                with self.assertRaises(DecodeError) as raised:
                    load_documents(text)
                self.assertIn(f"nested deeper than {MAX_YAML_DEPTH} levels", str(raised.exception))
        depth = MAX_YAML_DEPTH - 1
        docs = load_documents("a: " + "[" * depth + "]" * depth)
        self.assertEqual(len(docs), 1)

    def test_python_tags_are_not_executed(self) -> None:
        """The safe loader refuses Python object tags."""
        self.assertRaises(DecodeError, load_documents, "a: !!python/object/apply:os.system ['true']\n")


class LoadBodyTests(SynchronousTestCase):
    def test_json_and_yaml_bodies(self) -> None:
        """The content type chooses the decoder."""
        self.assertEqual(load_body(b'{"a": 1}'), {"a": 1})
        self.assertEqual(load_body(b"a: 1\n", "application/yaml; charset=utf-8"), {"a": 1})

    def test_body_rejections(self) -> None:
        """Non-UTF-8, several YAML documents and non-objects are refused."""
        self.assertRaises(DecodeError, load_body, b"\xff\xfe")
        self.assertRaises(DecodeError, load_body, b"a: 1\n---\nb: 2\n", "application/yaml")
        self.assertRaises(DecodeError, load_body, b"[1]")
