"""The names and inodes of the vPool tree (no pyfuse3 here; plain, synchronous, thread-safe).

    MNT/                          one directory per vPool
    MNT/POOL/NAME.raw             volume NAME of vPool POOL, a regular file of its size
    MNT/POOL/.snapshots/NAME/     one directory per volume of the vPool
    MNT/POOL/.snapshots/NAME/SNAP.raw   snapshot SNAP of NAME, read-only

Inode keys: ("root",), ("pool", P), ("snaps", P), ("snapdir", NS), ("vol", NS),
("snap", NS, SNAP), ("pending", P, NAME). Volumes are keyed by backend namespace, so an
inode survives a rename through any door. Inode numbers are never reused while mounted.

A file created in a vPool (create, mknod, `truncate -s` on a new name) is a *pending*
volume: a zero-length placeholder whose name is reserved in the engine's registry
(`reserve_name`: create/import/clone/rename elsewhere see the name as taken: one name,
one object), until its first growth (truncate, fallocate or a write) creates the volume.
Placeholders are not stored anywhere: they vanish at unmount. A placeholder removed while
open becomes ("gone",): its open descriptors can never make a volume.
"""

from __future__ import annotations

import errno
import threading
import time
from typing import Any

import pyfuse3

from ovsfs.engine.api import Holder, VolumeCatalog
from ovsfs.engine.names import NAME_RE
from ovsfs.errors import AlreadyExists, NotFound, OvsfsError

ROOT = pyfuse3.ROOT_INODE
SUFFIX = ".raw"
SNAPDIR = ".snapshots"
MAX_NAME = 200
GONE = ("gone",)            # the key of a placeholder removed while open


def fail(err: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(err)


def volume_name(name: str) -> str:
    """NAME for a file name NAME.raw; errno for anything that cannot be a volume."""
    if not name.endswith(SUFFIX):
        # Only volumes live in a vPool: a VM's config file belongs elsewhere.
        raise fail(errno.EPERM)
    base = name[:-len(SUFFIX)]
    if len(base) > MAX_NAME:
        raise fail(errno.ENAMETOOLONG)
    if not NAME_RE.match(base):
        raise fail(errno.EINVAL)
    return base


class Inodes:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_key: dict[tuple, int] = {("root",): ROOT}
        self.by_ino: dict[int, tuple] = {ROOT: ("root",)}
        self.next = ROOT + 1

    def ino(self, key: tuple) -> int:
        with self.lock:
            i = self.by_key.get(key)
            if i is None:
                i, self.next = self.next, self.next + 1
                self.by_key[key] = i
                self.by_ino[i] = key
            return i

    def key(self, ino: int) -> tuple:
        try:
            return self.by_ino[ino]
        except KeyError:
            raise fail(errno.ENOENT) from None

    def orphan(self, key: tuple) -> None:
        """The object behind `key` is gone but may still be open: its inode now names
        nothing (GONE), and a new object of the same name gets a new inode."""
        with self.lock:
            i = self.by_key.pop(key, None)
            if i is not None:
                self.by_ino[i] = GONE

    def rebind(self, old: tuple, new: tuple) -> None:
        """Give `new` the inode of `old` (a pending file became a volume, or was renamed)."""
        with self.lock:
            i = self.by_key.pop(old, None)
            if i is None:
                return
            prev = self.by_key.pop(new, None)
            if prev is not None:
                self.by_ino.pop(prev, None)
            self.by_key[new] = i
            self.by_ino[i] = new


class Tree:
    """Name resolution over the engine's catalog (the contract, ovsfs.engine.api: its
    lock-free `stat` records, never volume objects); every method is synchronous (run it
    in a thread)."""

    def __init__(self, catalog: VolumeCatalog, holder: Holder) -> None:
        self.catalog = catalog
        self.holder = holder        # who reserves placeholder names in the engine
        self.inodes = Inodes()
        self.lock = threading.RLock()
        self.pending: dict[tuple[str, str], float] = {}   # (vPool, NAME) -> creation time

    # ---- placeholders: names reserved in the engine -----------------------------------

    def reserve(self, pool: str, base: str) -> None:
        """Reserve NAME for a new file (EEXIST when a volume or a reservation has it)."""
        with self.lock:
            if (pool, base) in self.pending:
                raise fail(errno.EEXIST)
            try:
                self.catalog.reserve_name(base, self.holder, pool)
            except AlreadyExists:
                raise fail(errno.EEXIST) from None
            self.pending[(pool, base)] = time.time()

    def release(self, pool: str, base: str) -> None:
        """Drop a placeholder and its reservation (open descriptors of it become GONE)."""
        with self.lock:
            if self.pending.pop((pool, base), None) is None:
                return
            self.catalog.release_name(base, self.holder)

    def release_all(self) -> None:
        """Drop every placeholder of this mount (at unmount)."""
        with self.lock:
            for pool, base in list(self.pending):
                self.release(pool, base)

    def forget(self, pool: str, base: str) -> None:
        """The placeholder became a volume (its reservation with it)."""
        with self.lock:
            self.pending.pop((pool, base), None)

    def move(self, pool: str, old: str, new: str) -> None:
        """Rename a placeholder: the new name is reserved before the old one is released."""
        with self.lock:
            if (pool, old) not in self.pending:
                raise fail(errno.ENOENT)
            self.reserve(pool, new)
            self.pending[(pool, new)] = self.pending[(pool, old)]
            self.release(pool, old)
            self.pending.pop((pool, old), None)

    # ---- objects behind keys ----------------------------------------------------------

    def pools(self) -> list[str]:
        return sorted(p["name"] for p in self.catalog.list_vpools())

    def has_pool(self, name: str) -> bool:
        try:
            self.catalog.vpool(name)
        except NotFound:
            return False
        return True

    # Volumes are catalog.stat records: {"name", "vpool", "namespace", "size", "created"}.

    def volumes(self, pool: str) -> list[dict[str, Any]]:
        return self.catalog.list_stats(pool)

    def by_ns(self, ns: str) -> dict[str, Any]:
        for v in self.catalog.list_stats():
            if v["namespace"] == ns:
                return v
        raise fail(errno.ENOENT)

    def snapshot(self, vol: dict[str, Any], name: str) -> dict[str, Any]:
        try:
            snaps = self.catalog.list_snapshots(vol["name"])
        except OvsfsError:
            raise fail(errno.ENOENT) from None   # deleted or renamed meanwhile
        for s in snaps:
            if s["name"] == name:
                return s
        raise fail(errno.ENOENT)

    def stat(self, base: str) -> dict[str, Any] | None:
        """The open volume named base, or None (none, or one that could not be opened)."""
        try:
            return self.catalog.stat(base)
        except OvsfsError:
            return None

    def volume_in(self, pool: str, base: str) -> dict[str, Any] | None:
        vol = self.stat(base)
        return vol if vol is not None and vol["vpool"] == pool else None

    # ---- lookups ------------------------------------------------------------------------

    def child(self, parent: tuple, name: str) -> tuple:
        kind = parent[0]
        if kind == "root":
            if not self.has_pool(name):
                raise fail(errno.ENOENT)
            return ("pool", name)
        if kind == "pool":
            pool = parent[1]
            if name == SNAPDIR:
                return ("snaps", pool)
            if not name.endswith(SUFFIX):
                raise fail(errno.ENOENT)
            base = name[:-len(SUFFIX)]
            vol = self.volume_in(pool, base)
            if vol is not None:
                return ("vol", vol["namespace"])
            with self.lock:
                if (pool, base) in self.pending:
                    return ("pending", pool, base)
            raise fail(errno.ENOENT)
        if kind == "snaps":
            vol = self.volume_in(parent[1], name)
            if vol is None:
                raise fail(errno.ENOENT)
            return ("snapdir", vol["namespace"])
        if kind == "snapdir":
            if not name.endswith(SUFFIX):
                raise fail(errno.ENOENT)
            vol = self.by_ns(parent[1])
            self.snapshot(vol, name[:-len(SUFFIX)])
            return ("snap", parent[1], name[:-len(SUFFIX)])
        raise fail(errno.ENOTDIR)

    def listing(self, key: tuple) -> list[tuple[str, tuple]]:
        kind = key[0]
        if kind == "root":
            return [(p, ("pool", p)) for p in self.pools()]
        if kind == "pool":
            pool = key[1]
            out = [(SNAPDIR, ("snaps", pool))]
            out += [(v["name"] + SUFFIX, ("vol", v["namespace"])) for v in self.volumes(pool)]
            with self.lock:
                out += [(n + SUFFIX, ("pending", p, n)) for (p, n) in sorted(self.pending) if p == pool]
            return out
        if kind == "snaps":
            return [(v["name"], ("snapdir", v["namespace"])) for v in self.volumes(key[1])]
        if kind == "snapdir":
            vol = self.by_ns(key[1])
            try:
                snaps = self.catalog.list_snapshots(vol["name"])
            except OvsfsError:
                raise fail(errno.ENOENT) from None
            return [(s["name"] + SUFFIX, ("snap", key[1], s["name"])) for s in snaps]
        raise fail(errno.ENOTDIR)

    def check(self, key: tuple) -> None:
        """ENOENT when the object behind a key is gone (deleted through another door)."""
        kind = key[0]
        if kind in ("pool", "snaps") and not self.has_pool(key[1]):
            raise fail(errno.ENOENT)
        if kind in ("vol", "snapdir"):
            self.by_ns(key[1])
        if kind == "snap":
            self.snapshot(self.by_ns(key[1]), key[2])
        if kind == "pending":
            with self.lock:
                if (key[1], key[2]) not in self.pending:
                    raise fail(errno.ENOENT)
        if kind == "gone":
            raise fail(errno.ENOENT)

    def name_taken(self, pool: str, base: str) -> bool:
        """Volume names are global across vPools; placeholders count too."""
        with self.lock:
            return self.stat(base) is not None or any(n == base for (_p, n) in self.pending)
