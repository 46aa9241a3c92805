"""The FUSE door of a running node, driven by real tools: dd, cmp, truncate, rm, mv,
qemu-img, fio (psync and libaio, verify=crc32c), qemu-io over NBD for cross-door checks,
SIGKILL + restart (stale mount cleared, data kept) and SIGTERM (nothing left mounted).

The node is the daemon (tests/conftest.py `daemon_factory`, fuse enabled) once it exists;
until then `python -m ovsfs.fuse STATE --nbd`, which runs the same serve() calls.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

try:
    from fuse_helpers import SYSTEM_ENV, DaemonNode, FuseNode, mounts_under, run
except ImportError:  # tests/doors became a package
    from tests.doors.fuse_helpers import SYSTEM_ENV, DaemonNode, FuseNode, mounts_under, run

MiB = 1 << 20


def have(tool: str) -> bool:
    return shutil.which(tool, path=SYSTEM_ENV["PATH"]) is not None


def nbd_available() -> bool:
    try:
        import ovsfs.nbd.server  # noqa: F401
    except Exception:
        return False
    return True


@pytest.fixture
def node(request: pytest.FixtureRequest, tmp_path: Path):
    factory = None
    if not os.environ.get("OVSFS_FUSE_STANDALONE"):   # =1: test serve() without the daemon
        try:
            import ovsfs.daemon  # noqa: F401
            factory = request.getfixturevalue("daemon_factory")
        except Exception:
            factory = None
    if factory is not None:
        n = DaemonNode(factory({"fuse": {"enabled": True}}))
        if not mounts_under(n.mnt):
            n.start()
    else:
        n = FuseNode(tmp_path / "state", nbd=nbd_available())
        n.start()
    yield n
    n.close()
    assert not mounts_under(tmp_path), "a mount outlived the test"


def test_dd_cmp_truncate_rm_mv(node, tmp_path: Path) -> None:
    pool = node.mnt / "default"
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(8 * MiB))
    run(["truncate", "-s", "64M", str(pool / "v1.raw")])
    assert os.path.getsize(pool / "v1.raw") == 64 * MiB
    run(["dd", f"if={src}", f"of={pool / 'v1.raw'}", "bs=1M", "seek=3", "conv=notrunc,fsync", "status=none"])
    run(["cmp", "-i", f"0:{3 * MiB}", "-n", str(8 * MiB), str(src), str(pool / "v1.raw")])
    run(["cmp", "-n", str(3 * MiB), str(pool / "v1.raw"), "/dev/zero"])
    run(["truncate", "-s", "128M", str(pool / "v1.raw")])
    assert os.path.getsize(pool / "v1.raw") == 128 * MiB
    r = run(["truncate", "-s", "1000", str(pool / "v1.raw")], check=False)
    assert r.returncode != 0 and "Invalid argument" in r.stderr
    r = run(["touch", str(pool / "vm.conf")], check=False)
    assert r.returncode != 0 and "not permitted" in r.stderr
    run(["mv", str(pool / "v1.raw"), str(pool / "v2.raw")])
    assert sorted(os.listdir(pool)) == [".snapshots", "v2.raw"]
    run(["cmp", "-i", f"0:{3 * MiB}", "-n", str(8 * MiB), str(src), str(pool / "v2.raw")])
    run(["rm", str(pool / "v2.raw")])
    assert os.listdir(pool) == [".snapshots"]


@pytest.mark.skipif(not have("qemu-img"), reason="qemu-img is not installed")
def test_qemu_img(node, tmp_path: Path) -> None:
    pool = node.mnt / "default"
    img = tmp_path / "in.raw"
    with open(img, "wb") as f:
        f.truncate(32 * MiB)
        for off in (0, 5 * MiB + 512, 20 * MiB):
            f.seek(off)
            f.write(os.urandom(700_000))
    run(["qemu-img", "create", "-f", "raw", str(pool / "img.raw"), "32M"])
    info = run(["qemu-img", "info", "--output=json", str(pool / "img.raw")]).stdout
    assert '"virtual-size": 33554432' in info and '"format": "raw"' in info
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(img), str(pool / "img.raw")])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(img), str(pool / "img.raw")])
    # convert to a new file in the vPool: qemu-img creates it, sizes it, then writes
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", str(img), str(pool / "img2.raw")])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(img), str(pool / "img2.raw")])
    # and back out, sparse (SEEK_DATA / SEEK_HOLE)
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", str(pool / "img2.raw"), str(tmp_path / "out.raw")])
    run(["cmp", str(img), str(tmp_path / "out.raw")])
    assert os.stat(tmp_path / "out.raw").st_blocks * 512 < 8 * MiB


@pytest.mark.skipif(not have("fio"), reason="fio is not installed")
@pytest.mark.parametrize("engine,rw,bs,depth", [("psync", "randwrite", "4k", 1), ("libaio", "randwrite", "4k", 16),
                                                ("libaio", "write", "1M", 8)])
def test_fio_verify(node, tmp_path: Path, engine: str, rw: str, bs: str, depth: int) -> None:
    vol = node.mnt / "default" / "fio.raw"
    run(["truncate", "-s", "128M", str(vol)])
    job = ["fio", "--name=t", f"--filename={vol}", f"--ioengine={engine}", "--direct=1", f"--rw={rw}",
           f"--bs={bs}", f"--iodepth={depth}", "--size=32M", "--verify=crc32c", "--do_verify=1",
           "--verify_fatal=1", "--numjobs=1"]
    out = run(job, timeout=600, cwd=tmp_path).stdout   # fio leaves a verify state file in cwd
    assert "err= 0" in out
    # the data stays verifiable after the node restarted
    node.stop()
    assert not mounts_under(node.mnt)
    node.start()
    run(job + ["--verify_only=1"], timeout=600, cwd=tmp_path)


@pytest.mark.skipif(not have("qemu-io"), reason="qemu-io is not installed")
def test_same_bytes_through_nbd(node) -> None:
    if not nbd_available():
        pytest.skip("the NBD door (ovsfs.nbd.server) is not there yet")
    pool = node.mnt / "default"
    run(["truncate", "-s", "16M", str(pool / "x.raw")])
    uri = f"nbd+unix:///x?socket={node.nbd_socket}"
    fd = os.open(pool / "x.raw", os.O_RDWR)
    try:
        for i in range(3):
            # NBD writes, FUSE reads at once (the file stays open: no cache hides it) ...
            run(["qemu-io", "-f", "raw", "-c", f"write -P {0x10 + i} 0 1M", uri])
            assert os.pread(fd, MiB, 0) == bytes([0x10 + i]) * MiB
            # ... and FUSE writes, NBD reads at once
            os.pwrite(fd, bytes([0x20 + i]) * MiB, MiB)
            run(["qemu-io", "-f", "raw", "-c", f"read -P {0x20 + i} 1M 1M", uri])
        os.fsync(fd)
    finally:
        os.close(fd)


def test_sigkill_then_restart_remounts_and_keeps_data(node, tmp_path: Path) -> None:
    pool = node.mnt / "default"
    data = os.urandom(4 * MiB)
    run(["truncate", "-s", "16M", str(pool / "k.raw")])
    fd = os.open(pool / "k.raw", os.O_WRONLY)
    os.pwrite(fd, data, MiB)
    os.fsync(fd)
    os.close(fd)
    node.kill()
    # a dead mount: ENOTCONN until the next start clears it (or fusermount's auto-unmount did)
    if mounts_under(node.mnt):
        with pytest.raises(OSError):
            os.listdir(pool)
    node.start()
    assert len(mounts_under(node.mnt)) == 1
    with open(pool / "k.raw", "rb") as f:
        f.seek(MiB)
        assert f.read(4 * MiB) == data


def test_sigterm_unmounts(node) -> None:
    pool = node.mnt / "default"
    run(["truncate", "-s", "4M", str(pool / "t.raw")])
    f = open(pool / "t.raw", "rb")          # an open file must not keep the mount alive
    try:
        node.stop()
        assert not mounts_under(node.mnt)
        with open("/proc/mounts") as m:
            assert str(node.mnt) not in m.read()
    finally:
        try:
            f.close()                       # the mount is gone: ENOTCONN is what close may say
        except OSError:
            pass
    node.start()                            # and a clean restart mounts again
    assert os.path.getsize(pool / "t.raw") == 4 * MiB
