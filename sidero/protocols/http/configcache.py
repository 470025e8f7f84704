# -*- test-case-name: tests.protocols.http.test_configcache -*-
"""A cache of C{/configdata} answers, valid exactly as long as what they were made from.

Rendering a machine config costs a millisecond for a small config and tens for a large one
(YAML parse, patches, emit), on the reactor thread; a fleet booting at once asks for the same
few configs over and over.  L{configdata} is a pure function of the uuid, the settings and
what its lookups return, so the cache records every lookup a render made with the identity
(uid, resourceVersion) of what it got, and serves the stored answer while the same lookups
give the same objects.  Nothing has to invalidate it: a changed Secret, binding or patch is
a new resourceVersion and the next request renders again.  Only 200 answers are kept (an
error answer may carry an Event that must be asked for again); answers built from an object
without a resourceVersion are never kept.  Bounded in entries and bytes, least recently used
out first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from sidero.protocols.http.ipxe import BootSettings, LookupFailed
from sidero.protocols.http.metadata import ConfigData, MetadataLookup, configdata

#: (method, arguments, identity of the answer); identity None means "not found".
_Read = tuple[str, tuple[str, ...], tuple[str, str] | None]

DEFAULT_MAX_ENTRIES = 4096
DEFAULT_MAX_BYTES = 32 * 1024 * 1024


class _Uncacheable(Exception):
    """A lookup returned an object without a resourceVersion."""


def _identity(obj: dict[str, Any] | None) -> tuple[str, str] | None:
    if obj is None:
        return None
    meta = obj.get("metadata") or {}
    rv = str(meta.get("resourceVersion") or "")
    if not rv:
        raise _Uncacheable()
    return (str(meta.get("uid") or ""), rv)


class _Recording:
    """A L{MetadataLookup} that remembers what each lookup answered."""

    def __init__(self, lookup: MetadataLookup) -> None:
        self._lookup = lookup
        self.reads: list[_Read] = []
        self.cacheable = True

    def _read(self, method: str, *args: str) -> dict[str, Any] | None:
        obj: dict[str, Any] | None = getattr(self._lookup, method)(*args)
        try:
            self.reads.append((method, args, _identity(obj)))
        except _Uncacheable:
            self.cacheable = False
        return obj

    def server(self, name: str) -> dict[str, Any] | None:
        return self._read("server", name)

    def server_binding(self, name: str) -> dict[str, Any] | None:
        return self._read("server_binding", name)

    def server_class(self, name: str) -> dict[str, Any] | None:
        return self._read("server_class", name)

    def environment(self, name: str) -> dict[str, Any] | None:
        return self._read("environment", name)

    def metal_machine(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._read("metal_machine", namespace, name)

    def machine(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._read("machine", namespace, name)

    def secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._read("secret", namespace, name)


class ConfigDataCache:
    """C{configdata(uuid, lookup, settings)} with answers reused while their inputs stand.

    @ivar hits: answers served from the cache; C{misses}: renders.
    """

    def __init__(
        self,
        render: Callable[[str, MetadataLookup, BootSettings], ConfigData] = configdata,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self._render = render
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, BootSettings], tuple[ConfigData, list[_Read]]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __call__(self, uuid: str, lookup: MetadataLookup, settings: BootSettings) -> ConfigData:
        key = (uuid, settings)
        entry = self._entries.get(key)
        if entry is not None:
            answer, reads = entry
            try:
                current = all(_identity(getattr(lookup, method)(*args)) == identity
                              for method, args, identity in reads)
            except (_Uncacheable, LookupFailed):
                current = False  # the render says what went wrong
            if current:
                self._entries.move_to_end(key)
                self.hits += 1
                return answer
            self._drop(key)
        self.misses += 1
        recording = _Recording(lookup)
        answer = self._render(uuid, recording, settings)
        if answer.status == 200 and answer.event is None and recording.cacheable:
            self._keep(key, answer, recording.reads)
        return answer

    def _keep(self, key: tuple[str, BootSettings], answer: ConfigData, reads: list[_Read]) -> None:
        size = len(answer.body)
        if size > self.max_bytes:
            return
        self._entries[key] = (answer, reads)
        self._bytes += size
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple[str, BootSettings]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry[0].body)
