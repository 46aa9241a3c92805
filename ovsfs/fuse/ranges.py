"""Byte-range operations of the vPool filesystem: fallocate, SEEK_DATA / SEEK_HOLE (both
reached through lowlevel.py, as pyfuse3 lacks them) and the inline small-write path.

A mixin of fs.VpoolFS: it uses self.tree, self._call, self._truncate and self.mtimes.
"""

from __future__ import annotations

import errno
import logging
import time
from typing import Any

from ovsfs.errors import OvsfsError, WouldBlock
from ovsfs.fuse.tree import fail

log = logging.getLogger("ovsfs.fuse")

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
SEEK_DATA, SEEK_HOLE = 3, 4
SEEK_WINDOW = 1 << 30     # extents are scanned a GiB at a time


class RangeOps:
    tree: Any
    mtimes: dict[int, int]

    def _write_inline(self, vol: Any, off: int, data: Any) -> bool:
        """A small write straight from the event loop when nothing can make it wait.

        A thread hop costs more than a small engine write; the engine's nowait call
        writes only when the volume lock is free and the write buffer has room, and
        says WouldBlock otherwise (then the caller goes through a thread). The rare
        write that seals an SCO and TLog also commits the map here (milliseconds)."""
        try:
            vol.writev([(off, data)], nowait=True)
        except WouldBlock:
            return False
        except OvsfsError as e:
            if e.errno == errno.EIO:
                log.error("write %s %d+%d: %s", vol.name, off, len(data), e)
            raise fail(e.errno) from None
        except OSError as e:
            log.error("write %s %d+%d: %s", vol.name, off, len(data), e)
            raise fail(e.errno or errno.EIO) from None
        except Exception:
            # Anything else escaping a handler would end pyfuse3's main loop: the mount.
            log.exception("write %s %d+%d failed", vol.name, off, len(data))
            raise fail(errno.EIO) from None
        return True

    def _file(self, ino: int) -> tuple[Any, str | None, int]:
        key = self.tree.inodes.key(ino)
        if key[0] == "vol":
            vol = self.tree.by_ns(key[1])
            return vol, None, vol.size
        if key[0] == "snap":
            vol = self.tree.by_ns(key[1])
            return vol, key[2], self.tree.snapshot(vol, key[2])["size"]
        if key[0] == "pending":
            return None, None, 0
        raise fail(errno.EISDIR)

    async def fallocate(self, ino: int, mode: int, off: int, length: int) -> None:
        def run() -> None:
            vol, snap, size = self._file(ino)
            if snap is not None:
                raise fail(errno.EROFS)
            if off < 0 or length <= 0:
                raise fail(errno.EINVAL)
            if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
                raise fail(errno.EOPNOTSUPP)
            end = min(off + length, size)
            if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
                if vol is not None and off < end:
                    (vol.trim if mode & FALLOC_FL_PUNCH_HOLE else vol.write_zeroes)(off, end - off)
                    self.mtimes[ino] = time.time_ns()
                if not mode & FALLOC_FL_KEEP_SIZE and off + length > size:
                    self._truncate(ino, self.tree.inodes.key(ino), off + length)
                return
            # Plain allocation: volumes are thin, so only growing the file does anything.
            if not mode & FALLOC_FL_KEEP_SIZE and off + length > size:
                self._truncate(ino, self.tree.inodes.key(ino), off + length)
        await self._call(f"fallocate mode {mode:#x} {off}+{length}", run)

    async def lseek(self, ino: int, off: int, whence: int) -> int:
        def run() -> int:
            if whence not in (SEEK_DATA, SEEK_HOLE):
                raise fail(errno.EINVAL)
            vol, snap, size = self._file(ino)
            if off < 0 or off >= size:
                raise fail(errno.ENXIO)
            pos = off
            while pos < size:
                n = min(SEEK_WINDOW, size - pos)
                for start, length, allocated in vol.extents(pos, n, snap):
                    if allocated == (whence == SEEK_DATA):
                        return max(start, off)
                pos += n
            if whence == SEEK_DATA:
                raise fail(errno.ENXIO)
            return size
        return await self._call("lseek", run)
