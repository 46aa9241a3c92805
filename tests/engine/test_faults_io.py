"""Issue 9, cases 2 and 10: short writes, ENOSPC and EIO injected at the file layer.

The faults come from a FileIO subclass set on the volume (`vol.fio`), the one place
every SCO write, TLog append and fsync of the engine goes through.
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path
from typing import Iterator

import pytest

from ovsfs.engine import tlog
from ovsfs.engine.engine import Engine
from ovsfs.engine.fileio import FileIO, FsyncError, VolumeFailed
from ovsfs.engine.volume import Volume
from ovsfs.errors import NoSpace

from .helpers import crash, small_config

CS = 4096


class FaultIO(FileIO):
    """Short writes (at most `short` bytes per call), and armed one-shot failures: a write
    that lands `partial` bytes and then fails with ENOSPC, an fsync that fails with EIO."""

    def __init__(self) -> None:
        self.short = 0
        self.tlog_fail: int | None = None    # bytes of the next append that land before ENOSPC
        self.sco_fail: int | None = None     # same for the next SCO pwrite
        self.fsync_fail = False
        self.fsyncs: list[str] = []          # what was fsynced, in order ("f:<path>", "d:<path>")

    @staticmethod
    def _armed(data: memoryview, armed: int | None, short: int) -> tuple[memoryview, int | None]:
        """The part to write now and the new arming: `armed` bytes land, the next call fails."""
        if armed is None:
            return (data[:short] if short else data), None
        if armed == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return data[:armed], 0

    def _write(self, fd: int, data: memoryview) -> int:
        try:
            part, self.tlog_fail = self._armed(data, self.tlog_fail, self.short)
        except OSError:
            self.tlog_fail = None
            raise
        return super()._write(fd, part)

    def _pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        try:
            part, self.sco_fail = self._armed(data, self.sco_fail, self.short)
        except OSError:
            self.sco_fail = None
            raise
        return super()._pwrite(fd, part, offset)

    def _fsync(self, fd: int) -> None:
        if self.fsync_fail:
            self.fsync_fail = False   # the kernel reports a writeback error once
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        self.fsyncs.append(f"f:{os.readlink(f'/proc/self/fd/{fd}')}")
        super()._fsync(fd)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Engine, Volume, FaultIO]]:
    eng = Engine(small_config(tmp_path))
    eng.open()
    eng.create_vpool("default")
    vol = eng.create_volume("v", 256 * CS)
    fio = FaultIO()
    vol.fio = fio
    yield eng, vol, fio
    if not vol.closed:
        eng.close()


def reopen(eng: Engine, tmp_path: Path, clean: bool = False) -> tuple[Engine, Volume]:
    if clean:
        eng.close()
    else:
        crash(eng)
    eng = Engine(small_config(tmp_path))
    eng.open()
    return eng, eng.volume("v")


def block(i: int, gen: int) -> bytes:
    return bytes([gen % 251 + 1]) * 8 + i.to_bytes(4, "little") * ((CS - 8) // 4)


def test_short_writes_are_completed(setup: tuple[Engine, Volume, FaultIO], tmp_path: Path) -> None:
    eng, vol, fio = setup
    fio.short = 1000   # not a multiple of a record (24) nor of a cluster
    rnd = random.Random(9)
    expect: dict[int, bytes] = {}
    for gen in range(40):
        first = rnd.randrange(0, 250)
        count = rnd.choice([1, 1, 3, 6])
        vol.write(first * CS, b"".join(block(first + k, gen) for k in range(count)))
        expect.update({first + k: block(first + k, gen) for k in range(count)})
    assert vol.tlog_path.stat().st_size == vol.tlog_off and vol.tlog_off % tlog.SIZE == 0
    eng, vol = reopen(eng, tmp_path)   # a crash: replay parses every record
    try:
        assert [i for i, d in expect.items() if vol.read(i * CS, CS) != d] == []
    finally:
        eng.close()


def test_tlog_append_failing_mid_record_is_cut_back(setup: tuple[Engine, Volume, FaultIO], tmp_path: Path) -> None:
    eng, vol, fio = setup
    for i in range(4):
        vol.write(i * CS, block(i, 1))
    fio.tlog_fail = 10                       # 10 bytes of the record land, then ENOSPC
    with pytest.raises(NoSpace):
        vol.write(10 * CS, block(10, 1))
    assert vol.tlog_path.stat().st_size == vol.tlog_off and vol.tlog_off % tlog.SIZE == 0
    assert vol.read(10 * CS, CS) == bytes(CS)   # never acknowledged, nothing points at it
    for i in range(4, 9):                       # the volume goes on
        vol.write(i * CS, block(i, 2))
    eng, vol = reopen(eng, tmp_path)
    try:
        for i in range(9):
            assert vol.read(i * CS, CS) == block(i, 1 if i < 4 else 2)
        assert vol.read(10 * CS, CS) == bytes(CS)
    finally:
        eng.close()


def test_sco_write_failing_is_never_acknowledged(setup: tuple[Engine, Volume, FaultIO], tmp_path: Path) -> None:
    eng, vol, fio = setup
    vol.write(0, block(0, 1))
    vol.write(CS, block(1, 1))
    fio.sco_fail = CS + 100                  # a cluster and a bit land, then ENOSPC
    with pytest.raises(NoSpace):
        vol.write(CS, block(1, 2) + block(2, 2))
    assert vol.read(CS, 2 * CS) == block(1, 1) + bytes(CS)
    vol.write(3 * CS, block(3, 3))           # reuses the clusters nothing points at
    assert vol.read(0, 4 * CS) == block(0, 1) + block(1, 1) + bytes(CS) + block(3, 3)
    eng, vol = reopen(eng, tmp_path)
    try:
        assert vol.read(0, 4 * CS) == block(0, 1) + block(1, 1) + bytes(CS) + block(3, 3)
    finally:
        eng.close()


def test_failed_fsync_fails_every_later_flush_until_reopened(setup: tuple[Engine, Volume, FaultIO],
                                                             tmp_path: Path) -> None:
    eng, vol, fio = setup
    vol.write(0, block(0, 1))
    vol.flush()
    vol.write(CS, block(1, 1))
    fio.fsync_fail = True
    with pytest.raises(VolumeFailed) as e:
        vol.flush()
    assert e.value.errno == errno.EIO and "fsync" in e.value.message
    # fsyncgate: the next flush must not succeed (the dirty pages may be gone).
    with pytest.raises(VolumeFailed):
        vol.flush()
    with pytest.raises(VolumeFailed):
        vol.write(2 * CS, block(2, 1))
    with pytest.raises(VolumeFailed):
        with vol.lock:
            vol.commit()
    assert vol.info()["failed"] and vol.read_only
    assert vol.read(0, CS) == block(0, 1)      # reads go on
    eng, vol = reopen(eng, tmp_path, clean=True)   # a clean stop of a failed volume: no commit
    try:
        assert vol.info()["failed"] is None and not vol.read_only
        assert vol.read(0, CS) == block(0, 1)
        assert vol.read(CS, CS) == block(1, 1)     # on disk after all: replay finds it (CRC checked)
        vol.write(2 * CS, block(2, 1))
        vol.flush()
    finally:
        eng.close()


def test_failed_fsync_in_a_map_commit_records_no_position(setup: tuple[Engine, Volume, FaultIO],
                                                          tmp_path: Path) -> None:
    eng, vol, fio = setup
    vol.write(0, block(0, 1))
    before = vol.map.load_meta()
    fio.fsync_fail = True
    with pytest.raises(VolumeFailed):
        with vol.lock:
            vol.commit()
    assert vol.map.load_meta() == before
    eng, vol = reopen(eng, tmp_path, clean=True)
    try:
        assert vol.read(0, CS) == block(0, 1)
    finally:
        eng.close()


def test_flush_fsyncs_data_then_tlogs_then_directories(setup: tuple[Engine, Volume, FaultIO]) -> None:
    _eng, vol, fio = setup
    calls: list[str] = []

    class Recording(FaultIO):
        def fsync_dir(self, path: Path) -> None:
            calls.append(f"d:{path}")
            super().fsync_dir(path)

        def _fsync(self, fd: int) -> None:
            target = os.readlink(f"/proc/self/fd/{fd}")
            if not os.path.isdir(target):      # directories are recorded by fsync_dir
                calls.append(f"f:{target}")
            FileIO._fsync(self, fd)

    vol.fio = Recording()
    # Two SCOs and one TLog, no TLog rollover (so no map commit): one flush, one round.
    for i in range(2 * vol.sco_clusters):
        vol.write(i * CS, block(i, 1))
    vol.flush()
    kinds = ["dir" if c.startswith("d:") else "sco" if f"/{vol.ns}/sco/" in c else "tlog" for c in calls]
    assert kinds.count("sco") == 2
    assert "sco" in kinds and "tlog" in kinds and "dir" in kinds
    first_tlog, first_dir = kinds.index("tlog"), calls.index(next(c for c in calls if c.startswith("d:")))
    assert all(k == "sco" for k in kinds[:first_tlog])
    assert "sco" not in kinds[first_tlog:first_dir] and all(c.startswith("d:") for c in calls[first_dir:])
    assert f"d:{vol.sco_dir}" in calls and f"d:{vol.tlog_dir}" in calls


def test_mkdir_durable_fsyncs_new_directories_and_their_parent(tmp_path: Path) -> None:
    synced: list[Path] = []

    class Recording(FileIO):
        def fsync_dir(self, path: Path) -> None:
            synced.append(Path(path))
            super().fsync_dir(path)

    Recording().mkdir_durable(tmp_path / "a" / "b" / "c")
    assert set(synced) == {tmp_path / "a" / "b" / "c", tmp_path / "a" / "b", tmp_path / "a", tmp_path}
    with pytest.raises(FsyncError):
        class Broken(FileIO):
            def _fsync(self, fd: int) -> None:
                raise OSError(errno.EIO, "EIO")
        Broken().mkdir_durable(tmp_path / "x")
