"""Issue 9, case 1: the write-buffer disk fills up (a real, size-limited tmpfs).

No acknowledged write may be lost: a map commit that fails for lack of space keeps
everything (in memory now, and on disk after a crash or a clean restart), a write that
finds the disk full gets NoSpace, and the volume works again once space returns,
without a restart. The budget counts TLogs and the map, and writers wait while the
disk is below its reserve.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator

import pytest

from ovsfs.config import Config
from ovsfs.engine.engine import Engine
from ovsfs.engine.map import PAGE_ENTRIES
from ovsfs.errors import NoSpace

from .helpers import crash, fill, small_config, tmpfs

CS = 4096
PAGE_SPAN = PAGE_ENTRIES * CS      # bytes of volume per map page (16 MiB)


@pytest.fixture
def wbfs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "wbfs", 16 << 20) as mnt:
        yield mnt


def config(tmp_path: Path, wb: Path, **engine: object) -> Config:
    cfg = small_config(tmp_path, **engine)  # type: ignore[arg-type]
    cfg.engine.write_buffer = str(wb / "wb")
    return cfg


def block(i: int, gen: int) -> bytes:
    return (i.to_bytes(4, "little") + gen.to_bytes(4, "little")) * (CS // 8)


def test_failed_map_commit_loses_no_flushed_write(tmp_path: Path, wbfs: Path) -> None:
    # 128 map pages written: with 4 resident, most are evicted into the open SQLite
    # transaction, which a failed commit rolls back.
    pages = 128
    cfg = config(tmp_path, wbfs, disk_reserve=0, disk_wait=0.5, sco_clusters=256, tlog_scos=64,
                 write_buffer_size=64 << 20)
    eng = Engine(cfg)
    eng.open()
    eng.create_vpool("default")
    vol = eng.create_volume("v", pages * PAGE_SPAN)
    expect: dict[int, bytes] = {}
    for p in range(pages):
        expect[p * PAGE_SPAN] = block(p, 1)
        vol.write(p * PAGE_SPAN, expect[p * PAGE_SPAN])
    vol.flush()
    filler = fill(wbfs)
    with pytest.raises(Exception) as failed:
        with vol.lock:
            vol.commit()
    assert "full" in str(failed.value)
    for off, data in expect.items():          # still served while the disk is full
        assert vol.read(off, CS) == data
    filler.unlink()
    # Space is back: the volume works without a restart, and the next commit covers all.
    for p in range(pages):
        off = p * PAGE_SPAN + CS
        expect[off] = block(p, 2)
        vol.write(off, expect[off])
    vol.flush()
    commit_error: Exception | None = None
    try:
        with vol.lock:
            vol.commit()
    except Exception as e:  # the old code fails here; check the data first, it says more
        commit_error = e
    for off, data in expect.items():
        assert vol.read(off, CS) == data
    crash(eng)
    for clean in (False, True):
        eng = Engine(cfg)
        eng.open()
        try:
            vol = eng.volume("v")
            bad = [off for off, data in expect.items() if vol.read(off, CS) != data]
            assert not bad, f"{len(bad)} acknowledged writes lost after a {'clean restart' if clean else 'crash'}"
        finally:
            eng.close()
    assert commit_error is None


def test_write_on_full_disk_is_nospace_then_recovers(tmp_path: Path, wbfs: Path) -> None:
    cfg = config(tmp_path, wbfs, disk_reserve=0, disk_wait=0.1, write_buffer_size=64 << 20)
    # The backend on the same disk: an upload frees nothing there (a hard link), so
    # evicting uploaded SCOs cannot make room; only deleting the filler does.
    cfg.backend.path = str(wbfs / "backend")
    eng = Engine(cfg)
    eng.open()
    try:
        eng.create_vpool("default")
        vol = eng.create_volume("v", 256 * CS)
        expect = {i: block(i, 1) for i in range(0, 256, 3)}
        for i, data in expect.items():
            vol.write(i * CS, data)
        filler = fill(wbfs)
        refused = 0
        for i in range(1, 90, 3):
            try:
                vol.write(i * CS, block(i, 1))
            except NoSpace:
                refused += 1
            else:
                expect[i] = block(i, 1)   # acknowledged: must be there in the end
        assert refused > 0, "the disk was full but every write was acknowledged"
        vol.flush()                           # what was acknowledged can still be flushed
        filler.unlink()
        for i in range(2, 256, 3):            # no restart needed once space returns
            vol.write(i * CS, block(i, 2))
            expect[i] = block(i, 2)
        vol.flush()
        for i, data in expect.items():
            assert vol.read(i * CS, CS) == data
    finally:
        crash(eng)
    eng = Engine(cfg)
    eng.open()
    try:
        vol = eng.volume("v")
        assert [i for i, d in expect.items() if vol.read(i * CS, CS) != d] == []
    finally:
        eng.close()


def test_writers_wait_for_the_disk_reserve_instead_of_failing(tmp_path: Path) -> None:
    """The budget alone (1 GiB) would let 48 MiB into a 24 MiB disk: the disk reserve makes
    writers wait while sealed SCOs are uploaded and evicted, and every write succeeds."""
    with tmpfs(tmp_path / "wbfs", 24 << 20) as mnt:
        cfg = config(tmp_path, mnt, disk_reserve=2 << 20, disk_wait=30.0, sco_clusters=64,
                     write_buffer_size=1 << 30)
        eng = Engine(cfg)
        eng.open()
        try:
            eng.create_vpool("default")
            vol = eng.create_volume("v", 64 << 20)
            chunk = 64 * CS
            lowest = None
            t0 = time.monotonic()
            for n in range((48 << 20) // chunk):
                off = (n * chunk) % vol.size
                vol.write(off, bytes([n % 251 + 1]) * chunk)
                st = os.statvfs(mnt)
                free = st.f_bavail * st.f_frsize
                lowest = free if lowest is None else min(lowest, free)
            vol.flush()
            assert time.monotonic() - t0 < 60
            # The reserve held (allowing for what one write and the map add past the check).
            assert lowest is not None and lowest > (1 << 20)
            for n in range((48 << 20) // chunk - (64 << 20) // chunk, (48 << 20) // chunk):
                if n >= 0:
                    off = (n * chunk) % vol.size
                    assert vol.read(off, CS) == bytes([n % 251 + 1]) * CS
        finally:
            eng.close()


def test_budget_counts_tlogs_and_map(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, write_buffer_size=64 << 20)
    eng = Engine(cfg)
    eng.open()
    try:
        eng.create_vpool("default")
        vol = eng.create_volume("v", 64 * PAGE_SPAN)
        for p in range(64):
            vol.write(p * PAGE_SPAN, block(p, 1))
        vol.trim(0, 8 * PAGE_SPAN)
        with vol.lock:
            vol.commit()
        counted = eng.wb.status()["local_meta_bytes"]
        on_disk = 0
        # The upload thread may remove uploaded TLogs meanwhile: only ever less on disk.
        for f in [*vol.tlog_dir.iterdir(), vol.dir / "map.db", vol.dir / "map.db-wal"]:
            try:
                on_disk += f.stat().st_size
            except FileNotFoundError:
                pass
        assert on_disk > 0
        assert counted >= on_disk
    finally:
        eng.close()
