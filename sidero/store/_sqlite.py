# -*- test-case-name: tests.store.test_embedded -*-
"""The embedded store's SQLite layer: tables, one-query reads and one-transaction writes.

Everything here is synchronous and runs only in the store's single database thread (the
connection is opened there and never shared), so a transaction sees no concurrent writer and
the global resourceVersion can be assigned in memory and persisted in the same commit.
"""

from __future__ import annotations

import json
import os
import sqlite3
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sidero.store import errors

Object = dict[str, Any]

SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
    uid TEXT NOT NULL, rv INTEGER NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (kind, namespace, name)
);
CREATE INDEX IF NOT EXISTS objects_uid ON objects (uid);
CREATE TABLE IF NOT EXISTS owners (
    owner_uid TEXT NOT NULL, kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
    PRIMARY KEY (owner_uid, kind, namespace, name)
);
CREATE INDEX IF NOT EXISTS owners_dependent ON owners (kind, namespace, name);
CREATE TABLE IF NOT EXISTS events (
    rv INTEGER PRIMARY KEY, kind TEXT NOT NULL, type TEXT NOT NULL,
    data TEXT NOT NULL, prev TEXT
);
CREATE INDEX IF NOT EXISTS events_kind ON events (kind, rv);
"""


@dataclass(frozen=True)
class StoredEvent:
    """One committed change: C{rv} is its resourceVersion, C{kind} the resource name
    (C{servers.metal.sidero.dev}), C{data} the object after it and C{prev} before it (JSON)."""

    rv: int
    kind: str
    type: str
    data: str
    prev: str | None


def _dumps(obj: Object) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)


class Database:
    """One SQLite database: objects, the owner index for garbage collection, the event log.

    @ivar rv: the last committed resourceVersion (0 for an empty store).
    @ivar floor: every event with a resourceVersion above this is still in the log.
    """

    def __init__(self, path: str, event_log_size: int) -> None:
        self.path = path
        self.event_log_size = max(1, event_log_size)
        self.rv = 0
        self.floor = 0
        self._pending_rv = 0
        self._conn: sqlite3.Connection | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def open(self) -> None:
        if self.path != ":memory:":
            parent = os.path.dirname(os.path.abspath(self.path))
            if not os.path.isdir(parent):
                os.makedirs(parent, mode=0o700, exist_ok=True)
            self._check_intact()
        try:
            conn = self._connect()
        except sqlite3.DatabaseError as e:
            raise self._damaged(str(e)) from None
        rows = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if "schema" not in rows:
            conn.execute("INSERT INTO meta VALUES ('schema', ?), ('rv', '0'), ('floor', '0')",
                         (SCHEMA_VERSION,))
            rows = {"schema": SCHEMA_VERSION, "rv": "0", "floor": "0"}
        elif rows["schema"] != SCHEMA_VERSION:
            conn.close()
            raise errors.StoreError(f"unsupported store schema {rows['schema']!r} in {self.path}")
        self.rv = self._pending_rv = int(rows["rv"])
        self.floor = int(rows["floor"])
        self._conn = conn

    def _connect(self) -> sqlite3.Connection:
        if self.path == ":memory:":
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        else:
            # psow=0: do not count on the disk's "powersafe overwrite" (a torn sector write
            # leaving the rest of the sector alone).  SQLite then pads every commit to a
            # 4096-byte boundary of the WAL, so tearing the next commit's first sector can
            # never reach back into frames already acknowledged.
            uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?psow=0"
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        try:
            if self.path != ":memory:":
                # Secrets live here: only the owner may read the file (and its -wal, which copies
                # its mode).
                os.chmod(self.path, 0o600)
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode != "wal":
                    raise errors.StoreError(f"the store database {self.path} cannot use a write-ahead "
                                            f"log (journal mode {mode!r}); it needs a local filesystem")
                # FULL: a commit is on disk (the WAL fsynced) before it is acknowledged, so it
                # survives power loss, which NORMAL does not promise under WAL.
                conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_intact(self) -> None:
        """Refuse a damaged database before anything writes to it.

        The check reads through a read-only connection: closing a read-write one would
        checkpoint the WAL into the damaged file and delete the WAL, destroying what a
        recovery tool could still use.  Power loss alone never damages the file (WAL frames
        carry checksums, a torn tail is ignored, checkpointed pages are still in the WAL), so
        this finds media or filesystem damage, or a file that is not ours.
        """
        if not any(os.path.exists(p) and os.path.getsize(p) > 0 for p in (self.path, self.path + "-wal")):
            return
        uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True)
            try:
                rows = conn.execute("PRAGMA quick_check").fetchall()
            finally:
                conn.close()
        except sqlite3.DatabaseError as e:
            raise self._damaged(str(e)) from None
        if rows != [("ok",)]:
            raise self._damaged("; ".join(str(r[0]) for r in rows[:3]).replace("\n", " "))

    def _damaged(self, problem: str) -> errors.StoreError:
        return errors.StoreError(
            f"the store database {self.path} is damaged ({problem[:300]}); it was left as it is: "
            "restore it from a backup, or move it and its -wal file away to start with an empty store")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise errors.Unavailable("the store is closed")
        return self._conn

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction; the resourceVersions it assigned count only if it commits."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        self._pending_rv = self.rv
        floor = self.floor
        try:
            yield
            if self._pending_rv != self.rv:
                conn.execute("UPDATE meta SET value = ? WHERE key = 'rv'", (str(self._pending_rv),))
                self._compact()
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            self._pending_rv = self.rv
            self.floor = floor
            raise
        self.rv = self._pending_rv

    def _compact(self) -> None:
        """Keep about C{event_log_size} events: trim in batches so most commits delete nothing."""
        slack = self.event_log_size // 10
        if self._pending_rv - self.floor <= self.event_log_size + slack:
            return
        floor = self._pending_rv - self.event_log_size
        self.conn.execute("DELETE FROM events WHERE rv <= ?", (floor,))
        self.conn.execute("UPDATE meta SET value = ? WHERE key = 'floor'", (str(floor),))
        self.floor = floor

    # -- reads ----------------------------------------------------------------------------

    def get(self, kind: str, namespace: str, name: str) -> Object | None:
        row = self.conn.execute(
            "SELECT data FROM objects WHERE kind = ? AND namespace = ? AND name = ?",
            (kind, namespace, name),
        ).fetchone()
        return json.loads(row[0]) if row else None

    def list_objects(self, kind: str, namespace: str | None) -> tuple[list[Object], int]:
        """Objects of a kind (in one namespace, or all), by namespace then name, and the rv."""
        if namespace is None:
            rows = self.conn.execute(
                "SELECT data FROM objects WHERE kind = ? ORDER BY namespace, name", (kind,))
        else:
            rows = self.conn.execute(
                "SELECT data FROM objects WHERE kind = ? AND namespace = ? ORDER BY name",
                (kind, namespace))
        return [json.loads(r[0]) for r in rows], self.rv

    def events_since(self, kind: str, rv: int) -> tuple[list[StoredEvent], int]:
        """The logged events of C{kind} after C{rv}, and the current rv.

        @raise errors.Gone: events after C{rv} were compacted away.
        """
        if rv < self.floor:
            raise errors.Gone(f"too old resource version: {rv} ({self.floor + 1})")
        if rv > self.rv:
            # Not from this database's history (an older copy restored, or writes lost): the
            # watcher would skip every change up to its rv without a word.  Gone makes it relist.
            raise errors.Gone(f"too large resource version: {rv} (current {self.rv})")
        rows = self.conn.execute(
            "SELECT rv, kind, type, data, prev FROM events WHERE kind = ? AND rv > ? ORDER BY rv",
            (kind, rv),
        ).fetchall()
        return [StoredEvent(*row) for row in rows], self.rv

    def dependents(self, owner_uid: str) -> list[tuple[str, str, str]]:
        """(kind, namespace, name) of every object whose ownerReferences name C{owner_uid}."""
        return [(r[0], r[1], r[2]) for r in self.conn.execute(
            "SELECT kind, namespace, name FROM owners WHERE owner_uid = ? ORDER BY kind, namespace, name",
            (owner_uid,))]

    def uid_exists(self, uid: str) -> bool:
        return self.conn.execute("SELECT 1 FROM objects WHERE uid = ? LIMIT 1", (uid,)).fetchone() is not None

    def absent_owner_uids(self) -> list[str]:
        """Owner uids that no stored object has: their dependents await garbage collection."""
        return [r[0] for r in self.conn.execute(
            "SELECT DISTINCT owner_uid FROM owners WHERE owner_uid NOT IN (SELECT uid FROM objects)")]

    # -- writes (inside transaction()) ----------------------------------------------------

    def _next_rv(self) -> int:
        self._pending_rv += 1
        return self._pending_rv

    def put(self, kind: str, namespace: str, name: str, obj: Object, event_type: str,
            prev: Object | None, owners: list[str]) -> StoredEvent:
        """Insert or replace an object under a new resourceVersion (set into C{obj}) and log it."""
        rv = self._next_rv()
        obj["metadata"]["resourceVersion"] = str(rv)
        data = _dumps(obj)
        conn = self.conn
        conn.execute(
            "INSERT OR REPLACE INTO objects (kind, namespace, name, uid, rv, data) VALUES (?, ?, ?, ?, ?, ?)",
            (kind, namespace, name, obj["metadata"]["uid"], rv, data),
        )
        conn.execute("DELETE FROM owners WHERE kind = ? AND namespace = ? AND name = ?", (kind, namespace, name))
        conn.executemany("INSERT OR IGNORE INTO owners VALUES (?, ?, ?, ?)",
                         [(uid, kind, namespace, name) for uid in owners])
        return self._log(rv, kind, event_type, data, prev)

    def remove(self, kind: str, namespace: str, name: str, obj: Object, prev: Object | None) -> StoredEvent:
        """Delete an object; C{obj} (its last state) gets the deletion's resourceVersion."""
        rv = self._next_rv()
        obj["metadata"]["resourceVersion"] = str(rv)
        conn = self.conn
        conn.execute("DELETE FROM objects WHERE kind = ? AND namespace = ? AND name = ?", (kind, namespace, name))
        conn.execute("DELETE FROM owners WHERE kind = ? AND namespace = ? AND name = ?", (kind, namespace, name))
        return self._log(rv, kind, "DELETED", _dumps(obj), prev)

    def _log(self, rv: int, kind: str, event_type: str, data: str, prev: Object | None) -> StoredEvent:
        prev_data = _dumps(prev) if prev is not None else None
        self.conn.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?)", (rv, kind, event_type, data, prev_data))
        return StoredEvent(rv, kind, event_type, data, prev_data)
