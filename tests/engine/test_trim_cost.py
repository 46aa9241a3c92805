"""Trim and write-zeroes cost what is mapped in the range, not its length (issue 9, case 9).

Measured as TLog bytes: a trim's records go to the TLog opened after a sync, and each
record must be one cluster that did not read as zeros before.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ovsfs.engine import tail, tlog
from ovsfs.engine.map import ZERO_LOC
from ovsfs.engine.volume import Volume

from .helpers import opened, small_config

CS = 4096
GiB = 1 << 30


def _local_tlogs(vol: Volume) -> dict[int, Path]:
    return {int(p.name): p for p in vol.tlog_dir.iterdir() if p.name.isdigit()}


def trim_records(vol: Volume, offset: int, length: int, zeroes: bool = False) -> np.ndarray:
    """Trim (or write zeroes) and return the TLog records it wrote."""
    vol.sync()   # seals the open TLog: whatever the trim logs goes to new ones
    before = set(_local_tlogs(vol))
    (vol.write_zeroes if zeroes else vol.trim)(offset, length)
    recs = [np.zeros(0, dtype=tlog.RECORD)]
    for n, path in sorted(_local_tlogs(vol).items()):
        if n not in before:
            recs += [s.records for s in tlog.parse(path.read_bytes()) if s.records is not None]
    out = np.concatenate(recs)
    assert (out["kind"] == tlog.WRITE).all()
    return out


def cluster(c: int) -> bytes:
    return c.to_bytes(8, "little") * (CS // 8)


@pytest.mark.parametrize("size", [16 * GiB, 1024 * GiB])
@pytest.mark.parametrize("zeroes", [False, True])
def test_trim_of_never_written_space_logs_nothing(tmp_path: Path, size: int, zeroes: bool) -> None:
    with opened(small_config(tmp_path)) as eng:
        eng.create_vpool("default")
        vol = eng.create_volume("v", size)
        assert len(trim_records(vol, 0, size, zeroes)) == 0
        assert vol.read(size - CS, CS) == bytes(CS)


def test_trim_logs_one_record_per_written_cluster(tmp_path: Path) -> None:
    size = 16 * GiB
    written = [0, 1, 4095, 4096, 4097, GiB // CS, 10 * GiB // CS + 7, size // CS - 1]
    with opened(small_config(tmp_path)) as eng:
        eng.create_vpool("default")
        vol = eng.create_volume("v", size)
        for c in written:
            vol.write(c * CS, cluster(c))
        vol.create_snapshot("before")
        # A part of the range: only the written clusters inside it are logged.
        lo, hi = GiB - 3 * CS, 10 * GiB + 8 * CS
        recs = trim_records(vol, lo, hi - lo)
        inside = [c for c in written if lo // CS <= c < hi // CS]
        assert sorted(recs["a"].tolist()) == inside and (recs["b"] == 0).all()
        for c in written:
            expect = bytes(CS) if c in inside else cluster(c)
            assert vol.read(c * CS, CS) == expect
        # The whole volume: the rest of them, once each; again: nothing left to log.
        recs = trim_records(vol, 0, size, zeroes=True)
        assert sorted(recs["a"].tolist()) == [c for c in written if c not in inside]
        assert len(trim_records(vol, 0, size)) == 0
        for c in written:
            assert vol.read(c * CS, CS) == bytes(CS)
            assert vol.read(c * CS, CS, snapshot="before") == cluster(c)
        # Partial clusters at the edges are still zeroed exactly.
        vol.write(5 * CS, b"x" * 3 * CS)
        vol.trim(5 * CS + 100, CS)
        assert vol.read(5 * CS, 3 * CS) == b"x" * 100 + bytes(CS) + b"x" * (2 * CS - 100)
    with opened(small_config(tmp_path)) as eng:   # and the same after a restart
        vol = eng.volume("v")
        for c in written:
            assert vol.read(c * CS, CS) == bytes(CS)
            assert vol.read(c * CS, CS, snapshot="before") == cluster(c)


def test_clone_trim_masks_parent_data_and_skips_the_rest(tmp_path: Path) -> None:
    size = 16 * GiB
    parent_written = [3, 4096 * 5 + 1, 3 * GiB // CS]
    with opened(small_config(tmp_path)) as eng:
        eng.create_vpool("default")
        base = eng.create_volume("base", size)
        for c in parent_written:
            base.write(c * CS, cluster(c))
        base.create_snapshot("s")
        mid = eng.clone_volume("base", "s", "mid")
        mid.write(7 * CS, cluster(7))
        mid.trim(3 * CS, CS)                         # masks one parent cluster in mid
        mid.create_snapshot("m")
        clone = eng.clone_volume("mid", "m", "c")
        clone.write(3 * GiB, b"c" * CS)              # over parent data
        clone.write(9 * GiB, b"d" * CS)              # where no ancestor has data
        recs = trim_records(clone, 0, size)
        # Clusters whose data comes from the clone itself or an ancestor (not 3: mid masks it).
        assert sorted(recs["a"].tolist()) == [7, 4096 * 5 + 1, 3 * GiB // CS, 9 * GiB // CS]
        assert (recs["b"] == ZERO_LOC).all()
        assert len(trim_records(clone, 0, size)) == 0
        for c in [3, 7, 4096 * 5 + 1, 3 * GiB // CS, 9 * GiB // CS]:
            assert clone.read(c * CS, CS) == bytes(CS)
        for c in parent_written:
            assert base.read(c * CS, CS) == cluster(c)
        assert mid.read(7 * CS, CS) == cluster(7)
        # A range no ancestor ever wrote costs nothing in a clone either.
        assert len(trim_records(mid, 8 * GiB, 4 * GiB)) == 0


class RecordingDtl:
    """A DTL sink that notes each batch the engine hands it, and whether the volume lock
    was held only once (not inside an outer hold of the whole trim)."""

    mode = "async"   # "none" is never called

    def __init__(self, vol: Volume) -> None:
        self.vol = vol
        self.batches: list[list[int]] = []
        self.depths: list[int] = []

    def append(self, pos: tuple[int, int], blob: bytes) -> object:
        rec, _data = tail.decode(blob)
        self.batches.append(sorted(np.frombuffer(rec, dtype=tlog.RECORD)["a"].tolist()))
        # RLock's repr carries its recursion count: 1 means this chunk's own hold only.
        self.depths.append(int(repr(self.vol.lock).split("count=")[1].split(" ")[0].rstrip(">")))
        return None

    def wait(self, ticket: object) -> None:
        return None

    def flush(self) -> None:
        return None

    def trim(self, pos: tuple[int, int]) -> None:
        return None


def test_big_trims_hold_the_lock_per_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ovsfs.engine import trim
    monkeypatch.setattr(trim, "CHUNK_PAGES", 2)
    with opened(small_config(tmp_path)) as eng:
        eng.create_vpool("default")
        vol = eng.create_volume("v", 16 * GiB)
        pages = [0, 1, 7, 300, 1023]
        for p in pages:
            vol.write(p * 4096 * CS + 5 * CS, b"p" * CS)
        vol.dtl = RecordingDtl(vol)
        vol.trim(0, 16 * GiB)
        assert vol.dtl.batches == [[5, 4096 + 5], [7 * 4096 + 5, 300 * 4096 + 5], [1023 * 4096 + 5]]
        assert vol.dtl.depths == [1, 1, 1]
