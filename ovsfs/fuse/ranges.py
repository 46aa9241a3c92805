"""Byte-range operations of the vPool filesystem: fallocate, SEEK_DATA / SEEK_HOLE (both
reached through lowlevel.py, as pyfuse3 lacks them), on volume handles through the
door adapter.

A mixin of fs.VpoolFS: it uses self.tree, self._call, self._run, self._open_handle,
self._truncate and self.mtimes.
"""

from __future__ import annotations

import errno
import logging
import time
from typing import Any

from ovsfs.doors.adapter import EXTENTS, TRIM, ZEROES, Op
from ovsfs.fuse.tree import fail

log = logging.getLogger("ovsfs.fuse")

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
SEEK_DATA, SEEK_HOLE = 3, 4
SEEK_WINDOW = 1 << 30     # extents are scanned a GiB at a time


class RangeOps:
    tree: Any
    mtimes: dict[int, int]
    _call: Any
    _run: Any
    _open_handle: Any
    _truncate: Any

    def _file(self, ino: int) -> tuple[str | None, str | None, int]:
        """(handle name "VOL" / "VOL@SNAP" or None for a placeholder, snapshot, size)."""
        key = self.tree.inodes.key(ino)
        if key[0] == "vol":
            vol = self.tree.by_ns(key[1])
            return vol["name"], None, vol["size"]
        if key[0] == "snap":
            vol = self.tree.by_ns(key[1])
            return f"{vol['name']}@{key[2]}", key[2], self.tree.snapshot(vol, key[2])["size"]
        if key[0] in ("pending", "gone"):
            return None, None, 0
        raise fail(errno.EISDIR)

    async def fallocate(self, ino: int, mode: int, off: int, length: int) -> None:
        what = f"fallocate mode {mode:#x} {off}+{length}"
        name, snap, size = await self._call(what, self._file, ino)
        if snap is not None:
            raise fail(errno.EROFS)
        if off < 0 or length <= 0:
            raise fail(errno.EINVAL)
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise fail(errno.EOPNOTSUPP)
        end = min(off + length, size)
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) and name is not None and off < end:
            h = await self._call(what, self._open_handle, name)
            try:
                kind = TRIM if mode & FALLOC_FL_PUNCH_HOLE else ZEROES
                await self._run(what, h, [Op(kind, off, end - off)])
            finally:
                await self._call(what, h.close)
            self.mtimes[ino] = time.time_ns()
        # Plain allocation: volumes are thin, so only growing the file does anything.
        if not mode & FALLOC_FL_KEEP_SIZE and off + length > size:
            await self._call(what, lambda: self._truncate(ino, self.tree.inodes.key(ino), off + length,
                                                         why="fallocate"))

    async def lseek(self, ino: int, off: int, whence: int) -> int:
        if whence not in (SEEK_DATA, SEEK_HOLE):
            raise fail(errno.EINVAL)
        name, _snap, size = await self._call("lseek", self._file, ino)
        if off < 0 or off >= size or name is None:
            raise fail(errno.ENXIO)
        h = await self._call("lseek", self._open_handle, name, True)
        try:
            pos = off
            while pos < size:
                n = min(SEEK_WINDOW, size - pos)
                ops = await self._run("lseek", h, [Op(EXTENTS, pos, n)])
                for start, _length, allocated in ops[0].result:
                    if allocated == (whence == SEEK_DATA):
                        return max(start, off)
                pos += n
        finally:
            await self._call("lseek", h.close)
        if whence == SEEK_DATA:
            raise fail(errno.ENXIO)
        return size
