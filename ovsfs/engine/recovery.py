"""Opening a volume: resume from the local map, replay TLogs, or rebuild from the backend.

Local metadata is a cache that makes restarts fast. After a clean close the map
commit matches the TLog end and nothing is replayed; after a crash the TLogs after
the last commit are replayed, each write checked against its CRC32C so a torn
write is dropped rather than served; with no local metadata at all the volume is
rebuilt from the backend: latest map checkpoint, then every TLog after it.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterable

import crc32c
import numpy as np

from ovsfs.engine import tlog
from ovsfs.engine.map import SCO_SHIFT, ZERO_LOC, ClusterMap, dump
from ovsfs.engine.volume import IDX_MASK, Volume, tlog_name
from ovsfs.errors import NotFound

log = logging.getLogger("ovsfs.engine.recovery")

KEEP_CHECKPOINTS = 2


def _numbers(names: Iterable[str], prefix: str) -> list[int]:
    out = []
    for n in names:
        if n.startswith(prefix):
            try:
                out.append(int(n[len(prefix):], 16))
            except ValueError:
                pass
    return sorted(out)


def _local_numbers(directory: Any) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def open_volume(vol: Volume, create: bool, preset: str | None = None) -> None:
    vol.sco_dir.mkdir(parents=True, exist_ok=True)
    vol.tlog_dir.mkdir(parents=True, exist_ok=True)
    if create:
        vol.store.create_namespace(vol.ns, preset=preset)
        vol.store.put(vol.ns, "volume.json", json.dumps(vol.meta).encode())
    vol.map = ClusterMap(vol.dir / "map.db", vol._nclusters(), vol.cfg.map_cache_pages)
    backend = set(vol.store.list(vol.ns))
    meta = vol.map.load_meta()
    if meta is not None:
        _restore(vol, meta)
        replayed = vol.replayed = _replay_local(vol, meta)
        if replayed:
            log.info("%s: replayed %d TLog records after an unclean stop", vol.name, replayed)
    elif not create:
        _rebuild(vol, backend)
    vol.local_scos = set(_local_numbers(vol.sco_dir))
    local_tlogs = _local_numbers(vol.tlog_dir)
    vol.next_sco = max([vol.next_sco, *(n + 1 for n in vol.local_scos), *(n + 1 for n in _numbers(backend, "sco/"))])
    vol.next_tlog = max([vol.next_tlog, *(n + 1 for n in local_tlogs), *(n + 1 for n in _numbers(backend, "tlog/"))])
    _requeue(vol, backend, local_tlogs)
    vol.tlog_no, vol.tlog_off = vol.next_tlog, 0
    vol.commit()


def _restore(vol: Volume, meta: dict[str, Any]) -> None:
    vol.map.epoch = meta["epoch"]
    vol.snapshots = meta["snapshots"]
    vol.size = meta["size"]
    vol.map.resize(vol._nclusters())
    vol.next_sco = meta.get("next_sco", 1)
    vol.next_tlog = meta.get("next_tlog", 1)


def _replay_local(vol: Volume, meta: dict[str, Any]) -> int:
    start, off = meta["tlog"], meta["tlog_off"]
    count = 0
    for n in _local_numbers(vol.tlog_dir):
        if n < start:
            continue
        path = vol.tlog_dir / str(n)
        data = bytearray(path.read_bytes())
        before = bytes(data)
        count += apply(vol, tlog.parse(memoryview(data)[off if n == start else 0:]), verify=True)
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
        vol.next_tlog = max(vol.next_tlog, n + 1)
    return count


def _rebuild(vol: Volume, backend: set[str]) -> None:
    if "volume.json" not in backend:
        raise NotFound(f"volume {vol.name}: namespace {vol.ns} holds no volume on the backend")
    cps = _numbers(backend, "checkpoint/")
    start = 1
    if cps:
        meta = vol.map.load_dump(vol.store.get(vol.ns, f"checkpoint/{cps[-1]:016x}"))
        _restore(vol, meta)
        start = meta["tlog"]
    tlogs = [n for n in _numbers(backend, "tlog/") if n >= start]
    for n in tlogs:
        apply(vol, tlog.parse(vol.store.get(vol.ns, tlog_name(n))), verify=False)
        vol.next_tlog = max(vol.next_tlog, n + 1)
    log.info("%s: rebuilt from the backend (checkpoint %s, %d TLogs)", vol.name,
             cps[-1] if cps else "none", len(tlogs))


def apply(vol: Volume, segments: Iterable[tlog.Segment], verify: bool) -> int:
    """Apply TLog segments to the map in order; returns the number of records applied."""
    count = 0
    for seg in segments:
        if seg.kind == tlog.WRITE and seg.records is not None:
            addrs, locs = seg.records["a"].copy(), seg.records["b"].copy()
            if verify:
                good = _verify(vol, locs, seg.records["crc"])
                if not good.all():
                    seg.records["kind"][~good] = tlog.NOOP  # written back by _replay_local
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
            p = seg.payload
            if seg.op == tlog.SNAPSHOT:
                vol.apply_snapshot(p)
            elif seg.op == tlog.DELETE_SNAPSHOT:
                vol.apply_delete_snapshot(p["name"])
            elif seg.op == tlog.ROLLBACK:
                vol.apply_rollback(p["name"])
            elif seg.op == tlog.RESIZE:
                vol.apply_resize(p["size"])
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


def queue_checkpoint(vol: Volume) -> None:
    """Upload the map as of the last commit (just made at a TLog boundary).

    The snapshot is read once, on the first try, and its bytes are kept for retries (the
    reader, a SQLite read transaction, is closed at once so that it cannot hold the WAL
    while the backend is away). A newer checkpoint of the volume queued while this one
    still waits supersedes it: the newer one covers everything this one does."""
    reader = vol.map.reader()
    n = vol.tlog_no
    held: dict[str, Any] = {"reader": reader, "data": None}

    def release() -> None:
        r = held.pop("reader", None)
        if r is not None:
            r.close()

    def upload() -> None:
        if vol.deleted:
            release()
            return
        if held["data"] is None:
            if "reader" not in held:
                return   # released and never read: a newer checkpoint covers this one
            try:
                held["data"] = dump(held["reader"])
            finally:
                release()
        vol.store.put(vol.ns, f"checkpoint/{n:016x}", held["data"])
        names = vol.store.list(vol.ns)
        cps = _numbers(names, "checkpoint/")
        if len(cps) > KEEP_CHECKPOINTS:
            oldest_kept = cps[-KEEP_CHECKPOINTS]
            for c in cps[:-KEEP_CHECKPOINTS]:
                vol.store.delete(vol.ns, f"checkpoint/{c:016x}")
            for t in _numbers(names, "tlog/"):
                if t < oldest_kept:
                    vol.store.delete(vol.ns, tlog_name(t))
    vol.wb.submit(f"{vol.name} checkpoint {n}", upload, owner=vol, kind="checkpoint", on_drop=release)
