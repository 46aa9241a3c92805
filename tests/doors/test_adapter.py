"""The one door adapter (ovsfs/doors/adapter.py) on a small in-memory volume handle.

The handle below is a real implementation of the VolumeHandle I/O methods over a
bytearray (with a write buffer of bounded room that a flush empties), not a mock: the
tests check the data read back and the adapter's rules (per-op errors, the nowait-or-
thread rule, separate flush threads, waiting for write room in trio, bounds in flight).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest
import trio

from ovsfs.doors import EXTENTS, FLUSH, READ, TRIM, WRITE, ZEROES, DoorIO, Op
from ovsfs.doors.adapter import WRITE_BATCHES_IN_FLIGHT
from ovsfs.errors import OutOfRange, ReadOnly, WouldBlock


@dataclass(frozen=True)
class Caps:
    read_only: bool = False
    logical_block_size: int = 512
    preferred_block_size: int = 4096
    fua: bool = True
    trim: bool = True
    write_zeroes: bool = True
    extents: bool = True
    multi_conn: bool = True


@dataclass(eq=False)
class MemHandle:
    """A volume in memory. `buffer` bytes of unflushed writes fit; flush() empties it.
    `gate`, when set, holds every blocking writev until it is set (a slow backend)."""

    name: str
    size: int = 1 << 20
    buffer: int = 1 << 30
    caps: Caps = field(default_factory=Caps)
    gate: threading.Event | None = None
    nowait_ok: bool = True
    data: bytearray = field(init=False)
    dirty: int = 0
    flushed: bytes = b""
    calls: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.data = bytearray(self.size)
        self.lock = threading.Lock()

    def _check(self, off: int, n: int) -> None:
        if off < 0 or off + n > self.size:
            raise OutOfRange(f"{self.name}: {off}+{n} is past the end ({self.size})")

    def readv(self, reqs, nowait=False):
        if nowait and not self.nowait_ok:
            raise WouldBlock("read would wait")
        self.calls.append(("readv", len(reqs), nowait))
        for off, n in reqs:
            self._check(off, n)
        return [bytes(self.data[o:o + n]) for o, n in reqs]

    def writev(self, reqs, nowait=False):
        if self.caps.read_only:
            raise ReadOnly(f"{self.name} is read-only")
        n = sum(len(d) for _o, d in reqs)
        if nowait and (not self.nowait_ok or not self.write_room(n) or self.gate is not None):
            raise WouldBlock("write would wait")
        if self.gate is not None:
            self.gate.wait(10)
        for off, d in reqs:
            self._check(off, len(d))
        self.calls.append(("writev", len(reqs), nowait))
        with self.lock:
            for off, d in reqs:
                self.data[off:off + len(d)] = d
            self.dirty += n

    def write_room(self, nbytes: int) -> bool:
        return self.dirty + nbytes <= self.buffer

    def flush(self) -> None:
        self.calls.append(("flush",))
        with self.lock:
            self.dirty = 0
            self.flushed = bytes(self.data)

    def trim(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check(offset, length)
        self.data[offset:offset + length] = bytes(length)

    def extents(self, offset: int, length: int):
        self._check(offset, length)
        return [(offset, length, any(self.data[offset:offset + length]))]


def test_batch_results_and_one_engine_call_per_kind() -> None:
    h = MemHandle("a")
    io = DoorIO("test")

    async def main() -> None:
        ops = [Op(WRITE, i * 4096, data=bytes([i + 1]) * 4096) for i in range(8)]
        await io.run(h, ops)
        assert all(op.error is None for op in ops)
        reads = [Op(READ, i * 4096, 4096) for i in range(8)]
        await io.run(h, reads)
        for i, op in enumerate(reads):
            assert op.result == bytes([i + 1]) * 4096
        ext = await io.run(h, [Op(EXTENTS, 0, 65536), Op(EXTENTS, 1 << 19, 4096)])
        assert [op.result for op in ext] == [[(0, 65536, True)], [(1 << 19, 4096, False)]]

    trio.run(main)
    # All 8 writes in one writev, all 8 reads in one readv, in the event loop (nowait).
    assert ("writev", 8, True) in h.calls and ("readv", 8, True) in h.calls


def test_a_failed_op_never_fails_its_neighbours() -> None:
    h = MemHandle("a", size=65536)
    io = DoorIO("test")

    async def main() -> list[Op]:
        ops = [Op(WRITE, 0, data=b"x" * 512), Op(WRITE, 65536, data=b"y" * 512),
               Op(WRITE, 4096, data=b"z" * 512), Op(TRIM, 60000, 9000), Op(ZEROES, 8192, 512),
               Op(READ, 65000, 1024), Op(READ, 0, 512)]
        return list(await io.run(h, ops))

    ops = trio.run(main)
    assert [type(op.error).__name__ if op.error else None for op in ops] == \
        [None, "OutOfRange", None, "OutOfRange", None, "OutOfRange", None]
    assert ops[6].result == b"x" * 512
    assert bytes(h.data[4096:4608]) == b"z" * 512


def test_would_block_goes_to_a_worker_thread() -> None:
    h = MemHandle("a", nowait_ok=False)
    io = DoorIO("test")

    async def main() -> None:
        await io.run(h, [Op(WRITE, 0, data=b"q" * 4096)])
        ops = await io.run(h, [Op(READ, 0, 4096)])
        assert ops[0].result == b"q" * 4096

    trio.run(main)
    assert ("writev", 1, False) in h.calls and ("readv", 1, False) in h.calls


def test_fua_and_flush_ops_flush_after_the_data() -> None:
    h = MemHandle("a")
    io = DoorIO("test")

    async def main() -> None:
        await io.run(h, [Op(WRITE, 0, data=b"f" * 512, fua=True)])
        assert h.flushed[:512] == b"f" * 512
        await io.run(h, [Op(WRITE, 512, data=b"g" * 512), Op(FLUSH)])
        assert h.flushed[512:1024] == b"g" * 512

    trio.run(main)


def test_flush_of_one_volume_never_waits_behind_writes_of_another() -> None:
    gate = threading.Event()
    slow = [MemHandle(f"slow{i}", gate=gate) for i in range(4)]
    other = MemHandle("other")
    io = DoorIO("test", threads=2, flush_threads=1)

    async def main() -> None:
        async with trio.open_nursery() as n:
            for i in range(4):      # more volumes writing than data threads: all taken
                n.start_soon(io.run, slow[i], [Op(WRITE, i * 4096, data=b"s" * 4096)])
            await trio.sleep(0.05)
            assert io.data.borrowed_tokens == 2
            with trio.fail_after(5):
                op = (await io.run(other, [Op(FLUSH)]))[0]
            assert op.error is None and ("flush",) in other.calls
            gate.set()

    trio.run(main)
    assert all(slow[i].data[i * 4096] == ord("s") for i in range(4))


def test_writes_wait_for_room_in_trio_not_in_a_thread() -> None:
    h = MemHandle("a", buffer=8192)
    io = DoorIO("test")

    async def main() -> None:
        await io.run(h, [Op(WRITE, 0, data=b"1" * 8192)])     # the buffer is now full
        done = trio.Event()

        async def writer() -> None:
            await io.run(h, [Op(WRITE, 8192, data=b"2" * 4096)])
            done.set()

        async with trio.open_nursery() as n:
            n.start_soon(writer)
            await trio.sleep(0.2)
            # Waiting: no data thread is held, nothing written yet.
            assert not done.is_set() and io.data.borrowed_tokens == 0
            assert h.data[8192] == 0
            await trio.to_thread.run_sync(h.flush)             # room again
            with trio.fail_after(5):
                await done.wait()
        assert h.data[8192:12288] == b"2" * 4096

    trio.run(main)


def test_no_room_for_long_one_writer_probes_the_blocking_path() -> None:
    h = MemHandle("a", buffer=4096)
    h.dirty = 4096          # full, and nobody flushes: the probe must go on
    io = DoorIO("test")

    async def main() -> None:
        with trio.fail_after(10):
            ops = await io.run(h, [Op(WRITE, 0, data=b"p" * 4096)])
        assert ops[0].error is None

    trio.run(main)
    assert h.data[:4096] == b"p" * 4096


@pytest.mark.parametrize("scope", ["handle", "door"])
def test_bytes_and_requests_in_flight_are_bounded(scope: str) -> None:
    gate = threading.Event()
    h = MemHandle("a", gate=gate)
    bound = 3 * 4096
    kw = {"handle_bytes": bound} if scope == "handle" else {"max_bytes": bound, "max_requests": 3}
    io = DoorIO("test", threads=16, **kw)

    async def main() -> None:
        async with trio.open_nursery() as n:
            for i in range(10):
                n.start_soon(io.run, h, [Op(WRITE, i * 4096, data=b"b" * 4096)])
            await trio.sleep(0.1)
            reqs, nbytes = io.in_flight(h)
            assert reqs == 3 and nbytes == bound
            gate.set()
        assert io.in_flight(h) == (0, 0) and io.flight.peak_bytes <= bound

    trio.run(main)
    assert all(h.data[i * 4096] == ord("b") for i in range(10))


def test_one_batch_over_the_bounds_still_runs_alone() -> None:
    h = MemHandle("a")
    io = DoorIO("test", max_bytes=4096, handle_bytes=4096)

    async def main() -> None:
        with trio.fail_after(5):
            ops = await io.run(h, [Op(WRITE, 0, data=b"L" * 65536)])
        assert ops[0].error is None

    trio.run(main)


def test_read_only_handle_refuses_writes_per_op() -> None:
    h = MemHandle("a@s", caps=Caps(read_only=True))
    io = DoorIO("test")

    async def main() -> list[Op]:
        return list(await io.run(h, [Op(WRITE, 0, data=b"w" * 512), Op(READ, 0, 512), Op(FLUSH)]))

    ops = trio.run(main)
    assert isinstance(ops[0].error, ReadOnly) and ops[1].result == bytes(512) and ops[2].error is None


def test_try_now_is_all_or_nothing() -> None:
    h = MemHandle("a")
    io = DoorIO("test")
    ops = [Op(WRITE, 0, data=b"n" * 512), Op(READ, 4096, 512)]
    assert io.try_now(h, ops) and ops[1].result == bytes(512) and h.data[:512] == b"n" * 512
    assert not io.try_now(h, [Op(WRITE, 0, data=b"f" * 512, fua=True)])     # FUA: run()
    assert not io.try_now(h, [Op(TRIM, 0, 512)])
    h.nowait_ok = False
    ops = [Op(WRITE, 512, data=b"m" * 512), Op(READ, 0, 512)]
    assert not io.try_now(h, ops)
    assert ops[1].result is None and h.data[512] == 0                       # nothing done


def test_concurrent_writes_of_one_handle_join_into_one_writev() -> None:
    """At most K batches of one handle in threads (one may wait for a sync DTL while the
    next is appended); what arrives meanwhile joins into the next writev."""
    K = WRITE_BATCHES_IN_FLIGHT
    gate = threading.Event()
    h = MemHandle("a", gate=gate)
    io = DoorIO("test")

    async def main() -> None:
        async with trio.open_nursery() as n:
            for i in range(K + 5):
                n.start_soon(io.run, h, [Op(WRITE, i * 4096, data=bytes([65 + i]) * 4096)])
            await trio.sleep(0.1)
            assert io.data.borrowed_tokens == K      # K writers in threads, five queued
            gate.set()

    trio.run(main)
    # The K batches in threads, then one of them takes the five that queued (which one
    # finishes first is up to the threads).
    assert sorted(c[1] for c in h.calls if c[0] == "writev") == [1] * K + [5]
    assert all(h.data[i * 4096] == 65 + i for i in range(K + 5))


def test_a_cancelled_batch_never_acknowledges_the_writes_that_joined_it() -> None:
    gate = threading.Event()
    h = MemHandle("a", gate=gate)
    io = DoorIO("test")
    joined = [Op(WRITE, 64 * 4096, data=b"j" * 4096)]

    async def main() -> None:
        scopes = [trio.CancelScope() for _ in range(WRITE_BATCHES_IN_FLIGHT)]
        done = trio.Event()

        async def drainer(i: int) -> None:
            with scopes[i]:
                await io.run(h, [Op(WRITE, i * 4096, data=b"d" * 4096)])

        async def joiner() -> None:
            await io.run(h, joined)
            done.set()

        async with trio.open_nursery() as n:
            for i in range(WRITE_BATCHES_IN_FLIGHT):
                n.start_soon(drainer, i)
            await trio.sleep(0.05)          # the drainers' writes are in threads (gated)
            n.start_soon(joiner)            # queued behind them, to join the next writev
            await trio.sleep(0.05)
            for scope in scopes:
                scope.cancel()              # the drainers' clients go away
            with trio.fail_after(5):
                await done.wait()
        gate.set()

    trio.run(main)
    assert joined[0].error is not None and "interrupted" in str(joined[0].error)
