"""SIGKILL and power-cut rounds of fio (verify=crc32c over NBD) against a real daemon: nothing lost.

The short version of tools/fault_rounds.py: 2 rounds of each kind on a small volume. See that
tool for what is checked (every write before the last surely completed FLUSH is there; every
other block holds its old content or one of the round's writes, never zeros or garbage).
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest

from tools.fault_rounds import run_rounds


@pytest.mark.skipif(not shutil.which("fio") or not shutil.which("qemu-img"), reason="needs fio and qemu-img")
@pytest.mark.parametrize("kind", ["sigkill", "powercut"])
def test_fault_rounds_lose_nothing(tmp_path: Path, kind: str) -> None:
    out = io.StringIO()
    totals = run_rounds(tmp_path, rounds=2, kind=kind, size=4 << 20, fsync_every=16, seed=7, out=out)
    report = out.getvalue()
    assert totals.rounds == 2, report
    assert totals.flushed > 0, f"no FLUSH completed before the fault: nothing was checked\n{report}"
    assert totals.blocks_checked == 2 * (4 << 20) // 4096, report
    assert totals.lost == 0, report
