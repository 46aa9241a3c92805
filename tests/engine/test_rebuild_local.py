"""map.db is a cache (issue 9, case 4): lost, corrupt or old, it costs a rebuild of that
volume from the backend plus the local write buffer, never a flushed write or the node.

The backend is made to stop taking uploads part-way (a store that lets N uploads through,
then holds the rest until it is cut off, as a backend that goes away would), so every
scenario has TLogs and SCOs both on the backend and only in the local write buffer.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

from ovsfs.backend.local import LocalStore
from ovsfs.config import Config
from ovsfs.engine.engine import Engine
from ovsfs.errors import BackendError

from .helpers import crash, opened, small_config

CS = 4096
SIZE = 1 << 20          # 256 clusters: one map page


class StallingStore(LocalStore):
    """The local store, except that once `stall_after(n)` is called only n more objects
    are stored; later puts wait, and fail once `cut()` is called (the backend went away)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.cv = threading.Condition()
        self.left: int | None = None
        self.gone = False

    def stall_after(self, n: int) -> None:
        with self.cv:
            self.left = n

    def cut(self) -> None:
        with self.cv:
            self.gone = True
            self.cv.notify_all()

    def _gate(self, ns: str, name: str) -> None:
        with self.cv:
            while self.left is not None and self.left <= 0 and not self.gone:
                self.cv.wait()
            if self.gone:
                raise BackendError(f"backend put {ns}/{name}: the backend is away")
            if self.left is not None:
                self.left -= 1

    def put(self, ns: str, name: str, data: bytes | memoryview, gen: int = 0) -> None:
        self._gate(ns, name)
        super().put(ns, name, data, gen=gen)

    def put_file(self, ns: str, name: str, path: Path, gen: int = 0) -> None:
        self._gate(ns, name)
        super().put_file(ns, name, path, gen=gen)


def pattern(tag: int, cluster: int) -> bytes:
    return bytes([tag]) * 8 + cluster.to_bytes(8, "little") + bytes([tag ^ 0x5A]) * (CS - 16)


def write_clusters(vol, model: bytearray, tag: int, clusters: range) -> None:
    for c in clusters:
        data = pattern(tag, c)
        vol.write(c * CS, data)
        model[c * CS:(c + 1) * CS] = data


def partly_uploaded(cfg: Config, names: tuple[str, ...] = ("v",), uploads: int = 6,
                    ) -> dict[str, bytearray]:
    """Volumes whose flushed writes are partly on the backend and partly only local, then a
    crash. Returns the expected contents."""
    store = StallingStore(cfg.path(cfg.backend.path))
    eng = Engine(cfg, store)
    eng.open()
    eng.create_vpool("default")
    models = {}
    for k, name in enumerate(names):
        vol = eng.create_volume(name, SIZE)
        model = models[name] = bytearray(SIZE)
        write_clusters(vol, model, 1 + k, range(0, 96))          # several TLogs and checkpoints
        vol.sync()
    store.stall_after(uploads)
    for k, name in enumerate(names):
        vol = eng.volume(name)
        # Overwrites of uploaded clusters (stale on the backend) and new clusters.
        write_clusters(vol, models[name], 10 + k, range(40, 120))
        vol.flush()
    for name in names:
        vol = eng.volume(name)
        on_backend = {int(n[5:], 16) for n in store.list(vol.ns, "tlog/")}
        local = {int(p.name) for p in vol.tlog_dir.iterdir() if p.name.isdigit()}
        assert local - on_backend, "some TLogs must be only in the local write buffer"
    store.cut()
    crash(eng)
    # A killed process leaves no SQLite connection behind; here, the checkpoint readers of
    # the dropped upload tasks go only with their reference cycles.
    gc.collect()
    return models


def check(cfg: Config, models: dict[str, bytearray]) -> Engine:
    eng = Engine(cfg)
    eng.open()
    try:
        for name, model in models.items():
            assert eng.volume(name).read(0, SIZE) == bytes(model), f"volume {name} differs"
    except BaseException:
        eng.close()
        raise
    return eng


def _db_path(cfg: Config, ns: str) -> Path:
    return cfg.path(cfg.engine.write_buffer) / ns / "map.db"


def _namespaces(cfg: Config) -> dict[str, str]:
    from ovsfs.cluster.store import ConfigStore
    reg = ConfigStore(cfg.state_dir / "cluster" / "config.db")
    try:
        return {r["name"]: r["ns"] for r in reg.list("/volumes/").values()}
    finally:
        reg.close()


def _drop(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


def test_lost_map_rebuilds_with_local_writes_and_does_not_flap(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, write_buffer_size=8 << 20)  # uploads are held: room for all
    models = partly_uploaded(cfg)
    db = _db_path(cfg, _namespaces(cfg)["v"])
    _drop(db)
    # Rebuilt from backend + local write buffer: every flushed write is there ...
    check(cfg, models).close()
    # ... and stays the same across a restart (now with the local TLogs uploaded) ...
    check(cfg, models).close()
    # ... across another lost map ...
    _drop(db)
    eng = check(cfg, models)
    crash(eng)
    _drop(db)
    check(cfg, models).close()
    # ... and in a rebuild from the backend alone.
    shutil.rmtree(cfg.path(cfg.engine.write_buffer))
    shutil.rmtree(cfg.state_dir / "cluster")
    check(cfg, models).close()


def _garbage(db: Path) -> None:
    db.write_bytes(os.urandom(db.stat().st_size or 8192))


def _garbage_inside(db: Path) -> None:
    # Everything in the main file first (as SQLite's auto-checkpoint would have done),
    # then garbage over every page but the header page: the page index itself is hit.
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    assert db.stat().st_size > 4 * 4096
    with open(db, "r+b") as f:
        f.seek(4096)
        f.write(os.urandom(db.stat().st_size - 4096))


def _truncate(db: Path) -> None:
    with open(db, "r+b") as f:
        f.truncate(db.stat().st_size // 2)


def _empty(db: Path) -> None:
    db.write_bytes(b"")


def _sql(statement: str):
    def corrupt(db: Path) -> None:
        conn = sqlite3.connect(db, isolation_level=None)
        try:
            assert conn.execute("SELECT COUNT(*) FROM pages").fetchone()[0] > 0
            conn.execute(statement)
        finally:
            conn.close()
    return corrupt


CORRUPTIONS = {
    "garbage": _garbage,
    "garbage_inside": _garbage_inside,
    "truncated": _truncate,
    "empty": _empty,
    "short_page": _sql("UPDATE pages SET data = substr(data, 1, 1000)"),
    "long_page": _sql("UPDATE pages SET data = data || x'00'"),
    "meta_garbage": _sql("UPDATE meta SET value = '{not json'"),
    "meta_missing": _sql("DELETE FROM meta"),
    "meta_wrong": _sql("UPDATE meta SET value = '{\"epoch\": 1}'"),
    "epoch_ahead": _sql("UPDATE pages SET epoch = 99"),
}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
@pytest.mark.parametrize("stop", ["crash", "clean"])
def test_corrupt_map_rebuilds_that_volume_only(tmp_path: Path, how: str, stop: str) -> None:
    cfg = small_config(tmp_path, write_buffer_size=8 << 20)  # uploads are held: room for all
    models = partly_uploaded(cfg, ("a", "b"))
    if stop == "clean":
        with opened(cfg):
            pass   # a clean stop after the crash recovery: everything uploaded, nothing to replay
    ns = _namespaces(cfg)
    bad, good = _db_path(cfg, ns["a"]), _db_path(cfg, ns["b"])
    CORRUPTIONS[how](bad)
    eng = check(cfg, models)
    try:
        kept = sorted(p.name for p in bad.parent.iterdir() if p.name.startswith("map.db.corrupt-"))
        assert kept and not kept[0].endswith(("-wal", "-shm")), "the bad map.db is kept for post-mortem"
        assert not any(p.name.startswith("map.db.corrupt-") for p in good.parent.iterdir())
        if stop == "clean":
            assert eng.volume("b").replayed == 0, "b resumed from its own map.db"
        # The rebuilt volume takes writes as before.
        eng.volume("a").write(0, b"n" * CS)
        models["a"][:CS] = b"n" * CS
    finally:
        eng.close()
    check(cfg, models).close()


@pytest.mark.parametrize("gap", [False, True])
def test_map_older_than_the_tlogs_is_brought_forward(tmp_path: Path, gap: bool) -> None:
    """A map.db restored from a backup (or a lost commit): replay from its own position,
    taking the TLogs already uploaded (and dropped locally) from the backend; when even the
    backend pruned some of them, a checkpoint after the hole is used instead."""
    cfg = small_config(tmp_path, write_buffer_size=8 << 20)  # uploads are held: room for all
    store = StallingStore(cfg.path(cfg.backend.path))
    eng = Engine(cfg, store)
    eng.open()
    eng.create_vpool("default")
    vol = eng.create_volume("v", SIZE)
    model = bytearray(SIZE)
    write_clusters(vol, model, 1, range(0, 32))
    eng.close()
    db = _db_path(cfg, _namespaces(cfg)["v"])
    assert not Path(f"{db}-wal").exists()
    backup = db.read_bytes()

    store = StallingStore(cfg.path(cfg.backend.path))
    eng = Engine(cfg, store)
    eng.open()
    vol = eng.volume("v")
    rounds = 6 if gap else 1
    for r in range(rounds):
        write_clusters(vol, model, 20 + r, range(16, 64))
        vol.sync()
    vol.commit()   # drops the uploaded TLogs below the commit from the write buffer
    store.stall_after(3)
    write_clusters(vol, model, 40, range(50, 110))
    vol.flush()
    first_local = min(int(p.name) for p in vol.tlog_dir.iterdir() if p.name.isdigit())
    store.cut()
    crash(eng)

    backend_tlogs = sorted(int(n[5:], 16) for n in LocalStore(store.root).list(_namespaces(cfg)["v"], "tlog/"))
    _drop(db)
    db.write_bytes(backup)
    old = sqlite3.connect(db)
    position = json.loads(old.execute("SELECT value FROM meta").fetchone()[0])["tlog"]
    old.close()
    assert first_local > position, "TLogs after the old map position were dropped locally"
    assert (backend_tlogs[0] > position) == gap
    eng = check(cfg, {"v": model})
    try:
        moved = [p.name for p in db.parent.iterdir() if p.name.startswith("map.db.corrupt-")]
        assert bool(moved) == gap
        if not gap:
            assert eng.volume("v").replayed > 0
    finally:
        eng.close()
    check(cfg, {"v": model}).close()
