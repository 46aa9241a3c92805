"""The split virtqueue's layout in shared memory (virtio 1.1 section 2.6), for both ends.

A queue of `num` entries (a power of two, at most 32768) is three areas:

    descriptor table  16 * num bytes, 16-aligned: {u64 addr, u32 len, u16 flags, u16 next}
    available ring    6 + 2 * num bytes, 2-aligned: {u16 flags, u16 idx, u16 ring[num], u16 used_event}
    used ring         6 + 8 * num bytes, 4-aligned: {u16 flags, u16 idx, {u32 id, u32 len}[num], u16 avail_event}

`idx` fields are free-running u16 counters; entry i of a ring is at i % num. With
VIRTIO_RING_F_EVENT_IDX the trailing used_event / avail_event fields replace the flags
for notification suppression (section 2.6.7.2 / 2.6.10.2). Descriptor `addr` is a guest
physical address; a descriptor with F_INDIRECT points at a table of descriptors
(section 2.6.5.3). No I/O here: the back end (`ovsfs.shm`) and the front end
(`ovsfs.client`) read and write these through memoryviews of the mapped memory.
"""

from __future__ import annotations

import struct
import threading
import sys

MAX_QUEUE_SIZE = 32768

DESC = struct.Struct("<QIHH")          # addr, len, flags, next
USED_ELEM = struct.Struct("<II")       # id (head descriptor index), len (bytes written)
U16 = struct.Struct("<H")

F_NEXT = 0x1                           # the chain goes on at `next`
F_WRITE = 0x2                          # device-writable (else device-readable)
F_INDIRECT = 0x4                       # addr/len is a table of descriptors

AVAIL_F_NO_INTERRUPT = 0x1             # driver: do not signal used buffers (no EVENT_IDX)
USED_F_NO_NOTIFY = 0x1                 # device: do not kick on new available buffers (no EVENT_IDX)

# Offsets inside the available ring / used ring areas.
AVAIL_FLAGS, AVAIL_IDX, AVAIL_RING = 0, 2, 4
USED_FLAGS, USED_IDX, USED_RING = 0, 2, 4

ALIGN_DESC, ALIGN_AVAIL, ALIGN_USED = 16, 2, 4


def u16_cells(view: memoryview) -> memoryview:
    """`view` (2-aligned, an even number of bytes) as u16 cells: `cells[i]` loads and
    `cells[i] = v` stores with ONE 16-bit access. Use it for every field the other side
    reads while it may change: avail->idx / flags / ring / used_event, used->idx / flags /
    avail_event. struct's pack_into / unpack_from must not be used for those: CPython's
    pack_into first zeroes the destination (s_pack_internal's memset) and writes byte by
    byte, and unpack_from reads byte by byte, so the other side can see a zero or torn
    index (seen here: the device read avail->idx 0 mid-write and took the ring as
    corrupt). Aligned 16-bit accesses are single-copy atomic on x86 and arm64."""
    if sys.byteorder != "little":    # the ring is little-endian (virtio 1.1 section 2.6)
        raise NotImplementedError("virtqueue cells need a little-endian host")
    return view.cast("H")


# Cell numbers (u16 units) in the available ring / used ring areas, for u16_cells views.
AVAIL_FLAGS_CELL, AVAIL_IDX_CELL, AVAIL_RING_CELL = 0, 1, 2
USED_FLAGS_CELL, USED_IDX_CELL = 0, 1


def used_event_cell(num: int) -> int:
    """Cell of used_event in the available ring area."""
    return used_event_offset(num) // 2


def avail_event_cell(num: int) -> int:
    """Cell of avail_event in the used ring area."""
    return avail_event_offset(num) // 2


def check_size(num: int) -> None:
    """ValueError unless num is a valid queue size (section 2.6: a power of two, <= 32768)."""
    if num <= 0 or num > MAX_QUEUE_SIZE or num & (num - 1):
        raise ValueError(f"queue size {num} is not a power of two in 1..{MAX_QUEUE_SIZE}")


def desc_bytes(num: int) -> int:
    return DESC.size * num


def avail_bytes(num: int) -> int:
    return 6 + 2 * num


def used_bytes(num: int) -> int:
    return 6 + USED_ELEM.size * num


def used_event_offset(num: int) -> int:
    """Offset of used_event in the available ring area."""
    return AVAIL_RING + 2 * num


def avail_event_offset(num: int) -> int:
    """Offset of avail_event in the used ring area."""
    return USED_RING + USED_ELEM.size * num


def align(n: int, a: int) -> int:
    return (n + a - 1) & ~(a - 1)


def layout(num: int, base: int = 0) -> tuple[int, int, int, int]:
    """A compact placement of one queue from `base`: (desc, avail, used, end) offsets."""
    check_size(num)
    desc = align(base, ALIGN_DESC)
    avail = align(desc + desc_bytes(num), ALIGN_AVAIL)
    used = align(avail + avail_bytes(num), ALIGN_USED)
    return desc, avail, used, used + used_bytes(num)


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """Section 2.6.7.2: with EVENT_IDX, notify when the counter moved from old_idx to new_idx
    past event_idx (all u16, wrapping)."""
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF


_FENCE = threading.Lock()


def fence() -> None:
    """A full memory barrier between a store to shared memory and a later load of another
    location (virtio 1.1 2.6.7.2 / 2.6.10.2 need one: an event index written, then the
    other side's index read again). On x86 (TSO) only that store-load pair can be
    reordered; taking and giving back a lock is a locked read-modify-write instruction,
    which is a full barrier. Python has no fence of its own."""
    _FENCE.acquire()
    _FENCE.release()
