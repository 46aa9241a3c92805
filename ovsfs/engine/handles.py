"""VolumeHandle for the real engine (the contract is ovsfs/engine/api.py).

A handle pins what it opened: the Volume object (a rename does not move it) and, for
"VOL@SNAP", the snapshot's epoch and size. While the handle is open its hold is in the
volume's HoldTable, so the catalog refuses to delete that snapshot or roll it away; each
read still checks that the name maps to the pinned epoch, so that even a path around the
catalog can never make a snapshot handle read another snapshot's data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ovsfs.engine.api import Buffer, Capabilities, Holder
from ovsfs.errors import Busy, NotFound, ReadOnly

if TYPE_CHECKING:
    from ovsfs.engine.volume import Volume

LOGICAL_BLOCK_SIZE = 512


class EngineHandle:
    """One open volume or snapshot of the engine. Built by EngineCatalog.open, which has
    registered `holder` in vol.holds under the volume lock already."""

    def __init__(self, vol: "Volume", holder: Holder, snapshot: str | None = None,
                 epoch: int | None = None, snap_size: int = 0, read_only: bool = False) -> None:
        self._vol = vol
        self.volume = vol.name
        self.snapshot = snapshot
        self.name = f"{vol.name}@{snapshot}" if snapshot else vol.name
        self.holder = holder
        self._epoch = epoch
        self._snap_size = snap_size
        self._closed = False
        self.caps = Capabilities(
            read_only=read_only or snapshot is not None or vol.read_only,
            logical_block_size=LOGICAL_BLOCK_SIZE, preferred_block_size=vol.cluster_size,
            fua=True, trim=True, write_zeroes=True, extents=True, multi_conn=True)

    def __repr__(self) -> str:
        return f"<EngineHandle {self.name} by {self.holder}{' closed' if self._closed else ''}>"

    # ---- checks ---------------------------------------------------------------------------

    def _live(self) -> "Volume":
        if self._closed:
            raise Busy(f"handle on {self.name} is closed")
        if self.snapshot is not None:
            # The pin: the name must still be the snapshot this handle opened.
            if not any(s["name"] == self.snapshot and s["epoch"] == self._epoch
                       for s in self._vol.list_snapshots()):
                raise NotFound(f"snapshot {self.name} this handle opened is gone")
        return self._vol

    def _writable(self) -> "Volume":
        vol = self._live()
        if self.caps.read_only or vol.read_only:
            what = "snapshot" if self.snapshot else "volume"
            why = f" (failed: {vol.failed})" if vol.failed else ""
            raise ReadOnly(f"{what} {self.name} is read-only{why}")
        return vol

    # ---- the contract -----------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._snap_size if self.snapshot is not None else self._vol.size

    def readv(self, reqs: Sequence[tuple[int, int]], nowait: bool = False) -> list[bytes]:
        return self._live().readv(reqs, snapshot=self.snapshot, nowait=nowait)

    def writev(self, reqs: Sequence[tuple[int, Buffer]], nowait: bool = False) -> None:
        self._writable().writev(reqs, nowait=nowait)

    def write_room(self, nbytes: int) -> bool:
        return self._vol.write_room(nbytes)

    def waiting_for_room(self, delta: int) -> None:
        self._vol.waiting_for_room(delta)

    def flush(self) -> None:
        vol = self._live()
        if not self.caps.read_only:
            vol.flush()

    def trim(self, offset: int, length: int) -> None:
        self._writable().trim(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._writable().write_zeroes(offset, length)

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return self._live().extents(offset, length, snapshot=self.snapshot)

    def resize(self, size: int) -> None:
        vol = self._writable()
        with vol.lock:
            old = vol.size
            if size < old:
                vol.holds.check_shrink(vol.name, ignore=self.holder)
        if size < old:
            # Like truncate(2): what lies past the new end goes first. Not under the volume
            # lock: a trim may write (partial clusters), and writes wait for write-buffer
            # room before taking the lock (the uploads that make room need it).
            vol.trim(size, old - size)
        with vol.lock:
            if size < vol.size:
                # Checked again: a holder that came meanwhile sees zeros past the new end
                # (this holder's truncate), but its disk does not end under it.
                vol.holds.check_shrink(vol.name, ignore=self.holder)
            vol.resize(size)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._vol.lock:
            self._vol.holds.remove(self.holder, self._epoch)
