"""The driver side of split virtqueues in memory shared with a vhost-user back end.

`SharedMemory` is one memfd mapped here and handed to the back end with SET_MEM_TABLE as
a single region: guest physical address (gpa) 0 is byte 0 of the memfd, so a gpa is
simply an offset into `SharedMemory.view`. The back end also needs user addresses for
the rings (SET_VRING_ADDR); we give it `UADDR_BASE + gpa`, a fake but consistent
address space (the back end only translates it through the memory table).

`DriverQueue` is deliberately raw: tests put arbitrary descriptors on it (out-of-range
addresses, loops, indirect tables, wrong lengths) as well as well-formed chains. It does
no I/O of its own except the kick (an eventfd write) and the wait for the call eventfd.
"""

from __future__ import annotations

import os
import select
from typing import Sequence

from ovsfs.errors import InvalidArgument, NoSpace
from ovsfs.vhost import virtq
from ovsfs.vhost.virtq import DESC, USED_ELEM

UADDR_BASE = 0x7F5A_0000_0000   # user address of gpa 0 as the back end is told (never dereferenced here)
PAGE = 4096


class SharedMemory:
    """One memfd of `size` bytes, mapped read-write and shared, with a simple allocator.

    The first page is never handed out, so that gpa 0 never names a live buffer."""

    def __init__(self, size: int, name: str = "ovsfs-client", *, sealed: bool = True) -> None:
        import fcntl
        import mmap

        size = virtq.align(max(size, 2 * PAGE), PAGE)
        self.size = size
        self.sealed = sealed
        # Sealed against shrinking and growing once sized: a back end maps this memory, and
        # a front end that truncated it under the back end's mapping would make the back
        # end's next access SIGBUS; the shm door accepts only memfds sealed so. `sealed`
        # False makes the old, unsealed memfd (for tests of back ends that must refuse it).
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealed else 0))
        try:
            os.ftruncate(self.fd, size)
            if sealed:
                fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS,
                            fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self._map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self.view = memoryview(self._map)
        self._next = PAGE
        self._free: dict[int, list[int]] = {}   # rounded size -> free gpas of that size
        self._sizes: dict[int, int] = {}        # allocated gpa -> rounded size

    def alloc(self, nbytes: int, align: int = 64) -> int:
        """The gpa of `nbytes` fresh bytes aligned to `align` (a power of two <= 4096).
        NoSpace when the memory is used up (make the Frontend's memory larger)."""
        rounded = virtq.align(max(nbytes, 1), 64)
        free = self._free.get(rounded)
        if free and align <= 64:
            gpa = free.pop()
        else:
            gpa = virtq.align(self._next, max(align, 64))
            if gpa + rounded > self.size:
                raise NoSpace(f"shared memory of {self.size} bytes is used up ({nbytes} more asked)")
            self._next = gpa + rounded
        self._sizes[gpa] = rounded
        return gpa

    def free(self, gpa: int) -> None:
        """Give back a block from `alloc` (it is reused for blocks of the same size)."""
        rounded = self._sizes.pop(gpa)
        self._free.setdefault(rounded, []).append(gpa)

    def close(self) -> None:
        if self.fd < 0:
            return
        self.view.release()
        try:
            self._map.close()
        except BufferError:
            pass  # a caller still holds a view of a buffer: the mapping goes with the last one
        os.close(self.fd)
        self.fd = -1


class DriverQueue:
    """One split virtqueue, driver side: descriptor table, available ring (ours to write)
    and used ring (the device's), all in `mem`, plus the kick and call eventfds.

    Raw calls: `write_desc`, `make_available`, `publish`, `kick`, `reap`. Convenience:
    `add_chain` (allocates descriptors, links them, or builds an indirect table) and
    `free_chain`. Indices wrap as free-running u16 counters like the device's."""

    def __init__(self, mem: SharedMemory, index: int, num: int, event_idx: bool) -> None:
        virtq.check_size(num)
        self.mem = mem
        self.index = index
        self.num = num
        self.event_idx = event_idx
        desc, avail, used, end = virtq.layout(num)
        base = mem.alloc(end, align=PAGE)
        self.desc, self.avail, self.used = base + desc, base + avail, base + used
        # Every field the device may read or write meanwhile goes through u16 cells: one
        # 16-bit load or store each (struct's pack_into zeroes the field first, so the
        # device could read avail->idx 0; see virtq.u16_cells).
        self.avail_cells = virtq.u16_cells(mem.view[self.avail:self.avail + virtq.avail_bytes(num)])
        self.used_cells = virtq.u16_cells(mem.view[self.used:self.used + virtq.used_bytes(num)])
        self.avail_idx = 0          # our shadow of avail->idx (entries added, maybe unpublished)
        self.published_idx = 0      # what avail->idx says
        self.kicked_idx = 0         # avail->idx at the last kick (for EVENT_IDX suppression)
        self.last_used = 0          # used entries consumed
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._free_desc = list(range(num - 1, -1, -1))   # a stack: pop() gives 0, 1, 2, ...
        self._chains: dict[int, tuple[list[int], int | None]] = {}  # head -> (descs, indirect table gpa)

    # -- addresses as the back end is told ---------------------------------------------

    @property
    def addresses(self) -> tuple[int, int, int]:
        """(desc, used, avail) user addresses for SET_VRING_ADDR (in its field order)."""
        return UADDR_BASE + self.desc, UADDR_BASE + self.used, UADDR_BASE + self.avail

    # -- descriptors -------------------------------------------------------------------

    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, next_: int = 0) -> None:
        """Descriptor i of the table, as given (no checks: malformed is allowed)."""
        DESC.pack_into(self.mem.view, self.desc + DESC.size * i, addr & (2**64 - 1),
                       length & 0xFFFFFFFF, flags & 0xFFFF, next_ & 0xFFFF)

    def read_desc(self, i: int) -> tuple[int, int, int, int]:
        return DESC.unpack_from(self.mem.view, self.desc + DESC.size * i)

    def alloc_desc(self, n: int) -> list[int]:
        """n free descriptor indices; InvalidArgument when fewer are free."""
        if n > len(self._free_desc):
            raise InvalidArgument(f"queue {self.index}: {n} descriptors asked, {len(self._free_desc)} free")
        return [self._free_desc.pop() for _ in range(n)]

    def release_desc(self, idxs: Sequence[int]) -> None:
        self._free_desc.extend(reversed(idxs))

    @property
    def free_descriptors(self) -> int:
        return len(self._free_desc)

    def add_chain(self, segments: Sequence[tuple[int, int, int]], *, indirect: bool = False,
                  publish: bool = True) -> int:
        """Put one chain of (gpa, length, flags) segments on the ring and return its head.

        Segments are linked with F_NEXT in order (a segment's own F_NEXT is ignored). With
        `indirect`, the segments go into an indirect table in shared memory and the ring
        gets one F_INDIRECT descriptor. The chain is made available (and published unless
        `publish` is False); `kick()` is separate so that callers can batch."""
        n = len(segments)
        if indirect:
            table = self.mem.alloc(DESC.size * max(n, 1), align=16)
            for k, (addr, length, flags) in enumerate(segments):
                more = virtq.F_NEXT if k + 1 < n else 0
                DESC.pack_into(self.mem.view, table + DESC.size * k, addr, length,
                               (flags & ~virtq.F_NEXT) | more, k + 1 if more else 0)
            [head] = self.alloc_desc(1)
            self.write_desc(head, table, DESC.size * n, virtq.F_INDIRECT)
            self._chains[head] = ([head], table)
        else:
            idxs = self.alloc_desc(n)
            for k, (addr, length, flags) in enumerate(segments):
                more = virtq.F_NEXT if k + 1 < n else 0
                self.write_desc(idxs[k], addr, length, (flags & ~virtq.F_NEXT) | more,
                                idxs[k + 1] if more else 0)
            head = idxs[0]
            self._chains[head] = (idxs, None)
        self.make_available(head)
        if publish:
            self.publish()
        return head

    def track_chain(self, head: int, descs: Sequence[int], table_gpa: int | None = None) -> None:
        """Remember a hand-made chain so that `reap(free=True)` gives its descriptors back."""
        self._chains[head] = (list(descs), table_gpa)

    def free_chain(self, head: int) -> None:
        """Give back the descriptors (and indirect table) of a chain from `add_chain`."""
        descs, table = self._chains.pop(head)
        self.release_desc(descs)
        if table is not None:
            self.mem.free(table)

    # -- available ring ----------------------------------------------------------------

    def make_available(self, head: int) -> None:
        """Put `head` in the next available slot; invisible to the device until `publish`."""
        self.avail_cells[virtq.AVAIL_RING_CELL + self.avail_idx % self.num] = head & 0xFFFF
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF

    def publish(self) -> None:
        """Write avail->idx: every entry made available so far becomes the device's."""
        if self.published_idx != self.avail_idx:
            self.avail_cells[virtq.AVAIL_IDX_CELL] = self.avail_idx
            self.published_idx = self.avail_idx

    def set_avail_idx(self, value: int) -> None:
        """Raw: write any avail->idx (e.g. far past the entries there are)."""
        self.avail_cells[virtq.AVAIL_IDX_CELL] = value & 0xFFFF
        self.avail_idx = self.published_idx = value & 0xFFFF

    def needs_kick(self) -> bool:
        """Whether the device asked to be notified of what was published since the last
        kick: avail_event with EVENT_IDX, else the used ring's NO_NOTIFY flag."""
        if self.event_idx:
            virtq.fence()   # our avail->idx store before the load of the device's avail_event
            event = self.used_cells[virtq.avail_event_cell(self.num)]
            return virtq.need_event(event, self.published_idx, self.kicked_idx)
        flags = self.used_cells[virtq.USED_FLAGS_CELL]
        return not flags & virtq.USED_F_NO_NOTIFY

    def kick(self, force: bool = False) -> bool:
        """Publish, then notify the device if it wants it (or `force`). True if kicked."""
        self.publish()
        if self.published_idx == self.kicked_idx and not force:
            return False
        if force or self.needs_kick():
            os.eventfd_write(self.kick_fd, 1)
            self.kicked_idx = self.published_idx
            return True
        self.kicked_idx = self.published_idx
        return False

    # -- used ring ---------------------------------------------------------------------

    def used_idx(self) -> int:
        return self.used_cells[virtq.USED_IDX_CELL]

    def pending_used(self) -> int:
        return (self.used_idx() - self.last_used) & 0xFFFF

    def reap(self, free: bool = True) -> list[tuple[int, int]]:
        """Every used element the device added since the last reap: (head id, bytes written).
        With `free`, chains from `add_chain` / `track_chain` give their descriptors back."""
        view, used, num = self.mem.view, self.used, self.num
        end = self.used_cells[virtq.USED_IDX_CELL]
        out = []
        i = self.last_used
        while i != end:
            out.append(USED_ELEM.unpack_from(view, used + virtq.USED_RING + USED_ELEM.size * (i % num)))
            i = (i + 1) & 0xFFFF
        self.last_used = end
        if self.event_idx:
            # Ask for a call as soon as the next element is used.
            self.avail_cells[virtq.used_event_cell(num)] = end
            virtq.fence()   # before the next load of used->idx (a call may have been skipped)
        if free:
            for head, _ in out:
                if head in self._chains:
                    self.free_chain(head)
        return out

    def drain_call(self) -> None:
        """Clear the call eventfd (the device's notifications so far)."""
        try:
            os.eventfd_read(self.call_fd)
        except BlockingIOError:
            pass

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the device used something new (or `timeout` seconds); True if it did."""
        if self.pending_used():
            return True
        self.drain_call()
        if self.pending_used():
            return True
        r, _, _ = select.select([self.call_fd], [], [], timeout)
        return bool(r) or self.pending_used() > 0

    def close(self) -> None:
        self.avail_cells.release()
        self.used_cells.release()
        for fd in (self.kick_fd, self.call_fd):
            if fd >= 0:
                os.close(fd)
        self.kick_fd = self.call_fd = -1
