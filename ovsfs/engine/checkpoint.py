"""Map checkpoints on the backend: the map as of a commit, so that a rebuild on another
node replays only the TLogs after it. Works on a volume's shared state (state.py).
"""

from __future__ import annotations

from typing import Any, Iterable

from ovsfs.engine.map import dump
from ovsfs.engine.names import tlog_name
from ovsfs.engine.state import VolumeState

KEEP_CHECKPOINTS = 2


def numbers(names: Iterable[str], prefix: str) -> list[int]:
    """The hex numbers of the backend object names that start with `prefix`, sorted."""
    out = []
    for n in names:
        if n.startswith(prefix):
            try:
                out.append(int(n[len(prefix):], 16))
            except ValueError:
                pass
    return sorted(out)


def tlogs_after_checkpoint(backend: Iterable[str], local_tlogs: Iterable[int]) -> int:
    """TLogs a rebuild would replay on top of the newest backend checkpoint: those on the
    backend or still in the write buffer numbered at or above it (checkpoint n is the map
    as of the start of TLog n). The counter that triggers the next checkpoint starts here
    at open, so restarts do not set it back to 0."""
    names = list(backend)
    cps = numbers(names, "checkpoint/")
    newest = cps[-1] if cps else 0
    return sum(1 for t in set(numbers(names, "tlog/")) | set(local_tlogs) if t >= newest)


def queue_checkpoint(vol: VolumeState) -> None:
    """Upload the map as of the last commit (just made at a TLog boundary).

    The snapshot is read once, on the first try, and its bytes are kept for retries (the
    reader, a SQLite read transaction, is closed at once so that it cannot hold the WAL
    while the backend is away). A newer checkpoint of the volume queued while this one
    still waits supersedes it: the newer one covers everything this one does."""
    reader = vol.map.reader()
    n = vol.tlog_no
    held: dict[str, Any] = {"reader": reader, "data": None}

    def release() -> None:
        r = held.pop("reader", None)
        if r is not None:
            r.close()

    def upload() -> None:
        if vol.deleted:
            release()
            return
        if held["data"] is None:
            if "reader" not in held:
                return   # released and never read: a newer checkpoint covers this one
            try:
                held["data"] = dump(held["reader"])
            finally:
                release()
        vol.store.put(vol.ns, f"checkpoint/{n:016x}", held["data"])
        names = vol.store.list(vol.ns)
        cps = numbers(names, "checkpoint/")
        if len(cps) > KEEP_CHECKPOINTS:
            oldest_kept = cps[-KEEP_CHECKPOINTS]
            for c in cps[:-KEEP_CHECKPOINTS]:
                vol.store.delete(vol.ns, f"checkpoint/{c:016x}")
            for t in numbers(names, "tlog/"):
                if t < oldest_kept:
                    vol.store.delete(vol.ns, tlog_name(t))
    vol.wb.submit(f"{vol.name} checkpoint {n}", upload, owner=vol.owner, kind="checkpoint", on_drop=release)
