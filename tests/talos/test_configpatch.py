"""Talos config patching (spec §3.6): the §7 reference cases, the merge rules one by one,
multi-document configs, C{$patch: delete}, the node label, the SideroLink documents, the
YAML reader's bounds, and fuzzing.  Results are compared as parsed YAML, never as text."""

from __future__ import annotations

import json
import textwrap
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sidero.talos.configpatch import (
    MAX_NODES,
    MULTI_DOCUMENT_JSON6902,
    ConfigPatchError,
    DocumentID,
    JSONPatch,
    MachineConfig,
    StrategicPatch,
    add_node_label,
    add_siderolink_documents,
    apply_json6902,
    apply_patch,
    document_id,
    dump_yaml,
    json_patch,
    load_documents,
    load_patch,
    load_yaml,
    render,
    siderolink_documents,
    strategic_merge,
)

SECRET = "c2VjcmV0LXRva2VuLXZhbHVl"


def y(text: str) -> list[Any]:
    """Parsed YAML documents of an indented literal."""
    return load_yaml(textwrap.dedent(text))


def docs_of(config: MachineConfig) -> list[Any]:
    """The documents a config renders to, parsed back (what Talos would read)."""
    return load_yaml(config.text())


def pipeline(bootstrap: str, uuid: str, patches: list[str | list[dict[str, Any]]],
             tunnel: str = "192.168.1.1", endpoint: str = "192.168.1.1", port: int = 8081) -> list[Any]:
    """§3.6 steps 9–12 with the pure functions: patches, node label, SideroLink documents."""
    config = MachineConfig.from_text(textwrap.dedent(bootstrap))
    for patch in patches:
        loaded = load_patch(json.dumps(patch) if isinstance(patch, list) else patch)
        config = apply_patch(config, loaded)
    labeled = add_node_label(config.text(), uuid)
    final = add_siderolink_documents(labeled, siderolink_documents(endpoint, port, tunnel))
    return load_yaml(render(final.documents()))


SIDEROLINK_192 = [
    {"apiVersion": "v1alpha1", "kind": "SideroLinkConfig", "apiUrl": "grpc://192.168.1.1:8081"},
    {"apiVersion": "v1alpha1", "kind": "EventSinkConfig", "endpoint": "192.168.1.1:4002"},
    {"apiVersion": "v1alpha1", "kind": "KmsgLogConfig", "name": "remote-log", "url": "tcp://192.168.1.1:4001"},
]


class ReferenceCaseTests(SynchronousTestCase):
    """§7 TestMetadataService, at the level of the patching functions (same inputs)."""

    def test_no_patches(self) -> None:
        """machine.kubelet {} gets the node label; the SideroLink documents follow."""
        docs = pipeline("version: v1alpha1\nmachine:\n  kubelet: {}\n", "0000-1111-2222", [])
        self.assertEqual(docs, [
            {"version": "v1alpha1", "machine": {"kubelet": {"extraArgs": {
                "node-labels": "metal.sidero.dev/uuid=0000-1111-2222"}}}},
            *SIDEROLINK_192,
        ])

    def test_server_patch(self) -> None:
        """An RFC 6902 add of /machine/network keeps the existing extraArgs and adds the label."""
        docs = pipeline(
            "version: v1alpha1\nmachine:\n  kubelet:\n    extraArgs:\n      foo: bar\n",
            "1111-2222-3333", [[{"op": "add", "path": "/machine/network", "value": {"hostname": "example2"}}]])
        self.assertEqual(docs[0], {"version": "v1alpha1", "machine": {
            "kubelet": {"extraArgs": {"foo": "bar", "node-labels": "metal.sidero.dev/uuid=1111-2222-3333"}},
            "network": {"hostname": "example2"}}})
        self.assertEqual(docs[1:], SIDEROLINK_192)

    def test_server_and_server_class_patch(self) -> None:
        """The class's add comes first, the server's replace wins; node-labels gets a comma."""
        docs = pipeline(
            "version: v1alpha1\nmachine:\n  kubelet:\n    extraArgs:\n      node-labels: foo=bar\n",
            "2222-3333-4444", [
                [{"op": "add", "path": "/machine/network", "value": {"hostname": "invalid3"}}],
                [{"op": "replace", "path": "/machine/network/hostname", "value": "example3"}],
            ])
        self.assertEqual(docs[0]["machine"]["network"], {"hostname": "example3"})
        self.assertEqual(docs[0]["machine"]["kubelet"]["extraArgs"],
                         {"node-labels": "foo=bar,metal.sidero.dev/uuid=2222-3333-4444"})

    def test_machine_without_kubelet(self) -> None:
        """machine: null, and machine without kubelet (other keys passed through), get kubelet."""
        docs = pipeline("version: v1alpha1\nmachine:\n", "4444-5555-6666", [])
        self.assertEqual(docs[0], {"version": "v1alpha1", "machine": {"kubelet": {"extraArgs": {
            "node-labels": "metal.sidero.dev/uuid=4444-5555-6666"}}}})
        docs = pipeline("version: v1alpha1\nmachine:\n  unsupported: {}\n", "4444-5555-6666", [])
        self.assertEqual(docs[0]["machine"], {"unsupported": {}, "kubelet": {"extraArgs": {
            "node-labels": "metal.sidero.dev/uuid=4444-5555-6666"}}})

    def test_config_without_machine(self) -> None:
        """cluster: {} alone gets machine.kubelet.extraArgs.node-labels."""
        docs = pipeline("version: v1alpha1\ncluster: {}\n", "5555-6666-7777", [])
        self.assertEqual(docs[0], {"version": "v1alpha1", "cluster": {}, "machine": {"kubelet": {
            "extraArgs": {"node-labels": "metal.sidero.dev/uuid=5555-6666-7777"}}}})

    def test_strategic_patches_and_extension_service_config(self) -> None:
        """Class hostname invalid6, server hostname example6 plus an ExtensionServiceConfig:
        documents are v1alpha1, ExtensionServiceConfig, then the three SideroLink ones."""
        server_patch = textwrap.dedent("""\
            machine:
              network:
                hostname: example6
            ---
            apiVersion: v1alpha1
            kind: ExtensionServiceConfig
            name: frr
            environment:
              - TESTKEY=TESTVALUE
            """)
        docs = pipeline(
            "version: v1alpha1\nmachine:\n  kubelet:\n    extraArgs:\n      node-labels: foo=bar\n",
            "6666-7777-8888", ["machine:\n  network:\n    hostname: invalid6", server_patch])
        self.assertEqual(docs[0]["machine"]["network"]["hostname"], "example6")
        self.assertEqual(docs[0]["machine"]["kubelet"]["extraArgs"]["node-labels"],
                         "foo=bar,metal.sidero.dev/uuid=6666-7777-8888")
        self.assertEqual(docs[1], {"apiVersion": "v1alpha1", "kind": "ExtensionServiceConfig",
                                   "name": "frr", "environment": ["TESTKEY=TESTVALUE"]})
        self.assertEqual(docs[2:], SIDEROLINK_192)


def merge(config: str, patch: str) -> list[Any]:
    """Documents after one strategic patch."""
    loaded = load_patch(textwrap.dedent(patch))
    assert isinstance(loaded, StrategicPatch)
    return strategic_merge(load_documents(textwrap.dedent(config)), loaded)


class MergeRuleTests(SynchronousTestCase):
    """The strategic merge rules of §3.6, one by one."""

    def test_maps_merge_key_by_key(self) -> None:
        """Keys of both sides survive; nested mappings merge recursively."""
        docs = merge("machine:\n  network:\n    hostname: a\n  type: worker\n",
                     "machine:\n  network:\n    nameservers: [1.1.1.1]\n")
        self.assertEqual(docs[0]["machine"], {"network": {"hostname": "a", "nameservers": ["1.1.1.1"]},
                                              "type": "worker"})

    def test_scalars_replaced_only_when_not_zero(self) -> None:
        """A non-empty string or non-zero number replaces; "" and 0 leave the config alone."""
        docs = merge("machine:\n  type: worker\n  install:\n    disk: /dev/sda\n  kubelet:\n    port: 10\n",
                     "machine:\n  type: ''\n  install:\n    disk: /dev/nvme0n1\n  kubelet:\n    port: 0\n")
        self.assertEqual(docs[0]["machine"], {"type": "worker", "install": {"disk": "/dev/nvme0n1"},
                                              "kubelet": {"port": 10}})

    def test_booleans_always_replace(self) -> None:
        """false overwrites true (booleans are pointers in Talos)."""
        docs = merge("machine:\n  install:\n    wipe: true\n", "machine:\n  install:\n    wipe: false\n")
        self.assertIs(docs[0]["machine"]["install"]["wipe"], False)

    def test_null_changes_nothing(self) -> None:
        """A null in the patch leaves the config's value."""
        docs = merge("machine:\n  network:\n    hostname: a\n", "machine:\n  network:\n")
        self.assertEqual(docs[0]["machine"]["network"], {"hostname": "a"})

    def test_lists_are_appended(self) -> None:
        """Ordinary lists get the patch's items after the config's."""
        docs = merge("machine:\n  certSANs: [a, b]\n", "machine:\n  certSANs: [c]\n")
        self.assertEqual(docs[0]["machine"]["certSANs"], ["a", "b", "c"])

    def test_replace_fields(self) -> None:
        """podSubnets, serviceSubnets and auditPolicy are replaced whole."""
        docs = merge(
            """\
            cluster:
              network:
                podSubnets: [10.244.0.0/16]
                serviceSubnets: [10.96.0.0/12]
              apiServer:
                auditPolicy: {apiVersion: audit.k8s.io/v1, kind: Policy, rules: [{level: Metadata}]}
                certSANs: [a]
            """,
            """\
            cluster:
              network:
                podSubnets: [10.32.0.0/16]
                serviceSubnets: []
              apiServer:
                auditPolicy: {rules: [{level: None}]}
                certSANs: [b]
            """)
        cluster = docs[0]["cluster"]
        self.assertEqual(cluster["network"], {"podSubnets": ["10.32.0.0/16"], "serviceSubnets": []})
        self.assertEqual(cluster["apiServer"]["auditPolicy"], {"rules": [{"level": "None"}]})
        self.assertEqual(cluster["apiServer"]["certSANs"], ["a", "b"], "others still append")

    def test_network_rule_replace_fields(self) -> None:
        """NetworkRuleConfig ingress and portSelector.ports are replaced, protocol merged."""
        rule = ("apiVersion: v1alpha1\nkind: NetworkRuleConfig\nname: r\n"
                "ingress: [{subnet: 10.0.0.0/8}]\nportSelector: {ports: [22], protocol: tcp}\n")
        docs = merge("version: v1alpha1\nmachine: {}\n---\n" + rule,
                     "apiVersion: v1alpha1\nkind: NetworkRuleConfig\nname: r\n"
                     "ingress: [{subnet: 192.168.0.0/16}]\nportSelector: {ports: [80, 443]}\n")
        self.assertEqual(docs[1]["ingress"], [{"subnet": "192.168.0.0/16"}])
        self.assertEqual(docs[1]["portSelector"], {"ports": [80, 443], "protocol": "tcp"})

    def test_extra_args_key_by_key(self) -> None:
        """extraArgs of kubelet and apiServer: patch keys overwrite, others stay."""
        docs = merge(
            "machine:\n  kubelet:\n    extraArgs: {a: '1', b: '2'}\n"
            "cluster:\n  apiServer:\n    extraArgs: {x: y}\n",
            "machine:\n  kubelet:\n    extraArgs: {b: '3', c: '4'}\n"
            "cluster:\n  apiServer:\n    extraArgs: {z: w}\n")
        self.assertEqual(docs[0]["machine"]["kubelet"]["extraArgs"], {"a": "1", "b": "3", "c": "4"})
        self.assertEqual(docs[0]["cluster"]["apiServer"]["extraArgs"], {"x": "y", "z": "w"})

    def test_interfaces_merged_by_name(self) -> None:
        """machine.network.interfaces: the same interface merges (addresses appended), a new one appends."""
        docs = merge(
            "machine:\n  network:\n    interfaces:\n"
            "      - {interface: eth0, dhcp: true, addresses: [10.0.0.2/24]}\n"
            "      - {interface: eth1, mtu: 1500}\n",
            "machine:\n  network:\n    interfaces:\n"
            "      - {interface: eth1, mtu: 9000}\n"
            "      - {interface: eth0, addresses: [10.0.0.3/24]}\n"
            "      - {interface: eth2, dhcp: false}\n")
        self.assertEqual(docs[0]["machine"]["network"]["interfaces"], [
            {"interface": "eth0", "dhcp": True, "addresses": ["10.0.0.2/24", "10.0.0.3/24"]},
            {"interface": "eth1", "mtu": 9000},
            {"interface": "eth2", "dhcp": False},
        ])

    def test_interfaces_merged_by_device_selector(self) -> None:
        """An interface picked by deviceSelector merges with the one with an equal selector."""
        docs = merge(
            "machine:\n  network:\n    interfaces:\n"
            "      - {deviceSelector: {hardwareAddr: 'aa:*'}, dhcp: true}\n"
            "      - {deviceSelector: {busPath: '0*'}, mtu: 1500}\n",
            "machine:\n  network:\n    interfaces:\n"
            "      - {deviceSelector: {busPath: '0*'}, mtu: 9000}\n"
            "      - {deviceSelector: {driver: virtio}, dhcp: true}\n")
        self.assertEqual(docs[0]["machine"]["network"]["interfaces"], [
            {"deviceSelector": {"hardwareAddr": "aa:*"}, "dhcp": True},
            {"deviceSelector": {"busPath": "0*"}, "mtu": 9000},
            {"deviceSelector": {"driver": "virtio"}, "dhcp": True},
        ])

    def test_vlans_merged_by_id(self) -> None:
        """VLANs of a merged interface merge by vlanId, new ids append."""
        docs = merge(
            "machine:\n  network:\n    interfaces:\n      - interface: eth0\n        vlans:\n"
            "          - {vlanId: 10, addresses: [10.10.0.2/24]}\n          - {vlanId: 20, mtu: 1500}\n",
            "machine:\n  network:\n    interfaces:\n      - interface: eth0\n        vlans:\n"
            "          - {vlanId: 20, mtu: 1400}\n          - {vlanId: 30, dhcp: true}\n")
        self.assertEqual(docs[0]["machine"]["network"]["interfaces"][0]["vlans"], [
            {"vlanId": 10, "addresses": ["10.10.0.2/24"]},
            {"vlanId": 20, "mtu": 1400},
            {"vlanId": 30, "dhcp": True},
        ])

    def test_documents_matched_by_api_version_kind_name(self) -> None:
        """Same apiVersion/kind/name merges; another name or kind is appended."""
        config = ("version: v1alpha1\nmachine: {}\n---\n"
                  "apiVersion: v1alpha1\nkind: ExtensionServiceConfig\nname: a\nenvironment: [X=1]\n")
        docs = merge(config,
                     "apiVersion: v1alpha1\nkind: ExtensionServiceConfig\nname: a\nenvironment: [Y=2]\n"
                     "---\napiVersion: v1alpha1\nkind: ExtensionServiceConfig\nname: b\n"
                     "---\napiVersion: v1alpha2\nkind: ExtensionServiceConfig\nname: a\n")
        self.assertEqual([document_id(d) for d in docs], [
            DocumentID("", "v1alpha1"),
            DocumentID("v1alpha1", "ExtensionServiceConfig", "a"),
            DocumentID("v1alpha1", "ExtensionServiceConfig", "b"),
            DocumentID("v1alpha2", "ExtensionServiceConfig", "a"),
        ])
        self.assertEqual(docs[1]["environment"], ["X=1", "Y=2"])

    def test_v1alpha1_matches_itself(self) -> None:
        """A patch without apiVersion/kind merges into the v1alpha1 document, wherever it is."""
        config = ("apiVersion: v1alpha1\nkind: SideroLinkConfig\napiUrl: grpc://a:1\n---\n"
                  "version: v1alpha1\nmachine: {type: worker}\n")
        docs = merge(config, "machine:\n  type: controlplane\n")
        self.assertEqual(len(docs), 2)
        self.assertEqual(docs[1]["machine"]["type"], "controlplane")
        self.assertEqual(load_yaml(render(docs))[0]["machine"]["type"], "controlplane",
                         "v1alpha1 is rendered first")

    def test_type_mismatch_is_an_error(self) -> None:
        """A mapping where the config has a list (and so on) is an error naming the path."""
        e = self.assertRaises(ConfigPatchError, merge, "machine:\n  certSANs: [a]\n",
                              "machine:\n  certSANs: {a: b}\n")
        self.assertIn("machine.certSANs", str(e))

    def test_input_documents_not_modified(self) -> None:
        """strategic_merge works on copies."""
        config = load_documents("machine:\n  certSANs: [a]\n")
        patch = load_patch("machine:\n  certSANs: [b]\n")
        assert isinstance(patch, StrategicPatch)
        strategic_merge(config, patch)
        self.assertEqual(config, [{"machine": {"certSANs": ["a"]}}])


class DeleteTests(SynchronousTestCase):
    """C{$patch: delete} (Talos' delete selectors): applied before the merge."""

    CONFIG = """\
        version: v1alpha1
        machine:
          network:
            hostname: hostname1
            interfaces:
              - interface: eth0
                dhcp: true
              - interface: eth1
                addresses: [10.3.5.4/32]
          nodeLabels:
            keep: "yes"
            drop: x
        ---
        apiVersion: v1alpha1
        kind: SideroLinkConfig
        apiUrl: https://siderolink.api/join?jointoken=secret
        ---
        apiVersion: v1alpha1
        kind: ExtensionServiceConfig
        name: foo
        configFiles:
          - content: hello
            mountPath: /etc/foo
        environment:
          - FOO=BAR
        """

    def test_talos_reference_delete(self) -> None:
        """Talos' patchdelete case: a document, a key, list items by key, then merging."""
        docs = merge(self.CONFIG, """\
            apiVersion: v1alpha1
            kind: SideroLinkConfig
            $patch: delete
            ---
            apiVersion: v1alpha1
            kind: ExtensionServiceConfig
            name: foo
            configFiles:
              - content: hello
                $patch: delete
              - content: hello2
                mountPath: /etc/foo2
            ---
            version: v1alpha1
            machine:
              network:
                hostname:
                  $patch: delete
                interfaces:
                  - interface: eth0
                    $patch: delete
                  - interface: eth1
                    addresses: [10.3.5.5/32]
                  - interface: eth0
                    dummy: true
              nodeLabels:
                drop:
                  $patch: delete
            """)
        self.assertEqual(docs, [
            {"version": "v1alpha1", "machine": {
                "network": {"interfaces": [
                    {"interface": "eth1", "addresses": ["10.3.5.4/32", "10.3.5.5/32"]},
                    {"interface": "eth0", "dummy": True},
                ]},
                "nodeLabels": {"keep": "yes"}}},
            {"apiVersion": "v1alpha1", "kind": "ExtensionServiceConfig", "name": "foo",
             "configFiles": [{"content": "hello2", "mountPath": "/etc/foo2"}],
             "environment": ["FOO=BAR"]},
        ])

    def test_missing_parent_is_an_error(self) -> None:
        """Deleting under a level the config does not have fails with `lookup failed`."""
        e = self.assertRaises(ConfigPatchError, merge, "version: v1alpha1\nmachine: {}\n",
                              "machine:\n  network:\n    hostname:\n      $patch: delete\n")
        self.assertIn("machine.network.hostname", str(e))
        self.assertIn("lookup failed", str(e))

    def test_missing_list_item_or_document_is_an_error(self) -> None:
        """A list item or a document that is not there cannot be deleted."""
        self.assertRaises(ConfigPatchError, merge, self.CONFIG,
                          "machine:\n  network:\n    interfaces:\n      - interface: eth9\n"
                          "        $patch: delete\n")
        self.assertRaises(ConfigPatchError, merge, self.CONFIG,
                          "apiVersion: v1alpha1\nkind: KmsgLogConfig\nname: x\n$patch: delete\n")

    def test_cannot_delete_the_v1alpha1_root(self) -> None:
        """The legacy document itself cannot be deleted."""
        self.assertRaises(ConfigPatchError, load_patch, "version: v1alpha1\nmachine: {}\n$patch: delete\n")

    def test_cannot_delete_inside_list_items(self) -> None:
        """A delete below a list item is refused when the patch is loaded."""
        e = self.assertRaises(ConfigPatchError, load_patch,
                              "machine:\n  network:\n    interfaces:\n      - interface: eth0\n"
                              "        vlans:\n          - vlanId: 5\n            $patch: delete\n")
        self.assertIn("complex paths", str(e))
        self.assertRaises(ConfigPatchError, load_patch,
                          "machine:\n  network:\n    interfaces:\n      - interface: eth0\n"
                          "        dhcp:\n          $patch: delete\n")

    def test_other_patch_directives_refused(self) -> None:
        """Only `$patch: delete` is understood."""
        self.assertRaises(ConfigPatchError, load_patch, "machine:\n  network:\n    $patch: replace\n")


class LoadPatchTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """Config documents → strategic; JSON array and YAML list of ops → RFC 6902."""
        self.assertIsInstance(load_patch("machine:\n  type: worker\n"), StrategicPatch)
        ops = [{"op": "add", "path": "/machine/type", "value": "worker"}]
        self.assertEqual(load_patch(json.dumps(ops)), JSONPatch(tuple(ops)))
        self.assertEqual(load_patch("- op: add\n  path: /machine/type\n  value: worker\n"),
                         JSONPatch(tuple(ops)))
        self.assertEqual(load_patch(""), StrategicPatch(), "an empty patch does nothing")

    def test_errors_name_the_likely_format(self) -> None:
        """Text starting with [ reports the JSON error; other text the config one."""
        e = self.assertRaises(ConfigPatchError, load_patch, '[{"op": "add",')
        self.assertIn("JSON", str(e))
        e = self.assertRaises(ConfigPatchError, load_patch, "foo: bar\n")
        self.assertIn("missing kind", str(e))
        e = self.assertRaises(ConfigPatchError, load_patch, '[{"op": "frobnicate", "path": "/a"}]')
        self.assertIn("frobnicate", str(e))
        e = self.assertRaises(ConfigPatchError, load_patch, "apiVersion: v1\n")
        self.assertIn("missing kind", str(e))
        e = self.assertRaises(ConfigPatchError, load_patch, "kind: Foo\n")
        self.assertIn("missing apiVersion", str(e))
        self.assertRaises(ConfigPatchError, load_patch, "machine: {}\n---\nmachine: {}\n")

    def test_json_patch_validation(self) -> None:
        """json_patch refuses what is not a list of operations."""
        for bad in ({"op": "add"}, ["add"], [{"path": "/a"}], [{"op": "add", "path": "a", "value": 1}]):
            with self.subTest(bad=bad):
                self.assertRaises(ConfigPatchError, json_patch, bad)


class JSON6902Tests(SynchronousTestCase):
    def apply(self, config: str, ops: list[dict[str, Any]]) -> Any:
        return load_yaml(apply_json6902(config, json_patch(ops)))[0]

    def test_standard_semantics(self) -> None:
        """add/replace/remove/move/copy/test and `-` appending, as RFC 6902 says."""
        doc = self.apply("a: {b: 1}\nl: [1]\n", [
            {"op": "add", "path": "/a/c", "value": 2},
            {"op": "replace", "path": "/a/b", "value": 3},
            {"op": "add", "path": "/l/-", "value": 2},
            {"op": "copy", "from": "/a/c", "path": "/d"},
            {"op": "move", "from": "/d", "path": "/e"},
            {"op": "test", "path": "/e", "value": 2},
            {"op": "remove", "path": "/a/c"},
        ])
        self.assertEqual(doc, {"a": {"b": 3}, "l": [1, 2], "e": 2})

    def test_failures(self) -> None:
        """Adding under a missing parent, replacing or removing what is not there all fail."""
        for op in ({"op": "add", "path": "/x/y", "value": 1}, {"op": "replace", "path": "/x", "value": 1},
                   {"op": "remove", "path": "/x"}, {"op": "test", "path": "/a", "value": 2}):
            with self.subTest(op=op):
                self.assertRaises(ConfigPatchError, self.apply, "a: 1\n", [op])

    def test_errors_do_not_echo_the_config(self) -> None:
        """Error messages name the path, never the machine config's values."""
        config = f"machine:\n  token: {SECRET}\n"
        for op in ({"op": "add", "path": "/cluster/x", "value": 1},
                   {"op": "test", "path": "/machine", "value": 2},
                   {"op": "add", "path": "/machine/token/x", "value": 1}):
            with self.subTest(op=op):
                e = self.assertRaises(ConfigPatchError, self.apply, config, [op])
                self.assertNotIn(SECRET, str(e))

    def test_multi_document_refused(self) -> None:
        """RFC 6902 patches need exactly one document."""
        e = self.assertRaises(ConfigPatchError, apply_json6902, "a: 1\n---\nb: 2\n", JSONPatch(()))
        self.assertEqual(str(e), MULTI_DOCUMENT_JSON6902)
        config = MachineConfig(documents=load_documents("machine: {}\n---\napiVersion: v1alpha1\n"
                                                        "kind: SideroLinkConfig\napiUrl: grpc://a:1\n"))
        e = self.assertRaises(ConfigPatchError, apply_patch, config,
                              load_patch('[{"op": "add", "path": "/x", "value": 1}]'))
        self.assertEqual(str(e), MULTI_DOCUMENT_JSON6902)


class MultiDocumentTests(SynchronousTestCase):
    def test_v1alpha1_first_then_in_order(self) -> None:
        """Rendering puts the v1alpha1 document first and keeps the others' order."""
        text = ("apiVersion: v1alpha1\nkind: B\n---\nversion: v1alpha1\nmachine: {}\n---\n"
                "apiVersion: v1alpha1\nkind: A\n")
        self.assertEqual([document_id(d) for d in load_yaml(render(load_documents(text)))],
                         [DocumentID("", "v1alpha1"), DocumentID("v1alpha1", "B"), DocumentID("v1alpha1", "A")])

    def test_strategic_then_json_patch_on_single_document(self) -> None:
        """A merge result is rendered back to text for a following RFC 6902 patch."""
        config = MachineConfig.from_text("version: v1alpha1\nmachine: {}\n")
        config = apply_patch(config, load_patch("machine:\n  type: worker\n"))
        config = apply_patch(config, load_patch('[{"op": "add", "path": "/machine/token", "value": "t"}]'))
        self.assertEqual(docs_of(config), [{"version": "v1alpha1", "machine": {"type": "worker", "token": "t"}}])

    def test_duplicates_and_non_mappings_refused(self) -> None:
        """Two documents with one identity, or a scalar document, are errors."""
        self.assertRaises(ConfigPatchError, load_documents, "machine: {}\n---\ncluster: {}\n")
        self.assertRaises(ConfigPatchError, load_documents, "machine: {}\n---\n5\n")
        self.assertRaises(ConfigPatchError, load_documents, "apiVersion: v1\n")


class NodeLabelTests(SynchronousTestCase):
    def test_single_document_variants(self) -> None:
        """The legacy variant adds what is missing or replaces extraArgs whole."""
        for config, expected in (
            ("version: v1alpha1\n", {"kubelet": {"extraArgs": {"node-labels": "metal.sidero.dev/uuid=u"}}}),
            ("version: v1alpha1\nmachine: {}\n", {"kubelet": {"extraArgs": {"node-labels": "metal.sidero.dev/uuid=u"}}}),
            ("version: v1alpha1\nmachine: {kubelet: {image: k}}\n",
             {"kubelet": {"image": "k", "extraArgs": {"node-labels": "metal.sidero.dev/uuid=u"}}}),
            ("version: v1alpha1\nmachine: {kubelet: {extraArgs: {v: 2, node-labels: a=b}}}\n",
             {"kubelet": {"extraArgs": {"v": "2", "node-labels": "a=b,metal.sidero.dev/uuid=u"}}}),
        ):
            with self.subTest(config=config):
                self.assertEqual(docs_of(add_node_label(config, "u"))[0]["machine"], expected)

    def test_multi_document_uses_a_merge(self) -> None:
        """With --- in the text the label is merged and the other documents are kept."""
        config = ("version: v1alpha1\nmachine: {kubelet: {extraArgs: {node-labels: a=b, x: y}}}\n---\n"
                  "apiVersion: v1alpha1\nkind: EventSinkConfig\nendpoint: '[fd00::1]:4002'\n")
        docs = docs_of(add_node_label(config, "u"))
        self.assertEqual(docs[0]["machine"]["kubelet"]["extraArgs"],
                         {"node-labels": "a=b,metal.sidero.dev/uuid=u", "x": "y"})
        self.assertEqual(docs[1]["kind"], "EventSinkConfig")

    def test_errors(self) -> None:
        """Another version is `unknown config type`; a malformed config `failure creating config struct`."""
        e = self.assertRaises(ConfigPatchError, add_node_label, "version: v1alpha2\nmachine: {}\n", "u")
        self.assertEqual(str(e), "unknown config type")
        e = self.assertRaises(ConfigPatchError, add_node_label, "machine: {}\n", "u")
        self.assertEqual(str(e), "unknown config type")
        for bad in ("version: v1alpha1\nmachine: [1]\n", "- a\n", "version: v1alpha1\nmachine: {kubelet: 5}\n",
                    "version: v1alpha1\nmachine: {kubelet: {extraArgs: {a: [1]}}}\n", "a: [\n"):
            with self.subTest(config=bad):
                e = self.assertRaises(ConfigPatchError, add_node_label, bad, "u")
                self.assertTrue(str(e).startswith("failure creating config struct: "), str(e))


class SideroLinkDocumentTests(SynchronousTestCase):
    def test_ipv6_bracketed_ipv4_not(self) -> None:
        """The tunnel and API addresses are bracketed only when they are IPv6."""
        docs = siderolink_documents("fd00::2", 8081, "fdae:41e4::1")
        self.assertEqual(docs, [
            {"apiVersion": "v1alpha1", "kind": "SideroLinkConfig", "apiUrl": "grpc://[fd00::2]:8081"},
            {"apiVersion": "v1alpha1", "kind": "EventSinkConfig", "endpoint": "[fdae:41e4::1]:4002"},
            {"apiVersion": "v1alpha1", "kind": "KmsgLogConfig", "name": "remote-log",
             "url": "tcp://[fdae:41e4::1]:4001"},
        ])
        self.assertEqual(siderolink_documents("192.168.1.1", 8081, "192.168.1.1"), SIDEROLINK_192)
        self.assertEqual(siderolink_documents("sidero.example", 80, "fd00::1")[0]["apiUrl"],
                         "grpc://sidero.example:80")

    def test_invalid_refused(self) -> None:
        """An address that is not an IP, a bad port or an empty endpoint is an error."""
        for args in (("a", 8081, "not-an-ip"), ("a", 0, "fd00::1"), ("", 8081, "fd00::1"),
                     ("a b", 8081, "fd00::1")):
            with self.subTest(args=args):
                self.assertRaises(ConfigPatchError, siderolink_documents, *args)

    def test_merged_with_existing_documents(self) -> None:
        """Existing documents of the same kind/name are merged, other log configs kept."""
        config = MachineConfig.from_text(
            "version: v1alpha1\nmachine: {}\n---\n"
            "apiVersion: v1alpha1\nkind: SideroLinkConfig\napiUrl: https://old:443\n---\n"
            "apiVersion: v1alpha1\nkind: KmsgLogConfig\nname: remote-log\nurl: tcp://old:1\n---\n"
            "apiVersion: v1alpha1\nkind: KmsgLogConfig\nname: mine\nurl: udp://1.2.3.4:5\n")
        docs = load_yaml(render(add_siderolink_documents(
            config, siderolink_documents("10.0.0.1", 8081, "fd00::1")).documents()))
        self.assertEqual(docs[1:], [
            {"apiVersion": "v1alpha1", "kind": "SideroLinkConfig", "apiUrl": "grpc://10.0.0.1:8081"},
            {"apiVersion": "v1alpha1", "kind": "KmsgLogConfig", "name": "remote-log", "url": "tcp://[fd00::1]:4001"},
            {"apiVersion": "v1alpha1", "kind": "KmsgLogConfig", "name": "mine", "url": "udp://1.2.3.4:5"},
            {"apiVersion": "v1alpha1", "kind": "EventSinkConfig", "endpoint": "[fd00::1]:4002"},
        ])


class YAMLTests(SynchronousTestCase):
    def test_go_scalars(self) -> None:
        """Scalars resolve as Go's yaml.v3 reads them (YAML 1.2 core, Go octal)."""
        self.assertEqual(load_yaml("a: yes\nb: on\nc: 0o17\nd: 017\ne: 0x1f\nf: 2001-01-01\n"
                                   "g: 1e3\nh: ~\ni: True\nj: '5'\n"),
                         [{"a": "yes", "b": "on", "c": 15, "d": 15, "e": 31, "f": "2001-01-01",
                           "g": 1000.0, "h": None, "i": True, "j": "5"}])

    def test_ambiguous_strings_written_quoted(self) -> None:
        """Strings that YAML 1.1 or Go would read as something else survive a round trip."""
        values = {"a": "yes", "b": "0o17", "c": "1e3", "d": "null", "e": "017", "f": "2001-01-01",
                  "g": "true", "h": "", "i": "multi\nline\n", "j": " lead", "k": "0x1F", "l": "on"}
        self.assertEqual(load_yaml(dump_yaml([values])), [values])

    def test_alias_bomb_refused(self) -> None:
        """Nine levels of ten aliases (a billion nodes) are refused before being built."""
        lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
        lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
        e = self.assertRaises(ConfigPatchError, load_yaml, "\n".join(lines) + "\n")
        self.assertIn(str(MAX_NODES), str(e))
        self.assertRaises(ConfigPatchError, load_patch, "\n".join(lines) + "\n")

    def test_hostile_inputs_are_errors(self) -> None:
        """Recursion, deep nesting, Python tags, binary, duplicates, bad UTF-8, size."""
        for text in ("a: &a [*a]", "[" * 2000 + "]" * 2000, "a: !!python/object:os.system x",
                     "a: !!binary aGk=", "a: 1\na: 2\n", b"a: \xff\n", "a: *nope", "? [a]\n: b\n",
                     "x" * (5 << 20), "a: !!int zz", "a: !!set {x}"):
            with self.subTest(text=text[:40]):
                self.assertRaises(ConfigPatchError, load_yaml, text)

    def test_anchors_and_merge_keys(self) -> None:
        """Ordinary anchors and << merge keys work."""
        self.assertEqual(load_yaml("b: &b {x: 1, y: 2}\nd:\n  <<: *b\n  y: 3\n"),
                         [{"b": {"x": 1, "y": 2}, "d": {"x": 1, "y": 3}}])


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000), st.text(max_size=8),
                     st.sampled_from(["", "eth0", "v1alpha1", "$patch", "delete", "yes", "0o7"]))
_keys = st.sampled_from(["machine", "cluster", "network", "interfaces", "interface", "vlans", "vlanId",
                         "extraArgs", "kubelet", "podSubnets", "$patch", "apiVersion", "kind", "name",
                         "version", "deviceSelector", "a", "b"])
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=4)), max_leaves=20)
_ops = st.lists(st.dictionaries(st.sampled_from(["op", "path", "from", "value"]), st.one_of(
    st.sampled_from(["add", "remove", "replace", "move", "copy", "test", "x", "", "/", "/machine",
                     "/machine/kubelet", "/a/-", "/a/0", "~1", "/machine/network/interfaces/0"]),
    _values), max_size=4), max_size=4)

_paths = st.sampled_from(["", "/machine", "/machine/kubelet", "/machine/kubelet/extraArgs",
                          "/machine/kubelet/extraArgs/a", "/machine/network/interfaces/0",
                          "/machine/network/interfaces/-", "/machine/network/interfaces/5", "/cluster/x/y",
                          "/cluster/network/podSubnets/0", "/a~1b", "/machine/kubelet/extraArgs/a/b"])
_good_ops = st.lists(st.fixed_dictionaries(
    {"op": st.sampled_from(["add", "remove", "replace", "move", "copy", "test"]), "path": _paths},
    optional={"value": _values, "from": _paths}), max_size=4)
_deletes = st.fixed_dictionaries({"$patch": st.just("delete")}, optional={"interface": st.just("eth0"),
                                                                         "vlanId": st.just(1)})
_patch_values = st.recursive(st.one_of(_scalars, _deletes), lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(_keys, inner, max_size=4)), max_leaves=20)
_v1alpha1_docs = st.fixed_dictionaries({"machine": _patch_values},
                                       optional={"cluster": _patch_values, "version": st.just("v1alpha1")})
_typed_docs = st.fixed_dictionaries(
    {"apiVersion": st.just("v1alpha1"),
     "kind": st.sampled_from(["SideroLinkConfig", "KmsgLogConfig", "NetworkRuleConfig"])},
    optional={"name": st.sampled_from(["remote-log", "x"]), "$patch": st.just("delete"),
              "ingress": _patch_values, "url": _scalars})
_documents = st.lists(st.one_of(_v1alpha1_docs, _typed_docs), min_size=1, max_size=3)

BASE = MachineConfig.from_text(textwrap.dedent("""\
    version: v1alpha1
    machine:
      kubelet: {extraArgs: {a: b}}
      network:
        interfaces:
          - {interface: eth0, vlans: [{vlanId: 1}]}
    cluster:
      network: {podSubnets: [10.0.0.0/8]}
    """))


class FuzzTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=200))
    def test_any_text_loads_or_fails_typed(self, text: str) -> None:
        """Any text is a patch or a ConfigPatchError, and a patch applies or fails typed."""
        try:
            patch = load_patch(text)
            config = apply_patch(BASE, patch)
            config.text()
        except ConfigPatchError:
            pass

    @settings(max_examples=300, deadline=None)
    @given(st.lists(_values, min_size=1, max_size=3))
    def test_any_strategic_patch_applies_or_fails_typed(self, docs: list[Any]) -> None:
        """Random documents as a strategic patch, then the node label and SideroLink steps."""
        try:
            patch = load_patch(dump_yaml(docs))
            config = apply_patch(BASE, patch)
            labeled = add_node_label(config.text(), "u")
            render(add_siderolink_documents(labeled, siderolink_documents("a", 1, "fd00::1")).documents())
        except ConfigPatchError:
            pass

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(_ops, _good_ops))
    def test_any_operations_apply_or_fail_typed(self, ops: list[Any]) -> None:
        """Random RFC 6902 operation lists (as configPatches arrive) never raise another error."""
        try:
            apply_patch(BASE, load_patch(json.dumps(ops))).text()
        except ConfigPatchError:
            pass

    @settings(max_examples=300, deadline=None)
    @given(_documents)
    def test_config_shaped_patches_apply_or_fail_typed(self, docs: list[Any]) -> None:
        """Patches shaped like Talos documents, with deletes sprinkled in, merge or fail typed;
        a merge that succeeds renders to documents that load again."""
        try:
            config = apply_patch(BASE, load_patch(dump_yaml(docs)))
        except ConfigPatchError:
            return
        self.assertEqual(load_documents(config.text()), config.documents())

    @settings(max_examples=200, deadline=None)
    @given(_values)
    def test_dump_load_round_trip(self, value: Any) -> None:
        """What the dumper writes, the reader reads back unchanged."""
        self.assertEqual(load_yaml(dump_yaml([value])), [value])
