"""`VhostVolume`: a block volume over a vhost-user-blk back end, with a queue depth.

Each request slot owns a fixed piece of shared memory (request header, status byte, data
buffer) and fixed descriptors (an indirect table when the device offers
RING_F_INDIRECT_DESC, else a block of the ring's own descriptors), so a request costs a
few `struct.pack_into` calls and a copy of its data; avail->idx is written and the device
kicked once per batch (on `wait()` or `kick()`), and completions are reaped in batches.
Slots are spread over the queues round robin.

Errors (ovsfs.errors): InvalidArgument (unaligned offset or length, or the device
answered VIRTIO_BLK_S_UNSUPP), OutOfRange (past the end of the volume), ReadOnly (a write
to a read-only device), OvsfsError with EIO (VIRTIO_BLK_S_IOERR), VhostError (the back end
went away, answered out of protocol, or answered nothing for `io_timeout` seconds;
every request in flight fails with it), DaemonNotRunning / NotFound / Busy (see Frontend).
"""

from __future__ import annotations

import os
import select
import time
from typing import Iterable, Sequence

from ovsfs.client.frontend import WANTED_FEATURES, Frontend, VhostError
from ovsfs.errors import InvalidArgument, OutOfRange, OvsfsError, ReadOnly
from ovsfs.vhost import protocol as vp
from ovsfs.vhost import virtq
from ovsfs.vhost.virtq import DESC

__all__ = ["VhostVolume", "Request", "KINDS"]

KINDS = {"read": vp.T_IN, "write": vp.T_OUT, "flush": vp.T_FLUSH, "trim": vp.T_DISCARD,
         "write_zeroes": vp.T_WRITE_ZEROES, "get_id": vp.T_GET_ID}
_NAMES = {v: k for k, v in KINDS.items()}
_STATUS_UNSET = 0xFF          # written before submission: a device that never wrote the status is caught
_MAX_RING = 1024              # the ring size QEMU and libvhost-user accept at most
_DEVICE_WRITES = virtq.F_WRITE
DEFAULT_IO_TIMEOUT = 120.0    # seconds; see VhostVolume


class Request:
    """One virtio-blk request in flight or done. `result()` waits for it, then returns the
    bytes read (reads, get_id) or None, or raises its typed error."""

    __slots__ = ("volume", "kind", "offset", "length", "done", "data", "error", "slot", "collect")

    def __init__(self, volume: "VhostVolume", kind: int, offset: int, length: int, collect: bool) -> None:
        self.volume = volume
        self.kind = kind
        self.offset = offset
        self.length = length
        self.done = False
        self.data: bytes | None = None
        self.error: OvsfsError | None = None
        self.slot: _Slot | None = None
        self.collect = collect

    def result(self) -> bytes | None:
        while not self.done:
            self.volume._progress()
        if self.error is not None:
            raise self.error
        return self.data

    def describe(self) -> str:
        return f"{_NAMES.get(self.kind, f'type {self.kind}')} {self.offset}+{self.length} on {self.volume.fe.path}"

    def __repr__(self) -> str:
        return f"<Request {self.describe()}{'' if self.done else ' in flight'}>"


class _Slot:
    """The fixed resources of one request in flight (see the module docstring)."""

    __slots__ = ("queue", "head", "descs", "table", "hdr", "status", "buf", "req")

    def __init__(self, queue: int, head: int, descs: list[int], table: int, hdr: int, status: int, buf: int) -> None:
        self.queue = queue
        self.head = head            # the ring descriptor the device reports in the used ring
        self.descs = descs          # direct mode: this slot's ring descriptors (hdr first)
        self.table = table          # indirect mode: gpa of this slot's descriptor table (else -1)
        self.hdr = hdr              # gpa of the 16-byte request header
        self.status = status        # gpa of the status byte
        self.buf = buf              # gpa of the data buffer
        self.req: Request | None = None


class VhostVolume:
    """A volume served over vhost-user-blk at `socket_path`.

    `queue_depth`: requests in flight at most (slots); `num_queues`: virtqueues used (at
    most what the device has; default all, up to 4); `max_request_bytes`: the largest
    single request (bigger reads and writes are split); `indirect` / `event_idx`: use
    those ring features when the device offers them; `timeout`: seconds for the
    back end's replies during set-up; `io_timeout`: seconds requests may stay in flight
    while the back end answers none of them (default 120: twice the daemon's
    `[engine] disk_wait`, for which it may legitimately hold writes while its backend is
    away); past it every request in flight fails with VhostError and the volume is broken
    (None: wait for ever, like a disk). `busy_wait`: see Frontend. Not thread-safe: drive
    it from one thread."""

    def __init__(self, socket_path: str | os.PathLike[str], *, queue_depth: int = 32,
                 num_queues: int | None = None, max_request_bytes: int = 1 << 20,
                 indirect: bool = True, event_idx: bool = True, timeout: float = 10.0,
                 io_timeout: float | None = DEFAULT_IO_TIMEOUT, busy_wait: float = 3.0) -> None:
        if queue_depth < 1:
            raise InvalidArgument(f"queue depth {queue_depth}: at least 1")
        if io_timeout is not None and io_timeout <= 0:
            raise InvalidArgument(f"io_timeout {io_timeout}: seconds > 0, or None")
        self.io_timeout = io_timeout
        self._last_progress = time.monotonic()
        features = WANTED_FEATURES
        if not indirect:
            features &= ~vp.bits(vp.RING_F_INDIRECT_DESC)
        if not event_idx:
            features &= ~vp.bits(vp.RING_F_EVENT_IDX)
        memory = queue_depth * (max_request_bytes + 8192) + (4 << 20)
        self.fe = fe = Frontend(socket_path, memory_bytes=memory, timeout=timeout, busy_wait=busy_wait)
        try:
            fe.negotiate(features)
            fe.set_mem_table()
            self._setup(queue_depth, num_queues, max_request_bytes)
        except BaseException:
            fe.close()
            raise

    # -- set-up ------------------------------------------------------------------------

    def _setup(self, depth: int, num_queues: int | None, max_bytes: int) -> None:
        fe = self.fe
        cfg = vp.BlkConfig.decode(fe.config) if fe.config else None
        if cfg is None:
            raise VhostError(f"{fe.path}: the back end gives no device config (protocol feature CONFIG)")
        self.config = cfg
        self.size = cfg.capacity * vp.SECTOR
        self.block_size = cfg.blk_size if fe.has(vp.BLK_F_BLK_SIZE) and cfg.blk_size else vp.SECTOR
        self.read_only = fe.has(vp.BLK_F_RO)
        self.can_flush = fe.has(vp.BLK_F_FLUSH)
        self.can_trim = fe.has(vp.BLK_F_DISCARD)
        self.can_write_zeroes = fe.has(vp.BLK_F_WRITE_ZEROES)
        self.indirect = fe.has(vp.RING_F_INDIRECT_DESC)
        nq = max(1, min(num_queues or 4, fe.queue_limit(), depth))
        self.num_queues = nq
        per_queue = -(-depth // nq)
        size_max = cfg.size_max if fe.has(vp.BLK_F_SIZE_MAX) and cfg.size_max else 0
        seg_max = cfg.seg_max if fe.has(vp.BLK_F_SEG_MAX) and cfg.seg_max else 1 << 16
        segs = min(-(-max_bytes // size_max) if size_max else 1, seg_max)
        if not self.indirect:
            segs = max(1, min(segs, _MAX_RING // per_queue - 2))
            if _MAX_RING // per_queue < 3:
                raise InvalidArgument(f"queue depth {depth} over {nq} queues does not fit rings of {_MAX_RING}")
        if size_max:
            max_bytes = min(max_bytes, segs * size_max)
        self.max_request_bytes = max_bytes - max_bytes % vp.SECTOR
        self.seg_size = size_max or self.max_request_bytes
        ring_entries = per_queue if self.indirect else per_queue * (segs + 2)
        ring = 16
        while ring < ring_entries:
            ring *= 2
        self.queues = [fe.setup_queue(i, ring) for i in range(nq)]
        self._heads: list[dict[int, _Slot]] = [{} for _ in range(nq)]
        self._slots: list[_Slot] = []
        mem = fe.mem
        for s in range(depth):
            qi = s % nq
            q = self.queues[qi]
            hdr = mem.alloc(64)
            buf = mem.alloc(self.max_request_bytes, align=4096)
            if self.indirect:
                table = mem.alloc(DESC.size * (segs + 2), align=16)
                [head] = q.alloc_desc(1)
                descs = [head]
                DESC.pack_into(mem.view, table, hdr, vp.REQ_HEADER.size, virtq.F_NEXT, 1)
            else:
                table = -1
                descs = q.alloc_desc(segs + 2)
                head = descs[0]
                q.write_desc(head, hdr, vp.REQ_HEADER.size, virtq.F_NEXT, descs[1])
            slot = _Slot(qi, head, descs, table, hdr, hdr + 32, buf)
            self._heads[qi][head] = slot
            self._slots.append(slot)
        self._free = list(reversed(self._slots))
        self._dirty = [False] * nq
        self._in_flight = 0
        self._unkicked = 0          # submitted, not yet made visible to the device
        self._kicked = 0            # visible to the device and unanswered (io_timeout watches these)
        self._completed: list[Request] = []
        self._poll = select.poll()
        for q in self.queues:
            self._poll.register(q.call_fd, select.POLLIN)
        self._poll.register(fe.sock.fileno(), select.POLLIN)
        self._broken: VhostError | None = None

    @property
    def queue_depth(self) -> int:
        return len(self._slots)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # -- submitting --------------------------------------------------------------------

    def _check(self, offset: int, length: int, write: bool) -> None:
        if offset < 0 or length < 0 or offset % vp.SECTOR or length % vp.SECTOR:
            raise InvalidArgument(f"offset {offset} and length {length} must be multiples of {vp.SECTOR}")
        if offset + length > self.size:
            raise OutOfRange(f"{offset}+{length} is past the end of the volume ({self.size} bytes)")
        if write and self.read_only:
            raise ReadOnly(f"{self.fe.path} is read-only")

    def submit(self, kind: str | int, offset: int = 0, length: int = 0, data: bytes | memoryview | None = None,
               *, unmap: bool = False, _collect: bool = True) -> Request:
        """Queue one request without waiting: kind is read / write / flush / trim /
        write_zeroes / get_id (or a raw virtio-blk type number, sent with
        no data); offset and length in bytes (multiples of 512; for a write
        the length is len(data)); at most `max_request_bytes` of data. It reaches the
        device at the next `kick()` or `wait()`; when every slot is busy this waits for
        one. Raises InvalidArgument, OutOfRange, ReadOnly before anything is queued."""
        if isinstance(kind, int):
            t = kind            # a raw request type, sent as it is (for tests of back ends)
        elif kind in KINDS:
            t = KINDS[kind]
        else:
            raise InvalidArgument(f"unknown request kind {kind!r}")
        if t == vp.T_OUT:
            if data is None:
                raise InvalidArgument("a write needs data")
            length = len(data)
        if t in (vp.T_IN, vp.T_OUT):
            self._check(offset, length, t == vp.T_OUT)
            if length > self.max_request_bytes:
                raise InvalidArgument(f"{length} bytes in one request (at most {self.max_request_bytes})")
        elif t in (vp.T_DISCARD, vp.T_WRITE_ZEROES):
            self._check(offset, length, True)
            if not (self.can_trim if t == vp.T_DISCARD else self.can_write_zeroes):
                raise InvalidArgument(f"the device does not support {kind}")
            if length // vp.SECTOR > 0xFFFFFFFF:
                raise InvalidArgument(f"{length} bytes in one {kind} request")
        elif t == vp.T_GET_ID:
            offset, length = 0, vp.ID_BYTES
        else:
            offset = length = 0
        if self._broken is not None:
            raise self._broken
        while not self._free:
            self._progress()
        slot = self._free.pop()
        req = Request(self, t, offset, length, _collect)
        slot.req = req
        req.slot = slot
        self._post(slot, t, offset, length, data, unmap)
        return req

    def _post(self, slot: _Slot, t: int, offset: int, length: int, data: bytes | memoryview | None,
              unmap: bool) -> None:
        view = self.fe.mem.view
        vp.REQ_HEADER.pack_into(view, slot.hdr, t, 0, offset // vp.SECTOR)
        view[slot.status] = _STATUS_UNSET
        # The data segments: (gpa, length, flags) after the header.
        if t == vp.T_OUT:
            view[slot.buf:slot.buf + length] = data  # type: ignore[index,assignment]
            segs = self._split(slot.buf, length, 0)
        elif t in (vp.T_IN, vp.T_GET_ID):
            segs = self._split(slot.buf, length, _DEVICE_WRITES)
        elif t in (vp.T_DISCARD, vp.T_WRITE_ZEROES):
            flags = vp.SEGMENT_F_UNMAP if unmap and t == vp.T_WRITE_ZEROES else 0
            vp.SEGMENT.pack_into(view, slot.buf, offset // vp.SECTOR, length // vp.SECTOR, flags)
            segs = [(slot.buf, vp.SEGMENT.size, 0)]
        else:
            segs = []
        q = self.queues[slot.queue]
        n = len(segs)
        if slot.table >= 0:
            base = slot.table
            for k, (gpa, ln, fl) in enumerate(segs, 1):
                DESC.pack_into(view, base + 16 * k, gpa, ln, fl | virtq.F_NEXT, k + 1)
            DESC.pack_into(view, base + 16 * (n + 1), slot.status, 1, virtq.F_WRITE, 0)
            DESC.pack_into(view, q.desc + 16 * slot.head, base, 16 * (n + 2), virtq.F_INDIRECT, 0)
        else:
            d = slot.descs
            qd = q.desc
            for k, (gpa, ln, fl) in enumerate(segs, 1):
                DESC.pack_into(view, qd + 16 * d[k], gpa, ln, fl | virtq.F_NEXT, d[k + 1])
            DESC.pack_into(view, qd + 16 * d[n + 1], slot.status, 1, virtq.F_WRITE, 0)
        q.avail_cells[virtq.AVAIL_RING_CELL + q.avail_idx % q.num] = slot.head
        q.avail_idx = (q.avail_idx + 1) & 0xFFFF
        self._dirty[slot.queue] = True
        self._in_flight += 1
        self._unkicked += 1

    def _split(self, gpa: int, length: int, flags: int) -> list[tuple[int, int, int]]:
        step = self.seg_size
        if length <= step:
            return [(gpa, length, flags)]
        return [(gpa + o, min(step, length - o), flags) for o in range(0, length, step)]

    def kick(self) -> None:
        """Make everything submitted so far visible to the device (one avail->idx write and
        at most one notification per queue)."""
        if self._unkicked:
            if not self._kicked:
                # The io_timeout clock starts when the device first has something to answer
                # (not at submit: a caller may queue requests long before it kicks them).
                self._last_progress = time.monotonic()
            self._kicked += self._unkicked
            self._unkicked = 0
        for i, dirty in enumerate(self._dirty):
            if dirty:
                self.queues[i].kick()
                self._dirty[i] = False

    # -- completing --------------------------------------------------------------------

    def _reap(self) -> int:
        """Finish every request the device used; returns how many."""
        view = self.fe.mem.view
        done = 0
        for qi, q in enumerate(self.queues):
            if q.used_idx() == q.last_used:
                continue
            heads = self._heads[qi]
            for head, _written in q.reap(free=False):
                slot = heads.get(head)
                if slot is None or slot.req is None:
                    self._fail_all(VhostError(f"{self.fe.path}: the device used descriptor {head} of queue "
                                              f"{qi}, which is no request in flight (used->idx now "
                                              f"{q.used_idx()}, avail->idx {q.avail_idx})"))
                    return done
                req = slot.req
                status = view[slot.status]
                if status == vp.S_OK:
                    if req.kind in (vp.T_IN, vp.T_GET_ID):
                        req.data = bytes(view[slot.buf:slot.buf + req.length])
                elif status == vp.S_UNSUPP:
                    req.error = InvalidArgument(f"{req.describe()}: the device does not support it (VIRTIO_BLK_S_UNSUPP)")
                elif status == vp.S_IOERR:
                    req.error = OvsfsError(f"{req.describe()}: I/O error (VIRTIO_BLK_S_IOERR)")
                else:
                    req.error = VhostError(f"{req.describe()}: the device answered status {status}")
                self._finish(slot)
                done += 1
        if done:
            self._last_progress = time.monotonic()
        return done

    def _finish(self, slot: _Slot) -> None:
        req = slot.req
        assert req is not None
        req.done = True
        req.slot = None
        slot.req = None
        self._free.append(slot)
        self._in_flight -= 1
        self._kicked = max(0, self._kicked - 1)
        if req.collect:
            self._completed.append(req)

    def _fail_all(self, error: VhostError) -> None:
        self._broken = error
        for slot in self._slots:
            if slot.req is not None:
                slot.req.error = error
                self._finish(slot)
        self._kicked = self._unkicked = 0

    def _progress(self, timeout: float | None = None) -> int:
        """Kick, then wait until at least one request finishes (or `timeout` seconds).
        Returns how many finished; raises VhostError if the connection is gone."""
        if self._broken is not None:
            raise self._broken
        self.kick()
        done = self._reap()
        if done or not self._in_flight:
            return done
        waited = 0.0
        while True:
            for q in self.queues:
                q.drain_call()
            done = self._reap()
            if done:
                return done
            # Wake at least every second: to see a back end that went away, and to kick
            # again should a notification have been lost all the same (a back end without
            # the barriers of virtio 1.1 2.6.10.2).
            step = 1.0 if timeout is None else min(1.0, timeout - waited)
            if self.io_timeout is not None:
                step = min(step, max(0.0, self._last_progress + self.io_timeout - time.monotonic()) + 0.001)
            events = self._poll.poll(max(0, int(step * 1000)))
            if any(fd == self.fe.sock.fileno() for fd, _ in events) and self.fe.connection_lost():
                self._fail_all(VhostError(f"{self.fe.path}: the back end closed the connection"))
                raise self._broken  # type: ignore[misc]
            # Checked whether or not anything woke us: a hung back end that still signals
            # (a spurious call, a socket event) answers nothing all the same.
            stalled = time.monotonic() - self._last_progress
            if self.io_timeout is not None and stalled >= self.io_timeout:
                done = self._reap()     # one last look: answered just now?
                if done:
                    return done
                self._fail_all(VhostError(f"{self.fe.path}: {self._in_flight} request(s) unanswered for "
                                          f"{stalled:.1f} s (io_timeout {self.io_timeout} s): the back "
                                          "end is stopped or hung; the volume is broken, reopen it"))
                raise self._broken  # type: ignore[misc]
            if not events:
                waited += step
                if timeout is not None and waited >= timeout:
                    return 0
                for q in self.queues:
                    if q.last_used != q.avail_idx:
                        q.kick(force=True)

    def wait(self, timeout: float | None = None) -> list[Request]:
        """Every request from `submit` that finished since the last `wait` (at least one
        if any is in flight, unless `timeout` seconds pass first). Kicks first."""
        if not self._completed and self._in_flight:
            self._progress(timeout)
        else:
            self.kick()
            self._reap()
        out, self._completed = self._completed, []
        return out

    def drain(self) -> list[Request]:
        """Wait for every request in flight; returns those from `submit` not yet collected."""
        while self._in_flight:
            self._progress()
        out, self._completed = self._completed, []
        return out

    # -- whole operations --------------------------------------------------------------

    def _run(self, parts: Iterable[tuple[str, int, int, bytes | memoryview | None, bool]]) -> list[Request]:
        """Submit every part keeping the queue full, wait for all; raise the first error."""
        reqs = [self.submit(kind, off, ln, data, unmap=unmap, _collect=False) for kind, off, ln, data, unmap in parts]
        for r in reqs:
            while not r.done:
                self._progress()
        for r in reqs:
            if r.error is not None:
                raise r.error
        return reqs

    def _chunks(self, offset: int, length: int, step: int) -> Iterable[tuple[int, int]]:
        for o in range(0, length, step):
            yield offset + o, min(step, length - o)

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes from byte `offset` (both multiples of 512)."""
        self._check(offset, length, False)
        reqs = self._run(("read", o, n, None, False) for o, n in self._chunks(offset, length, self.max_request_bytes))
        return b"".join(r.data or b"" for r in reqs)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write `data` at byte `offset` (both multiples of 512). Durable after `flush()`."""
        mv = memoryview(data).cast("B")
        self._check(offset, len(mv), True)
        self._run(("write", o, n, mv[o - offset:o - offset + n], False)
                  for o, n in self._chunks(offset, len(mv), self.max_request_bytes))

    def readv(self, extents: Sequence[tuple[int, int]]) -> list[bytes]:
        """Several reads in flight together: (offset, length) each; their data in order."""
        for o, n in extents:
            self._check(o, n, False)
        out = []
        for o, n in extents:
            out.append(self.read(o, n) if n > self.max_request_bytes else None)
        small = [(i, o, n) for i, (o, n) in enumerate(extents) if n <= self.max_request_bytes]
        reqs = self._run(("read", o, n, None, False) for _, o, n in small)
        for (i, _, _), r in zip(small, reqs):
            out[i] = r.data
        return out  # type: ignore[return-value]

    def writev(self, writes: Sequence[tuple[int, bytes | bytearray | memoryview]]) -> None:
        """Several writes in flight together: (offset, data) each."""
        parts = []
        for offset, data in writes:
            mv = memoryview(data).cast("B")
            self._check(offset, len(mv), True)
            parts += [("write", o, n, mv[o - offset:o - offset + n], False)
                      for o, n in self._chunks(offset, len(mv), self.max_request_bytes)]
        self._run(parts)

    def flush(self) -> None:
        """Make every write finished so far durable (a no-op if the device has no FLUSH)."""
        if self.can_flush:
            self._run([("flush", 0, 0, None, False)])

    def _ranges(self, kind: str, offset: int, length: int, max_sectors: int, unmap: bool) -> None:
        self._check(offset, length, True)
        step = (max_sectors or 0xFFFFFFFF) * vp.SECTOR
        step -= step % self.block_size or 0
        self._run((kind, o, n, None, unmap) for o, n in self._chunks(offset, length, max(step, vp.SECTOR)))

    def trim(self, offset: int, length: int) -> None:
        """Discard a byte range (multiples of 512). InvalidArgument if the device cannot."""
        if not self.can_trim:
            raise InvalidArgument("the device does not support discard")
        self._ranges("trim", offset, length, self.config.max_discard_sectors, False)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """Zero a byte range (multiples of 512); `unmap` lets the device deallocate it."""
        if not self.can_write_zeroes:
            raise InvalidArgument("the device does not support write-zeroes")
        self._ranges("write_zeroes", offset, length, self.config.max_write_zeroes_sectors, unmap)

    def get_id(self) -> str:
        """The device's serial (VIRTIO_BLK_T_GET_ID), NULs stripped."""
        [r] = self._run([("get_id", 0, 0, None, False)])
        return (r.data or b"").rstrip(b"\0").decode(errors="replace")

    def close(self) -> None:
        """Close the connection; requests still in flight are abandoned."""
        self.fe.close()

    def __enter__(self) -> "VhostVolume":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
