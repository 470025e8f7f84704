"""Power loss under the embedded store: the crash images it can leave, opened with the real
L{EmbeddedStore}.

A kill -9 loses only the process: the kernel still writes out what SQLite handed it (the
process crash tests, L{tests.integration.test_crash_embedded}).  A power loss loses every
write not yet fsynced, and a write in flight may tear at any sector.  No device-mapper target
(dm-log-writes, dm-flakey) is available in this environment (the kernel has no device-mapper
driver), so the images are built from a recorded history instead:

  - L{SyncOrderTests} traces (strace, a real peer) the writes and fsyncs SQLite issues under
    the store's settings, and checks the barriers the images below rely on: every
    acknowledged commit's WAL frames are fsynced before the acknowledgement (only padding up
    to the next 4096-byte boundary may follow, the store opens with C{psow=0}); a new WAL header
    is fsynced before any frame follows it; a checkpoint writes the database file only after
    the WAL is fsynced, and fsyncs the database before the WAL is started over.
  - L{PowerLossTests} records the database and WAL files after every acknowledged write of a
    random history (small autocheckpoint, so checkpoints and WAL restarts happen).  Between
    acknowledgement k and k+1 only commit k+1 (and the checkpoint after it) is in flight, so a
    power loss there leaves: the WAL of k with any sectors of commit k+1's frames present,
    missing (zeros, or the old bytes of a restarted WAL) or garbage, possibly truncated; or,
    when commit k+1 ran a checkpoint, its complete WAL with any of the database pages the
    checkpoint rewrote new, old or torn.  Each image must open, pass C{PRAGMA
    integrity_check}, hold exactly the objects of k (or of k+1 when all of commit k+1 made
    it) with their resourceVersions, carry the matching current resourceVersion on, and serve
    watches from the last acknowledged resourceVersion without a gap; a resourceVersion the
    image never reached is refused (Gone), never silently skipped.
  - A database damaged beyond what power loss can do (media errors) is refused at open with
    one clear error naming the file, and neither the file nor its WAL is changed.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SkipTest, TestCase

from sidero.api.registry import SECRET
from sidero.store import errors
from sidero.store.embedded import EmbeddedStore
from sidero.store.interfaces import WatchEvent
from tests.paths import REPO

SECTOR = 512       # the unit a torn write lands in
ATOMIC = 4096      # the sector a write may tear as a whole (what the store pads commits to)
PAGE = 4096
WAL_HEADER = 32
FRAME = 24 + PAGE
NAMES = [f"s{i}" for i in range(8)]
SIZES = (40, 700, 3000, 9000)  # the largest spill into overflow pages
HISTORY = int(os.environ.get("SIDERO_POWER_LOSS_WRITES") or "70")


@dataclass(frozen=True)
class Snapshot:
    """The files as a power loss right after acknowledgement C{k} would leave them."""

    wal: bytes
    db: bytes
    state: dict[str, dict[str, Any]]
    rv: int


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def _secret(name: str, size: int, rng: random.Random) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "default"},
            "type": "Opaque", "data": {"v": base64.b64encode(rng.randbytes(size)).decode()}}


def _mix(old: bytes, new: bytes, rng: random.Random, garbage: float = 0.15) -> bytes:
    """C{new} written over C{old} with each sector landing, missing (old bytes, zeros past the
    end of C{old}) or torn into garbage."""
    out = bytearray()
    for at in range(0, len(new), SECTOR):
        r = rng.random()
        if r < 0.6:
            out += new[at:at + SECTOR]
        elif r < 0.6 + garbage:
            out += rng.randbytes(len(new[at:at + SECTOR]))
        else:
            piece = old[at:at + SECTOR]
            out += piece + bytes(len(new[at:at + SECTOR]) - len(piece))
    return bytes(out)


def _intact(old: bytes, new: bytes, rng: random.Random) -> bytes:
    """Every sector landed (the commit reached the disk just before the power went)."""
    return new


def _wal_pages(wal: bytes) -> set[int]:
    """Page numbers held by the WAL's frames (valid or not)."""
    pages = set()
    for at in range(WAL_HEADER, len(wal) - FRAME + 1, FRAME):
        pages.add(int.from_bytes(wal[at:at + 4], "big"))
    return pages


def _write_image(directory: str, db: bytes, wal: bytes) -> str:
    """A fresh directory holding C{state.db} (and C{state.db-wal} when there is one, never a
    -shm: shared memory does not survive a power loss); returns the database path."""
    if os.path.exists(directory):
        shutil.rmtree(directory)
    os.makedirs(directory)
    path = os.path.join(directory, "state.db")
    with open(path, "wb") as f:
        f.write(db)
    if wal:
        with open(path + "-wal", "wb") as f:
            f.write(wal)
    return path


def _digest(path: str) -> str | None:
    return hashlib.sha256(_read(path)).hexdigest() if os.path.exists(path) else None


class SyncOrderTests(TestCase):
    """What SQLite really does on disk under the store's settings, seen by strace."""

    timeout = 120

    def test_barriers(self) -> None:
        if shutil.which("strace") is None:
            raise SkipTest("LOUD SKIP: the fsync order check needs strace (apt-get install strace)")
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        path = os.path.join(work, "state.db")
        trace = os.path.join(work, "trace")
        # The store's own Database (the same open(): journal mode, synchronous, schema), one
        # transaction per write as EmbeddedStore runs them; "ACK n" is printed where the store
        # would answer its caller.
        script = (
            "import os, sys\n"
            "from sidero.store._sqlite import Database\n"
            f"db = Database({path!r}, 1000)\n"
            "db.open()\n"
            "db.conn.execute('PRAGMA wal_autocheckpoint=40')\n"
            "for i in range(40):\n"
            "    with db.transaction():\n"
            "        obj = {'metadata': {'uid': str(i), 'name': 'n%d' % (i % 7)}, 'x': 'y' * (i * 300 % 5000)}\n"
            "        db.put('secrets', 'default', obj['metadata']['name'], obj, 'ADDED', None, [])\n"
            "    os.write(1, b'ACK %d\\n' % i)\n"
        )
        done = subprocess.run(
            ["strace", "-f", "-y", "-e", "trace=pwrite64,write,fsync,fdatasync", "-o", trace,
             sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=100)
        self.assertEqual(done.returncode, 0, done.stderr)
        line = re.compile(r"^\d+\s+(\w+)\((\d+)<([^>]*)>(.*)$")
        wal, db = path + "-wal", path
        unsynced: dict[str, bool] = {wal: False, db: False}
        pending: list[int] = []      # offsets of WAL writes since its last fsync
        synced_end = 0               # end of this commit's fsynced WAL writes
        written_end = 0
        header_pending = False
        acks = restarts = checkpoints = 0
        with open(trace) as f:
            for raw in f:
                m = line.match(raw)
                if m is None:
                    continue
                call, target, rest = m[1], m[3], m[4]
                if call == "write" and "ACK" in rest:
                    # What follows the commit's fsync may only be padding: copies of its last
                    # frame from a 4096-byte boundary on, which the next commit may tear.
                    self.assertGreater(synced_end, 0, f"ACK {acks} before the WAL was fsynced")
                    if pending:
                        self.assertEqual(min(pending) % ATOMIC, 0, f"ACK {acks}: unsynced WAL write "
                                         f"at {min(pending)} is not padding after a sector boundary")
                        self.assertGreaterEqual(min(pending), synced_end, f"ACK {acks}: unsynced frames")
                    self.assertFalse(unsynced[db], f"ACK {acks} before the checkpoint was fsynced")
                    acks += 1
                    synced_end = 0
                elif target not in unsynced:
                    continue
                elif call in ("fsync", "fdatasync"):
                    unsynced[target] = False
                    if target == wal:
                        header_pending = False
                        pending.clear()
                        synced_end = max(synced_end, written_end)
                elif call == "pwrite64":
                    tail = re.search(r", (\d+), (\d+)\) += ", rest)
                    assert tail is not None, raw
                    size, offset = int(tail[1]), int(tail[2])
                    if target == wal:
                        self.assertFalse(header_pending, "a WAL frame written before the new header was fsynced")
                        if offset == 0:
                            self.assertFalse(unsynced[db], "the WAL started over before the checkpoint was fsynced")
                            header_pending = True
                            restarts += 1
                        pending.append(offset)
                        written_end = offset + size
                    else:
                        self.assertFalse(unsynced[wal], "the database written before the WAL was fsynced")
                        checkpoints += not unsynced[db]
                    unsynced[target] = True
        self.assertEqual(acks, 40)
        self.assertGreater(restarts, 2)
        self.assertGreater(checkpoints, 2)


class PowerLossTests(TestCase):
    timeout = 600

    async def record(self, path: str, rng: random.Random) -> list[Snapshot]:
        """A random history of creates, updates, patches and deletes; the files and the
        expected state after every acknowledged write."""
        store = EmbeddedStore(reactor, path, event_ttl=0)
        await store.open()
        try:
            await store._run(lambda: store._db.conn.execute("PRAGMA wal_autocheckpoint=24").fetchall())
            state: dict[str, dict[str, Any]] = {}
            snaps = [Snapshot(_read(path + "-wal"), _read(path), {}, int(store.resource_version))]
            for _ in range(HISTORY):
                name = rng.choice(NAMES)
                size = rng.choice(SIZES)
                if name not in state:
                    state[name] = await store.create(_secret(name, size, rng))
                elif rng.random() < 0.2:
                    await store.delete(SECRET, name, "default")
                    del state[name]
                elif rng.random() < 0.5:
                    obj = dict(state[name], data=_secret(name, size, rng)["data"])
                    state[name] = await store.update(obj)
                else:
                    state[name] = await store.patch(SECRET, name, {"metadata": {"labels": {"n": str(size)}},
                                                                   "data": _secret(name, size, rng)["data"]},
                                                    "default")
                snaps.append(Snapshot(_read(path + "-wal"), _read(path), dict(state), int(store.resource_version)))
            return snaps
        finally:
            await store.close()

    def images(self, before: Snapshot, after: Snapshot, rng: random.Random) -> list[tuple[str, bytes, bytes, bool]]:
        """(what, db, wal, commit k+1 must be there) for a power loss between the two."""
        w0, w1, d0, d1 = before.wal, after.wal, before.db, after.db
        out: list[tuple[str, bytes, bytes, bool]] = []
        restart = len(w0) < WAL_HEADER or w1[:WAL_HEADER] != w0[:WAL_HEADER]
        if not restart:
            # Commit k+1's frames, torn anywhere from the start of the 4096-byte sector its
            # first byte falls in (a write may tear its whole sector, and a restarted WAL is
            # rewritten in place over older frames), a growing file cut short.
            lo = 0
            while lo < min(len(w0), len(w1)) and w0[lo:lo + ATOMIC] == w1[lo:lo + ATOMIC]:
                lo += ATOMIC
            for tear in (_mix, _mix, _intact):
                frames = tear(w0[lo:len(w1)], w1[lo:], rng)
                if tear is _mix and len(w1) > len(w0) and rng.random() < 0.5:
                    frames = frames[:rng.randrange(len(frames) + 1)]
                wal = w0[:lo] + frames + w0[len(w1):]
                out.append(("torn commit", d0, wal, wal[:len(w1)] == w1))
        else:
            # The header is fsynced before any frame: either it is torn (frames not written)...
            sector = w1[:WAL_HEADER] + w0[WAL_HEADER:ATOMIC]
            out.append(("torn WAL header", d0, _mix(w0[:ATOMIC], sector, rng, 0.3) + w0[ATOMIC:], False))
            # ...or it is down and the frames after it are torn over the old ones.
            for tear in (_mix, _intact):
                frames = tear(w0[WAL_HEADER:len(w1)], w1[WAL_HEADER:], rng)
                wal = w1[:WAL_HEADER] + frames + w0[len(w1):]
                out.append(("torn restarted WAL", d0, wal, wal[:len(w1)] == w1))
        if d0 != d1:
            # The checkpoint after commit k+1: its WAL is fsynced, its database pages torn.
            db = bytearray()
            for at in range(0, max(len(d0), len(d1)), PAGE):
                old, new = d0[at:at + PAGE], d1[at:at + PAGE]
                if old == new:
                    db += new
                    continue
                r = rng.random()
                db += new if r < 0.4 else old.ljust(len(new), b"\0") if r < 0.7 else _mix(old, new, rng, 0.3)
            if len(d1) > len(d0) and rng.random() < 0.5:
                db = db[:rng.randrange(len(d0), len(d1) + 1, PAGE)]
            out.append(("torn checkpoint", bytes(db), w1, True))
        return out

    async def check_image(self, work: str, what: str, db: bytes, wal: bytes, before: Snapshot,
                          after: Snapshot, must_have_next: bool) -> bool:
        """Open one image; True when it holds commit k+1."""
        path = _write_image(work, db, wal)
        store = EmbeddedStore(reactor, path, event_ttl=0)
        self.addCleanup(store.close)
        await store.open()
        try:
            check = await store._run(lambda: store._db.conn.execute("PRAGMA integrity_check").fetchall())
            self.assertEqual(check, [("ok",)], what)
            listed = await store.list(SECRET, "default")
            got = {o["metadata"]["name"]: o for o in listed.items}
            rv = int(store.resource_version)
            has_next = got == after.state and rv == after.rv
            if not has_next:
                self.assertEqual((got, rv), (before.state, before.rv),
                                 f"{what}: neither the acknowledged state nor the next one")
            if what.startswith("torn checkpoint"):
                self.assertTrue(has_next, f"{what}: commit k+1 was fsynced in the WAL and is missing")
            else:
                # Every byte of a WAL frame is under its checksum: commit k+1 is there exactly
                # when all of its frames are.
                self.assertEqual(has_next, must_have_next,
                                 f"{what}: commit k+1 {'whole' if must_have_next else 'torn'} on disk, "
                                 f"{'missing' if must_have_next else 'recovered'}")
            await self.check_watch(store, before, after, has_next, what)
            return has_next
        finally:
            await store.close()

    async def check_watch(self, store: EmbeddedStore, before: Snapshot, after: Snapshot,
                          has_next: bool, what: str) -> None:
        """A watcher resuming from the last acknowledged resourceVersion sees commit k+1 (when
        it survived) and the next write, in order and above everything it had seen; one
        resuming from a resourceVersion this image never reached is told Gone."""
        seen: list[WatchEvent] = []
        watch = await store.watch(SECRET, seen.append, "default", resource_version=str(before.rv))
        try:
            if not has_next and after.rv > before.rv:
                gone: list[WatchEvent] = []
                ahead = await store.watch(SECRET, gone.append, "default", resource_version=str(after.rv))
                failure = await self.assertFailure(ahead.done, errors.Gone)
                self.assertIn("too large resource version", failure.message)
                self.assertEqual(gone, [])
            written = await store.create(_secret("after-power-loss", 10, random.Random(0)))
            new_rv = int(written["metadata"]["resourceVersion"])
            self.assertGreater(new_rv, after.rv if has_next else before.rv, what)
            await _turn()
            rvs = [int(e.object["metadata"]["resourceVersion"]) for e in seen if e.type != "BOOKMARK"]
            expected = ([after.rv] if has_next and after.rv > before.rv else []) + [new_rv]
            self.assertEqual(rvs, expected, what)
        finally:
            watch.stop()

    async def test_crash_images(self) -> None:
        rng = random.Random(int(os.environ.get("SIDERO_POWER_LOSS_SEED") or "1"))
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        snaps = await self.record(os.path.join(work, "history.db"), rng)
        counts: dict[str, int] = {}
        outcomes = {True: 0, False: 0}
        for k in range(len(snaps) - 1):
            for what, db, wal, must in self.images(snaps[k], snaps[k + 1], rng):
                has_next = await self.check_image(os.path.join(work, "image"), f"{what} after write {k}",
                                                  db, wal, snaps[k], snaps[k + 1], must)
                counts[what] = counts.get(what, 0) + 1
                outcomes[has_next] += 1
        # Not vacuous: the history restarted its WAL and checkpointed, and images went both ways.
        for what in ("torn commit", "torn WAL header", "torn restarted WAL", "torn checkpoint"):
            self.assertGreater(counts.get(what, 0), 0, f"no {what} image in {counts}")
        self.assertGreater(outcomes[True], 0)
        self.assertGreater(outcomes[False], 0)
        print(f"\npower-loss images: {sum(counts.values())} ({counts}); commit k+1 kept in "
              f"{outcomes[True]}, lost in {outcomes[False]}")

    async def test_damage_beyond_power_loss_is_refused(self) -> None:
        """A garbled database header (no WAL to take page 1 from), or a b-tree page no WAL
        frame covers, is refused with one error naming the file; neither the file nor its WAL
        changes.  (A garbled header with page 1 in the WAL is not damage: the WAL's copy wins
        and the next checkpoint rewrites it; the crash images cover that.)"""
        rng = random.Random(2)
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        history = os.path.join(work, "history.db")
        snaps = await self.record(history, rng)
        self.assertFalse(os.path.exists(history + "-wal"), "a clean close leaves no WAL")
        snap = next(s for s in reversed(snaps) if len(s.wal) > WAL_HEADER + FRAME and len(s.db) > 4 * PAGE)
        covered = _wal_pages(snap.wal)
        btree = [p for p in range(2, len(snap.db) // PAGE + 1)
                 if p not in covered and snap.db[(p - 1) * PAGE] in (2, 5, 10, 13)]
        self.assertTrue(btree, "no b-tree page outside the WAL to damage")
        header = bytearray(_read(history))
        header[0:100] = rng.randbytes(100)
        page = bytearray(snap.db)
        page[(btree[0] - 1) * PAGE] = 0x33   # not a page type
        for what, db, wal in (("garbled header", bytes(header), b""),
                              ("damaged b-tree page", bytes(page), snap.wal)):
            path = _write_image(os.path.join(work, what.replace(" ", "-")), db, wal)
            digests = (_digest(path), _digest(path + "-wal"))
            store = EmbeddedStore(reactor, path, event_ttl=0)
            self.addCleanup(store.close)
            with self.assertRaises(errors.StoreError) as e:
                await store.open()
            self.assertIn(f"the store database {path} is damaged", e.exception.message, what)
            self.assertIn("it was left as it is", e.exception.message)
            self.assertEqual((_digest(path), _digest(path + "-wal")), digests, f"{what}: the files changed")
            self.assertEqual(store.resource_version, "0")


class BackupTests(TestCase):
    timeout = 60

    async def test_online_backup_opens(self) -> None:
        """The README's backup (sqlite3's C{.backup}, a real peer) taken while the store is
        open and written to opens as a store with the same objects and resourceVersion."""
        if shutil.which("sqlite3") is None:
            raise SkipTest("LOUD SKIP: the backup check needs the sqlite3 command (apt-get install sqlite3)")
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        path, copy = os.path.join(work, "state.db"), os.path.join(work, "copy.db")
        store = EmbeddedStore(reactor, path, event_ttl=0)
        await store.open()
        self.addCleanup(store.close)
        rng = random.Random(3)
        for i in range(20):
            await store.create(_secret(f"s{i}", rng.choice(SIZES), rng))
        done = subprocess.run(["sqlite3", path, f".backup {copy}"], capture_output=True, text=True, timeout=30)
        self.assertEqual(done.returncode, 0, done.stderr)
        original = await store.list(SECRET, "default")
        restored = EmbeddedStore(reactor, copy, event_ttl=0)
        await restored.open()
        self.addCleanup(restored.close)
        listed = await restored.list(SECRET, "default")
        self.assertEqual(listed.items, original.items)
        self.assertEqual(restored.resource_version, store.resource_version)


def _turn() -> Deferred[None]:
    """Let the store's thread and the reactor deliver what is pending."""
    from twisted.internet.task import deferLater

    return deferLater(reactor, 0.05, lambda: None)
