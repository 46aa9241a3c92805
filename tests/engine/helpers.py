"""Helpers for engine tests: small configs, an in-process 'crash', a size-limited tmpfs,
and a FileIO that can drop what was not fsynced (a power cut at engine level)."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ovsfs.config import Config, load
from ovsfs.engine.engine import Engine
from ovsfs.engine.fileio import FileIO


def small_config(state: Path, **engine: int) -> Config:
    cfg = load(None, state)
    cfg.engine.sco_clusters = 8
    cfg.engine.tlog_scos = 2
    cfg.engine.backend_checkpoint_tlogs = 2
    cfg.engine.map_cache_pages = 4
    cfg.engine.write_buffer_size = 4 * 8 * 4096 * 4
    for k, v in engine.items():
        setattr(cfg.engine, k, v)
    return cfg


@contextmanager
def opened(cfg: Config) -> Iterator[Engine]:
    """An engine opened on cfg, closed cleanly at the end."""
    eng = Engine(cfg)
    eng.open()
    try:
        yield eng
    finally:
        eng.close()


def crash(engine: Engine) -> None:
    """Drop an engine as a SIGKILL would: no flush, no map commit, queued uploads lost.

    What the kernel already has (written files) stays; the SQLite transaction is
    rolled back, exactly as a killed process's would be.
    """
    engine._stop.set()
    with engine.wb.cv:
        engine.wb.queue.clear()
        engine.wb.stopping = True
        engine.wb.cv.notify_all()
    engine.wb.thread.join()
    for vol in engine.volumes.values():
        with vol.lock:
            vol.closed = True
            vol.deleted = True  # any upload still running for it becomes a no-op
            for fd in [vol.sco_fd, vol.tlog_fd, *vol.read_fds.values(), *vol.unsynced.values()]:
                if fd is not None:
                    os.close(fd)
            vol.sco_fd = vol.tlog_fd = None
            vol.read_fds.clear()
            vol.unsynced.clear()
            vol.map.db.close()
    engine.registry.close()


@contextmanager
def tmpfs(path: Path, size: int) -> Iterator[Path]:
    """A size-limited tmpfs (bytes) mounted at path for the test, always unmounted."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)]).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)


def fill(directory: Path, name: str = "filler") -> Path:
    """Fill the file system holding `directory` to the last byte; returns the filler file."""
    path = directory / name
    chunk = b"\xff" * (64 << 10)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (len(chunk), 4096, 512, 1):
            while True:
                try:
                    if os.write(fd, chunk[:size]) < size:
                        break
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return path


class PowerCutIO(FileIO):
    """A FileIO that remembers what was written and not yet fsynced, so a test can drop it
    (`power_cut`) the way a power loss would: fsynced bytes stay, the rest reads as zeros
    or is cut off. Files that the local backend hard-linked (and fsynced) are kept whole."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.paths: dict[int, Path] = {}
        self.pending: dict[int, list[tuple[int, int]]] = {}
        self.durable: dict[int, int] = {}   # inode -> size as of its last fsync

    def _open(self, path: Path, flags: int, mode: int) -> int:
        fd = super()._open(path, flags, mode)
        st = os.fstat(fd)
        with self.lock:
            self.paths[st.st_ino] = Path(path)
            if st.st_ino not in self.durable or flags & os.O_TRUNC:
                self.durable[st.st_ino] = st.st_size
                self.pending[st.st_ino] = []
        return fd

    def _note(self, fd: int, off: int, n: int) -> None:
        with self.lock:
            self.pending.setdefault(os.fstat(fd).st_ino, []).append((off, n))

    def _pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        n = super()._pwrite(fd, data, offset)
        self._note(fd, offset, n)
        return n

    def _write(self, fd: int, data: memoryview) -> int:
        off = os.fstat(fd).st_size
        n = super()._write(fd, data)
        self._note(fd, off, n)
        return n

    def _fsync(self, fd: int) -> None:
        super()._fsync(fd)
        st = os.fstat(fd)
        with self.lock:
            self.pending[st.st_ino] = []
            self.durable[st.st_ino] = st.st_size

    def power_cut(self) -> int:
        """Drop every un-fsynced byte from the files; returns how many bytes were dropped."""
        dropped = 0
        with self.lock:
            for ino, ranges in self.pending.items():
                path = self.paths.get(ino)
                if not ranges or path is None:
                    continue
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue   # evicted after upload
                if st.st_ino != ino or st.st_nlink > 1:
                    continue   # the backend holds a fsynced hard link of it
                keep = self.durable.get(ino, 0)
                with open(path, "r+b") as f:
                    for off, n in ranges:
                        if off < keep:
                            f.seek(off)
                            f.write(bytes(min(n, keep - off)))
                            dropped += min(n, keep - off)
                    dropped += max(0, st.st_size - keep)
                    f.truncate(keep)
            self.pending.clear()
        return dropped

