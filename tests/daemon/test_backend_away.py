"""A backend that goes away for a while (issue 9): the daemon's ASD processes are stopped
with SIGSTOP (by PID, from the daemon's own log of the ASDs it started) and continued with
SIGCONT. Writes over NBD (qemu-io) go on into the local write buffer until it is full,
then wait; `ovsfs status` answers and names the volume whose uploads fail; once the ASDs
are back the uploads resume and every acknowledged write reads back. A SIGTERM while
the ASDs are stopped finishes within engine.stop_timeout (plus slack), and after a
restart every acknowledged, flushed write is there and the backlog uploads.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import Daemon

MiB = 1 << 20
STOP_TIMEOUT = 6.0
CONFIG = {
    # 1 MiB SCOs, an 8 MiB write buffer: writers wait after a few MiB while the backend is away.
    "engine": {"sco_clusters": 256, "tlog_scos": 2, "write_buffer_size": 8 * MiB,
               "upload_retry_max_seconds": 1.0, "stop_timeout": STOP_TIMEOUT},
}

pytestmark = pytest.mark.skipif(not shutil.which("qemu-io"), reason="needs qemu-io")


def asd_pids(d: Daemon) -> list[int]:
    """The daemon's ASD processes, from its log; each checked to be the daemon's child."""
    m = re.findall(r"started \d+ ASDs: (.*)", d.log_path.read_text())
    assert m, d.log()
    pids = [int(p) for p in re.findall(r"pid (\d+)", m[-1])]
    for pid in pids:
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert ppid == d.pid, f"pid {pid} is not an ASD of daemon {d.pid}"
    return pids


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@contextmanager
def backend_away(pids: list[int]) -> Iterator[None]:
    """Every ASD stopped for the block; continued again whatever happens."""
    _signal(pids, signal.SIGSTOP)
    try:
        yield
    finally:
        _signal(pids, signal.SIGCONT)


def qemu_io(uri: str, *cmds: str, timeout: float = 120) -> None:
    args = [a for c in cmds for a in ("-c", c)]
    r = subprocess.run(["qemu-io", "-f", "raw", *args, uri], capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and "failed" not in r.stdout, r.stdout + r.stderr


def writes(first: int, count: int) -> list[str]:
    """qemu-io commands writing MiB `first`..`first+count-1`, each with its own pattern."""
    return [f"write -P {0x10 + i} {i}M 1M" for i in range(first, first + count)]


def reads(first: int, count: int) -> list[str]:
    return [f"read -P {0x10 + i} {i}M 1M" for i in range(first, first + count)]


def wb_status(d: Daemon) -> dict:
    status, st = d.api("GET", "/status", timeout=5)
    assert status == 200
    return st["engine"]["write_buffer"]


def wait_for(what: str, cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_writers_wait_while_the_backend_is_away_and_resume_when_it_returns(daemon_factory) -> None:
    d = daemon_factory(CONFIG, asds=3)
    d.cli("volume", "create", "v", "--size", "16M")
    uri = f"nbd+unix:///v?socket={d.nbd_socket}"
    pids = asd_pids(d)
    assert len(pids) == 3
    writer = None
    try:
        with backend_away(pids):
            # 12 MiB into an 8 MiB buffer that cannot empty: the writer must end up waiting.
            writer = subprocess.Popen(["qemu-io", "-f", "raw", *[a for c in writes(0, 12) for a in ("-c", c)],
                                       "-c", "flush", uri], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, stdin=subprocess.DEVNULL)
            wait_for("the write buffer to fill", lambda: wb_status(d)["pending_bytes"] > 6 * MiB, 60)
            time.sleep(1.0)
            assert writer.poll() is None, "12 MiB cannot fit an 8 MiB buffer with the backend away"
            # The node answers meanwhile (generous bound for a loaded 2-core machine) and
            # says which volume's uploads are stuck, and why, once an upload failed.
            start = time.monotonic()
            out = d.cli("status", timeout=30).stdout
            assert time.monotonic() - start < 5, "ovsfs status is slow with the backend away"
            assert "uploads:" in out and "  v:" in out, out
            wait_for("a failed upload to be reported", lambda: wb_status(d)["lanes"]["v"]["errors"] > 0, 60)
            lane = wb_status(d)["lanes"]["v"]
            assert lane["queued"] > 0 and lane["last_error"] and lane["last_error_at"] > 0
            assert writer.poll() is None
            # The human status says so too (fault review finding 6), not only --json.
            wait_for("the writer to be counted", lambda: wb_status(d).get("waiting_writers", 0) > 0, 30)
            out = d.cli("status", timeout=30).stdout
            assert re.search(r"write buffer: \S+ of 8M used, \d+ writers? waiting for room "
                             r"\(backend away\?\)", out), out
        # The ASDs are back: the writer finishes, everything reads back, the backlog goes out.
        out, _ = writer.communicate(timeout=120)
        assert writer.returncode == 0 and "failed" not in out, out
        qemu_io(uri, *reads(0, 12), "read -P 0 12M 4M")
        wait_for("the uploads to catch up", lambda: wb_status(d)["queued"] == 0, 120)
        assert "is on the backend" in d.cli("volume", "sync", "v").stdout
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.wait()


def test_sigterm_with_the_backend_away_is_bounded_and_nothing_is_lost(daemon_factory) -> None:
    d = daemon_factory(CONFIG, asds=3)
    d.cli("volume", "create", "v", "--size", "16M")
    uri = f"nbd+unix:///v?socket={d.nbd_socket}"
    qemu_io(uri, *writes(0, 3), "flush")
    d.cli("volume", "sync", "v")
    pids = asd_pids(d)
    with backend_away(pids):
        # Acknowledged and flushed while the backend is away: only the write buffer has it.
        qemu_io(uri, *writes(3, 4), "flush")
        wait_for("uploads to be queued", lambda: wb_status(d)["queued"] > 0, 30)
        start = time.monotonic()
        os.kill(d.pid, signal.SIGTERM)
        try:
            rc = d.proc.wait(STOP_TIMEOUT + 20)    # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit {STOP_TIMEOUT + 20} s after SIGTERM:\n{d.log()}") from None
        took = time.monotonic() - start
    assert rc == 0, d.log()
    # Generous: stop_timeout for the engine (local flush and commits come first), slack for
    # the backend close and for stopping the ASDs on a loaded machine.
    assert took < STOP_TIMEOUT + 10, f"SIGTERM took {took:.1f} s with the backend away"
    log = d.log(200)
    assert "uploads left in the write buffer" in log or "engine closed" in log
    # Restart with the ASDs back: everything is there and the backlog uploads.
    d.start()
    qemu_io(uri, *reads(0, 7), "read -P 0 7M 9M")
    wait_for("the backlog to upload", lambda: wb_status(d)["queued"] == 0, 120)
    assert "is on the backend" in d.cli("volume", "sync", "v").stdout
    # The backend alone now holds it all: lose the write buffer and rebuild from it.
    d.stop()
    shutil.rmtree(d.state / "wb")
    d.start()
    qemu_io(uri, *reads(0, 7), "read -P 0 7M 9M")
