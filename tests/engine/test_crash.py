"""SIGKILL a process while it writes through the engine: no acknowledged write is lost."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ovsfs.engine.engine import Engine
from tests.engine.crash_writer import BATCH, CS, content_of, offset_of
from tests.engine.helpers import small_config

ROOT = Path(__file__).resolve().parents[2]


def run_writer_and_kill(state: Path, seed: int, acks_wanted: int) -> int:
    proc = subprocess.Popen([sys.executable, "-m", "tests.engine.crash_writer", str(state), str(seed)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    last = -1
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while last < acks_wanted and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            last = int(line.split()[1])
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # Acks already in the pipe when the process died were acknowledged too.
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("ack"):
                last = int(line.split()[1])
    assert last >= 0, "the writer acknowledged nothing"
    return last


@pytest.mark.parametrize("round_", range(3))
def test_sigkill_loses_no_acknowledged_write(tmp_path: Path, round_: int) -> None:
    seed = 1000 + round_
    total_last = -1
    rnd = random.Random(seed)
    # Kill it several times on the same state: recovery after recovery must hold too.
    for kill in range(2):
        last = run_writer_and_kill(tmp_path, seed + kill * 7919, rnd.randrange(200, 3000))
        eng = Engine(small_config(tmp_path, sco_clusters=64, write_buffer_size=64 << 20))
        eng.open()
        try:
            vol = eng.volume("v")
            # Newest acknowledged write per offset, and which later (unacknowledged) ones may have landed.
            newest: dict[int, int] = {}
            for i in range(last + 1):
                newest[offset_of(seed + kill * 7919, i)] = i
            maybe: dict[int, set[int]] = {}
            for i in range(last + 1, last + 1 + 2 * BATCH):
                maybe.setdefault(offset_of(seed + kill * 7919, i), set()).add(i)
            for off, i in newest.items():
                got = vol.read(off, CS)
                allowed = {content_of(j) for j in maybe.get(off, set())} | {content_of(i)}
                assert got in allowed, f"offset {off}: acknowledged write {i} lost after SIGKILL"
            total_last = max(total_last, last)
        finally:
            eng.close()
        # The next round writes a new schedule over the recovered state; previous offsets
        # may be overwritten, so each round checks its own schedule only.
    assert total_last > 0
