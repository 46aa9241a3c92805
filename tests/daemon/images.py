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


def start_import(ovsfs: str, state: Path, volume: str, path: Path, mib: int = 256) -> subprocess.Popen[str]:
    """`ovsfs volume import` of a new file of `mib` MiB of random bytes, returned once the
    job is running (its first progress line is read). The caller waits for or kills it."""
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    cli = subprocess.Popen([ovsfs, "--state", str(state), "volume", "import", volume, str(path)],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert cli.stderr is not None
    line = cli.stderr.readline()
    if "% (" not in line:
        cli.kill()
        cli.wait()
        raise AssertionError(f"the import did not start: {line}")
    return cli
