"""Opening a volume: resume from the local map, replay TLogs, or rebuild the map.

Local metadata (`map.db`) is a cache that makes restarts fast. After a clean close
the map commit matches the TLog end and nothing is replayed; after a crash the TLogs
after the last commit are replayed. A missing, empty, truncated or corrupt `map.db`
is moved aside (kept for post-mortem as `map.db.corrupt-<unix time>`) and the map is
rebuilt: newest loadable backend checkpoint, then every TLog after it.

Replay and rebuild read the same way: every TLog from the start position on, in
number order, from the local write buffer when it is still there (each WRITE checked
against its CRC32C, since a local tail can be torn: a torn write is dropped rather
than served) and from the backend otherwise. So flushed writes that never reached the
backend are part of every rebuild, and a `map.db` older than the local TLogs (restored
from a backup, a lost commit) is brought forward from its own position; when TLogs it
needs are gone everywhere, a backend checkpoint that covers them is used instead.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import struct
import time
import zlib
from pathlib import Path
from typing import Any, Iterable

import crc32c
import numpy as np

from ovsfs.engine import tail, tlog
from ovsfs.engine.checkpoint import numbers as _numbers, tlogs_after_checkpoint
from ovsfs.engine.map import SCO_SHIFT, ZERO_LOC, ClusterMap, check_file
from ovsfs.engine.owners import GEN_SHIFT, gen_floor, mark_local
from ovsfs.engine.volume import IDX_MASK, Volume, tlog_name
from ovsfs.errors import NotFound, NotOwner

log = logging.getLogger("ovsfs.engine.recovery")

_META_INTS = ("epoch", "size", "tlog", "tlog_off")


def _local_numbers(directory: Any) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def open_volume(vol: Volume, create: bool, preset: str | None = None,
                tail_entries: list[tuple[tail.Pos, bytes]] | None = None) -> None:
    """Open (or create) a volume: local map, TLog replay or rebuild (see the module doc).

    With an owner generation (several nodes) the namespace is fenced at it first, so the
    previous owner can no longer write, and read afresh from the shared backend. Then
    `tail_entries`, the previous owner's DTL tail, is appended as this owner's writes
    (entries the backend or the local log hold already are skipped)."""
    # Replay belongs here; the log writer needs it to rebuild its map in place later.
    vol.state.replay = lambda segments: apply(vol, segments, verify=False)
    vol.sco_dir.mkdir(parents=True, exist_ok=True)
    vol.tlog_dir.mkdir(parents=True, exist_ok=True)
    if create:
        vol.store.create_namespace(vol.ns, preset=preset)
    if vol.gen:
        vol.store.refresh(vol.ns)
        vol.store.fence(vol.ns, vol.gen)
    elif not create:
        held = getattr(vol.store, "fence_gen", lambda ns: 0)(vol.ns)
        if held:
            # A node without [cluster] etcd on a cluster's backend: serving this volume would
            # serve stale data and acknowledge writes the backend then refuses.
            raise NotOwner(f"volume {vol.name} belongs to a cluster (owner generation {held} in the "
                           "backend): this node runs without [cluster] etcd and does not open it")
    if create:
        vol.store.put(vol.ns, "volume.json", json.dumps(vol.meta).encode())
    backend = set(vol.store.list(vol.ns))
    try:
        _load(vol, backend, create)
        mark_local(vol.dir, vol.gen)
        if tail_entries:
            applied = {n: 1 << 62 for n in _numbers(backend, "tlog/")}
            for n in _local_numbers(vol.tlog_dir):
                applied.setdefault(n, (vol.tlog_dir / str(n)).stat().st_size)
            tail.replay(vol, tail_entries, applied)
    except BaseException:
        # No half-open map left behind (its write transaction would lock out a retry).
        if vol.map is not None:
            try:
                vol.map.close()
            except sqlite3.Error:
                pass
        raise


def _load(vol: Volume, backend: set[str], create: bool) -> None:
    if create:
        vol.map = _new_map(vol)
    meta = None if create else _open_local_map(vol)
    if meta is not None:
        missing = _missing(vol, backend, meta["tlog"])
        cps = _numbers(backend, "checkpoint/")
        if missing and cps and cps[-1] > missing[-1]:
            # Older than every copy of the TLogs it needs (pruned from the backend, dropped
            # locally): a checkpoint past the hole is exact, a replay across it is not.
            vol.map.close()
            _move_aside(vol, f"it is at TLog {meta['tlog']} and TLogs {_ranges(missing)} are gone")
            vol.map = _new_map(vol)
            meta = None
    if meta is not None:
        _restore(vol, meta)
        replayed = vol.replayed = _replay(vol, backend, meta["tlog"], meta["tlog_off"])
        if replayed:
            log.info("%s: replayed %d TLog records after an unclean stop", vol.name, replayed)
    elif not create:
        _rebuild(vol, backend)
    vol.local_scos = set(_local_numbers(vol.sco_dir))
    local_tlogs = _local_numbers(vol.tlog_dir)
    vol.next_sco = max([vol.next_sco, *(n + 1 for n in vol.local_scos), *(n + 1 for n in _numbers(backend, "sco/"))])
    vol.next_tlog = max([vol.next_tlog, *(n + 1 for n in local_tlogs), *(n + 1 for n in _numbers(backend, "tlog/"))])
    if vol.gen:
        # Object names of this owner never collide with a previous owner's (whose last
        # SCOs and TLogs may never have reached the backend, or may still try to).
        vol.next_sco = max(vol.next_sco, gen_floor(vol.gen))
        vol.next_tlog = max(vol.next_tlog, gen_floor(vol.gen))
    _requeue(vol, backend, local_tlogs)
    vol.tlogs_since_checkpoint = tlogs_after_checkpoint(backend, local_tlogs)
    vol.tlog_no, vol.tlog_off = vol.next_tlog, 0
    vol.commit()


def _new_map(vol: Volume) -> ClusterMap:
    return ClusterMap(vol.dir / "map.db", vol._nclusters(), vol.cfg.map_cache_pages)


def _meta_problem(meta: Any) -> str | None:
    if not isinstance(meta, dict):
        return "no meta row"
    for key in _META_INTS:
        if not isinstance(meta.get(key), int) or meta[key] < 0:
            return f"meta {key!r} is {meta.get(key)!r}"
    if not isinstance(meta.get("snapshots"), list):
        return "meta 'snapshots' is not a list"
    return None


def _open_local_map(vol: Volume) -> dict[str, Any] | None:
    """Open map.db and return its meta, or set up an empty map and return None when the
    file is missing or unusable (moved aside first); the caller then rebuilds."""
    db = vol.dir / "map.db"
    if not db.exists():
        if any(Path(f"{db}{s}").exists() for s in ("-wal", "-shm")):
            # A log without its database must not be applied to a new one.
            _move_aside(vol, "map.db is missing but its -wal/-shm are not")
        else:
            log.warning("%s: no map.db: rebuilding the map from the backend and the local write buffer",
                        vol.name)
        vol.map = _new_map(vol)
        return None
    problem = check_file(db)
    if problem is None:
        try:
            vol.map = _new_map(vol)
            meta = vol.map.load_meta()
            problem = _meta_problem(meta)
            if problem is None:
                return meta
            vol.map.close()
        except (sqlite3.DatabaseError, ValueError) as e:
            problem = f"{type(e).__name__}: {e}"
            if vol.map is not None:
                try:
                    vol.map.close()
                except sqlite3.Error:
                    pass   # it goes aside anyway
    _move_aside(vol, problem)
    vol.map = _new_map(vol)
    return None


def _move_aside(vol: Volume, why: str) -> None:
    """Keep an unusable map.db (and its -wal/-shm) for post-mortem, out of the way."""
    db = vol.dir / "map.db"
    stamp = int(time.time())
    dest = db.with_name(f"map.db.corrupt-{stamp}")
    k = 0
    while any(Path(f"{dest}{s}").exists() for s in ("", "-wal", "-shm")):
        k += 1
        dest = db.with_name(f"map.db.corrupt-{stamp}.{k}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{db}{suffix}")
        if src.exists():
            os.replace(src, f"{dest}{suffix}")
    log.error("%s: map.db is unusable (%s): kept as %s; rebuilding the map from the backend"
              " and the local write buffer", vol.name, why, dest.name)


def _restore(vol: Volume, meta: dict[str, Any]) -> None:
    vol.map.epoch = meta["epoch"]
    vol.snapshots = meta["snapshots"]
    vol.size = meta["size"]
    vol.map.resize(vol._nclusters())
    vol.next_sco = meta.get("next_sco", 1)
    vol.next_tlog = meta.get("next_tlog", 1)


def _tlogs_from(vol: Volume, backend: set[str], start: int) -> tuple[list[int], set[int]]:
    """TLog numbers >= start held anywhere (ascending), and which of them are local."""
    local = {n for n in _local_numbers(vol.tlog_dir) if n >= start}
    remote = {n for n in _numbers(backend, "tlog/") if n >= start}
    return sorted(local | remote), local


def _missing(vol: Volume, backend: set[str], start: int) -> list[int]:
    """TLogs from `start` on that exist neither locally nor on the backend, up to the newest
    TLog anywhere (or the last one a backend checkpoint covers, which existed too)."""
    nums, _local = _tlogs_from(vol, backend, start)
    cps = _numbers(backend, "checkpoint/")
    top = max([*nums[-1:], *(cp - 1 for cp in cps[-1:])], default=start - 1)
    have = set(nums)
    missing: list[int] = []
    prev = start - 1
    for n in sorted(have | {top}):
        if n < start:
            continue
        # Each owner generation numbers its TLogs from gen_floor(gen): the numbers between
        # the end of one generation and the start of the next were never used.
        same = (n >> GEN_SHIFT) == ((prev + 1) >> GEN_SHIFT)
        first = prev + 1 if same else max(start, gen_floor(n >> GEN_SHIFT))
        missing.extend(range(first, n))
        if n not in have:
            missing.append(n)
        prev = n
    return missing


def _ranges(nums: list[int]) -> str:
    return f"{nums[0]}" if len(nums) == 1 else f"{nums[0]}..{nums[-1]} ({len(nums)})"


def _replay(vol: Volume, backend: set[str], start: int, off: int) -> int:
    """Apply every TLog from (start, off) on, local copies first; returns records applied."""
    nums, local = _tlogs_from(vol, backend, start)
    count = 0
    for n in nums:
        skip = off if n == start else 0
        if n in local:
            count += _apply_local(vol, n, skip)
        else:
            data = memoryview(vol.store.get(vol.ns, tlog_name(n)))
            count += apply(vol, tlog.parse(data[skip:]), verify=False)
        vol.next_tlog = max(vol.next_tlog, n + 1)
    return count


def _apply_local(vol: Volume, n: int, skip: int) -> int:
    path = vol.tlog_dir / str(n)
    data = bytearray(path.read_bytes())
    before = bytes(data)
    count = apply(vol, tlog.parse(memoryview(data)[skip:]), verify=True)
    if data != before:
        # Torn writes were turned into no-op records: keep them out of the upload (and
        # so out of any rebuild from the backend) as well.
        tmp = path.with_name(f".{n}.tmp")
        tmp.write_bytes(data)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    return count


def _rebuild(vol: Volume, backend: set[str]) -> None:
    if "volume.json" not in backend:
        raise NotFound(f"volume {vol.name}: namespace {vol.ns} holds no volume on the backend")
    start, off, used = 1, 0, None
    for cp in reversed(_numbers(backend, "checkpoint/")):
        try:
            meta = vol.map.load_dump(vol.store.get(vol.ns, f"checkpoint/{cp:016x}"))
            problem = _meta_problem(meta)
        except (NotFound, ValueError, KeyError, struct.error, zlib.error, sqlite3.DatabaseError) as e:
            problem = f"{type(e).__name__}: {e}"
        if problem is not None:
            log.warning("%s: checkpoint %d cannot be used (%s): trying an older one", vol.name, cp, problem)
            continue
        _restore(vol, meta)
        start, off, used = meta["tlog"], meta["tlog_off"], cp
        break
    else:
        vol.map.load_dump(struct.pack("<I", 2) + b"{}")   # no usable checkpoint: start empty
    missing = _missing(vol, backend, start)
    if missing:
        log.error("%s: TLogs %s are neither local nor on the backend: the rebuilt map misses"
                  " what they recorded", vol.name, _ranges(missing))
    nums, local = _tlogs_from(vol, backend, start)
    _replay(vol, backend, start, off)
    log.info("%s: map rebuilt (checkpoint %s, %d TLogs from the backend, %d from the local"
             " write buffer)", vol.name, used if used is not None else "none",
             len(nums) - len(local), len(local))


def apply(vol: Volume, segments: Iterable[tlog.Segment], verify: bool) -> int:
    """Apply TLog segments to the map in order; returns the number of records applied."""
    count = 0
    for seg in segments:
        if seg.kind == tlog.WRITE and seg.records is not None:
            addrs, locs = seg.records["a"].copy(), seg.records["b"].copy()
            if verify:
                good = _verify(vol, locs, seg.records["crc"])
                if not good.all():
                    seg.records["kind"][~good] = tlog.NOOP  # written back by _apply_local
                addrs, locs = addrs[good], locs[good]
            vol.map.update(addrs, locs)
            if len(locs):
                vol.next_sco = max(vol.next_sco, int(locs.max() >> SCO_SHIFT) + 1)
            count += len(addrs)
        elif seg.kind == tlog.RELOC and seg.records is not None:
            vol.map.relocate(seg.records["a"].copy(), seg.records["b"].copy())
            vol.next_sco = max(vol.next_sco, int(seg.records["b"].max() >> SCO_SHIFT) + 1)
            count += len(seg.records)
        elif seg.kind == tlog.MARK and seg.payload is not None:
            vol.apply_mark(seg.op, seg.payload)
            count += 1
    return count


def _verify(vol: Volume, locs: np.ndarray, crcs: np.ndarray) -> np.ndarray:
    """Which WRITE records point at data that matches its CRC (a crash may tear the tail)."""
    good = np.ones(len(locs), dtype=bool)
    cs = vol.cluster_size
    fds: dict[int, int | None] = {}
    try:
        for i, loc in enumerate(locs.tolist()):
            if loc <= ZERO_LOC:
                continue
            sco = loc >> SCO_SHIFT
            if sco not in fds:
                try:
                    fds[sco] = os.open(vol.sco_dir / str(sco), os.O_RDONLY)
                except FileNotFoundError:
                    fds[sco] = None
            fd = fds[sco]
            if fd is None:
                # Not local: it was sealed and uploaded long ago, so it is whole.
                continue
            data = os.pread(fd, cs, (loc & IDX_MASK) * cs)
            if len(data) != cs or crc32c.crc32c(data) != int(crcs[i]):
                good[i] = False
    finally:
        for fd in fds.values():
            if fd is not None:
                os.close(fd)
    if not good.all():
        log.warning("%s: dropped %d torn writes found in replay", vol.name, int((~good).sum()))
    return good


def _requeue(vol: Volume, backend: set[str], local_tlogs: list[int]) -> None:
    """Queue what never reached the backend; count the rest as evictable cache."""
    uploaded_scos = set(_numbers(backend, "sco/"))
    for n in sorted(vol.local_scos):
        nbytes = (vol.sco_dir / str(n)).stat().st_size
        vol.wb.add_pending(nbytes)
        if n in uploaded_scos:
            vol.wb.uploaded((vol, n), nbytes, lambda n=n: vol.evict_sco(n))
        else:
            vol.queue_sco_upload(n, nbytes)
    vol.uploaded_tlogs = set(_numbers(backend, "tlog/"))
    for n in local_tlogs:
        if n not in vol.uploaded_tlogs:
            vol.queue_tlog_upload(n)
