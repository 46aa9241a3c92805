"""FUSE door semantics over a real Engine, serve() running in a thread of the test process:
names, create/resize/delete/rename, snapshots, fallocate, SEEK_DATA/HOLE, errno mapping."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest

try:
    from fuse_helpers import InprocFuse, mounts_under
except ImportError:  # tests/doors became a package
    from tests.doors.fuse_helpers import InprocFuse, mounts_under

MiB = 1 << 20


@pytest.fixture
def fz(tmp_path: Path):
    f = InprocFuse(tmp_path / "state").start()
    yield f
    f.stop()
    assert not mounts_under(tmp_path)


def oserr(fn, *args) -> int:
    with pytest.raises(OSError) as ei:
        fn(*args)
    return ei.value.errno


def test_layout_and_sizes(fz: InprocFuse) -> None:
    fz.engine.create_volume("v1", 64 * MiB)
    fz.engine.create_vpool("other")
    fz.engine.create_volume("w1", 8 * MiB, vpool="other")
    assert sorted(os.listdir(fz.mnt)) == ["default", "other"]
    assert sorted(os.listdir(fz.pool)) == [".snapshots", "v1.raw"]
    assert os.listdir(fz.mnt / "other") == [".snapshots", "w1.raw"]
    st = os.stat(fz.pool / "v1.raw")
    assert st.st_size == 64 * MiB and (st.st_mode & 0o170000) == 0o100000
    assert os.path.isdir(fz.pool / ".snapshots" / "v1")
    # A volume made through another door appears at once; one deleted there disappears.
    fz.engine.create_volume("v2", 4 * MiB)
    assert os.path.getsize(fz.pool / "v2.raw") == 4 * MiB
    fz.engine.delete_volume("v2")
    assert not os.path.exists(fz.pool / "v2.raw")
    sv = os.statvfs(fz.pool)
    usage = fz.engine.store.usage()
    assert sv.f_frsize == 4096 and abs(sv.f_blocks * sv.f_frsize - usage["capacity"]) < 4096
    assert sv.f_namemax == 204


def test_create_by_truncate_resize_and_bad_sizes(fz: InprocFuse) -> None:
    p = fz.pool / "new.raw"
    p.touch()                                  # a placeholder: zero length, not a volume yet
    assert p.stat().st_size == 0 and "new" not in fz.engine.volumes
    os.truncate(p, 10 << 30)                   # creates the volume (thin)
    assert fz.engine.volume("new").size == 10 << 30 and p.stat().st_size == 10 << 30
    os.truncate(p, 12 << 30)                   # resize
    assert fz.engine.volume("new").size == 12 << 30
    assert oserr(os.truncate, p, 5000) == errno.EINVAL          # not a multiple of 512
    with open(p, "r+b") as f:
        f.seek(8 * MiB)
        f.write(b"x" * 4096)
    os.truncate(p, 8 * MiB + 512)              # like truncate(2): what is past the end goes
    os.truncate(p, 12 << 30)
    assert fz.engine.volume("new").read(8 * MiB, 4096) == b"x" * 512 + bytes(3584)
    fz.engine.volume("new").acquire("nbd")     # another door has it open: no shrinking
    assert oserr(os.truncate, p, 4 * MiB) == errno.EBUSY
    fz.engine.volume("new").release("nbd")
    with open(p, "wb"):                        # O_TRUNC empties it
        pass
    assert p.stat().st_size == 0 and fz.engine.volume("new").size == 0
    # create + ftruncate on the same descriptor (qemu-img create does this)
    fd = os.open(fz.pool / "q.raw", os.O_CREAT | os.O_RDWR | os.O_EXCL, 0o644)
    try:
        os.ftruncate(fd, 16 * MiB)
        os.pwrite(fd, b"hello", 4096)
        assert [str(h) for h in fz.engine.catalog.holders("q")] == [f"fuse client {fz.mnt}"]
    finally:
        os.close(fd)
    assert fz.engine.volume("q").read(4096, 5) == b"hello"
    os.unlink(fz.pool / "q.raw")       # right after close: the release may still be in flight
    # a placeholder can be removed again
    (fz.pool / "tmp.raw").touch()
    os.unlink(fz.pool / "tmp.raw")
    assert not (fz.pool / "tmp.raw").exists()


def test_names_refused(fz: InprocFuse) -> None:
    fz.engine.create_vpool("other")
    fz.engine.create_volume("taken", 4 * MiB, vpool="other")
    assert oserr(open, fz.pool / "vm.xml", "wb") == errno.EPERM          # not a volume
    assert oserr(os.mkdir, fz.pool / "sub") == errno.EPERM
    assert oserr(open, fz.pool / "bad name.raw", "wb") == errno.EINVAL
    assert oserr(open, fz.pool / ".hidden.raw", "wb") == errno.EINVAL
    assert oserr(open, fz.pool / ("x" * 201 + ".raw"), "wb") in (errno.ENAMETOOLONG,)
    assert oserr(open, fz.pool / "taken.raw", "xb") == errno.EEXIST       # names are global
    assert oserr(os.symlink, "v", fz.pool / "l.raw") == errno.EPERM
    os.mkdir(fz.mnt / "pool2")                                            # mkdir at the top: a vPool
    assert fz.engine.vpool("pool2")["name"] == "pool2"
    assert oserr(os.rmdir, fz.mnt / "pool2") == errno.EPERM


def test_rm_and_mv(fz: InprocFuse) -> None:
    fz.engine.create_vpool("other")
    v = fz.engine.create_volume("a", 4 * MiB)
    fz.engine.create_volume("b", 4 * MiB)
    with open(fz.pool / "a.raw", "rb"):
        assert oserr(os.unlink, fz.pool / "a.raw") == errno.EBUSY          # open here
        assert oserr(os.rename, fz.pool / "a.raw", fz.pool / "c.raw") == errno.EBUSY
    v.acquire("nbd")                                                       # exported elsewhere
    assert oserr(os.unlink, fz.pool / "a.raw") == errno.EBUSY
    v.release("nbd")
    assert oserr(os.rename, fz.pool / "a.raw", fz.pool / "b.raw") == errno.EEXIST
    assert oserr(os.rename, fz.pool / "a.raw", fz.mnt / "other" / "a.raw") == errno.EXDEV
    assert oserr(os.rename, fz.pool / "a.raw", fz.pool / "a.conf") == errno.EPERM
    ino = os.stat(fz.pool / "a.raw").st_ino
    os.rename(fz.pool / "a.raw", fz.pool / "c.raw")
    assert "c" in fz.engine.volumes and "a" not in fz.engine.volumes
    assert os.stat(fz.pool / "c.raw").st_ino == ino
    os.unlink(fz.pool / "c.raw")
    assert "c" not in fz.engine.volumes
    assert oserr(os.unlink, fz.pool / "c.raw") == errno.ENOENT


def test_snapshots_read_only(fz: InprocFuse) -> None:
    v = fz.engine.create_volume("v", 8 * MiB)
    v.write(0, b"A" * MiB)
    v.create_snapshot("s1")
    v.write(0, b"B" * MiB)
    v.resize(16 * MiB)
    snap = fz.pool / ".snapshots" / "v" / "s1.raw"
    assert os.listdir(fz.pool / ".snapshots" / "v") == ["s1.raw"]
    assert snap.stat().st_size == 8 * MiB and snap.stat().st_mode & 0o222 == 0
    with open(snap, "rb") as f:
        assert f.read(MiB) == b"A" * MiB
        assert [str(h) for h in fz.engine.catalog.holders("v@s1")] == [f"fuse client {fz.mnt}"]
    assert (fz.pool / "v.raw").read_bytes()[:MiB] == b"B" * MiB
    assert oserr(open, snap, "r+b") == errno.EROFS
    assert oserr(os.truncate, snap, 4 * MiB) == errno.EROFS
    assert oserr(os.unlink, snap) == errno.EROFS
    assert oserr(os.rename, snap, fz.pool / ".snapshots" / "v" / "s2.raw") == errno.EROFS
    assert not (fz.pool / ".snapshots" / "v" / "nope.raw").exists()


def test_no_caching_between_doors(fz: InprocFuse) -> None:
    v = fz.engine.create_volume("v", 8 * MiB)
    fd = os.open(fz.pool / "v.raw", os.O_RDWR)
    try:
        for i in range(3):
            v.write(0, bytes([i]) * 4096)                  # another door writes...
            assert os.pread(fd, 4096, 0) == bytes([i]) * 4096   # ...and FUSE sees it at once
            os.pwrite(fd, bytes([100 + i]) * 4096, 4096)
            assert v.read(4096, 4096) == bytes([100 + i]) * 4096
        v.resize(16 * MiB)                                  # a resize elsewhere shows at once
        assert os.fstat(fd).st_size == 16 * MiB
        # partial, unaligned I/O
        os.pwrite(fd, b"xyz", 8192 + 5)
        assert v.read(8192, 10) == b"\0" * 5 + b"xyz" + b"\0\0"
        # reads stop at the end; a write past it grows the file to a size of the size
        # rule (a multiple of 512 bytes), any other end past it is refused
        assert os.pread(fd, 8192, 16 * MiB - 4096) == b"\0" * 4096
        assert os.pread(fd, 10, 16 * MiB) == b""
        assert oserr(os.pwrite, fd, b"z" * 10, 16 * MiB) == errno.EINVAL
        assert os.pwrite(fd, b"q" * 8192, 16 * MiB - 4096) == 8192
        assert os.fstat(fd).st_size == v.size == 16 * MiB + 4096
        seq = v.synced_seq
        os.fsync(fd)
        assert v.synced_seq > seq
        os.fdatasync(fd)
    finally:
        os.close(fd)


def test_fallocate_and_seek_data_hole(fz: InprocFuse) -> None:
    v = fz.engine.create_volume("v", 16 * MiB)
    v.write(0, b"\xab" * (8 * MiB))
    fd = os.open(fz.pool / "v.raw", os.O_RDWR)
    try:
        FL_KEEP, FL_PUNCH, FL_ZERO = 1, 2, 0x10
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)

        def falloc(mode: int, off: int, n: int) -> None:
            if libc.fallocate(fd, mode, off, n) != 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e))

        falloc(FL_PUNCH | FL_KEEP, 1 * MiB, 2 * MiB)
        falloc(FL_ZERO, 4 * MiB + 100, 4096)          # unaligned: edges are written as zeros
        assert os.pread(fd, 2 * MiB, MiB) == b"\0" * (2 * MiB)
        assert os.pread(fd, 4096, 4 * MiB + 100) == b"\0" * 4096
        assert os.pread(fd, 100, 4 * MiB) == b"\xab" * 100
        assert v.read(3 * MiB, MiB) == b"\xab" * MiB
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        assert os.lseek(fd, 0, os.SEEK_HOLE) == MiB
        assert os.lseek(fd, MiB, os.SEEK_DATA) == 3 * MiB
        assert os.lseek(fd, 8 * MiB, os.SEEK_HOLE) == 8 * MiB
        assert os.lseek(fd, 10 * MiB, os.SEEK_HOLE) == 10 * MiB
        assert oserr(os.lseek, fd, 9 * MiB, os.SEEK_DATA) == errno.ENXIO
        assert oserr(os.lseek, fd, 16 * MiB, os.SEEK_HOLE) == errno.ENXIO
        assert oserr(falloc, 0x40, 0, 4096) == errno.EOPNOTSUPP     # INSERT_RANGE
        falloc(0, 0, 16 * MiB)                                      # thin: nothing to do
        falloc(0, 0, 20 * MiB)                                      # grows the volume
        assert v.size == 20 * MiB
    finally:
        os.close(fd)


def test_errors_map_to_errno(fz: InprocFuse, caplog: pytest.LogCaptureFixture) -> None:
    from ovsfs.engine.volume import sco_name
    from ovsfs.errors import NoSpace

    v = fz.engine.create_volume("v", 16 * MiB)
    v.write(0, os.urandom(8 * MiB))                 # two full SCOs
    v.sync()
    for n in sorted(v.local_scos):
        if n != v.sco_no or v.sco_fd is None:
            v.evict_sco(n)
        fz.engine.store.delete(v.ns, sco_name(n))   # lose the data on the backend too
    caplog.set_level(logging.ERROR, logger="ovsfs.fuse")
    with open(fz.pool / "v.raw", "rb") as f:
        assert oserr(f.read, 4096) == errno.EIO
    assert any("SCO" in r.getMessage() for r in caplog.records if r.name == "ovsfs.fuse")

    def full(*_a: object, **_k: object) -> None:
        raise NoSpace("write buffer full")
    v.write = full  # type: ignore[method-assign]
    v.writev = full  # type: ignore[method-assign]
    fd = os.open(fz.pool / "v.raw", os.O_WRONLY)
    try:
        assert oserr(os.pwrite, fd, b"x" * 4096, 0) == errno.ENOSPC
    finally:
        os.close(fd)


def test_many_writes_in_flight(fz: InprocFuse) -> None:
    """Concurrent writers (threads here; fio libaio in test_fuse_node) get batched and all land."""
    import threading

    v = fz.engine.create_volume("v", 64 * MiB)
    fd = os.open(fz.pool / "v.raw", os.O_RDWR)
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for i in range(64):
                off = (i * 16 + k) * 4096
                os.pwrite(fd, bytes([k + 1]) * 4096, off)
        except BaseException as e:
            errors.append(e)

    try:
        ts = [threading.Thread(target=writer, args=(k,)) for k in range(16)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors
        data = v.read(0, 64 * 16 * 4096)
        for i in range(64):
            for k in range(16):
                off = (i * 16 + k) * 4096
                assert data[off:off + 4096] == bytes([k + 1]) * 4096
        os.pwrite(fd, b"\1" * MiB, 8 * MiB)             # a large write goes through a thread
        assert v.read(8 * MiB, MiB) == b"\1" * MiB
    finally:
        os.close(fd)
