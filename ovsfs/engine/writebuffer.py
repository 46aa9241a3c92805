"""The write buffer budget shared by every volume of a node, and its upload queues.

Sealed SCOs and TLogs go to the backend in the order they were sealed, per volume
(ovsfs/engine/uploads.py: one lane per volume, a small pool of workers), which keeps
the backend consistent at every moment: a TLog is uploaded only after the SCOs it
points into, a checkpoint only after the TLogs it covers, and an SCO the scrubber
emptied is deleted only after the TLog recording the move.

The budget counts everything the engine keeps locally: SCOs not yet on the backend
(`pending`), uploaded SCOs kept as a read cache (`cached`, evicted first), and each
volume's TLogs and map (`local`, reported by the volumes). Writers wait while unsent
data would exceed the budget, and while the write-buffer filesystem has less than
`disk_reserve` bytes free (then open SCOs are sealed and uploaded SCOs evicted); a disk
that stays full for `disk_wait` seconds turns into NoSpace for that write, never into a
lost acknowledged write.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from ovsfs.engine.uploads import Task, UploadQueues
from ovsfs.errors import NoSpace


class WriteBuffer:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.cv = threading.Condition()
        self.pending = 0            # bytes of SCOs (open or sealed) not yet on the backend
        self.cached = 0             # bytes of uploaded SCOs still kept locally
        self.evictable: OrderedDict[tuple[object, int], tuple[int, Callable[[], None]]] = OrderedDict()
        self.local: dict[object, int] = {}   # per volume: bytes of local TLogs and map.db
        self.local_total = 0
        self.disk_path: Path | None = None  # the write-buffer filesystem (see watch_disk)
        self.disk_reserve = 0
        self.disk_wait = 60.0
        self._free = 0                       # last statvfs free bytes, minus reservations since
        self._reserve = 0                    # disk_reserve, capped for small file systems
        self._free_at = -1.0
        self.stopping = False
        self.waiting = 0                     # writers waiting for room (engine and doors)
        # Per-volume upload lanes; they wait on the same condition as the budget.
        self.uploads = UploadQueues(self.cv)
        # Called (with no lock held) when writers wait and nothing is queued for upload:
        # open SCOs of idle volumes hold the budget, so the engine seals them.
        self.on_pressure: Callable[[], None] = lambda: None

    # ---- budget -----------------------------------------------------------------------

    def watch_disk(self, path: Path, reserve: int, wait: float) -> None:
        """Keep `reserve` bytes free on the filesystem holding `path` (bytes, at most a tenth
        of the file system; `wait`: seconds a writer waits for space before NoSpace)."""
        with self.cv:
            self.disk_path, self.disk_reserve, self.disk_wait = Path(path), reserve, wait
            self._free_at = -1.0

    def _fits(self, nbytes: int) -> bool:
        return (self.pending + self.local_total + nbytes <= self.limit or self.pending == 0
                or self.stopping)

    def _disk_ok(self, nbytes: int) -> bool:
        """Whether the disk keeps its reserve after `nbytes` more (called with cv held).
        statvfs is asked at most every 0.1 s unless the estimate comes near the reserve."""
        if self.disk_path is None or self.stopping:
            return True
        now = time.monotonic()
        if now - self._free_at > 0.1 or self._free - nbytes < self._reserve + (16 << 20):
            try:
                st = os.statvfs(self.disk_path)
            except OSError:
                return True   # the directory is being set up or removed: nothing to judge
            self._free, self._free_at = st.f_bavail * st.f_frsize, now
            # A small file system (a test's tmpfs) keeps at most a tenth of itself free.
            self._reserve = min(self.disk_reserve, st.f_blocks * st.f_frsize // 10)
        return self._free - nbytes >= self._reserve

    def disk_free(self) -> int | None:
        """Free bytes on the write-buffer filesystem as last seen (None: not watched)."""
        with self.cv:
            return None if self.disk_path is None else self._free

    def reserve(self, nbytes: int) -> None:
        """Count bytes about to be written.

        Waits while unsent SCOs fill the budget (uploads free it), and while the disk is
        below its reserve (seals, evicts cached SCOs meanwhile). Raises NoSpace when the
        disk stays short for `disk_wait` seconds."""
        with self.cv:
            if self._fits(nbytes) and self._disk_ok(nbytes):
                self.pending += nbytes
                self._free -= nbytes
                return
            self.waiting += 1     # shown in status: writers held up (backend away? disk full?)
        try:
            self._reserve_wait(nbytes)
        finally:
            with self.cv:
                self.waiting -= 1

    def _reserve_wait(self, nbytes: int) -> None:
        deadline: float | None = None
        while True:
            with self.cv:
                fits, disk_ok = self._fits(nbytes), self._disk_ok(nbytes)
                if fits and disk_ok:
                    self.pending += nbytes
                    self._free -= nbytes
                    return
                if disk_ok and (self.queue or self.busy):
                    self.cv.wait(1.0)
                    continue
            if not disk_ok:
                now = time.monotonic()
                deadline = now + self.disk_wait if deadline is None else deadline
                if now >= deadline:
                    raise NoSpace(f"write buffer disk {self.disk_path} has less than"
                                  f" {self._reserve} bytes free")
                self._evict_over(0)  # uploaded SCOs are only a cache
            self.on_pressure()   # open SCOs of idle volumes hold the budget (and disk)
            with self.cv:
                if not disk_ok or (not self.queue and not self.busy):
                    self.cv.wait(0.05)

    def note_waiting(self, delta: int) -> None:
        """A writer waiting for room outside reserve() (a door polling has_room)."""
        with self.cv:
            self.waiting += delta

    def try_reserve(self, nbytes: int) -> bool:
        """reserve() that never waits: False when the bytes do not fit now."""
        with self.cv:
            if self._fits(nbytes) and self._disk_ok(nbytes):
                self.pending += nbytes
                self._free -= nbytes
                return True
            return False

    def set_local(self, owner: object, nbytes: int) -> None:
        """A volume's TLogs and map now take `nbytes` of the write-buffer disk."""
        with self.cv:
            old = self.local.get(owner, 0)
            self.local[owner] = nbytes
            self.local_total += nbytes - old
            if nbytes < old:
                self.cv.notify_all()

    def has_room(self, nbytes: int) -> bool:
        """Whether reserve(nbytes) would go through now; reserves nothing, wakes nobody."""
        with self.cv:
            return self._fits(nbytes) and self._disk_ok(nbytes)

    def unreserve(self, nbytes: int) -> None:
        with self.cv:
            self.pending -= nbytes
            self.cv.notify_all()

    def add_pending(self, nbytes: int) -> None:
        """Count bytes already in the write buffer (found at start-up) without waiting."""
        with self.cv:
            self.pending += nbytes

    def uploaded(self, key: tuple[object, int], nbytes: int, evict: Callable[[], None]) -> None:
        """An SCO is safe on the backend: its bytes move from pending to the evictable cache."""
        with self.cv:
            self.pending -= nbytes
            self.cached += nbytes
            self.evictable[key] = (nbytes, evict)
            self.cv.notify_all()
        self._evict_over(self.limit)

    def forget(self, key: tuple[object, int], pending: int = 0) -> None:
        """An SCO went away (volume deleted, scrubbed): stop counting it."""
        with self.cv:
            item = self.evictable.pop(key, None)
            if item:
                self.cached -= item[0]
            self.pending -= pending
            self.cv.notify_all()

    def forget_owner(self, owner: object, pending: int = 0) -> None:
        """A volume went away: drop its cached SCOs, its unsent open SCO, its TLogs and
        map from the counts."""
        with self.cv:
            self.local_total -= self.local.pop(owner, 0)
            for key in [k for k in self.evictable if k[0] is owner]:
                self.cached -= self.evictable.pop(key)[0]
            self.pending -= pending
            self.cv.notify_all()

    def touch(self, key: tuple[object, int]) -> None:
        with self.cv:
            if key in self.evictable:
                self.evictable.move_to_end(key)

    def _evict_over(self, budget: int) -> None:
        while True:
            with self.cv:
                if self.pending + self.cached <= budget or not self.evictable:
                    return
                _key, (nbytes, evict) = self.evictable.popitem(last=False)
                self.cached -= nbytes
            evict()

    def drop_cache(self) -> None:
        self._evict_over(0)

    # ---- the upload queue (ovsfs/engine/uploads.py) ---------------------------------------

    def configure_uploads(self, workers: int, retry_max: float) -> None:
        """Upload pool size and backoff cap (seconds); before the first submit."""
        self.uploads.configure(workers, retry_max)

    def submit(self, what: str, task: Task, owner: object = None, kind: str | None = None,
               on_drop: Callable[[], None] | None = None) -> None:
        """Queue an upload in `owner`'s lane (a volume; None: the node lane); see UploadQueues."""
        self.uploads.submit(what, task, owner, kind, on_drop)

    def drain(self, timeout: float | None = None, owner: object = None) -> bool:
        """Wait until everything queued before this call (for `owner`, or node-wide) has run."""
        return self.uploads.drain(timeout, owner)

    @property
    def queue(self) -> int:
        """Items queued and not done (budget waits use it: is anything on its way out?)."""
        return self.uploads.queued()

    @property
    def busy(self) -> bool:
        return self.uploads.busy()

    @property
    def errors(self) -> int:
        return self.uploads.errors

    @property
    def last_error(self) -> str:
        return self.uploads.last_error

    def begin_stop(self) -> None:
        """Wake writers waiting for room: the node is stopping, nobody will make room."""
        with self.cv:
            self.stopping = True
            self.cv.notify_all()

    def stop(self, timeout: float = 30.0) -> int:
        """Upload what is queued within `timeout` seconds (less when the backend fails),
        then stop the workers. Returns how many uploads were left for the next start."""
        self.begin_stop()
        left = self.uploads.stop(timeout)
        self.uploads.join(0.5)
        return left

    def abandon(self) -> None:
        """Stop at once, as a crash would (tests): queued uploads are forgotten."""
        self.begin_stop()
        self.uploads.abandon()
        self.uploads.join(60.0)

    def status(self) -> dict[str, object]:
        with self.cv:   # re-entrant: the upload lanes share it
            st: dict[str, object] = {"limit": self.limit, "pending_bytes": self.pending,
                                     "cached_bytes": self.cached, "local_meta_bytes": self.local_total,
                                     "disk_free_bytes": self._free if self.disk_path is not None else -1,
                                     "waiting_writers": self.waiting}
            st.update(self.uploads.status())
            return st
