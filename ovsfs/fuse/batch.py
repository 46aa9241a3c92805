"""Write batching: FUSE writes to one open file that arrive while a write of it is in
flight are handed to the door adapter together, as one batch (one `writev`: one SCO
append, one TLog append, one map update), and acknowledged together.

With one request in flight (psync, QD1) nothing waits: the write goes out at once, and
the adapter (ovsfs.doors.adapter) may run it in the event loop (nowait). With many
(libaio, several jobs, a guest's queue) the per-call cost is paid once per batch. The
nowait-or-thread rule, the wait for write-buffer room and the bounds in flight are the
adapter's.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

import pyfuse3
import trio

from ovsfs.doors.adapter import WRITE, DoorIO, Op

log = logging.getLogger("ovsfs.fuse")

MAX_BATCH_BYTES = 8 << 20


class _Slot:
    __slots__ = ("off", "data", "done", "error")

    def __init__(self, off: int, data: Any) -> None:
        self.off, self.data = off, data
        self.done = trio.Event()
        self.error: BaseException | None = None


class WriteBatcher:
    """One per open file; `await write(off, data)` returns once the write is acknowledged
    (raises FUSEError with the engine error's errno)."""

    def __init__(self, handle: Any, io: DoorIO) -> None:
        self.handle = handle
        self.io = io
        self.queue: list[_Slot] = []
        self.busy = False

    async def write(self, off: int, data: Any) -> None:
        slot = _Slot(off, data)
        self.queue.append(slot)
        if not self.busy:
            await self._drain()
        await slot.done.wait()
        if slot.error is not None:
            raise slot.error

    async def _drain(self) -> None:
        self.busy = True
        try:
            while self.queue:
                batch, size = [], 0
                while self.queue and (not batch or size + len(self.queue[0].data) <= MAX_BATCH_BYTES):
                    s = self.queue.pop(0)
                    batch.append(s)
                    size += len(s.data)
                ops = [Op(WRITE, s.off, data=s.data) for s in batch]
                try:
                    await self.io.run(self.handle, ops)
                except BaseException:   # cancelled: wake the writers of this batch too
                    for s in batch:
                        s.error = pyfuse3.FUSEError(errno.EINTR)
                        s.done.set()
                    raise
                for s, op in zip(batch, ops):
                    if op.error is not None:
                        e = op.error
                        (log.error if e.errno == errno.EIO else log.debug)(
                            "write %s %d+%d: %s", self.handle.name, s.off, len(s.data), e)
                        s.error = pyfuse3.FUSEError(e.errno or errno.EIO)
                    s.done.set()
        finally:
            self.busy = False
            for s in self.queue:   # cancelled: nobody drains these any more
                s.error = pyfuse3.FUSEError(errno.EINTR)
                s.done.set()
            self.queue.clear()
