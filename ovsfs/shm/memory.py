"""The front end's memory as the back end sees it: one mmap per region of SET_MEM_TABLE.

vhost-user.rst "Front-end message types", VHOST_USER_SET_MEM_TABLE: each region comes
with a file descriptor; bytes [mmap_offset, mmap_offset + memory_size) of that fd are
guest physical addresses [guest_phys_addr, ...) (what descriptors hold, virtio 1.1
section 2.6.5) and the front end's user addresses [userspace_addr, ...) (what
SET_VRING_ADDR holds). Every translation is bounds-checked: an address outside the
table is a `GuestMemoryError`, never an access outside a mapping.

Regions are mapped shared (writes reach the guest). A mapping past the end of its file
faults (SIGBUS, which kills the whole daemon) on first touch, so a region's fd must be a
memfd sealed against shrinking (F_SEAL_SHRINK, checked with F_GET_SEALS): its size, checked
at map time, then stays. QEMU's memory-backend-memfd seals (seal=on, the default), and so
does the client library. F_GET_SEALS is asked before anything else: it fails (EINVAL) on
anything that is not shmem or hugetlbfs without calling into the file's filesystem, so a
file on a FUSE mount (even the daemon's own, whose fstat would wait on the daemon itself)
is refused without blocking. `allow_unsealed` ([shm] allow_unsealed_memory) also takes
unsealed tmpfs / hugetlbfs files (QEMU memory-backend-file on /dev/hugepages): such a
front end could still crash the daemon by truncating its file.
"""

from __future__ import annotations

import fcntl
import gc
import mmap
import os
import stat
from dataclasses import dataclass

from ovsfs.errors import InvalidArgument
from ovsfs.vhost.protocol import MAX_REGIONS, Region


class GuestMemoryError(InvalidArgument):
    """An address or length the front end gave falls outside its memory table."""


@dataclass
class Mapped:
    region: Region
    map: mmap.mmap
    view: memoryview


def check_memory_fd(fd: int, allow_unsealed: bool = False) -> None:
    """GuestMemoryError unless `fd` is a memfd sealed against shrinking (or, with
    allow_unsealed, any shmem / hugetlbfs file). Never blocks: F_GET_SEALS does not reach
    the file's filesystem (see the module docstring)."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as e:
        raise GuestMemoryError(f"memory region fd is not a memfd ({_what(fd)}: F_GET_SEALS: "
                               f"{e.strerror}); only sealed memfds are accepted") from None
    if not seals & fcntl.F_SEAL_SHRINK and not allow_unsealed:
        raise GuestMemoryError(f"memory region fd ({_what(fd)}) is not sealed with F_SEAL_SHRINK: it could "
                               "shrink under the mapping (QEMU: memory-backend-memfd with seal=on; "
                               "[shm] allow_unsealed_memory takes unsealed tmpfs/hugetlbfs files)")


def _what(fd: int) -> str:
    """What an fd is, for log lines (readlink of /proc/self/fd never calls into a filesystem)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"


class GuestMemory:
    """The regions of one SET_MEM_TABLE, mapped. Addresses and sizes in bytes."""

    def __init__(self, regions: list[Region], fds: list[int], allow_unsealed: bool = False) -> None:
        """Map each region from its fd (the fds stay the caller's to close: mmap holds
        its own reference). GuestMemoryError for a malformed table (overlaps, sizes
        past the fd's end, wrap-around) or an fd that cannot be mapped or could shrink
        (not a memfd sealed with F_SEAL_SHRINK; unless allow_unsealed, a tmpfs or
        hugetlbfs file)."""
        if len(regions) != len(fds) or len(regions) > MAX_REGIONS:
            raise GuestMemoryError(f"memory table of {len(regions)} regions with {len(fds)} fds")
        self.maps: list[Mapped] = []
        try:
            for r, fd in zip(regions, fds):
                self.maps.append(self._map(r, fd, allow_unsealed))
        except BaseException:
            self.close()
            raise
        # (gpa, size, view) per region, for the per-descriptor lookups (gpa(), Vring._walk).
        self.spans = [(m.region.gpa, m.region.size, m.view) for m in self.maps]
        spans = sorted((m.region.gpa, m.region.gpa + m.region.size) for m in self.maps)
        for (a0, a1), (b0, _b1) in zip(spans, spans[1:]):
            if b0 < a1:
                self.close()
                raise GuestMemoryError(f"memory regions overlap at guest address {b0:#x}")

    @staticmethod
    def _map(r: Region, fd: int, allow_unsealed: bool) -> Mapped:
        if r.size <= 0 or r.gpa < 0 or r.gpa + r.size > 1 << 64 or r.uaddr + r.size > 1 << 64:
            raise GuestMemoryError(f"memory region {r} is empty or wraps around")
        check_memory_fd(fd, allow_unsealed)
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise GuestMemoryError(f"memory region fd: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise GuestMemoryError("memory region fd is not a regular file (memfd, hugetlbfs)")
        page = mmap.ALLOCATIONGRANULARITY
        start = r.offset - r.offset % page
        if r.offset < 0 or r.offset + r.size > st.st_size:
            raise GuestMemoryError(f"memory region [{r.offset:#x}, +{r.size:#x}) is past the end of "
                                   f"its file ({st.st_size:#x} bytes)")
        try:
            m = mmap.mmap(fd, r.offset - start + r.size, mmap.MAP_SHARED,
                          mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        except (OSError, ValueError, OverflowError) as e:
            raise GuestMemoryError(f"memory region cannot be mapped: {e}") from None
        view = memoryview(m)[r.offset - start:]
        return Mapped(r, m, view)

    def _find(self, addr: int, length: int, user: bool) -> list[memoryview]:
        """The views covering [addr, addr + length): several when the range crosses from
        one region into the next contiguous one."""
        out: list[memoryview] = []
        if length < 0:
            raise GuestMemoryError(f"negative length {length}")
        while True:
            for m in self.maps:
                base = m.region.uaddr if user else m.region.gpa
                if base <= addr < base + m.region.size:
                    off = addr - base
                    take = min(length, m.region.size - off)
                    out.append(m.view[off:off + take])
                    addr += take
                    length -= take
                    break
            else:
                kind = "user" if user else "guest physical"
                raise GuestMemoryError(f"{kind} address {addr:#x} (+{length:#x}) is outside the memory table")
            if length == 0:
                return out

    def gpa(self, addr: int, length: int) -> list[memoryview]:
        """Views of guest physical range [addr, addr + length) (length 0: one empty view).
        GuestMemoryError outside the table."""
        for base, size, view in self.spans:   # the usual case first: inside one region
            off = addr - base
            if 0 <= off and off + length <= size and length:
                return [view[off:off + length]]
        if length == 0:
            return [self._find(addr, 1, False)[0][:0]]
        return self._find(addr, length, False)

    def uaddr(self, addr: int, length: int) -> memoryview:
        """One view of the front end's user range [addr, addr + length) (rings must lie in
        one region, as libvhost-user also requires). GuestMemoryError otherwise."""
        views = self._find(addr, max(length, 1), True)
        if len(views) != 1:
            raise GuestMemoryError(f"ring at user address {addr:#x} crosses a memory region boundary")
        return views[0][:length]

    def close(self) -> None:
        """Unmap. Views of the requests of a session that was cancelled linger in reference
        cycles (tracebacks of trio.Cancelled): one garbage collection frees them, else
        every front end that went away would leave its mapping and fd until the next
        collection. A mapping that a request still really uses (a write abandoned in an
        engine thread) stays until that view is released, then goes with it."""
        collected = False
        self.spans = []
        for m in self.maps:
            try:
                m.view.release()
            except BufferError:
                pass
            while True:
                try:
                    m.map.close()
                    break
                except BufferError:
                    if collected:
                        break
                    gc.collect()
                    collected = True
        self.maps = []
