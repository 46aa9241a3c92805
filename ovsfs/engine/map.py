"""The cluster map: per cluster one 64-bit location, held in pages with epoch versions.

A location is (SCO number << 16) | cluster index inside the SCO; 0 means never
written, ZERO_LOC means "reads as zeros, do not look in a clone's parent".

Pages of PAGE_ENTRIES numbers are the unit of caching, persistence and
copy-on-write: the first write to a page in a new epoch (after a snapshot) copies
it, so a snapshot costs nothing to take. Every version lives in an SQLite table;
an LRU of resident pages bounds memory. All versions older than the current epoch
are always in SQLite (written when the epoch moves on), so only current-epoch pages
can be dirty, and `head[page]` alone says whether one exists.

The SQLite connection keeps one write transaction open: pages evicted from the
cache go into it, and `commit` makes the whole map durable together with the TLog
position it reflects. A crash rolls back to the last commit and the TLogs are
replayed from the position stored with it.

A failed SQLite write (a full disk) never loses a page silently: a page that cannot
be evicted stays resident (the cache goes over its bound for a while), and when SQLite
rolls the open transaction back (a failed commit, or SQLITE_FULL mid-transaction)
`lost` is set: pages evicted into that transaction are gone from memory and disk, so
the owner must rebuild the map from the last commit plus the TLogs after it
(Volume._recover_map) before trusting it again.
"""

from __future__ import annotations

import json
import sqlite3
import struct
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ovsfs.engine.fileio import LocalIOError
from ovsfs.errors import NoSpace, OvsfsError

PAGE_SHIFT = 12
PAGE_ENTRIES = 1 << PAGE_SHIFT          # 4096 entries = 32 KiB, 16 MiB of volume at 4 KiB
PAGE_MASK = PAGE_ENTRIES - 1
SCO_SHIFT = 16
ZERO_LOC = 1                            # SCO 0 does not exist, so its locations are markers
_DUMP_HEAD = struct.Struct("<IIII")     # page, epoch, compressed length, reserved


def pages_for(nclusters: int) -> int:
    return (nclusters + PAGE_MASK) >> PAGE_SHIFT


class ClusterMap:
    def __init__(self, db_path: Path, nclusters: int, cache_pages: int) -> None:
        self.db_path = Path(db_path)
        self.db = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit must survive a power loss, because local TLogs below it are deleted.
        self.db.execute("PRAGMA synchronous=FULL")
        # Dirty SQLite pages stay in memory until the commit: a spill into the WAL in the
        # middle of a transaction needs disk space, and when the disk is full it would
        # fail reads too, not just the commit (which is handled: see `lost`).
        self.db.execute("PRAGMA cache_spill=OFF")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS pages (page INTEGER, epoch INTEGER, data BLOB,"
            " PRIMARY KEY (page, epoch)) WITHOUT ROWID")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        self.db.execute("BEGIN")
        self.cache_pages = cache_pages
        self.cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.dirty: set[tuple[int, int]] = set()
        self.epoch = 1
        self.lost = False      # the open transaction was rolled back: rebuild before use
        self.head = np.full(pages_for(nclusters), -1, dtype=np.int64)
        self._load_heads()

    # ---- persistence -------------------------------------------------------------

    def _load_heads(self) -> None:
        self.head[:] = -1
        for page, epoch in self.db.execute("SELECT page, MAX(epoch) FROM pages GROUP BY page"):
            if page >= len(self.head):
                self.resize(page * PAGE_ENTRIES + 1)
            self.head[page] = epoch

    def load_meta(self) -> dict[str, Any] | None:
        row = self.db.execute("SELECT value FROM meta WHERE key='volume'").fetchone()
        return json.loads(row[0]) if row else None

    def _write_page(self, key: tuple[int, int], arr: np.ndarray) -> None:
        self.db.execute("INSERT OR REPLACE INTO pages VALUES (?, ?, ?)", (key[0], key[1], arr.tobytes()))

    def _store_error(self, e: sqlite3.Error, what: str, rollback: bool = False) -> OvsfsError:
        """Note a failed SQLite write and return the typed error to raise. When the open
        transaction is gone (or `rollback`), whatever was evicted into it is lost."""
        if rollback or not self.db.in_transaction:
            self.lost = True
        try:
            if self.db.in_transaction and rollback:
                self.db.execute("ROLLBACK")
            if not self.db.in_transaction:
                self.db.execute("BEGIN")   # evictions must never autocommit on their own
        except sqlite3.Error:
            self.lost = True
        if getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return NoSpace(f"map {self.db_path}: {what}: disk full")
        return LocalIOError(f"map {self.db_path}: {what}: {e}")

    def write_dirty(self) -> None:
        try:
            for key in sorted(self.dirty):
                arr = self.cache.get(key)
                if arr is not None:
                    self._write_page(key, arr)
        except sqlite3.Error as e:
            raise self._store_error(e, "writing pages") from e
        self.dirty.clear()

    def commit(self, meta: dict[str, Any]) -> None:
        """Make the map durable together with the volume metadata that matches it.

        Raises NoSpace (disk full) or LocalIOError; then the transaction is rolled back,
        `lost` is set and map.db still holds the previous commit."""
        if self.lost:
            raise LocalIOError(f"map {self.db_path}: rebuild it before committing")
        try:
            for key in sorted(self.dirty):
                arr = self.cache.get(key)
                if arr is not None:
                    self._write_page(key, arr)
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('volume', ?)", (json.dumps(meta),))
            self.db.execute("COMMIT")
        except sqlite3.Error as e:
            raise self._store_error(e, "commit", rollback=True) from e
        self.dirty.clear()
        self.db.execute("BEGIN")

    def close(self) -> None:
        try:
            self.db.execute("ROLLBACK")
        except sqlite3.OperationalError:
            pass
        self.db.close()

    # ---- pages ----------------------------------------------------------------------

    def _get(self, page: int, epoch: int) -> np.ndarray:
        key = (page, epoch)
        arr = self.cache.get(key)
        if arr is not None:
            self.cache.move_to_end(key)
            return arr
        row = self.db.execute("SELECT data FROM pages WHERE page=? AND epoch=?", key).fetchone()
        if row is None:
            arr = np.zeros(PAGE_ENTRIES, dtype=np.uint64)
        else:
            arr = np.frombuffer(row[0], dtype=np.uint64).copy()
        self._insert(key, arr)
        return arr

    def _insert(self, key: tuple[int, int], arr: np.ndarray) -> None:
        self.cache[key] = arr
        while len(self.cache) > self.cache_pages:
            old, old_arr = self.cache.popitem(last=False)
            if old in self.dirty:
                try:
                    self._write_page(old, old_arr)
                except sqlite3.Error as e:
                    # Keep the page resident rather than lose it; over the bound until
                    # SQLite takes writes again.
                    self.cache[old] = old_arr
                    self.cache.move_to_end(old, last=False)
                    self._store_error(e, "evicting a page")
                    return
                self.dirty.discard(old)

    def _version_at(self, page: int, epoch: int | None) -> int:
        """The epoch of the newest version of `page` visible at `epoch` (-1: none)."""
        head = int(self.head[page]) if page < len(self.head) else -1
        if epoch is None or head <= epoch:
            return head
        row = self.db.execute(
            "SELECT MAX(epoch) FROM pages WHERE page=? AND epoch<=?", (page, epoch)).fetchone()
        return -1 if row[0] is None else int(row[0])

    def page_view(self, page: int, epoch: int | None = None) -> np.ndarray | None:
        v = self._version_at(page, epoch)
        return None if v < 0 else self._get(page, v)

    def _page_for_write(self, page: int) -> np.ndarray:
        head = int(self.head[page])
        if head == self.epoch:
            arr = self._get(page, head)
        else:
            arr = np.zeros(PAGE_ENTRIES, dtype=np.uint64) if head < 0 else self._get(page, head).copy()
            self._insert((page, self.epoch), arr)
            self.head[page] = self.epoch
        self.dirty.add((page, self.epoch))
        return arr

    # ---- lookups and updates -----------------------------------------------------------

    def lookup(self, addrs: np.ndarray, epoch: int | None = None) -> np.ndarray:
        out = np.zeros(len(addrs), dtype=np.uint64)
        if len(addrs) == 0:
            return out
        pages = addrs >> PAGE_SHIFT
        if pages[0] == pages[-1] and (len(addrs) == 1 or np.all(pages == pages[0])):
            arr = self.page_view(int(pages[0]), epoch)
            if arr is not None:
                out[:] = arr[addrs & PAGE_MASK]
            return out
        for p in np.unique(pages):
            sel = pages == p
            arr = self.page_view(int(p), epoch)
            if arr is not None:
                out[sel] = arr[addrs[sel] & PAGE_MASK]
        return out

    def update_one(self, addr: int, loc: int) -> None:
        self._page_for_write(addr >> PAGE_SHIFT)[addr & PAGE_MASK] = loc

    def update(self, addrs: np.ndarray, locs: np.ndarray) -> None:
        """Set locations at the current epoch; later entries win over earlier ones."""
        n = len(addrs)
        if n == 0:
            return
        pages = addrs >> PAGE_SHIFT
        if pages[0] == pages[-1] and (pages == pages[0]).all():
            self._page_for_write(int(pages[0]))[addrs & PAGE_MASK] = locs
            return
        order = np.argsort(pages, kind="stable")
        sp = pages[order]
        idx = (addrs[order] & PAGE_MASK).astype(np.intp)
        sl = locs[order]
        cuts = (np.flatnonzero(sp[1:] != sp[:-1]) + 1).tolist()
        bounds = [0, *cuts, n]
        for i, p in enumerate(sp[[0, *cuts]].tolist()):
            s, e = bounds[i], bounds[i + 1]
            self._page_for_write(p)[idx[s:e]] = sl[s:e]

    def resize(self, nclusters: int) -> None:
        n = pages_for(nclusters)
        if n > len(self.head):
            self.head = np.concatenate((self.head, np.full(n - len(self.head), -1, dtype=np.int64)))

    # ---- epochs: snapshots, rollback, snapshot deletion ---------------------------------

    def new_epoch(self) -> int:
        """Take a snapshot: the current epoch becomes read-only. Returns the frozen epoch."""
        self.write_dirty()   # keeps the rule: versions older than the current epoch are in SQLite
        frozen = self.epoch
        self.epoch += 1
        return frozen

    def _reload(self) -> None:
        self.write_dirty()
        self.cache.clear()
        self._load_heads()

    def rollback(self, epoch: int) -> None:
        self.write_dirty()
        self.db.execute("DELETE FROM pages WHERE epoch > ?", (epoch,))
        self.epoch = epoch + 1
        self._reload()

    def fold(self, epoch: int, into: int) -> None:
        """Delete the versions of a deleted snapshot, keeping what the next epoch still reads."""
        self.write_dirty()
        self.db.execute(
            "DELETE FROM pages WHERE epoch=? AND page IN (SELECT page FROM pages WHERE epoch=?)",
            (epoch, into))
        self.db.execute("UPDATE pages SET epoch=? WHERE epoch=?", (into, epoch))
        self._reload()

    # ---- whole-map passes: scrub, relocation, checkpoints --------------------------------

    def versions(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """Every page version (page, epoch, entries), dirty ones included."""
        self.write_dirty()
        for page, epoch, data in self.db.execute("SELECT page, epoch, data FROM pages"):
            key = (page, epoch)
            arr = self.cache.get(key)
            yield page, epoch, arr if arr is not None else np.frombuffer(data, dtype=np.uint64)

    def relocate(self, old: np.ndarray, new: np.ndarray) -> int:
        """Replace locations old[i] by new[i] in every version; returns entries changed."""
        order = np.argsort(old)
        old_s, new_s = old[order], new[order]
        changed = []
        for page, epoch, arr in list(self.versions()):
            hit = np.isin(arr, old_s)
            if hit.any():
                arr = arr.copy()
                arr[hit] = new_s[np.searchsorted(old_s, arr[hit])]
                changed.append((page, epoch, arr, int(hit.sum())))
        for page, epoch, arr, _ in changed:
            self._write_page((page, epoch), arr)
            if (page, epoch) in self.cache:
                self.cache[(page, epoch)] = arr
        return sum(c[3] for c in changed)

    def load_dump(self, data: bytes) -> dict[str, Any]:
        (hlen,) = struct.unpack_from("<I", data, 0)
        meta = json.loads(data[4:4 + hlen])
        pos = 4 + hlen
        self.db.execute("DELETE FROM pages")
        while pos < len(data):
            page, epoch, zlen, _ = _DUMP_HEAD.unpack_from(data, pos)
            pos += _DUMP_HEAD.size
            self.db.execute("INSERT INTO pages VALUES (?, ?, ?)", (page, epoch, zlib.decompress(data[pos:pos + zlen])))
            pos += zlen
        self.cache.clear()
        self.dirty.clear()
        self._load_heads()
        return meta

    def reader(self) -> sqlite3.Connection:
        """A connection frozen at the last commit, for dumping while writes go on."""
        conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        conn.execute("BEGIN")
        conn.execute("SELECT COUNT(*) FROM meta").fetchone()   # starts the read snapshot now
        return conn

    def resident_bytes(self) -> int:
        return len(self.cache) * PAGE_ENTRIES * 8 + self.head.nbytes

    def stored_bytes(self) -> int:
        row = self.db.execute("SELECT COUNT(*) FROM pages").fetchone()
        return int(row[0]) * PAGE_ENTRIES * 8


def dump(conn: sqlite3.Connection) -> bytes:
    """A self-contained checkpoint (meta + every page version) for the backend."""
    row = conn.execute("SELECT value FROM meta WHERE key='volume'").fetchone()
    head = (row[0] if row else "{}").encode()
    parts = [struct.pack("<I", len(head)), head]
    for page, epoch, data in conn.execute("SELECT page, epoch, data FROM pages ORDER BY page, epoch"):
        z = zlib.compress(data, 1)
        parts.append(_DUMP_HEAD.pack(page, epoch, len(z), 0))
        parts.append(z)
    return b"".join(parts)
