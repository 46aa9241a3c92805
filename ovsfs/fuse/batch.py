"""Write batching: FUSE writes to one volume that arrive while a write of that volume is
in a worker thread are handed to the engine together, as one `vol.writev` (one SCO
append, one TLog append, one map update), and acknowledged together.

With one request in flight (psync, QD1) nothing waits: the write goes out at once. With
many (libaio, several jobs, a guest's queue) the per-call cost is paid once per batch.

`inline` tells the door whether small writes should skip the thread hop and run in the
event loop (fs.VpoolFS._write_inline): right when requests come one at a time, wrong
under a queue (an inline write blocks the loop, so nothing ever batches). The batcher
adapts: in inline mode every PROBE-th write goes through a thread anyway, and if others
queue up behind it the volume switches to batching; SETTLE batches of one switch it back.
"""

from __future__ import annotations

import errno
import logging
import time
from typing import Any, Callable

import pyfuse3
import trio

log = logging.getLogger("ovsfs.fuse")

MAX_BATCH_BYTES = 8 << 20
ROOM_POLL = (0.002, 0.1)   # seconds: first and longest pause between write-buffer room checks
ROOM_PROBE = 1.0           # seconds without room before the batch goes into the blocking path
PROBE = 32          # in inline mode, every PROBE-th small write goes through a thread
SETTLE = 1.0        # seconds without queueing before writes go inline again


async def wait_room(vol: Any, nbytes: int) -> None:
    """Wait in trio, not in a worker thread, while the write buffer has no room for
    `nbytes` (the backend away): a writer waiting in a thread would hold one the rest of
    the node needs. After ROOM_PROBE seconds the write goes on into the engine's blocking
    reserve (one per volume, as the batcher writes one batch at a time): the engine seals
    idle volumes' open SCOs when writers wait there."""
    room = getattr(vol, "write_room", None)
    if room is None:
        return
    pause, waited = ROOM_POLL[0], 0.0
    while not room(nbytes) and waited < ROOM_PROBE:
        await trio.sleep(pause)
        waited += pause
        pause = min(pause * 2, ROOM_POLL[1])


class _Slot:
    __slots__ = ("off", "data", "done", "error")

    def __init__(self, off: int, data: Any) -> None:
        self.off, self.data = off, data
        self.done = trio.Event()
        self.error: BaseException | None = None


class WriteBatcher:
    """One per volume; `await write(off, data)` returns once the write is acknowledged."""

    def __init__(self, vol: Any, call: Callable[..., Any]) -> None:
        self.vol = vol
        self.call = call           # async (what, fn, *args) -> result, raising FUSEError
        self.queue: list[_Slot] = []
        self.busy = False
        self.inline = True
        self.last_queued = 0.0     # when a write last had to queue behind another
        self.count = 0

    def want_inline(self) -> bool:
        """Should this (small) write run inline? Counts writes for the periodic probe."""
        self.count += 1
        if self.busy:
            return False
        if not self.inline and time.monotonic() - self.last_queued > SETTLE:
            self.inline = True
            log.debug("%s: one write at a time: writing inline", self.vol.name)
        return self.inline and self.count % PROBE != 0

    async def write(self, off: int, data: Any) -> None:
        slot = _Slot(off, data)
        self.queue.append(slot)
        if self.busy:
            self.last_queued = time.monotonic()
            if self.inline:
                self.inline = False
                log.debug("%s: writes queue up: batching them", self.vol.name)
        else:
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
                try:
                    await wait_room(self.vol, size)
                    if len(batch) == 1:
                        await self.call(f"write {self.vol.name} {batch[0].off}+{size}",
                                        self.vol.write, batch[0].off, batch[0].data, kind="data")
                    else:
                        await self.call(f"write {self.vol.name} ({len(batch)} requests, {size} bytes)",
                                        self.vol.writev, [(s.off, s.data) for s in batch], kind="data")
                except BaseException as e:  # every request of the batch fails alike
                    for s in batch:
                        s.error = e
                    if not isinstance(e, Exception):
                        for s in batch:   # cancelled: wake the writers of this batch too
                            s.done.set()
                        raise
                for s in batch:
                    s.done.set()
        finally:
            self.busy = False
            for s in self.queue:   # cancelled: nobody drains these any more
                s.error = pyfuse3.FUSEError(errno.EINTR)
                s.done.set()
            self.queue.clear()
