"""The one async adapter between a door (NBD, FUSE, later vhost-user-blk, iSCSI) and the
engine's blocking volume handles.

A door builds one `DoorIO` at start-up and hands it batches of `Op`s for a
`VolumeHandle` (ovsfs.engine.api). `await door_io.run(handle, ops)` runs the batch and
fills in, per op, either `op.result` or `op.error` (a typed `ovsfs.errors.OvsfsError`);
it never raises for an engine error, and a failed op never fails its neighbours.

    io = DoorIO("fuse", threads=16, flush_threads=4)
    ops = [Op(WRITE, 0, data=b"x" * 4096, fua=True), Op(READ, 8192, 4096)]
    await io.run(handle, ops)
    for op in ops: op.error or op.result   # READ: bytes; EXTENTS: [(off, len, allocated)]

Rules the adapter owns (so every door gets them the same):

- Batch semantics: the data ops of one batch (READ, WRITE, TRIM, ZEROES, EXTENTS) may
  run in any order or together: the caller gives only ops that commute (no two overlap
  where one modifies). All WRITEs of a batch go to the engine as one `writev`, all READs as
  one `readv` (one SCO append, one map lookup pass). FLUSH ops of a batch run after all its
  data ops completed; a WRITE/TRIM/ZEROES with `fua=True` is flushed before it completes.
  Ops of different `run` calls are independent: a door that needs order awaits one before
  it starts the next. Write-only batches of one handle that arrive while a write of it
  runs in a thread join into one writev (up to MAX_BATCH_BYTES), like FUSE's batcher.
- nowait or thread: a small batch of only reads and writes first tries the engine's
  `nowait=True` calls in the event loop (at queue depth 1 a thread hop costs more than the
  engine work); whatever would wait (WouldBlock) or fails goes to a worker thread, which
  sorts out errors per op.
- Threads: data calls take the door's `data` CapacityLimiter, flushes its `flush`
  limiter, so a FLUSH on one volume never waits behind the writes of another, and no door
  takes the threads of another door (each DoorIO has its own limiters).
- Write room, waited for in trio: before a write goes to a thread, the adapter polls
  `handle.write_room(nbytes)` with backoff (ROOM_POLL). A writer waiting in a thread
  would hold a thread the rest of the node needs while the backend is away. After
  ROOM_PROBE seconds one writer per door (the `probe` limiter) goes on into the engine's
  blocking reserve: the engine seals idle volumes' open SCOs when writers wait there.
- Bounds: requests and bytes (write payloads + read lengths) in flight, per handle and
  per door. A batch waits (in trio) for room; one bigger than a bound runs alone when
  nothing else is in flight, so it never waits for ever. Doors with finer accounting of
  their own (NBD counts reply bytes too: ovsfs/nbd/limits.py) keep it on top.
- Cancellation (the client gone, shutdown): a data call in a worker thread is abandoned
  (nothing of it is acknowledged); a flush is not abandoned.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import trio

from ovsfs.errors import LocalIOError, OvsfsError

log = logging.getLogger("ovsfs.doors")

READ, WRITE, TRIM, ZEROES, EXTENTS, FLUSH = "read", "write", "trim", "zeroes", "extents", "flush"
KINDS = (READ, WRITE, TRIM, ZEROES, EXTENTS, FLUSH)
MUTATING = (WRITE, TRIM, ZEROES)

INLINE_MAX = 256 << 10     # bytes: batches up to this size may run in the event loop (nowait)
ROOM_POLL = (0.002, 0.1)   # seconds: first and longest pause between write-room checks
ROOM_PROBE = 1.0           # seconds without room before one writer per door goes on anyway
MAX_BATCH_BYTES = 8 << 20  # bytes of concurrent writes of one handle joined into one writev
WRITE_BATCHES_IN_FLIGHT = 4  # such writevs of one handle in worker threads at once


@dataclass(slots=True, eq=False)
class Op:
    """One request. offset/length in bytes; `data` is the WRITE payload (any buffer).

    After `DoorIO.run`: `error` is None and `result` holds bytes (READ), a list of
    (offset, length, allocated) (EXTENTS) or None (the others); or `error` is the typed
    error of this op alone."""

    kind: str
    offset: int = 0
    length: int = 0
    data: Any = None
    fua: bool = False
    tag: Any = None                # the door's own: cookie, FUSE request, ...
    result: Any = None
    error: OvsfsError | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown op kind {self.kind!r}")
        if self.kind == WRITE and self.data is not None and not self.length:
            self.length = len(self.data)

    @property
    def nbytes(self) -> int:
        """Bytes this op holds in flight (payload or read data)."""
        return self.length if self.kind in (READ, WRITE) else 0


def typed(e: BaseException) -> OvsfsError:
    """An engine exception as an OvsfsError (OSError keeps its errno)."""
    if isinstance(e, OvsfsError):
        return e
    if isinstance(e, OSError):
        err = LocalIOError(str(e))
        if isinstance(e.errno, int):
            err.errno = e.errno
        return err
    if isinstance(e, MemoryError):
        err = OvsfsError("out of memory")
        err.errno = 12   # ENOMEM
        return err
    log.error("unexpected engine error: %r", e)
    return OvsfsError(f"internal error: {e!r}")


@dataclass
class Flight:
    """Requests and bytes in flight (of a door or of one handle), and a wake-up."""

    max_requests: int
    max_bytes: int
    requests: int = 0
    bytes: int = 0
    peak_bytes: int = 0
    _freed: trio.Event = field(default_factory=trio.Event)

    def fits(self, n: int, nbytes: int) -> bool:
        if self.requests == 0:      # nothing in flight: anything may go (never stuck)
            return True
        return self.requests + n <= self.max_requests and self.bytes + nbytes <= self.max_bytes

    def charge(self, n: int, nbytes: int) -> None:
        self.requests += n
        self.bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def release(self, n: int, nbytes: int) -> None:
        self.requests -= n
        self.bytes -= nbytes
        self._freed.set()

    async def wait_freed(self) -> None:
        if self._freed.is_set():
            self._freed = trio.Event()
        await self._freed.wait()


@dataclass
class _Drain:
    """The writes of one handle waiting to be joined into a writev, and how many worker
    threads are writing batches of it now."""

    queue: list[tuple[list[Op], trio.Event]] = field(default_factory=list)
    active: int = 0


class DoorIO:
    """One door's way into the engine. Sizes in bytes; counts of requests (ops)."""

    def __init__(self, door: str, *, threads: int = 16, flush_threads: int = 4,
                 max_requests: int = 1 << 16, max_bytes: int = 1 << 40,
                 handle_requests: int = 1 << 16, handle_bytes: int = 1 << 40,
                 inline_max: int = INLINE_MAX) -> None:
        """threads / flush_threads: worker threads for data calls / flushes (>= 1).
        max_*: bounds per door; handle_*: bounds per handle. Raises ValueError."""
        if threads < 1 or flush_threads < 1:
            raise ValueError("a door needs at least one data and one flush thread")
        self.door = door
        self.data = trio.CapacityLimiter(threads)
        self.flush = trio.CapacityLimiter(flush_threads)
        self.probe = trio.CapacityLimiter(1)
        self.flight = Flight(max_requests, max_bytes)
        self.handle_limits = (handle_requests, handle_bytes)
        self._handles: dict[int, Flight] = {}
        self._writers: dict[int, _Drain] = {}   # batched writes per handle
        self.inline_max = inline_max

    def in_flight(self, handle: Any) -> tuple[int, int]:
        """(requests, bytes) in flight on `handle`."""
        f = self._handles.get(id(handle))
        return (f.requests, f.bytes) if f else (0, 0)

    # ---- the entry point -------------------------------------------------------------------

    async def run(self, handle: Any, ops: Sequence[Op]) -> Sequence[Op]:
        """Run one batch (see the module docstring for its semantics); returns `ops`, each
        with its result or typed error filled in. Raises only trio.Cancelled."""
        if not ops:
            return ops
        n, nbytes = len(ops), sum(op.nbytes for op in ops)
        key = id(handle)
        hf = self._handles.get(key)
        if hf is None:
            hf = self._handles[key] = Flight(*self.handle_limits)
        while not (hf.fits(n, nbytes) and self.flight.fits(n, nbytes)):
            await (hf.wait_freed() if not hf.fits(n, nbytes) else self.flight.wait_freed())
        hf.charge(n, nbytes)
        self.flight.charge(n, nbytes)
        try:
            await self._data(handle, [op for op in ops if op.kind != FLUSH])
            flushes = [op for op in ops if op.kind == FLUSH or
                       (op.fua and op.kind in MUTATING and op.error is None)]
            if flushes:
                err = await self.run_flush(handle)
                for op in flushes:
                    op.error = err
        finally:
            hf.release(n, nbytes)
            self.flight.release(n, nbytes)
            if hf.requests == 0:
                self._handles.pop(key, None)
        return ops

    def try_now(self, handle: Any, ops: Sequence[Op]) -> bool:
        """The fast path, synchronous, in the event loop: run a small batch of only READs
        and WRITEs (no FUA, no FLUSH) with the engine's nowait calls. True: every op has
        its result. False: nothing was done (WouldBlock, an error, or not eligible); the
        caller then awaits `run`, which sorts errors out per op. At queue depth 1 this
        saves the task and thread hops the async path costs."""
        total = 0
        for op in ops:
            if op.kind not in (READ, WRITE) or op.fua:
                return False
            total += op.length
        if total > self.inline_max:
            return False
        writes = [op for op in ops if op.kind == WRITE]
        reads = [op for op in ops if op.kind == READ]
        try:
            if reads and writes:
                # Both or nothing: a read that would wait after the writes were done
                # would leave the batch half run (run() would write them again: harmless
                # for data, but the caller must see one outcome).
                got = handle.readv([(op.offset, op.length) for op in reads], nowait=True)
                handle.writev([(op.offset, op.data) for op in writes], nowait=True)
            elif writes:
                handle.writev([(op.offset, op.data) for op in writes], nowait=True)
                got = []
            else:
                got = handle.readv([(op.offset, op.length) for op in reads], nowait=True)
        except Exception:  # noqa: BLE001 - WouldBlock, or an error run() sorts out per op
            return False
        for op, d in zip(reads, got):
            op.result = d
        return True

    async def run_flush(self, handle: Any) -> OvsfsError | None:
        """Flush `handle` on the flush threads; the typed error, or None."""
        if getattr(getattr(handle, "caps", None), "read_only", False):
            return None
        try:
            await trio.to_thread.run_sync(handle.flush, limiter=self.flush)
        except Exception as e:
            return typed(e)
        return None

    # ---- data ops --------------------------------------------------------------------------

    async def _data(self, handle: Any, ops: list[Op]) -> None:
        writes = [op for op in ops if op.kind == WRITE]
        reads = [op for op in ops if op.kind == READ]
        others = [op for op in ops if op.kind not in (READ, WRITE)]
        if not (writes or reads or others):
            return
        # nowait first: small batches of reads and writes, in the event loop.
        if not others and sum(op.length for op in writes + reads) <= self.inline_max:
            try:
                if writes:
                    handle.writev([(op.offset, op.data) for op in writes], nowait=True)
                    writes = []
                if reads:
                    got = handle.readv([(op.offset, op.length) for op in reads], nowait=True)
                    for op, d in zip(reads, got):
                        op.result = d
                    reads = []
            except Exception:  # noqa: BLE001 - WouldBlock, or an error the thread sorts out per op
                pass
            if not (writes or reads):
                return
        if writes and not (reads or others):
            await self._write_batched(handle, writes)
            return
        await self._thread(handle, writes, reads, others)

    async def _write_batched(self, handle: Any, writes: list[Op]) -> None:
        """Writes of one handle that arrive while writes of it are in worker threads go to
        the engine together, as one writev (one SCO append, one TLog append, one lock
        round), instead of queueing on the volume lock in many threads. Up to
        WRITE_BATCHES_IN_FLIGHT batches run at once: while one waits for its acknowledgement
        (a sync DTL's round trip, outside the volume lock) the next is appended, and their
        DTL entries travel together. Concurrent `run` calls are independent by contract, so
        joining or overlapping them keeps every promise."""
        key = id(handle)
        drain = self._writers.get(key)
        if drain is None:
            drain = self._writers[key] = _Drain()
        done = trio.Event()
        drain.queue.append((writes, done))
        if drain.active >= WRITE_BATCHES_IN_FLIGHT:
            await done.wait()       # a running drain takes these
            return
        drain.active += 1
        try:
            q = drain.queue
            while q:
                batch, size = [], 0
                while q and (not batch or size + sum(op.length for op in q[0][0]) <= MAX_BATCH_BYTES):
                    w, ev = q.pop(0)
                    batch.append((w, ev))
                    size += sum(op.length for op in w)
                ran = False
                try:
                    await self._thread(handle, [op for w, _ev in batch for op in w], [], [])
                    ran = True
                finally:
                    for w, ev in batch:
                        if not ran:     # cancelled: never acknowledge what may not be written
                            for op in w:
                                op.error = op.error or OvsfsError("write interrupted: the door is closing")
                        ev.set()
        finally:
            drain.active -= 1
            if drain.active == 0:
                del self._writers[key]
                for w, ev in drain.queue:   # cancelled: nobody drains these any more
                    for op in w:
                        op.error = OvsfsError("write interrupted: the door is closing")
                    ev.set()

    async def _thread(self, handle: Any, writes: list[Op], reads: list[Op], others: list[Op]) -> None:
        """Run ops in a worker thread, after waiting in trio for write room."""
        limiter = self.data
        mutating = writes + [op for op in others if op.kind in MUTATING]
        if mutating:
            bs = int(getattr(getattr(handle, "caps", None), "preferred_block_size", 4096) or 4096)
            if not await self._wait_room(handle, _room_needed(mutating, bs)):
                limiter = self.probe

        def work() -> None:
            _run_blocking(handle, writes, reads, others)

        await trio.to_thread.run_sync(work, limiter=limiter, abandon_on_cancel=True)

    async def _wait_room(self, handle: Any, nbytes: int) -> bool:
        """Wait in trio until the write buffer has room for `nbytes`: True. False when the
        caller should go into the blocking reserve under the probe limiter (no room for
        ROOM_PROBE seconds and this door's probe is free)."""
        room: Callable[[int], bool] | None = getattr(handle, "write_room", None)
        if room is None or room(nbytes):
            return True
        # Counted by the engine while it waits here, so that status can show writers held up.
        note: Callable[[int], None] = getattr(handle, "waiting_for_room", lambda delta: None)
        note(1)
        try:
            pause, waited = ROOM_POLL[0], 0.0
            while not room(nbytes):
                if waited >= ROOM_PROBE and self.probe.available_tokens:
                    return False
                await trio.sleep(pause)
                waited += pause
                pause = min(pause * 2, ROOM_POLL[1])
            return True
        finally:
            note(-1)


def _room_needed(ops: list[Op], bs: int) -> int:
    """What the engine will reserve: whole blocks for writes, two per trim or zeroing
    (their partial edges), so a waiting writer does not go on a little too early."""
    need = 0
    for op in ops:
        if op.kind == WRITE and op.length:
            need += (math.ceil((op.offset + op.length) / bs) - op.offset // bs) * bs
        elif op.kind != WRITE:
            need += 2 * bs
    return need


def _run_blocking(handle: Any, writes: list[Op], reads: list[Op], others: list[Op]) -> None:
    """In a worker thread: run the ops, one engine call per kind where it can, and find
    out which op failed when a combined call fails."""
    if writes:
        try:
            handle.writev([(op.offset, op.data) for op in writes])
        except Exception as e:
            if len(writes) == 1:
                writes[0].error = typed(e)
            else:
                for op in writes:
                    try:
                        handle.writev([(op.offset, op.data)])
                    except Exception as e1:
                        op.error = typed(e1)
    for op in others:
        try:
            if op.kind == TRIM:
                handle.trim(op.offset, op.length)
            elif op.kind == ZEROES:
                handle.write_zeroes(op.offset, op.length)
            elif op.kind == EXTENTS:
                op.result = handle.extents(op.offset, op.length)
        except Exception as e:
            op.error = typed(e)
    if reads:
        try:
            for op, d in zip(reads, handle.readv([(op.offset, op.length) for op in reads])):
                op.result = d
        except Exception as e:
            if len(reads) == 1:
                reads[0].error = typed(e)
            else:
                for op in reads:
                    try:
                        op.result = handle.readv([(op.offset, op.length)])[0]
                    except Exception as e1:
                        op.error = typed(e1)
