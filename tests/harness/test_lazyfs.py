"""The power-cut filesystem itself: what survives a cut is exactly what was made durable."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Iterator

import pytest

from ovsfs.fsutil import fsync_path

from tests.harness.control import PowerCutFS


@pytest.fixture
def pfs(tmp_path: Path) -> Iterator[PowerCutFS]:
    with PowerCutFS(tmp_path) as fs:
        yield fs


def durable_file(path: Path, data: bytes) -> None:
    """Create path with data the careful way: data, then the directory entry."""
    path.write_bytes(data)
    fsync_path(path)
    fsync_path(path.parent)


def cut_and_restart(pfs: PowerCutFS) -> dict[str, object]:
    dropped = pfs.power_cut()
    pfs.start()
    return dropped


def test_unsynced_data_is_lost_synced_data_kept(pfs: PowerCutFS) -> None:
    a, b = pfs.mnt / "a", pfs.mnt / "b"
    durable_file(a, b"old" * 1000)
    durable_file(b, b"old" * 1000)
    with open(a, "r+b") as f:
        f.write(b"NEW")                    # no fsync: gone at the cut
    with open(b, "r+b") as f:
        f.seek(10)
        f.write(b"NEW")
        f.flush()
        os.fsync(f.fileno())
        f.seek(0, os.SEEK_END)
        f.write(b"tail")                   # after the fsync: gone
    assert pfs.stats()["pending_bytes"] == 7
    dropped = cut_and_restart(pfs)
    assert dropped["pending_bytes"] == 7
    assert a.read_bytes() == b"old" * 1000
    assert b.read_bytes() == (b"old" * 1000)[:10] + b"NEW" + (b"old" * 1000)[13:]


def test_names_need_a_directory_fsync(pfs: PowerCutFS) -> None:
    d = pfs.mnt / "d"
    d.mkdir()
    fsync_path(pfs.mnt)
    durable_file(d / "kept", b"x")
    (d / "empty").write_bytes(b"z")        # the name is durable, the data is not
    fsync_path(d)
    (d / "gone").write_bytes(b"y")
    fsync_path(d / "gone")                 # the data is durable, the name is not
    (d / "gone2").write_bytes(b"w")        # neither
    durable_file(pfs.mnt / "r1", b"r")
    os.rename(pfs.mnt / "r1", pfs.mnt / "r2")   # rename not made durable
    os.unlink(d / "kept")                  # unlink not made durable
    os.link(d / "empty", d / "hard")       # link not made durable
    cut_and_restart(pfs)
    assert sorted(os.listdir(d)) == ["empty", "kept"]
    assert (d / "kept").read_bytes() == b"x"
    assert (d / "empty").read_bytes() == b""
    assert sorted(os.listdir(pfs.mnt)) == ["d", "r1"]


def test_truncate_append_link_and_statvfs(pfs: PowerCutFS) -> None:
    f = pfs.mnt / "f"
    durable_file(f, b"A" * 8192)
    fd = os.open(f, os.O_WRONLY | os.O_APPEND)
    os.truncate(f, 100)
    os.write(fd, b"B" * 50)                # O_APPEND: lands at 100
    os.fsync(fd)
    os.close(fd)
    os.link(f, pfs.mnt / "g")
    fsync_path(pfs.mnt)
    assert os.statvfs(pfs.mnt).f_bsize > 0
    cut_and_restart(pfs)
    assert f.read_bytes() == b"A" * 100 + b"B" * 50
    assert os.stat(f).st_ino == os.stat(pfs.mnt / "g").st_ino and os.stat(f).st_nlink == 2


def test_sqlite_wal_commit_survives_a_cut(pfs: PowerCutFS) -> None:
    db = pfs.mnt / "m.db"
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
    fsync_path(pfs.mnt)                    # SQLite does not fsync the directory for a new -wal
    for i in range(200):
        con.execute("INSERT INTO t VALUES (?, ?)", (i, os.urandom(100)))
    con.execute("BEGIN")
    con.execute("INSERT INTO t VALUES (1000, x'00')")   # open transaction: lost at the cut
    assert pfs.stats()["pending_bytes"] > 0
    cut_and_restart(pfs)
    con2 = sqlite3.connect(db)
    assert con2.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con2.execute("SELECT count(*), max(k) FROM t").fetchone() == (200, 199)
    con2.close()
