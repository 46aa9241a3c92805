"""Test disk images: random data, holes and explicit zeros at chosen places."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path
from typing import Sequence


def make_image(path: Path, size: int, data: Sequence[tuple[int, int]] = (),
               zeros: Sequence[tuple[int, int]] = (), seed: int = 1) -> Path:
    """A sparse file of `size` bytes: random bytes at `data` ranges, written zeros at `zeros`.

    Everything else is a hole.
    """
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in zeros:
            os.pwrite(f.fileno(), bytes(n), off)
        for off, n in data:
            os.pwrite(f.fileno(), rnd.randbytes(n), off)
    return path


def same(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got: {stderr!r}"
    assert lines[0].startswith("ovsfs: error: "), lines[0]
    return lines[0]
