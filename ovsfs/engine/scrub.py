"""The scrubber: reclaim the space of overwritten clusters.

Liveness per SCO comes from one pass over every page version of the volume's map
(current data, every snapshot; clones read their parent through those same
versions, so nothing a clone reads is ever counted dead). SCOs with no live
cluster are deleted; SCOs whose live share is under the threshold have their live
clusters moved to the open SCO (RELOC records in the TLog) and are then deleted.

Order keeps the backend consistent at every moment: the moves are sealed and
queued for upload before the deletions are queued, and the upload queue is FIFO.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ovsfs.engine.map import SCO_SHIFT, ZERO_LOC
from ovsfs.engine.volume import Volume, sco_name

log = logging.getLogger("ovsfs.engine.scrub")


def live_locations(vol: Volume) -> np.ndarray:
    """Sorted unique locations referenced by any version of the volume's map."""
    parts = [np.unique(arr[arr > ZERO_LOC]) for _p, _e, arr in vol.map.versions()]
    parts = [p for p in parts if len(p)]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)


def scrub_volume(vol: Volume, threshold: float) -> dict[str, Any]:
    vol.sync()
    cs = vol.cluster_size
    with vol.lock:
        live = live_locations(vol)
        scos, counts = np.unique(live >> SCO_SHIFT, return_counts=True)
        live_count = dict(zip(scos.tolist(), counts.tolist()))
        candidates = {int(n[4:], 16) for n in vol.store.list(vol.ns, "sco/")}
        if vol.sco_fd is not None:
            candidates.discard(vol.sco_no)
        dead = sorted(s for s in candidates if live_count.get(s, 0) == 0)
        low = sorted(s for s in candidates if 0 < live_count.get(s, 0) < threshold * vol.sco_clusters)
        if len(low) == 1 and not dead:
            low = []  # moving a lone half-empty SCO into a new one gains nothing
        moved = np.zeros(0, dtype=np.uint64)
        if low:
            moved = live[np.isin(live >> SCO_SHIFT, np.array(low, dtype=np.uint64))]
            buf = vol.read_locations(moved)
            # Counted without waiting: waiting here, under the volume lock, could deadlock
            # with the upload thread; the budget is exceeded by at most this one move.
            vol.wb.add_pending(len(moved) * cs)
            before = vol.appended
            try:
                vol._append(np.zeros(len(moved), dtype=np.uint64), bytes(buf), moved_from=moved)
            finally:
                unused = len(moved) * cs - (vol.appended - before)
                if unused > 0:   # a full disk stopped the move part way: give the rest back
                    vol.wb.unreserve(unused)
        victims = dead + low
        if victims:
            vol.seal()
            for s in victims:
                vol.wb.submit(f"{vol.name} delete SCO {s}", lambda s=s: _delete_sco(vol, s))
    vol.wb.drain()
    result = {"volume": vol.name, "live_clusters": int(len(live)), "deleted_scos": len(dead),
              "rewritten_scos": len(low), "moved_clusters": int(len(moved)),
              "freed_bytes": int((len(victims) * vol.sco_clusters - len(moved)) * cs)}
    if victims:
        log.info("scrub %s: deleted %d dead SCOs, rewrote %d (%d clusters moved)",
                 vol.name, len(dead), len(low), len(moved))
    return result


def _delete_sco(vol: Volume, n: int) -> None:
    if vol.deleted:
        return
    vol.store.delete(vol.ns, sco_name(n))
    vol.evict_sco(n)
    vol.wb.forget((vol, n))
