"""Issue 9, case 7: the node stays responsive with the backend away and 100 writers.

The daemon runs over the erasure-coded backend (local ASD processes) with a small write
buffer. The ASDs are stopped (SIGSTOP by PID), so nothing leaves the write buffer; 100
NBD connections write until their writes stop being acknowledged. Then `ovsfs status`
and FLUSH on another volume must still answer at once, and after SIGCONT every write
that was acknowledged reads back.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from ovsfs.nbd import protocol as P
from tests.nbd_pipe import Client, pump_all

KiB = 1024
WRITERS = 100
WRITES_EACH = 4          # pipelined per connection
WRITE_SIZE = 64 * KiB
STATUS_BOUND = 5.0       # seconds; the issue asks for under 1 s, printed below
FUSE_WRITERS = 2         # dd processes writing through the FUSE mount
FUSE_BYTES = 1 << 20     # each
FUSE_AT = 48 << 20       # where they write (the NBD writers use the first 25 MiB)
SIGTERM_AT = 32 << 20    # where the writers of the SIGTERM part write


def asd_pids(log_path: Path) -> list[int]:
    m = re.findall(r"started \d+ ASDs: (.*)", log_path.read_text())
    assert m, "the daemon did not log its ASDs"
    return [int(p) for p in re.findall(r"pid (\d+)", m[-1])]


def test_status_and_flush_answer_with_the_backend_away_and_100_writers(daemon_factory) -> None:
    d = daemon_factory({"engine": {"sco_clusters": 64, "write_buffer_size": 1 << 20},
                        "fuse": {"enabled": True}}, asds=3)
    try:
        _run_writers_with_the_backend_away(d)
        _sigterm_with_the_backend_away(d)
    finally:
        if d.running():
            d.teardown()
        if _mounted(d.state / "mnt"):   # the daemon unmounts on SIGTERM; never leave one behind
            subprocess.run(["fusermount3", "-u", "-z", str(d.state / "mnt")], check=False)


def _mounted(path: Path) -> bool:
    """From /proc/mounts only: a stat of a mount whose daemon does not answer would hang."""
    root = os.path.join(os.path.realpath(path.parent), path.name)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == root for line in f)


def _run_writers_with_the_backend_away(d) -> None:  # noqa: ANN001 - tests/conftest.py Daemon
    d.cli("volume", "create", "w", "--size", "64M")
    d.cli("volume", "create", "other", "--size", "16M")
    other = Client(d.nbd_socket, "other")
    assert other.call(P.CMD_WRITE, 0, 4096, b"o" * 4096)[0] == 0
    writers = [Client(d.nbd_socket, "w") for _ in range(WRITERS)]
    cookie = 0
    for i, c in enumerate(writers):
        for j in range(WRITES_EACH):
            cookie += 1
            off = (i * WRITES_EACH + j) * WRITE_SIZE
            c.queue_write(cookie, off, bytes([cookie % 251 + 1]) * WRITE_SIZE)
    pattern = os.urandom(FUSE_BYTES)
    src = d.base / "pattern.bin"
    src.write_bytes(pattern)
    pids = asd_pids(d.log_path)
    dds: list[subprocess.Popen[bytes]] = []
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        # FUSE writers too (they wait for room in the door's event loop, fuse/batch.py).
        for k in range(FUSE_WRITERS):
            seek = (FUSE_AT + k * FUSE_BYTES) // WRITE_SIZE
            dds.append(subprocess.Popen(
                ["dd", f"if={src}", f"of={d.state / 'mnt' / 'default' / 'w.raw'}", f"bs={WRITE_SIZE}",
                 f"seek={seek}", "conv=notrunc", "status=none"],
                stdin=subprocess.DEVNULL, stderr=subprocess.PIPE))
        pump_all(writers, 60, until_quiet=2.0)
        acked = sum(len(c.acked) for c in writers)
        total = WRITERS * WRITES_EACH
        print(f"backend away: {acked} of {total} writes acknowledged before writers blocked")
        assert acked < total, "the write buffer should have filled up"

        t0 = time.monotonic()
        status, st = d.api("GET", "/status", timeout=15)
        t_api = time.monotonic() - t0
        t0 = time.monotonic()
        cli = d.cli_json("status")
        t_cli = time.monotonic() - t0
        t0 = time.monotonic()
        err, _ = other.call(P.CMD_FLUSH)
        t_flush = time.monotonic() - t0
        t0 = time.monotonic()
        err_read, data = other.call(P.CMD_READ, 0, 4096)
        t_read = time.monotonic() - t0
        t0 = time.monotonic()
        ls = subprocess.run(["ls", "-l", str(d.state / "mnt" / "default")], capture_output=True,
                            text=True, timeout=30, stdin=subprocess.DEVNULL)
        t_ls = time.monotonic() - t0
        print(f"with the backend away and {WRITERS} writers waiting: GET /status {t_api:.3f} s, "
              f"`ovsfs status` {t_cli:.3f} s (process start included), FLUSH on another volume "
              f"{t_flush:.3f} s, a read there {t_read:.3f} s, `ls -l` on the mount {t_ls:.3f} s")
        assert ls.returncode == 0 and "w.raw" in ls.stdout and "other.raw" in ls.stdout, ls.stderr
        assert t_ls < STATUS_BOUND
        assert status == 200 and cli["backend"] == "asd"
        assert err == 0 and err_read == 0 and data == b"o" * 4096
        assert t_api < STATUS_BOUND and t_flush < STATUS_BOUND and t_read < STATUS_BOUND
        assert t_cli < 2 * STATUS_BOUND
        assert all(p.poll() is None for p in dds), "FUSE writers should wait for room too"
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        for p in dds:
            try:
                p.wait(120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    assert [p.returncode for p in dds] == [0] * FUSE_WRITERS, [p.stderr.read() for p in dds if p.stderr]

    # The backend is back: every write completes, and every acknowledged one reads back.
    pump_all(writers, 120, until_quiet=20.0)
    errors = {k: v for c in writers for k, v in c.acked.items() if v}
    assert not errors, f"writes failed: {errors}"
    assert sum(len(c.acked) for c in writers) == WRITERS * WRITES_EACH
    reader = Client(d.nbd_socket, "w")
    for k in range(FUSE_WRITERS):
        assert reader.call(P.CMD_READ, FUSE_AT + k * FUSE_BYTES, FUSE_BYTES) == (0, pattern), \
            f"FUSE writer {k}: data lost"
    for c in writers:
        for ck, (off, data) in c.sent.items():
            assert reader.call(P.CMD_READ, off, len(data)) == (0, data), f"write {ck} at {off} lost"
    for c in [reader, other, *writers]:
        c.s.close()


def _sigterm_with_the_backend_away(d) -> None:  # noqa: ANN001 - tests/conftest.py Daemon
    """SIGTERM while writers (NBD and FUSE) wait for room: the doors stop at once (their
    waiting writers are not acknowledged, and no worker thread holds them up); once the backend is back the
    daemon closes the engine and exits 0, and every acknowledged write is there after a
    restart."""
    writers = [Client(d.nbd_socket, "w") for _ in range(20)]
    cookie = 0
    for i, c in enumerate(writers):
        for j in range(2):
            cookie += 1
            c.queue_write(cookie, SIGTERM_AT + (i * 2 + j) * WRITE_SIZE, bytes([cookie % 251 + 1]) * WRITE_SIZE)
    mnt = d.state / "mnt"
    pids = asd_pids(d.log_path)
    dd: subprocess.Popen[bytes] | None = None
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        pump_all(writers, 30, until_quiet=2.0)
        dd = subprocess.Popen(["dd", "if=/dev/zero", f"of={mnt / 'default' / 'w.raw'}", f"bs={WRITE_SIZE}",
                               f"seek={(SIGTERM_AT + (8 << 20)) // WRITE_SIZE}", "count=64",
                               "conv=notrunc", "status=none"],
                              stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2.5)   # past fuse/batch.py's ROOM_PROBE: its write waits in a worker thread
        assert dd.poll() is None, "the FUSE writer should wait for room"
        acked = {ck: c.sent[ck] for c in writers for ck, err in c.acked.items() if not err}
        assert len(acked) < 40, "the write buffer should have filled up"
        os.kill(d.pid, signal.SIGTERM)
        t0 = time.monotonic()
        while (_mounted(mnt) or d.nbd_socket.exists()) and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        t_doors = time.monotonic() - t0
        print(f"SIGTERM with the backend away and writers waiting: doors stopped (unmounted, "
              f"NBD socket gone) after {t_doors:.2f} s; {len(acked)} of 40 writes acknowledged")
        assert not _mounted(mnt) and not d.nbd_socket.exists()
        assert t_doors < STATUS_BOUND
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        for c in writers:
            c.s.close()
        if dd is not None:
            try:
                dd.wait(30)             # its write fails when the mount goes
            except subprocess.TimeoutExpired:
                dd.kill()
                dd.wait()
    t0 = time.monotonic()
    assert d.proc is not None and d.proc.wait(120) == 0, d.log()
    print(f"then, the backend back, the daemon exited 0 after {time.monotonic() - t0:.2f} s")
    d.start()
    reader = Client(d.nbd_socket, "w")
    for ck, (off, data) in acked.items():
        assert reader.call(P.CMD_READ, off, len(data)) == (0, data), f"acknowledged write {ck} lost"
    reader.s.close()
    d.stop()
