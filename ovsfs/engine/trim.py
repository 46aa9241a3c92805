"""Trim and write-zeroes of whole clusters, at a cost that follows what is mapped.

A cluster gets a TLog record only when it would not already read as zeros: in a
volume without a parent, when it maps to anything; in a clone, when it maps to data
(it becomes ZERO_LOC) or maps to nothing while the parent chain has data there (it
needs ZERO_LOC, or the read would fall through to the parent). Map pages with no
version at all (in the volume, or for a clone in every ancestor) are skipped from
the page index without looking at their entries, and the range is done a few pages
per hold of the volume lock, so writers elsewhere in the volume get in between.

Snapshots are untouched: records go to the current epoch (copy-on-write per page).
"""

from __future__ import annotations

import numpy as np

from ovsfs.engine import tlog
from ovsfs.engine.log import LogWriter
from ovsfs.engine.map import PAGE_SHIFT, ZERO_LOC
from ovsfs.engine.state import VolumeState
from ovsfs.errors import Busy


CHUNK_PAGES = 16        # written map pages handled per hold of the lock (<= 64 Ki records)
SCAN_PAGES = 1 << 16    # page-index entries scanned per hold when nothing is written there


def trim_clusters(vol: VolumeState, log: LogWriter, first: int, end: int) -> int:
    """Make clusters [first, end) read as zeros; returns the number of TLog records written.

    Raises Busy when the volume is closed meanwhile (what was done so far stays done).
    Clusters past the end of a volume shrunk meanwhile are left alone (they are gone).
    """
    written = 0
    page = first >> PAGE_SHIFT
    while True:
        with vol.lock:
            log.check_open()
            stop = min(end, vol.nclusters())
            if first >= stop:
                return written
            last_page = ((stop - 1) >> PAGE_SHIFT) + 1
            if page >= last_page:
                return written
            window = min(last_page, page + SCAN_PAGES)
            pages = _candidate_pages(vol, page, window)
            todo = pages[:CHUNK_PAGES].tolist()
            page = todo[-1] + 1 if len(pages) > CHUNK_PAGES else window
            if todo:
                written += _trim_pages(vol, log, todo, first, stop)


def _candidate_pages(vol: VolumeState, lo: int, hi: int) -> np.ndarray:
    """Pages in [lo, hi) where the volume or (for a clone) an ancestor has any version."""
    pages = vol.map.written_pages(lo, hi)
    anc = vol.parent
    while anc is not None:
        pages = np.union1d(pages, anc.map.written_pages(lo, hi))
        anc = anc.parent
    return pages


def _trim_pages(vol: VolumeState, log: LogWriter, pages: list[int], first: int, stop: int) -> int:
    """One hold of the lock: the records for the clusters of `pages` inside [first, stop)."""
    parts = []
    for p in pages:
        lo, hi = max(first, p << PAGE_SHIFT), min(stop, (p + 1) << PAGE_SHIFT)
        view = vol.map.page_view(p)
        if view is None:
            if vol.parent is None:
                continue
            cur = np.zeros(hi - lo, dtype=np.uint64)
        else:
            base = p << PAGE_SHIFT
            cur = view[lo - base:hi - base]
        if vol.parent is None:
            sel = np.flatnonzero(cur)
        else:
            sel = np.flatnonzero(cur > ZERO_LOC)
            unset = np.flatnonzero(cur == 0)
            if len(unset):
                shadowed = _parent_has_data(vol, (unset + lo).astype(np.uint64))
                sel = np.union1d(sel, unset[shadowed])
        if len(sel):
            parts.append((sel + lo).astype(np.uint64))
    if not parts:
        return 0
    addrs = np.concatenate(parts)
    locs = np.full(len(addrs), ZERO_LOC if vol.parent is not None else 0, dtype=np.uint64)
    log._tlog_append(tlog.writes(addrs, locs, np.zeros(len(addrs), dtype=np.uint32)))
    vol.map.update(addrs, locs)
    vol.write_seq += 1
    return len(addrs)


def _parent_has_data(vol: VolumeState, addrs: np.ndarray) -> np.ndarray:
    """For a clone: which of `addrs` (unmapped in the clone) would read data from the chain.

    The chain is read at the snapshot epochs the clones were made from, which never
    change while a clone exists; lock order clone -> parent, as on the read path.
    """
    has = np.zeros(len(addrs), dtype=bool)
    idx = np.arange(len(addrs))
    anc, epoch = vol.parent, vol.parent_epoch
    while anc is not None and len(idx):
        with anc.lock:
            if anc.closed:
                raise Busy(f"volume {anc.name} is closed")
            locs = anc.map.lookup(addrs[idx], epoch)
        has[idx[locs > ZERO_LOC]] = True
        idx = idx[locs == 0]
        anc, epoch = anc.parent, anc.parent_epoch
    return has
