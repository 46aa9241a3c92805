"""Durable directory operations shared by every layer that keeps files of its own.

A new file or directory name, a rename and an unlink are durable only once the directory
holding the name is fsynced (POSIX leaves it open; ext4 and XFS need it after a power cut).
The engine's write path has its own injectable version (`ovsfs/engine/fileio.py`); these
are for the registry, the local backend and the state directory.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or directory by path. Raises OSError."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mkdir_durable(path: Path) -> None:
    """mkdir -p, then fsync every directory it created and the parent of the topmost one.
    Raises OSError."""
    path = Path(path)
    missing: list[Path] = []
    p = path
    while not p.is_dir() and p.parent != p:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
    for d in missing:
        fsync_path(d)
    if missing:
        fsync_path(missing[-1].parent)
