"""Issue 10 items 5 and 6 at the FUSE door: one volume namespace, and the vPool directory
behaves as a directory of sparse raw images for the tools operators use (cp, dd,
qemu-img convert, truncate, fallocate), checked with the real tools on a real mount and
compared with cmp. (rsync is not installed on this machine: `rsync --inplace` is not tested.)"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from ovsfs.errors import AlreadyExists

try:
    from fuse_helpers import InprocFuse, mounts_under, run
except ImportError:  # tests/doors became a package
    from tests.doors.fuse_helpers import InprocFuse, mounts_under, run

KiB, MiB = 1 << 10, 1 << 20
ODD = 1000448            # the image: a multiple of 512, not of the 4 KiB cluster


@pytest.fixture
def fz(tmp_path: Path):
    f = InprocFuse(tmp_path / "state").start()
    yield f
    f.stop()
    assert not mounts_under(tmp_path)


def image(path: Path, size: int, holes: bool = True, seed: int = 0) -> Path:
    """A raw image of `size` bytes: random data, with zero runs (holes) in between."""
    rng = np.random.default_rng(seed)
    buf = rng.integers(0, 256, size, dtype=np.uint8)
    if holes:
        for start in range(64 * KiB, size, 256 * KiB):
            buf[start:start + 128 * KiB] = 0
    path.write_bytes(buf.tobytes())
    return path


def oserr(fn, *args) -> int:
    with pytest.raises(OSError) as ei:
        fn(*args)
    return ei.value.errno


# ---- one namespace ------------------------------------------------------------------------

def test_placeholder_is_a_reservation_one_name_one_object(fz: InprocFuse) -> None:
    p = fz.pool / "img.raw"
    p.touch()                                   # what a failed cp leaves behind
    with pytest.raises(AlreadyExists):
        fz.engine.create_volume("img", 4 * MiB)  # the CLI sees the name as taken
    assert [r["name"] for r in fz.engine.reservations("default")] == ["img"]
    assert sorted(os.listdir(fz.pool)) == [".snapshots", "img.raw"]   # listed once
    fz.engine.create_volume("other", 4 * MiB)
    assert oserr(os.rename, p, fz.pool / "other.raw") == errno.EEXIST
    with pytest.raises(AlreadyExists):
        fz.engine.rename_volume("other", "img")
    fz.engine.volume("other").create_snapshot("s")
    with pytest.raises(AlreadyExists):
        fz.engine.clone_volume("other", "s", "img")
    os.unlink(p)                                # rm of the placeholder drops the reservation only
    assert fz.engine.reservations("default") == []
    assert "other" in fz.engine.volumes
    fz.engine.create_volume("img", 4 * MiB)     # now the name is free
    assert sorted(os.listdir(fz.pool)) == [".snapshots", "img.raw", "other.raw"]


def test_unlinked_open_file_never_becomes_a_volume(fz: InprocFuse, caplog: pytest.LogCaptureFixture) -> None:
    p = fz.pool / "gone.raw"
    fd = os.open(p, os.O_CREAT | os.O_RDWR | os.O_EXCL, 0o644)
    try:
        os.unlink(p)
        assert fz.engine.reservations() == []
        with caplog.at_level(logging.WARNING, logger="ovsfs.fuse"):
            assert oserr(os.ftruncate, fd, 4 * MiB) == errno.ENOENT
            assert oserr(os.pwrite, fd, b"x" * 4096, 0) == errno.ENOENT
        assert sum("removed before it became a volume" in r.getMessage() for r in caplog.records) == 2
    finally:
        os.close(fd)
    assert "gone" not in fz.engine.volumes and not p.exists()


# ---- sizes: one rule ------------------------------------------------------------------------

def test_truncate_keeps_any_multiple_of_512_and_refuses_the_rest(fz: InprocFuse,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    p = fz.pool / "t.raw"
    run(["truncate", "-s", str(ODD), str(p)])
    assert p.stat().st_size == ODD and fz.engine.volume("t").size == ODD
    run(["truncate", "-s", str(ODD + 512), str(p)])
    assert fz.engine.volume("t").size == ODD + 512
    with caplog.at_level(logging.WARNING, logger="ovsfs.fuse"):
        assert oserr(os.truncate, p, ODD + 1) == errno.EINVAL
    assert sum("a size is a multiple of 512 bytes" in r.getMessage() for r in caplog.records) == 1
    assert p.stat().st_size == ODD + 512
    run(["fallocate", "-l", str(2 * ODD), str(fz.pool / "f.raw")])
    assert fz.engine.volume("f").size == 2 * ODD


# ---- a directory of sparse raw images -----------------------------------------------------

@pytest.mark.parametrize("args", [[], ["--sparse=always"]], ids=["plain", "sparse"])
def test_cp_into_and_onto(fz: InprocFuse, tmp_path: Path, args: list[str]) -> None:
    src = image(tmp_path / "img.raw", ODD)
    run(["cp", *args, str(src), str(fz.pool) + "/"])
    dst = fz.pool / "img.raw"
    assert fz.engine.volume("img").size == ODD
    run(["cmp", str(src), str(dst)])
    # cp onto the existing volume (O_TRUNC) with a smaller image: it now holds that one.
    small = image(tmp_path / "small.raw", 300 * KiB, seed=1)
    run(["cp", *args, str(small), str(dst)])
    assert dst.stat().st_size == 300 * KiB
    run(["cmp", str(small), str(dst)])


def test_dd_with_and_without_notrunc(fz: InprocFuse, tmp_path: Path) -> None:
    src = image(tmp_path / "img.raw", ODD, seed=2)
    dst = fz.pool / "x.raw"
    run(["dd", f"if={src}", f"of={dst}", "bs=64K", "status=none"])
    run(["cmp", str(src), str(dst)])
    assert fz.engine.volume("x").size == ODD
    # notrunc: rewrite the first 128 KiB in place, the size stays
    patch = image(tmp_path / "patch.raw", 128 * KiB, holes=False, seed=3)
    run(["dd", f"if={patch}", f"of={dst}", "bs=1M", "conv=notrunc", "status=none"])
    want = patch.read_bytes() + src.read_bytes()[128 * KiB:]
    assert dst.stat().st_size == ODD and dst.read_bytes() == want
    # without notrunc, at an offset: truncated there, then grown by the write
    run(["dd", f"if={patch}", f"of={dst}", "bs=4K", "seek=10", "status=none"])
    assert dst.stat().st_size == 40 * KiB + 128 * KiB
    assert dst.read_bytes() == want[:40 * KiB] + patch.read_bytes()


def test_rsync_inplace_into_and_over(fz: InprocFuse, tmp_path: Path) -> None:
    """rsync --inplace writes a new image, then rewrites only the blocks that changed."""
    src = image(tmp_path / "img.raw", ODD, seed=6)
    dst = fz.pool / "r.raw"
    run(["rsync", "--times", "--inplace", str(src), str(dst)])
    run(["cmp", str(src), str(dst)])
    assert fz.engine.volume("r").size == ODD
    assert dst.stat().st_mtime_ns // 10**9 == src.stat().st_mtime_ns // 10**9   # rsync set it
    changed = bytearray(src.read_bytes())
    changed[64 * KiB:64 * KiB + 4096] = os.urandom(4096)
    src.write_bytes(changed)
    os.utime(src, ns=(dst.stat().st_atime_ns, dst.stat().st_mtime_ns + 10**10))   # edited later
    run(["rsync", "--times", "--inplace", "--no-whole-file", str(src), str(dst)])
    assert dst.stat().st_mtime_ns == src.stat().st_mtime_ns   # rsync's quick check reads it back
    run(["cmp", str(src), str(dst)])


def test_qemu_img_convert_and_snapshots_keep_theirs(fz: InprocFuse, tmp_path: Path) -> None:
    src = image(tmp_path / "img.raw", ODD, seed=4)
    dst = fz.pool / "q.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", str(src), str(dst)])
    run(["cmp", str(src), str(dst)])
    assert fz.engine.volume("q").size == ODD
    fz.engine.volume("q").create_snapshot("before")
    with open(dst, "wb"):                       # O_TRUNC empties the volume ...
        pass
    assert dst.stat().st_size == 0
    run(["cmp", str(src), str(fz.pool / ".snapshots" / "q" / "before.raw")])   # ... not its snapshot


def test_write_past_the_end_grows_like_a_sparse_file(fz: InprocFuse, caplog: pytest.LogCaptureFixture) -> None:
    p = fz.pool / "g.raw"
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, b"a" * 1024, 8 * MiB)      # a new file: the write makes the volume
        assert os.fstat(fd).st_size == 8 * MiB + 1024
        os.pwrite(fd, b"b" * 512, 16 * MiB)      # past the end: grows, a hole between
        assert os.fstat(fd).st_size == 16 * MiB + 512
        assert os.pread(fd, 2048, 8 * MiB) == b"a" * 1024 + bytes(1024)
        assert os.lseek(fd, 8 * MiB + 4096, os.SEEK_DATA) == 16 * MiB - (16 * MiB % 4096)
        with caplog.at_level(logging.WARNING, logger="ovsfs.fuse"):
            assert oserr(os.pwrite, fd, b"c" * 100, 16 * MiB + 512) == errno.EINVAL
        assert sum("a size is a multiple of 512 bytes" in r.getMessage() for r in caplog.records) == 1
        assert os.fstat(fd).st_size == 16 * MiB + 512
        os.pwrite(fd, b"c" * 100, 100)           # inside the file: any size is fine
    finally:
        os.close(fd)
    assert fz.engine.volume("g").read(0, 4096)[100:200] == b"c" * 100


def test_unmount_ends_reservations_and_holds(tmp_path: Path) -> None:
    f = InprocFuse(tmp_path / "state").start()
    try:
        (f.pool / "p.raw").touch()
        f.engine.create_volume("v", 4 * MiB)
        fd = os.open(f.pool / "v.raw", os.O_RDWR)
        assert [r["name"] for r in f.engine.reservations()] == ["p"]
        assert f.engine.catalog.holders("v")
        engine = f.engine
        f.engine = None                      # stop() below must not close it: it is checked after
        f.stop()
        f.engine = engine
        assert engine.reservations() == [] and engine.catalog.holders("v") == []
        engine.delete_volume("v")            # nothing holds it any more
        with pytest.raises(OSError):         # the mount is gone under the descriptor
            os.close(fd)
    finally:
        if f.engine is not None:
            f.engine.close()
    assert not mounts_under(tmp_path)


def test_every_refusal_of_a_directory_change_is_one_log_line(fz: InprocFuse, caplog: pytest.LogCaptureFixture) -> None:
    """rm of a volume in use, a name that is not NAME.raw, mv onto an existing volume: each
    gets its errno and exactly one warning saying what was refused."""
    a, b = fz.pool / "a.raw", fz.pool / "b.raw"
    for p in (a, b):
        with open(p, "wb") as f:
            f.truncate(64 * KiB)
    fd = os.open(a, os.O_RDWR)
    try:
        with caplog.at_level(logging.WARNING, logger="ovsfs.fuse"):
            assert oserr(os.unlink, a) == errno.EBUSY
            assert oserr(os.open, fz.pool / ".a.raw.tmp", os.O_CREAT | os.O_WRONLY) == errno.EPERM
            assert oserr(os.rename, b, a) == errno.EEXIST
    finally:
        os.close(fd)
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 3, refused
    assert refused[0].startswith("unlink") and "EBUSY" in refused[0]
    assert refused[1].startswith("create") and "EPERM" in refused[1]
    assert refused[2].startswith("rename") and "EEXIST" in refused[2]
