"""The read side of a volume: map look-ups through the clone chain, local SCO reads,
backend reads outside the lock, allocation extents.

A part of Volume (ovsfs/engine/volume.py): it works on the volume's shared state
(state.py, `self.s`); a clone's read path holds its parent's read path, so reads fall
through the clone chain without knowing Volume.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import numpy as np

from ovsfs.engine.map import SCO_SHIFT, ZERO_LOC
from ovsfs.engine.names import sco_name
from ovsfs.engine.state import VolumeState
from ovsfs.errors import Busy, DataError, NotFound, WouldBlock


IDX_MASK = (1 << SCO_SHIFT) - 1


def _fetch(out: bytearray, remote: list[tuple[VolumeState, int, int, int, int]]) -> None:
    """Read the runs that are no longer in any write buffer from the backend."""
    for st, sco, ci, count, at in remote:
        cs = st.cluster_size
        out[at:at + count * cs] = st.store.get_range(st.ns, sco_name(sco), ci * cs, count * cs)


@contextmanager
def _hold(lock: threading.RLock, nowait: bool) -> Iterator[None]:
    """Hold a volume lock; with nowait, WouldBlock instead of waiting for it."""
    if not lock.acquire(blocking=not nowait):
        raise WouldBlock("volume busy")
    try:
        yield
    finally:
        lock.release()


class ReadPath:
    def __init__(self, state: VolumeState, ensure_map: Callable[[], None],
                 parent: "ReadPath | None" = None) -> None:
        """`ensure_map` rebuilds this volume's map if SQLite lost it (the log writer's);
        `parent` is the read path of the volume this one was cloned from."""
        self.s = state
        self.ensure_map = ensure_map
        self.parent = parent

    # ---- reads -----------------------------------------------------------------------------

    def read(self, offset: int, length: int, snapshot: str | None = None) -> bytes:
        self.s.check_served()
        with self.s.lock:
            epoch, size = self.s.view(snapshot)
        self.s.check_range(offset, length, size)
        if length == 0:
            return b""
        cs = self.s.cluster_size
        first, last = offset // cs, (offset + length - 1) // cs
        buf = self._read_clusters(np.arange(first, last + 1, dtype=np.uint64), epoch)
        start = offset - first * cs
        if start == 0 and length == len(buf):
            return bytes(buf)
        return bytes(memoryview(buf)[start:start + length])

    def readv(self, reqs: Sequence[tuple[int, int]], snapshot: str | None = None,
              nowait: bool = False) -> list[bytes]:
        """Many reads in one map pass and one sorted sweep over the SCOs.

        nowait=True: WouldBlock unless every cluster is in the local write buffer and no
        lock is busy (see writev)."""
        if not reqs:
            return []
        self.s.check_served(nowait)
        n = len(reqs)
        offs = np.fromiter((r[0] for r in reqs), dtype=np.int64, count=n)
        lens = np.fromiter((r[1] for r in reqs), dtype=np.int64, count=n)
        cs = self.s.cluster_size
        with _hold(self.s.lock, nowait):
            epoch, size = self.s.view(snapshot)
        if offs.min() < 0 or lens.min() < 0 or (offs + lens).max() > size:
            for o, ln in reqs:
                self.s.check_range(o, ln, size)
        lens_c = np.maximum(lens, 1)
        firsts = offs // cs
        counts = (offs + lens_c - 1) // cs - firsts + 1
        starts = np.cumsum(counts) - counts
        addrs = (np.repeat(firsts, counts) + np.arange(int(counts.sum())) - np.repeat(starts, counts)).astype(np.uint64)
        buf = self._read_clusters(addrs, epoch, nowait)
        view = memoryview(buf)
        out = []
        for o, ln, f, st in zip(offs.tolist(), lens.tolist(), firsts.tolist(), starts.tolist()):
            b = st * cs + (o - f * cs)
            out.append(bytes(view[b:b + ln]))
        return out

    def _resolve(self, addrs: np.ndarray, epoch: int | None,
                 nowait: bool = False) -> list[tuple["ReadPath", np.ndarray, np.ndarray]]:
        """Which volume of the clone chain holds each cluster: [(its read path, indexes, locations)]."""
        out = []
        idx = np.arange(len(addrs))
        rp: ReadPath | None = self
        ep = epoch
        while rp is not None and len(idx):
            st = rp.s
            with _hold(st.lock, nowait):
                if st.closed:
                    raise Busy(f"volume {st.name} is closed")
                rp.ensure_map()   # after a full disk: never read a stale map.db page
                locs = st.map.lookup(addrs[idx], ep)
            have = locs > ZERO_LOC
            if have.any():
                out.append((rp, idx[have], locs[have]))
            idx = idx[locs == 0]
            ep = st.parent_epoch
            rp = rp.parent
        return out

    def _read_clusters(self, addrs: np.ndarray, epoch: int | None, nowait: bool = False) -> bytearray:
        """Clusters as of `epoch`. Local SCOs are read under each volume's lock (eviction
        closes their files); backend reads happen after it is released, so a slow backend
        never holds up writers. An SCO the scrubber removed meanwhile means the map moved
        on: look up again once."""
        cs = self.s.cluster_size
        out = bytearray(len(addrs) * cs)
        for attempt in range(2):
            remote: list[tuple[VolumeState, int, int, int, int]] = []
            for rp, idx, locs in self._resolve(addrs, epoch, nowait):
                with _hold(rp.s.lock, nowait):
                    rp._fill(out, idx, locs, remote)
                if nowait and remote:
                    raise WouldBlock("data must come from the backend")
            try:
                _fetch(out, remote)
                return out
            except NotFound as e:
                if attempt:
                    raise DataError(f"{self.s.name}: SCO data is missing from the backend ({e.message})") from None
        return out

    def _fill(self, out: bytearray, idx: np.ndarray, locs: np.ndarray,
              remote: list[tuple[VolumeState, int, int, int, int]]) -> None:
        """Copy local clusters into `out`; list the runs that must come from the backend."""
        cs = self.s.cluster_size
        if len(locs) > 1:
            order = np.argsort(locs, kind="stable")
            locs, idx = locs[order], idx[order]
            brk = np.flatnonzero((np.diff(locs) != 1) | (np.diff(idx) != 1)) + 1
            starts = [0, *brk.tolist()]
            ends = [*brk.tolist(), len(locs)]
        else:
            starts, ends = [0], [len(locs)]
        view = memoryview(out)
        for s, e in zip(starts, ends):
            loc = int(locs[s])
            sco, ci, at = loc >> SCO_SHIFT, loc & IDX_MASK, int(idx[s]) * cs
            data = self._read_local(sco, ci, e - s)
            if data is None:
                remote.append((self.s, sco, ci, e - s, at))
            else:
                view[at:at + len(data)] = data

    def read_locations(self, locs: np.ndarray) -> bytearray:
        """The clusters at these locations of this volume (the scrubber's read)."""
        cs = self.s.cluster_size
        out = bytearray(len(locs) * cs)
        remote: list[tuple[VolumeState, int, int, int, int]] = []
        with self.s.lock:
            self._fill(out, np.arange(len(locs)), locs, remote)
        _fetch(out, remote)
        return out

    def _read_local(self, sco: int, ci: int, count: int) -> bytes | None:
        if sco not in self.s.local_scos:
            return None
        cs = self.s.cluster_size
        fd = self.s.read_fds.get(sco)
        if fd is None:
            try:
                fd = os.open(self.s.sco_dir / str(sco), os.O_RDONLY)
            except FileNotFoundError:
                self.s.local_scos.discard(sco)
                return None
            self.s.read_fds[sco] = fd
        data = os.pread(fd, count * cs, ci * cs)
        if len(data) != count * cs:
            raise DataError(f"{self.s.name}: SCO {sco} is shorter than expected")
        self.s.wb.touch((self.s.owner, sco))
        return data

    def extents(self, offset: int, length: int, snapshot: str | None = None) -> list[tuple[int, int, bool]]:
        """Allocated and unallocated runs covering [offset, offset+length)."""
        self.s.check_served()
        with self.s.lock:
            epoch, size = self.s.view(snapshot)
            self.s.check_range(offset, length, size)
            if length == 0:
                return []
            cs = self.s.cluster_size
            first, last = offset // cs, (offset + length - 1) // cs
            addrs = np.arange(first, last + 1, dtype=np.uint64)
            alloc = np.zeros(len(addrs), dtype=bool)
            for _vol, idx, _locs in self._resolve(addrs, epoch):
                alloc[idx] = True
        out: list[tuple[int, int, bool]] = []
        cuts = np.flatnonzero(np.diff(alloc)) + 1
        for s, e in zip(np.concatenate(([0], cuts)).tolist(), np.concatenate((cuts, [len(alloc)])).tolist()):
            lo = max(offset, (first + s) * cs)
            hi = min(offset + length, (first + e) * cs)
            out.append((lo, hi - lo, bool(alloc[s])))
        return out

