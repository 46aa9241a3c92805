"""Serving one started virtqueue: wait for kicks, pop what is available, run it in batches.

Everything a kick made available (up to BATCH_REQUESTS requests or BATCH_BYTES of data)
becomes one `DoorIO.run(handle, ops)` call. virtio-blk promises no order between requests
in flight (virtio 1.1 section 5.2.6.4: a driver that needs order waits for completion,
and FLUSH covers the writes completed before it was submitted), so the requests of one
batch may run together and several batches of one queue may be in flight at once (at
most `batches`, then the queue waits). A small batch of only reads and writes first tries
`DoorIO.try_now` in the event loop (queue depth 1 saves the task and thread hops).

Finished requests go to the used ring in the order they were made available (batches that
finish early wait for the ones before them), then the call eventfd is signalled unless
suppressed. Section 2.6.8 would allow any order, but in order the used index says exactly
which requests are done: when the back end dies, QEMU restarts the ring at used->idx
(virtio_queue_restore_last_avail_idx), so the requests then in flight are taken again and
no finished one is (without this, INFLIGHT_SHMFD would be needed).

Stopping (GET_VRING_BASE, vhost-user.rst "Ring states"): the kick loop stops taking
requests and the batches in flight drain (bounded by DRAIN_SECONDS, then cancelled: a
cancelled request is never put in the used ring); the index returned is that of the
first request not in the used ring, so that the front end makes those available again.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import trio

from ovsfs.doors.adapter import DoorIO, Op
from ovsfs.shm import blk
from ovsfs.shm.vring import ChainError, Vring

log = logging.getLogger("ovsfs.shm")

BATCH_REQUESTS = 128          # requests in one DoorIO.run at most
YIELD_EVERY = 8               # inline batches in a row before the kick loop lets other tasks run
BATCH_BYTES = 8 << 20         # bytes of data in one DoorIO.run at most
DRAIN_SECONDS = 30.0          # a stopping queue waits this long for its requests in flight


class QueueRunner:
    """The task serving one Vring of one session."""

    def __init__(self, vring: Vring, io: DoorIO, handle: Any, limits: blk.Limits, serial: bytes,
                 batches: int, label: str) -> None:
        self.vring = vring
        self.io = io
        self.handle = handle
        self.limits = limits
        self.serial = serial
        self.slots = trio.Semaphore(max(1, batches))
        self.label = label
        self.scope = trio.CancelScope()       # everything, batches included
        self.kick_scope = trio.CancelScope()  # the kick loop only
        self.done = trio.Event()
        self.next_batch = 0           # number of the next batch popped
        self.next_push = 0            # number of the next batch to go to the used ring
        self.finished: dict[int, list[tuple[int, int]]] = {}   # batch -> [(head, used len)]
        self.unpushed = 0             # requests popped and not in the used ring

    async def run(self) -> None:
        """Serve until stopped; ChainError (malformed ring) and OSError (kick fd) go out to
        the session, which drops the connection."""
        try:
            with self.scope:
                async with trio.open_nursery() as batches:
                    with self.kick_scope:
                        await self._kick_loop(batches)
        finally:
            self.done.set()

    async def stop(self) -> int:
        """Stop taking requests, let those in flight finish (DRAIN_SECONDS at most). The
        number of requests popped that are not in the used ring (abandoned)."""
        self.kick_scope.cancel()
        with trio.move_on_after(DRAIN_SECONDS):
            await self.done.wait()
            return self.unpushed
        log.warning("%s: queue %d: requests still in flight after %.0f s: abandoned",
                    self.label, self.vring.index, DRAIN_SECONDS)
        self.scope.cancel()
        await self.done.wait()
        return self.unpushed

    async def _kick_loop(self, batches: trio.Nursery) -> None:
        r = self.vring
        slots = self.slots
        while True:
            inline = 0
            while True:
                # A trio checkpoint per batch costs as much as a small batch: take a free
                # slot without one, and let other tasks run every YIELD_EVERY batches.
                try:
                    slots.acquire_nowait()
                except trio.WouldBlock:
                    await slots.acquire()
                    inline = 0
                else:
                    inline += 1
                    if inline >= YIELD_EVERY:
                        await trio.lowlevel.checkpoint()
                        inline = 0
                reqs = self._pop()
                if not reqs:
                    slots.release()
                    if r.publish():
                        continue
                    break
                self._start(reqs, batches)
            await self._wait_kick()

    async def _wait_kick(self) -> None:
        fd = self.vring.kick_fd
        assert fd is not None
        await trio.lowlevel.wait_readable(fd)
        try:
            got = os.read(fd, 8)
        except BlockingIOError:
            return
        if len(got) != 8:
            # A file at its end is always readable: it would spin this loop.
            raise ChainError(f"queue {self.vring.index}: kick fd is not an eventfd")

    def _pop(self) -> list[blk.Request]:
        """Pop up to a batch worth of requests (parsed; failed ones carry their status).
        The available index is read once: what comes later is the next batch's."""
        r = self.vring
        n = min(r.pending(), BATCH_REQUESTS)
        reqs: list[blk.Request] = []
        nbytes = 0
        parse, take = blk.parse, r.take
        index, handle, limits, serial = r.index, self.handle, self.limits, self.serial
        while n and nbytes < BATCH_BYTES:
            req = parse(take(), index, handle, limits, serial)
            reqs.append(req)
            nbytes += req.nbytes
            n -= 1
        return reqs

    def _start(self, reqs: list[blk.Request], batches: trio.Nursery) -> None:
        number = self.next_batch
        self.next_batch += 1
        self.unpushed += len(reqs)
        ops: list[Op] = [op for req in reqs for op in req.ops]
        if not ops or self.io.try_now(self.handle, ops):
            self._finish(number, reqs)
            self.slots.release()
            return
        batches.start_soon(self._batch, number, reqs, ops)

    async def _batch(self, number: int, reqs: list[blk.Request], ops: list[Op]) -> None:
        try:
            await self.io.run(self.handle, ops)
            self._finish(number, reqs)
        finally:
            self.slots.release()

    def _finish(self, number: int, reqs: list[blk.Request]) -> None:
        r = self.vring
        if r.used is None:          # unmapped meanwhile (the session is ending)
            return
        # Data and status go to guest memory now; the used ring takes them in order.
        complete = blk.complete
        done = [(req.chain.head, complete(req)) for req in reqs]
        if number != self.next_push or self.finished:
            self.finished[number] = done
            done = []
            while self.next_push in self.finished:
                done += self.finished.pop(self.next_push)
                self.next_push += 1
        else:                       # the usual case: the oldest batch, nothing waiting
            self.next_push += 1
        self.unpushed -= len(done)
        r.push_many(done)
        r.notify()
