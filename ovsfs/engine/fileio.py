"""Checked writes to the files the engine depends on (SCOs, TLogs, their directories).

Every write, fsync and directory creation of the local write path goes through one
`FileIO` object, so that:

- a short write is never taken for a whole one (the loop writes the rest, and the
  kernel's ENOSPC on the rest is what reaches the caller);
- ENOSPC / EDQUOT become `NoSpace` (the client may retry once space returns) and any
  other OSError a `LocalIOError`;
- a failed fsync is a `FsyncError`: the caller must never retry it and call the data
  durable (the kernel may already have dropped the dirty pages: "fsyncgate");
- tests inject faults at this layer by subclassing and overriding the one-syscall
  primitives `_open`, `_write`, `_pwrite`, `_ftruncate`, `_fsync` (no monkeypatching).

Each volume holds one (`Volume.fio`); replace it to inject faults into that volume.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Callable, TypeVar

from ovsfs.errors import NoSpace, OvsfsError

T = TypeVar("T")

_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class LocalIOError(OvsfsError):
    """A write-buffer file operation failed (not for lack of space)."""

    errno = errno.EIO
    http_status = 500


class FsyncError(LocalIOError):
    """fsync (of a file or directory) failed: what it covered may be lost."""


class VolumeFailed(OvsfsError):
    """The volume stopped taking writes and flushes after a failed fsync or an
    unrecoverable local write error; reopening it (a restart) replays what is on disk."""

    errno = errno.EIO
    http_status = 503


class FileIO:
    """Checked file operations. All sizes and offsets are in bytes."""

    # ---- primitives: one system call each; fault-injecting subclasses override these ----

    def _open(self, path: Path, flags: int, mode: int) -> int:
        return os.open(path, flags, mode)

    def _write(self, fd: int, data: memoryview) -> int:
        return os.write(fd, data)

    def _pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def _ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def _fsync(self, fd: int) -> None:
        os.fsync(fd)

    # ---- checked operations ----------------------------------------------------------------

    @staticmethod
    def _checked(what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except OSError as e:
            if e.errno in _SPACE_ERRNOS:
                raise NoSpace(f"{what}: no space left on the write-buffer disk") from e
            raise LocalIOError(f"{what}: {e.strerror or e}") from e

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        """os.open; raises NoSpace or LocalIOError."""
        return self._checked(f"open {path}", lambda: self._open(path, flags, mode))

    def pwrite_all(self, fd: int, data: bytes | bytearray | memoryview, offset: int, what: str = "") -> None:
        """Write all of `data` at `offset`, looping on short writes.

        Raises NoSpace (ENOSPC/EDQUOT) or LocalIOError; then part of the range may hold
        new bytes, so the caller must not point at any of it."""
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            n = self._checked(f"write {what}", lambda: self._pwrite(fd, view[done:], offset + done))
            if n <= 0:
                raise LocalIOError(f"write {what}: the kernel wrote nothing")
            done += n

    def append_all(self, fd: int, data: bytes | bytearray | memoryview, what: str = "") -> None:
        """Append all of `data` to an O_APPEND file, looping on short writes.

        Raises NoSpace or LocalIOError; the caller truncates back to its last whole record."""
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            n = self._checked(f"append {what}", lambda: self._write(fd, view[done:]))
            if n <= 0:
                raise LocalIOError(f"append {what}: the kernel wrote nothing")
            done += n

    def truncate(self, fd: int, size: int, what: str = "") -> None:
        """ftruncate; raises LocalIOError (or NoSpace)."""
        self._checked(f"truncate {what}", lambda: self._ftruncate(fd, size))

    def fsync(self, fd: int, what: str = "") -> None:
        """fsync; any failure is a FsyncError (never NoSpace: the data may be gone)."""
        try:
            self._fsync(fd)
        except OSError as e:
            raise FsyncError(f"fsync {what}: {e.strerror or e}") from e

    def fsync_dir(self, path: Path) -> None:
        """fsync a directory, making the names created in it durable. Raises FsyncError."""
        try:
            fd = self._open(path, os.O_RDONLY | os.O_DIRECTORY, 0)
        except OSError as e:
            raise FsyncError(f"open directory {path}: {e.strerror or e}") from e
        try:
            self.fsync(fd, str(path))
        finally:
            os.close(fd)

    def mkdir_durable(self, path: Path) -> None:
        """mkdir -p, then fsync every directory created and the parent of the topmost one,
        so the new directories survive a power cut. Raises NoSpace, LocalIOError, FsyncError."""
        path = Path(path)
        missing: list[Path] = []
        p = path
        while not p.exists():
            missing.append(p)
            if p.parent == p:
                break
            p = p.parent
        if not missing:
            return
        for d in reversed(missing):
            self._checked(f"mkdir {d}", lambda d=d: d.mkdir(exist_ok=True))  # type: ignore[misc]
        for d in missing:
            self.fsync_dir(d)
        self.fsync_dir(missing[-1].parent)
