"""ServerClass membership and PartialEqual (sidero.api.matching): every §7 reference case."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sidero.api import matching
from sidero.api.selectors import SelectorError

# -- the Dell R630-like fixture (v1alpha2 Test_PartialEqual) ------------------------------------

R630: dict[str, Any] = {
    "system": {"manufacturer": "Dell Inc.", "productName": "PowerEdge R630", "serialNumber": "790H8D2",
               "skuNumber": "", "family": "", "uuid": "4c4c4544-0039-3010-8048-b7c04f384432"},
    "compute": {"totalCoreCount": 8, "totalThreadCount": 16, "processorCount": 1, "processors": [
        {"manufacturer": "Intel", "productName": "Intel(R) Xeon(R) CPU E5-2630 v3 @ 2.40GHz",
         "speed": 2400, "coreCount": 8, "threadCount": 16}]},
    "memory": {"totalSize": "32 GB", "moduleCount": 2, "modules": [
        {"manufacturer": "002C00B3002C", "productName": "18ASF2G72PDZ-2G1A1", "serialNumber": "0E83E8E2",
         "type": "LPDDR4", "size": 16384, "speed": 2133},
        {"manufacturer": "002C00B3002C", "productName": "18ASF2G72PDZ-2G1A1", "serialNumber": "0E83E8E3",
         "type": "LPDDR4", "size": 16384, "speed": 2133}]},
    "storage": {"totalSize": "1116 GB", "deviceCount": 1, "devices": [
        {"type": "HDD", "size": 1199101181952, "productName": "PERC H730 Mini", "name": "sda",
         "deviceName": "/dev/sda", "serialNumber": "5000cca0", "wwid": "naa.61866da0"}]},
    "network": {"interfaceCount": 2, "interfaces": [
        {"index": 1, "name": "lo", "flags": "up|loopback", "mtu": 65536, "mac": "",
         "addresses": ["127.0.0.1/8", "::1/128"]},
        {"index": 2, "name": "enp3s0", "flags": "up|broadcast|multicast", "mtu": 1500,
         "mac": "40:8d:5c:86:5a:14", "addresses": ["192.168.2.8/24"]}]},
}


class PartialEqualTests(SynchronousTestCase):
    def test_defaults_are_partially_equal(self) -> None:
        """An empty filter matches."""
        self.assertTrue(matching.partial_equal({}, R630))

    def test_cpu_is_partially_equal(self) -> None:
        """processors [{manufacturer: Intel}] matches the R630."""
        self.assertTrue(matching.partial_equal({"compute": {"processors": [{"manufacturer": "Intel"}]}}, R630))

    def test_cpu_is_not_partially_equal(self) -> None:
        """processors [{manufacturer: AMD}] does not."""
        self.assertFalse(matching.partial_equal({"compute": {"processors": [{"manufacturer": "AMD"}]}}, R630))

    def test_lists_are_positional(self) -> None:
        """Filter element i is compared with actual element i only; a longer filter never matches."""
        second = {"network": {"interfaces": [{}, {"name": "enp3s0"}]}}
        self.assertTrue(matching.partial_equal(second, R630))
        self.assertFalse(matching.partial_equal({"network": {"interfaces": [{"name": "enp3s0"}]}}, R630))
        self.assertFalse(matching.partial_equal({"storage": {"devices": [{}, {"type": "SSD"}]}}, R630))

    def test_zero_scalars_ignored_and_missing_struct_fails(self) -> None:
        """Empty strings and zeros in the filter are unspecified; a missing actual struct fails."""
        self.assertTrue(matching.partial_equal({"system": {"manufacturer": "", "family": ""}}, R630))
        self.assertTrue(matching.partial_equal({"memory": {"moduleCount": 0}}, {}))
        self.assertFalse(matching.partial_equal({"memory": {"moduleCount": 2}}, {}))
        self.assertFalse(matching.partial_equal({"system": {"manufacturer": "Dell Inc."}}, {"system": None}))

    def test_exact_scalars(self) -> None:
        """Scalar comparison is exact and case-sensitive."""
        self.assertFalse(matching.partial_equal({"system": {"manufacturer": "dell inc."}}, R630))
        self.assertTrue(matching.partial_equal({"memory": {"modules": [{"size": 16384}]}}, R630))
        self.assertFalse(matching.partial_equal({"memory": {"modules": [{"size": 8192}]}}, R630))

    def test_null_actual_element(self) -> None:
        """A null element in the actual list fails a non-zero filter element."""
        self.assertFalse(matching.partial_equal({"compute": {"processors": [{"manufacturer": "Intel"}]}},
                                                {"compute": {"processors": [None]}}))

    def test_v1alpha1_cases(self) -> None:
        """v1alpha1 PartialEqual: empty vs empty, {QEMU} vs {QEMU,1.2.0}, {QEMU,1.0.0} vs {QEMU,1.2.0}."""
        self.assertTrue(matching.partial_equal_v1alpha1({}, {}))
        self.assertTrue(matching.partial_equal_v1alpha1({"manufacturer": "QEMU"},
                                                        {"manufacturer": "QEMU", "version": "1.2.0"}))
        self.assertFalse(matching.partial_equal_v1alpha1({"manufacturer": "QEMU", "version": "1.0.0"},
                                                         {"manufacturer": "QEMU", "version": "1.2.0"}))


# -- TestFilterAcceptedServers fixtures ---------------------------------------------------------

def server(name: str, labels: dict[str, str] | None, accepted: bool, hardware: dict[str, Any]) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if labels:
        metadata["labels"] = labels
    return {"metadata": metadata, "spec": {"accepted": accepted, "hardware": hardware}}


def processor(manufacturer: str, product: str, speed: int, cores: int, threads: int) -> dict[str, Any]:
    return {"manufacturer": manufacturer, "productName": product, "serialNumber": "", "speed": speed,
            "coreCount": cores, "threadCount": threads}


INTEL = "Intel(R) Corporation"
AMD = "Advanced Micro Devices, Inc."
ATOM = server("atom", {"common-label": "true", "zone": "central"}, True, {"compute": {
    "totalCoreCount": 4, "totalThreadCount": 4, "processorCount": 1,
    "processors": [processor(INTEL, "Intel(R) Atom(TM) CPU C3558 @ 2.20GHz", 2200, 4, 4)]}})
XEON = processor(INTEL, "Intel(R) Xeon(R) CPU E5-2630 v3 @ 2.40GHz", 2400, 8, 16)
DUAL_XEON = server("dualxeon", None, True, {"compute": {
    "totalCoreCount": 16, "totalThreadCount": 32, "processorCount": 2, "processors": [XEON, dict(XEON)]}})
RYZEN_HW = {"system": {"manufacturer": "QEMU"}, "compute": {
    "totalCoreCount": 8, "totalThreadCount": 16, "processorCount": 1,
    "processors": [processor(AMD, "AMD Ryzen 7 2700X Eight-Core Processor", 3700, 8, 16)]}}
RYZEN = server("ryzen", {"common-label": "true", "zone": "east"}, True, RYZEN_HW)
NOT_ACCEPTED = server("notaccepted", {"common-label": "true", "zone": "west"}, False, dict(RYZEN_HW))
SERVERS = [NOT_ACCEPTED, RYZEN, DUAL_XEON, ATOM]  # deliberately unsorted

QEMU_HW = [{"system": {"manufacturer": "QEMU"}}]
CASES: dict[str, tuple[dict[str, Any], dict[str, Any], list[str]]] = {
    "empty selector - empty qualifier": ({}, {}, ["atom", "dualxeon", "ryzen"]),
    "Intel only": ({}, {"hardware": [{"compute": {"processors": [{"manufacturer": INTEL}]}}]},
                   ["atom", "dualxeon"]),
    "Intel and AMD": ({}, {"hardware": [{"compute": {"processors": [{"manufacturer": INTEL}]}},
                                        {"compute": {"processors": [{"manufacturer": AMD}]}}]},
                      ["atom", "dualxeon", "ryzen"]),
    "QEMU only": ({}, {"hardware": QEMU_HW}, ["ryzen"]),
    "with label": ({}, {"labelSelectors": [{"common-label": "true"}]}, ["atom", "ryzen"]),
    "with multiple labels - single selector": (
        {}, {"labelSelectors": [{"common-label": "true", "zone": "central"}]}, ["atom", "ryzen"]),
    "with multiple labels - multiple selectors": (
        {}, {"labelSelectors": [{"common-label": "true"}, {"zone": "central"}]}, ["atom", "ryzen"]),
    "with same label key different label value": ({}, {"labelSelectors": [{"zone": "central"}]}, ["atom"]),
    "selector - single MatchLabels single result": ({"matchLabels": {"zone": "central"}}, {}, ["atom"]),
    "selector - single MatchLabels multiple results": (
        {"matchLabels": {"common-label": "true"}}, {}, ["atom", "ryzen"]),
    "selector - multiple MatchLabels": ({"matchLabels": {"zone": "central", "common-label": "true"}}, {},
                                        ["atom"]),
    "selector - MatchExpressions common label key": (
        {"matchExpressions": [{"key": "common-label", "operator": "Exists"}]}, {}, ["atom", "ryzen"]),
    "selector - MatchExpressions multiple values": (
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["east", "west"]}]}, {}, ["ryzen"]),
    "selector and qualifiers both match": ({"matchLabels": {"common-label": "true"}}, {"hardware": QEMU_HW},
                                           ["ryzen"]),
    "selector and qualifiers with disqualifying selector": (
        {"matchLabels": {"common-label": "no-match"}}, {"hardware": QEMU_HW}, []),
    "selector and qualifiers with disqualifying qualifier": (
        {"matchLabels": {"common-label": "true"}}, {"hardware": [{"system": {"manufacturer": "Gateway"}}]}, []),
}


def names(servers: list[dict[str, Any]]) -> list[str]:
    return [s["metadata"]["name"] for s in servers]


class FilterV1alpha2Tests(SynchronousTestCase):
    def check(self, case: str) -> None:
        selector, qualifiers, expected = CASES[case]
        spec: dict[str, Any] = {}
        if selector:
            spec["selector"] = selector
        if qualifiers:
            spec["qualifiers"] = qualifiers
        got = matching.servers_for_class({"metadata": {"name": "c"}, "spec": spec}, SERVERS)
        self.assertEqual(names(got), expected, case)

    def test_every_reference_case(self) -> None:
        """All TestFilterAcceptedServers cases of §7 select exactly the expected servers."""
        for case in CASES:
            self.check(case)

    def test_any_class(self) -> None:
        """The any class (empty spec) holds every accepted server, sorted by name."""
        got = matching.servers_for_class(matching.any_server_class(), SERVERS)
        self.assertEqual(names(got), ["atom", "dualxeon", "ryzen"])
        self.assertEqual(matching.any_server_class()["metadata"]["name"], matching.ANY_SERVER_CLASS)

    def test_cordoned_excluded(self) -> None:
        """A cordoned server is in no class."""
        cordoned = server("cordoned", None, True, {})
        cordoned["spec"]["cordoned"] = True
        self.assertEqual(names(matching.servers_for_class({"spec": {}}, [cordoned, ATOM])), ["atom"])

    def test_hardware_qualifier_needs_hardware(self) -> None:
        """A server without hardware fails any hardware qualifier, even an empty entry."""
        bare = {"metadata": {"name": "bare"}, "spec": {"accepted": True}}
        sc: dict[str, Any] = {"spec": {"qualifiers": {"hardware": [{}]}}}
        self.assertEqual(names(matching.servers_for_class(sc, [bare, ATOM])), ["atom"])

    def test_invalid_selector_raises(self) -> None:
        """An invalid selector operator is an error, not an empty result."""
        sc = {"spec": {"selector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}}}
        self.assertRaises(SelectorError, matching.servers_for_class, sc, SERVERS)

    def test_reset_any(self) -> None:
        """Resetting any empties qualifiers and keeps the selector."""
        sc: dict[str, Any] = {"metadata": {"name": "any"}, "spec": {"qualifiers": {"labelSelectors": [{"a": "b"}]},
                                                    "selector": {"matchLabels": {"x": "y"}}}}
        reset = matching.reset_any_server_class(sc)
        self.assertEqual(reset["spec"], {"qualifiers": {}, "selector": {"matchLabels": {"x": "y"}}})
        self.assertEqual(sc["spec"]["qualifiers"], {"labelSelectors": [{"a": "b"}]})


# -- v1alpha1 fixtures --------------------------------------------------------------------------

def server_v1(name: str, labels: dict[str, str] | None, accepted: bool, spec: dict[str, Any]) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if labels:
        metadata["labels"] = labels
    return {"metadata": metadata, "spec": {"accepted": accepted, **spec}}


ATOM_V1 = server_v1("atom", {"common-label": "true", "zone": "central"}, True,
                    {"cpu": {"manufacturer": INTEL, "version": "Intel(R) Atom(TM) CPU C3558 @ 2.20GHz"}})
RYZEN_V1 = server_v1("ryzen", {"common-label": "true", "zone": "east"}, True,
                     {"cpu": {"manufacturer": AMD, "version": "AMD Ryzen 7 2700X Eight-Core Processor"},
                      "system": {"manufacturer": "QEMU"}})
NOT_ACCEPTED_V1 = server_v1("notaccepted", {"common-label": "true", "zone": "west"}, False,
                            dict(RYZEN_V1["spec"], accepted=False))
SERVERS_V1 = [RYZEN_V1, NOT_ACCEPTED_V1, ATOM_V1]

CASES_V1: dict[str, tuple[dict[str, Any], dict[str, Any], list[str]]] = {
    "empty selector - empty qualifier": ({}, {}, ["atom", "ryzen"]),
    "Intel only": ({}, {"cpu": [{"manufacturer": INTEL}]}, ["atom"]),
    "QEMU only": ({}, {"systemInformation": [{"manufacturer": "QEMU"}]}, ["ryzen"]),
    "with label": ({}, {"labelSelectors": [{"common-label": "true"}]}, ["atom", "ryzen"]),
    "with multiple labels - single selector": (
        {}, {"labelSelectors": [{"common-label": "true", "zone": "central"}]}, ["atom", "ryzen"]),
    "with multiple labels - multiple selectors": (
        {}, {"labelSelectors": [{"common-label": "true"}, {"zone": "central"}]}, ["atom", "ryzen"]),
    "with same label key different label value": ({}, {"labelSelectors": [{"zone": "central"}]}, ["atom"]),
    "selector - single MatchLabels single result": ({"matchLabels": {"zone": "central"}}, {}, ["atom"]),
    "selector - single MatchLabels multiple results": (
        {"matchLabels": {"common-label": "true"}}, {}, ["atom", "ryzen"]),
    "selector - multiple MatchLabels": ({"matchLabels": {"zone": "central", "common-label": "true"}}, {},
                                        ["atom"]),
    "selector - MatchExpressions common label key": (
        {"matchExpressions": [{"key": "common-label", "operator": "Exists"}]}, {}, ["atom", "ryzen"]),
    "selector - MatchExpressions multiple values": (
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["east", "west"]}]}, {}, ["ryzen"]),
    "selector and qualifiers both match": (
        {"matchLabels": {"common-label": "true"}}, {"systemInformation": [{"manufacturer": "QEMU"}]}, ["ryzen"]),
    "selector and qualifiers with disqualifying selector": (
        {"matchLabels": {"common-label": "no-match"}}, {"systemInformation": [{"manufacturer": "QEMU"}]}, []),
    "selector and qualifiers with disqualifying qualifier": (
        {"matchLabels": {"common-label": "true"}}, {"systemInformation": [{"manufacturer": "Gateway"}]}, []),
    "any": ({}, {}, ["atom", "ryzen"]),
}


class FilterV1alpha1Tests(SynchronousTestCase):
    def test_every_reference_case(self) -> None:
        """All v1alpha1 TestFilterAcceptedServers cases select exactly the expected servers."""
        for case, (selector, qualifiers, expected) in CASES_V1.items():
            spec: dict[str, Any] = {}
            if selector:
                spec["selector"] = selector
            if qualifiers:
                spec["qualifiers"] = qualifiers
            got = matching.servers_for_class_v1alpha1({"spec": spec}, SERVERS_V1)
            self.assertEqual(names(got), expected, case)


_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2, 2), st.sampled_from(["", "a", "b"]))
_json = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["x", "y", "z"]), inner, max_size=3),
    max_leaves=12,
)


class PrunedEqualTests(SynchronousTestCase):
    """The pruned form used per class is exactly partial_equal, for any filter and value."""

    @given(_json, _json)
    @settings(max_examples=500)
    def test_same_as_partial_equal(self, filter_: object, actual: object) -> None:
        self.assertEqual(matching.pruned_equal(matching.prune(filter_), actual),
                         matching.partial_equal(filter_, actual))

    @given(_json)
    @settings(max_examples=200)
    def test_against_itself_and_r630(self, filter_: object) -> None:
        for actual in (filter_, R630):
            self.assertEqual(matching.pruned_equal(matching.prune(filter_), actual),
                             matching.partial_equal(filter_, actual))
