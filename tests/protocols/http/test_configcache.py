"""The /configdata answer cache: served while every object it was made from is unchanged."""

from __future__ import annotations

import base64
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from sidero.protocols.http.configcache import ConfigDataCache
from sidero.protocols.http.ipxe import BootSettings, LookupFailed
from sidero.protocols.http.metadata import ConfigData, configdata

SETTINGS = BootSettings("127.0.0.1", 8081, siderolink_server_address="fdae:41e4:649b:9303::1")
CONFIG = "version: v1alpha1\nmachine:\n  type: worker\ncluster:\n  clusterName: c\n"


def _obj(name: str, rv: str | None, **rest: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "uid": f"uid-{name}"}
    if rv is not None:
        meta["resourceVersion"] = rv
    return {"metadata": meta, **rest}


class Lookup:
    """Objects by kind and name, each with a resourceVersion the test bumps."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any] | None] = {
            "binding": _obj("u1", "1", spec={"metalMachineRef": {"namespace": "default", "name": "mm"}}),
            "mm": _obj("mm", "2", ),
            "secret": _obj("s", "3", data={"value": base64.b64encode(CONFIG.encode()).decode()}),
            "server": _obj("u1", "4", spec={}),
        }
        self.objects["mm"]["metadata"].update(  # type: ignore[index]
            namespace="default", annotations={"metal.sidero.dev/bootstrap-data-secret": "s"})
        self.fail = False

    def _get(self, key: str) -> dict[str, Any] | None:
        if self.fail:
            raise LookupFailed("cache not synced")
        return self.objects[key]

    def server(self, name: str) -> dict[str, Any] | None:
        return self._get("server")

    def server_binding(self, name: str) -> dict[str, Any] | None:
        return self._get("binding")

    def server_class(self, name: str) -> dict[str, Any] | None:
        return None

    def environment(self, name: str) -> dict[str, Any] | None:
        return None

    def metal_machine(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get("mm")

    def machine(self, namespace: str, name: str) -> dict[str, Any] | None:
        return None

    def secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get("secret")

    def bump(self, key: str, **changes: Any) -> None:
        obj = self.objects[key]
        assert obj is not None
        new = {**obj, **changes, "metadata": dict(obj["metadata"])}
        new["metadata"]["resourceVersion"] = str(int(obj["metadata"]["resourceVersion"]) + 100)
        self.objects[key] = new


class CountingRender:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, uuid: str, lookup: Any, settings: BootSettings) -> ConfigData:
        self.calls += 1
        return configdata(uuid, lookup, settings)


class ConfigDataCacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.lookup = Lookup()
        self.render = CountingRender()
        self.cache = ConfigDataCache(self.render)

    def test_same_inputs_render_once(self) -> None:
        first = self.cache("u1", self.lookup, SETTINGS)
        second = self.cache("u1", self.lookup, SETTINGS)
        self.assertEqual(first.status, 200)
        self.assertIs(second, first)
        self.assertEqual((self.render.calls, self.cache.hits, self.cache.misses), (1, 1, 1))

    def test_any_changed_input_renders_again(self) -> None:
        """A new resourceVersion of the Secret (or binding, server...) is a new answer."""
        self.cache("u1", self.lookup, SETTINGS)
        new_config = CONFIG.replace("clusterName: c", "clusterName: changed")
        self.lookup.bump("secret", data={"value": base64.b64encode(new_config.encode()).decode()})
        answer = self.cache("u1", self.lookup, SETTINGS)
        self.assertIn(b"clusterName: changed", answer.body)
        self.assertEqual(self.render.calls, 2)
        self.lookup.bump("server")
        self.cache("u1", self.lookup, SETTINGS)
        self.assertEqual(self.render.calls, 3)

    def test_object_gone_renders_again(self) -> None:
        self.cache("u1", self.lookup, SETTINGS)
        self.lookup.objects["binding"] = None
        answer = self.cache("u1", self.lookup, SETTINGS)
        self.assertEqual(answer.status, 404)
        self.assertEqual(self.render.calls, 2)

    def test_settings_are_part_of_the_key(self) -> None:
        self.cache("u1", self.lookup, SETTINGS)
        other = BootSettings("127.0.0.2", 8081, siderolink_server_address="fdae:41e4:649b:9303::1")
        self.assertIn(b"127.0.0.2", self.cache("u1", self.lookup, other).body)
        self.assertEqual(self.render.calls, 2)

    def test_errors_are_not_kept(self) -> None:
        self.lookup.objects["secret"] = None
        self.assertEqual(self.cache("u1", self.lookup, SETTINGS).status, 404)
        self.assertEqual(self.cache("u1", self.lookup, SETTINGS).status, 404)
        self.assertEqual((self.render.calls, len(self.cache)), (2, 0))

    def test_without_resource_version_never_kept(self) -> None:
        self.lookup.objects["mm"]["metadata"].pop("resourceVersion")  # type: ignore[index]
        self.cache("u1", self.lookup, SETTINGS)
        self.cache("u1", self.lookup, SETTINGS)
        self.assertEqual((self.render.calls, len(self.cache)), (2, 0))

    def test_lookup_failing_later_answers_500(self) -> None:
        """A cache that stops answering (relist, API away) is the render's 500, not a stale hit."""
        self.cache("u1", self.lookup, SETTINGS)
        self.lookup.fail = True
        self.assertEqual(self.cache("u1", self.lookup, SETTINGS).status, 500)

    def test_bounded_in_entries_and_bytes(self) -> None:
        cache = ConfigDataCache(self.render, max_entries=2)
        for uuid in ("a", "b", "c"):
            cache(uuid, self.lookup, SETTINGS)
        self.assertEqual(len(cache), 2)
        cache("a", self.lookup, SETTINGS)  # evicted first, rendered again
        self.assertEqual(self.render.calls, 4)
        tiny = ConfigDataCache(self.render, max_bytes=10)
        tiny("a", self.lookup, SETTINGS)
        self.assertEqual(len(tiny), 0)
