"""Engine behaviour beyond the model: errors, write buffer pressure, scrub, clones, group commit."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ovsfs.backend.local import LocalStore
from ovsfs.engine.engine import MAX_CLONE_DEPTH, Engine
from ovsfs.errors import AlreadyExists, Busy, InvalidArgument, NotFound, OutOfRange

from .helpers import opened, small_config

CS = 4096


@pytest.fixture
def engine(tmp_path: Path):
    eng = Engine(small_config(tmp_path))
    eng.open()
    eng.create_vpool("default")
    yield eng
    eng.close()


def test_bad_requests_are_typed_errors(engine: Engine) -> None:
    vol = engine.create_volume("v", 16 * CS)
    with pytest.raises(AlreadyExists):
        engine.create_volume("v", 16 * CS)
    with pytest.raises(InvalidArgument):
        engine.create_volume("w", 16 * CS + 1)
    with pytest.raises(InvalidArgument):
        engine.create_volume("bad/name", 16 * CS)
    with pytest.raises(InvalidArgument):
        engine.create_volume(".hidden", 16 * CS)
    with pytest.raises(NotFound):
        engine.volume("nope")
    with pytest.raises(NotFound):
        engine.create_volume("x", 16 * CS, vpool="nopool")
    with pytest.raises(OutOfRange):
        vol.read(15 * CS, 2 * CS)
    with pytest.raises(OutOfRange):
        vol.write(16 * CS - 1, b"ab")
    with pytest.raises(OutOfRange):
        vol.writev([(0, b"a"), (16 * CS, b"b")])
    assert vol.read(0, 1) == b"\0", "a refused batch must not have written its valid part"
    with pytest.raises(OutOfRange):
        vol.trim(0, 17 * CS)
    with pytest.raises(NotFound):
        vol.read(0, 1, snapshot="nosnap")


def test_resize_grow_and_refused_shrink(engine: Engine) -> None:
    vol = engine.create_volume("v", 16 * CS)
    vol.write(10 * CS, b"x" * CS)
    vol.resize(32 * CS)
    assert vol.size == 32 * CS and vol.read(20 * CS, CS) == bytes(CS)
    with pytest.raises(InvalidArgument, match="data is written"):
        vol.resize(8 * CS)
    vol.trim(10 * CS, CS)
    vol.resize(8 * CS)
    assert vol.size == 8 * CS
    with pytest.raises(InvalidArgument):
        vol.resize(8 * CS + 5)


def test_delete_busy_with_users_and_clones(engine: Engine) -> None:
    vol = engine.create_volume("v", 16 * CS)
    vol.acquire("nbd")
    with pytest.raises(Busy):
        engine.delete_volume("v")
    vol.release("nbd")
    vol.create_snapshot("s")
    engine.clone_volume("v", "s", "c")
    with pytest.raises(Busy):
        engine.delete_volume("v")
    with pytest.raises(Busy):
        vol.delete_snapshot("s")
    engine.delete_volume("c")
    vol.delete_snapshot("s")
    engine.delete_volume("v")
    assert engine.list_volumes() == []
    assert not [n for n in engine.store.namespaces() if n.startswith("vol-")] or engine.wb.drain(10)


def test_clone_chain_255_deep_reads_through(engine: Engine) -> None:
    vol = engine.create_volume("c0", 64 * CS)
    for depth in range(MAX_CLONE_DEPTH - 1):
        vol.write((depth % 64) * CS, bytes([depth % 251 + 1]) * 10)
        vol.create_snapshot("s")
        t = time.perf_counter()
        vol = engine.clone_volume(vol.name, "s", f"c{depth + 1}")
        assert time.perf_counter() - t < 5  # O(1): no data copied (generous bound, not a benchmark)
    # Every level's write is visible at the bottom of the chain, unless a later level overwrote it.
    for depth in range(MAX_CLONE_DEPTH - 1 - 64, MAX_CLONE_DEPTH - 1):
        assert vol.read((depth % 64) * CS, 10) == bytes([depth % 251 + 1]) * 10
    vol.create_snapshot("s")
    with pytest.raises(InvalidArgument, match="deep"):
        engine.clone_volume(vol.name, "s", "one-too-many")


def test_scrub_reclaims_overwritten_space_but_keeps_snapshots(engine: Engine, tmp_path: Path) -> None:
    vol = engine.create_volume("v", 64 * CS)
    for i in range(64):
        vol.write(i * CS, bytes([1]) * CS)
    vol.create_snapshot("keep")
    for rnd in range(2, 6):
        for i in range(64):
            vol.write(i * CS, bytes([rnd]) * CS)
    vol.sync()
    before = len(engine.store.list(vol.ns, "sco/"))
    result = engine.scrub("v")[0]
    after = len(engine.store.list(vol.ns, "sco/"))
    assert result["deleted_scos"] > 0 and after < before
    assert vol.read(0, 64 * CS) == bytes([5]) * (64 * CS)
    assert vol.read(0, 64 * CS, snapshot="keep") == bytes([1]) * (64 * CS)
    vol.delete_snapshot("keep")
    engine.scrub("v")
    assert len(engine.store.list(vol.ns, "sco/")) < after
    assert vol.read(0, 64 * CS) == bytes([5]) * (64 * CS)


def test_scrub_moves_live_clusters_out_of_sparse_scos(engine: Engine) -> None:
    vol = engine.create_volume("v", 256 * CS)
    vol.write(0, os.urandom(256 * CS))
    expect = bytearray(vol.read(0, 256 * CS))
    for i in range(0, 256, 8):          # leave 1 in 8 clusters of each SCO live... then overwrite the rest
        for j in range(1, 8):
            vol.write((i + j) * CS, b"z" * CS)
            expect[(i + j) * CS:(i + j + 1) * CS] = b"z" * CS
    vol.sync()
    result = engine.scrub("v")[0]
    assert result["rewritten_scos"] > 0 and result["moved_clusters"] > 0
    assert vol.read(0, 256 * CS) == bytes(expect)
    engine.close()
    eng2 = Engine(engine.cfg)
    eng2.open()
    try:
        assert eng2.volume("v").read(0, 256 * CS) == bytes(expect)
    finally:
        eng2.close()
    engine.open = lambda: None  # type: ignore[method-assign]
    engine.close = lambda: None  # type: ignore[method-assign]


class GatedStore(LocalStore):
    """The real local store with a gate in front of put: a backend that stops taking writes."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = threading.Event()
        self.gate.set()

    def put(self, ns: str, name: str, data: bytes | memoryview, gen: int = 0) -> None:
        if name.startswith("sco/"):
            self.gate.wait()
        super().put(ns, name, data, gen=gen)

    def put_file(self, ns: str, name: str, path: Path, gen: int = 0) -> None:
        if name.startswith("sco/"):
            self.gate.wait()
        super().put_file(ns, name, path, gen=gen)


def test_full_write_buffer_makes_writes_wait_not_fail(tmp_path: Path) -> None:
    cfg = small_config(tmp_path)  # write buffer: 4 SCOs of 8 clusters
    store = GatedStore(cfg.path(cfg.backend.path))
    eng = Engine(cfg, store)
    eng.open()
    try:
        eng.create_vpool("default")
        vol = eng.create_volume("v", 256 * CS)
        store.gate.clear()
        done = threading.Event()

        def writer() -> None:
            for i in range(256):  # twice the write buffer
                vol.write(i * CS, bytes([i % 250 + 1]) * CS)
            done.set()
        t = threading.Thread(target=writer)
        t.start()
        assert not done.wait(1.0), "writes should wait while the backend takes nothing"
        assert eng.wb.status()["pending_bytes"] <= cfg.engine.write_buffer_size
        store.gate.set()
        assert done.wait(30)
        t.join()
        for i in range(256):
            assert vol.read(i * CS, CS) == bytes([i % 250 + 1]) * CS
    finally:
        store.gate.set()
        eng.close()


def test_group_commit_shares_fsyncs(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    vol = engine.create_volume("v", 64 * CS)
    calls = []
    real = os.fsync

    def slow_fsync(fd: int) -> None:
        calls.append(fd)
        time.sleep(0.05)
        real(fd)
    monkeypatch.setattr(os, "fsync", slow_fsync)
    vol.write(0, b"a" * CS)
    threads = [threading.Thread(target=vol.flush) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # One round covers the SCO, the TLog and their directories; 16 flushers share it.
    assert len(calls) <= 2 * 4, f"{len(calls)} fsyncs for 16 concurrent flushes"
    before = len(calls)
    vol.flush()
    assert len(calls) == before, "a flush with nothing new to sync must not fsync"


def test_clean_restart_replays_nothing(tmp_path: Path) -> None:
    cfg = small_config(tmp_path)
    eng = Engine(cfg)
    eng.open()
    eng.create_vpool("default")
    vol = eng.create_volume("v", 64 * CS)
    for i in range(64):
        vol.write(i * CS, bytes([i]) * CS)
    eng.close()
    with opened(cfg) as eng:
        assert eng.volume("v").replayed == 0
        assert eng.volume("v").read(63 * CS, CS) == bytes([63]) * CS


def test_volumes_found_again_from_the_backend_alone(tmp_path: Path) -> None:
    cfg = small_config(tmp_path)
    eng = Engine(cfg)
    eng.open()
    eng.create_vpool("default")
    vol = eng.create_volume("v", 64 * CS)
    vol.write(0, b"kept" * 1024)
    vol.create_snapshot("s1")
    vol.write(0, b"newr" * 1024)
    vol.sync()
    eng.close()
    import shutil
    shutil.rmtree(tmp_path / "wb")
    shutil.rmtree(tmp_path / "cluster")
    with opened(cfg) as eng:
        vol = eng.volume("v")
        assert vol.read(0, 4) == b"newr"
        assert vol.read(0, 4, snapshot="s1") == b"kept"
        assert [s["name"] for s in vol.list_snapshots()] == ["s1"]


def test_uploaded_scos_are_evicted_and_read_back_from_the_backend(tmp_path: Path) -> None:
    cfg = small_config(tmp_path)
    with opened(cfg) as eng:
        eng.create_vpool("default")
        vol = eng.create_volume("v", 1024 * CS)
        data = os.urandom(1024 * CS)
        vol.write(0, data)  # 8x the write buffer
        vol.sync()
        local = sum(p.stat().st_size for p in vol.sco_dir.iterdir())
        assert local <= cfg.engine.write_buffer_size
        assert len(vol.local_scos) < len(engine_scos := eng.store.list(vol.ns, "sco/"))
        assert len(engine_scos) >= 1024 // cfg.engine.sco_clusters
        assert vol.read(0, 1024 * CS) == data


def test_nowait_calls_never_wait(engine: Engine) -> None:
    from ovsfs.errors import WouldBlock
    vol = engine.create_volume("v", 64 * CS)
    vol.writev([(0, b"a" * CS), (8 * CS, b"b" * 2 * CS)], nowait=True)
    assert vol.readv([(0, 10), (8 * CS, 2 * CS)], nowait=True) == [b"a" * 10, b"b" * 2 * CS]
    with pytest.raises(WouldBlock):
        vol.writev([(1, b"x")], nowait=True)     # needs read-modify-write
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with vol.lock:
            held.set()
            release.wait(10)
    t = threading.Thread(target=holder)
    t.start()
    held.wait(10)
    try:
        pending = engine.wb.status()["pending_bytes"]
        with pytest.raises(WouldBlock):
            vol.writev([(0, b"c" * CS)], nowait=True)
        with pytest.raises(WouldBlock):
            vol.readv([(0, CS)], nowait=True)
        assert engine.wb.status()["pending_bytes"] == pending, "a refused write must give its reservation back"
    finally:
        release.set()
        t.join()
    assert vol.read(0, CS) == b"a" * CS
    vol.sync()
    engine.wb.drop_cache()
    with pytest.raises(WouldBlock):
        vol.readv([(0, CS)], nowait=True)        # only on the backend now
    assert vol.readv([(0, CS)]) == [b"a" * CS]


def test_write_buffer_accounting_returns_to_zero(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Failed writes, scrub moves and deleted volumes must not leak write-buffer budget:
    a leak adds up until every writer of the node waits forever."""
    pending = lambda: engine.wb.status()["pending_bytes"]  # noqa: E731
    vol = engine.create_volume("v", 256 * CS)
    for rnd in range(3):
        for i in range(0, 256, 3):
            vol.write(i * CS, bytes([rnd + 1]) * CS)
    vol.sync()
    assert pending() == 0
    engine.scrub("v")
    vol.sync()
    assert pending() == 0
    v2 = engine.create_volume("v2", 256 * CS)
    v2.write(0, os.urandom(100 * CS))
    engine.delete_volume("v2")
    assert engine.wb.drain(10)
    assert pending() == 0

    def broken(*_a: object, **_k: object) -> None:
        raise OSError(5, "disk error")
    monkeypatch.setattr(vol, "_append", broken)
    for call in (lambda: vol.write(0, b"x" * CS), lambda: vol.write(5, b"x"),
                 lambda: vol.writev([(0, b"a" * CS), (CS, b"b" * CS)])):
        with pytest.raises(OSError):
            call()
        assert pending() == 0


def test_torn_write_is_dropped_at_replay_and_never_reaches_the_backend(tmp_path: Path) -> None:
    """Power loss after a write but before a flush: the TLog record made it to disk, the
    data did not. Replay must serve the older data, here and after a rebuild."""
    import shutil

    from .helpers import crash
    cfg = small_config(tmp_path)
    eng = Engine(cfg)
    eng.open()
    eng.create_vpool("default")
    vol = eng.create_volume("v", 64 * CS)
    vol.write(0, b"old!" * 1024)
    vol.sync()
    vol.write(0, b"new!" * 1024)
    vol.write(CS, b"kept" * 1024)
    loc = int(vol.map.lookup(np.array([0], dtype=np.uint64))[0])
    sco_path, idx = vol.sco_dir / str(loc >> 16), loc & 0xFFFF
    crash(eng)
    with open(sco_path, "r+b") as f:   # the page never reached the disk
        f.seek(idx * CS)
        f.write(bytes(CS))
    with opened(cfg) as eng:
        vol = eng.volume("v")
        assert vol.read(0, 4) == b"old!"
        assert vol.read(CS, 4) == b"kept"
        vol.sync()
    shutil.rmtree(tmp_path / "wb")
    shutil.rmtree(tmp_path / "cluster")
    with opened(cfg) as eng:
        assert eng.volume("v").read(0, 4) == b"old!"
        assert eng.volume("v").read(CS, 4) == b"kept"


def test_a_deleted_volume_stays_deleted_across_a_crash(tmp_path: Path) -> None:
    from .helpers import crash
    cfg = small_config(tmp_path)
    eng = Engine(cfg)
    eng.open()
    eng.create_vpool("default")
    eng.create_volume("gone", 64 * CS).write(0, b"x" * CS)
    eng.create_volume("kept", 64 * CS).write(0, b"k" * CS)
    eng.volume("gone").sync()
    gate = threading.Event()
    eng.wb.submit("stall", gate.wait, owner=eng.volume("gone"))  # its upload lane stops moving...
    eng.delete_volume("gone")
    eng.wb.uploads.abandon()                # ...and the crash loses the queued namespace deletion
    gate.set()
    crash(eng)
    with opened(cfg) as eng:
        assert [v["name"] for v in eng.list_volumes()] == ["kept"]
        assert eng.volume("kept").read(0, 1) == b"k"
