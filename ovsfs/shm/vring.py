"""The device side of one split virtqueue (virtio 1.1 section 2.6) in the front end's memory.

`pop()` takes the next available descriptor chain (section 2.6.6) with its indirect table
(2.6.5.3) as lists of device-readable and device-writable memoryviews; `push()` puts a
used element (2.6.8); `notify()` signals the call eventfd unless the driver suppressed it
(2.6.7: AVAIL_F_NO_INTERRUPT, or with EVENT_IDX used_event, 2.6.7.2); with EVENT_IDX
`publish()` writes avail_event (2.6.10.2) so the driver kicks for the next entries.

Everything the driver wrote is checked before use: a head or `next` index past the ring,
a chain longer than the ring (or than its indirect table: a loop), an indirect table
inside an indirect table or with a bad length, a writable descriptor before a readable
one (2.6.4.2), an address outside the memory table, or more entries made available than
the ring has are a `ChainError`. The device cannot trust such a ring any more (it cannot
even tell where the status byte is): the session drops the connection, as libvhost-user
does ("device needs reset"), and the daemon serves on.

Indexes and flags are read and written through u16 cells (`virtq.u16_cells`): single
16-bit accesses, never struct (which zeroes first and goes byte by byte: torn indexes).

Ordering: the rings are shared with another process without locks. On x86 (TSO) stores
are seen in order and loads are not reordered with loads, so the used element before the
used index, and the descriptors after the available index, need nothing. A store followed
by a load of another location can pass, though: where the protocol needs a full barrier
(avail_event then the available index; the used index then used_event) `fence()` takes
and gives back a lock, a locked read-modify-write instruction, which is one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import trio

from ovsfs.shm.memory import GuestMemory, GuestMemoryError
from ovsfs.vhost import virtq
from ovsfs.vhost.protocol import U64
from ovsfs.vhost.virtq import DESC, USED_ELEM

F_NEXT, F_WRITE, F_INDIRECT = virtq.F_NEXT, virtq.F_WRITE, virtq.F_INDIRECT   # hot-path globals
MAX_INDIRECT = 1024          # descriptors in one indirect table (Linux uses seg_max + 2)

fence = virtq.fence


class ChainError(GuestMemoryError):
    """The driver's ring is malformed: the connection cannot be trusted any more."""


@dataclass(slots=True)
class Chain:
    """One available descriptor chain: its head index, and the memory it names."""

    head: int
    out: list[memoryview] = field(default_factory=list)    # device-readable, in order
    into: list[memoryview] = field(default_factory=list)   # device-writable, in order
    out_len: int = 0
    in_len: int = 0


class Vring:
    """One queue of one connection. Sizes: `num` entries; addresses are the front end's
    user addresses of SET_VRING_ADDR; indexes are free-running u16."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.num = 0
        self.addrs: tuple[int, int, int] | None = None      # desc, avail, used
        self.last_avail = 0        # SET_VRING_BASE / GET_VRING_BASE
        self.used_idx = 0
        self.checked_used = 0      # used index at the last notify decision
        self.event_idx = False
        self.enabled = False
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.desc: memoryview | None = None
        self.avail: memoryview | None = None      # u16 cells of the available ring
        self.used: memoryview | None = None       # bytes of the used ring (elements)
        self.used16: memoryview | None = None     # u16 cells of the used ring
        self.mem: GuestMemory | None = None

    @property
    def ready(self) -> bool:
        """Everything needed to serve it: size, mapped rings, a kick fd."""
        return self.desc is not None and self.kick_fd is not None

    def map(self, mem: GuestMemory | None) -> None:
        """(Re)resolve the ring addresses in `mem` (after SET_VRING_ADDR or a new memory
        table). ChainError when they fall outside it; nothing when not all is known."""
        self.unmap()
        self.mem = mem
        if mem is None or self.addrs is None or not self.num:
            return
        d, a, u = self.addrs
        n = self.num
        if d % virtq.ALIGN_DESC or a % virtq.ALIGN_AVAIL or u % virtq.ALIGN_USED:
            raise ChainError(f"queue {self.index}: ring addresses are not aligned (section 2.6)")
        self.desc = mem.uaddr(d, virtq.desc_bytes(n))
        self.avail = virtq.u16_cells(mem.uaddr(a, virtq.avail_bytes(n)))
        self.used = mem.uaddr(u, virtq.used_bytes(n))
        self.used16 = virtq.u16_cells(self.used)
        self.used_idx = self.checked_used = self.used16[virtq.USED_IDX_CELL]

    def unmap(self) -> None:
        """Drop the views (the mapping can then be closed)."""
        for name in ("desc", "avail", "used16", "used"):
            view = getattr(self, name)
            setattr(self, name, None)
            if view is not None:
                view.release()
        self.mem = None

    # ---- available ring ----------------------------------------------------------------

    def pending(self) -> int:
        """Entries made available and not yet popped. ChainError when more than the ring."""
        assert self.avail is not None
        idx = self.avail[virtq.AVAIL_IDX_CELL]
        n = (idx - self.last_avail) & 0xFFFF
        if n > self.num:
            raise ChainError(f"queue {self.index}: {n} entries available in a ring of {self.num} "
                             f"(avail idx {idx}, {self.last_avail} taken)")
        return n

    def pop(self) -> Chain | None:
        """The next available chain, or None. ChainError (see the module docstring)."""
        if not self.pending():
            return None
        return self.take()

    def take(self) -> Chain:
        """The next available chain, when `pending()` said there is one (a batch reads the
        available index once). ChainError (see the module docstring)."""
        assert self.avail is not None and self.desc is not None and self.mem is not None
        head = self.avail[virtq.AVAIL_RING_CELL + self.last_avail % self.num]
        if head >= self.num:
            raise ChainError(f"queue {self.index}: head {head} past a ring of {self.num}")
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return self._walk(head)

    def _walk(self, head: int) -> Chain:
        # The hot path of every request: locals only, one unpack per descriptor, an
        # indirect table copied once and split with iter_unpack.
        mem = self.mem
        assert mem is not None and self.desc is not None
        gpa = mem.gpa
        # The first region inline (the usual case: every descriptor inside it), gpa() else.
        base, rsize, rview = mem.spans[0] if mem.spans else (0, 0, None)
        desc = self.desc
        unpack = DESC.unpack_from
        addr, length, flags, nxt = unpack(desc, DESC.size * head)
        entries: list[tuple[int, int, int, int]] | None = None
        size = self.num
        if flags & F_INDIRECT:
            if flags & F_NEXT:
                raise ChainError(f"queue {self.index}: indirect descriptor inside a chain or an "
                                 "indirect table (section 2.6.5.3.1)")
            if not length or length % DESC.size or length // DESC.size > MAX_INDIRECT:
                raise ChainError(f"queue {self.index}: indirect table of {length} bytes")
            # A private copy: the driver cannot change the table while it is walked.
            views = gpa(addr, length)
            table = bytes(views[0]) if len(views) == 1 else b"".join(views)
            entries = list(DESC.iter_unpack(table))
            size = len(entries)
            addr, length, flags, nxt = entries[0]
        out: list[memoryview] = []
        into: list[memoryview] = []
        out_len = in_len = 0
        count = 1
        while True:
            if flags & F_INDIRECT:
                raise ChainError(f"queue {self.index}: indirect descriptor inside a chain or an "
                                 "indirect table (section 2.6.5.3.1)")
            off = addr - base
            views = [rview[off:off + length]] if length and 0 <= off and off + length <= rsize else gpa(addr, length)
            if flags & F_WRITE:
                into += views
                in_len += length
            else:
                if into:
                    raise ChainError(f"queue {self.index}: a readable descriptor after a writable "
                                     "one (section 2.6.4.2)")
                out += views
                out_len += length
            if not flags & F_NEXT:
                return Chain(head, out, into, out_len, in_len)
            if nxt >= size:
                raise ChainError(f"queue {self.index}: next {nxt} past a table of {size}")
            count += 1
            if count > size:
                raise ChainError(f"queue {self.index}: chain from {head} is longer than its table "
                                 f"({size}): a loop")
            addr, length, flags, nxt = entries[nxt] if entries is not None else unpack(desc, DESC.size * nxt)

    def publish(self) -> bool:
        """With EVENT_IDX: ask for a kick at the next entry (avail_event = last_avail),
        then look again. True when entries are available (pop again before waiting)."""
        if self.event_idx and self.used16 is not None:
            self.used16[virtq.avail_event_cell(self.num)] = self.last_avail
            fence()
        return self.pending() > 0

    # ---- used ring ---------------------------------------------------------------------

    def push(self, head: int, written: int) -> None:
        """Return chain `head` with `written` bytes written into its writable part."""
        assert self.used is not None and self.used16 is not None
        # The element is not the driver's until the index moves: struct may write it.
        USED_ELEM.pack_into(self.used, virtq.USED_RING + USED_ELEM.size * (self.used_idx % self.num),
                            head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.used16[virtq.USED_IDX_CELL] = self.used_idx

    def push_many(self, done: list[tuple[int, int]]) -> None:
        """`push` for each (head, written), with one store of the used index at the end."""
        assert self.used is not None and self.used16 is not None
        used, num, idx, pack = self.used, self.num, self.used_idx, USED_ELEM.pack_into
        for head, written in done:
            pack(used, virtq.USED_RING + USED_ELEM.size * (idx % num), head, written)
            idx = (idx + 1) & 0xFFFF
        self.used_idx = idx
        self.used16[virtq.USED_IDX_CELL] = idx

    def notify(self) -> None:
        """Signal the call eventfd for the used elements pushed since the last call, unless
        the driver asked not to be (section 2.6.7)."""
        if self.used_idx == self.checked_used or self.avail is None:
            return
        old, self.checked_used = self.checked_used, self.used_idx
        fence()
        if self.event_idx:
            used_event = self.avail[virtq.used_event_cell(self.num)]
            if not virtq.need_event(used_event, self.used_idx, old):
                return
        elif self.avail[virtq.AVAIL_FLAGS_CELL] & virtq.AVAIL_F_NO_INTERRUPT:
            return
        if self.call_fd is not None:
            try:
                os.write(self.call_fd, U64.pack(1))
            except BlockingIOError:
                pass      # the counter is full: the driver has a wake-up pending anyway

    def close_fds(self) -> None:
        """Close kick, call and err fds (the kick task must be stopped first)."""
        for name in ("kick_fd", "call_fd", "err_fd"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                if name == "kick_fd":
                    try:      # trio may still hold an epoll registration for it
                        trio.lowlevel.notify_closing(fd)
                    except RuntimeError:
                        pass  # not in a trio thread (tests)
                try:
                    os.close(fd)
                except OSError:
                    pass
