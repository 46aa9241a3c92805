"""The write buffer budget and the upload queue shared by every volume of a node.

Sealed SCOs and TLogs go to the backend in the order they were sealed (one FIFO),
which keeps the backend consistent at every moment: a TLog is uploaded only after
the SCOs it points into, a checkpoint only after the TLogs it covers, and an SCO
the scrubber emptied is deleted only after the TLog recording the move.

The budget counts everything the engine keeps locally: SCOs not yet on the backend
(`pending`), uploaded SCOs kept as a read cache (`cached`, evicted first), and each
volume's TLogs and map (`local`, reported by the volumes). Writers wait while unsent
data would exceed the budget, and while the write-buffer filesystem has less than
`disk_reserve` bytes free (then open SCOs are sealed and uploaded SCOs evicted); a disk
that stays full for `disk_wait` seconds turns into NoSpace for that write, never into a
lost acknowledged write.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import Callable

from ovsfs.errors import NoSpace

log = logging.getLogger("ovsfs.engine.upload")

Task = Callable[[], None]


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
        self.queue: deque[tuple[str, Task]] = deque()
        self.busy = False
        self.stopping = False
        self.errors = 0
        self.last_error = ""
        # Called (with no lock held) when writers wait and nothing is queued for upload:
        # open SCOs of idle volumes hold the budget, so the engine seals them.
        self.on_pressure: Callable[[], None] = lambda: None
        self.thread = threading.Thread(target=self._run, name="ovsfs-upload", daemon=True)
        self.thread.start()

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

    # ---- the upload queue -------------------------------------------------------------

    def submit(self, what: str, task: Task) -> None:
        with self.cv:
            self.queue.append((what, task))
            self.cv.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until everything queued before this call has run."""
        done = threading.Event()
        self.submit("barrier", done.set)
        return done.wait(timeout)

    def _run(self) -> None:
        delay = 0.05
        while True:
            with self.cv:
                while not self.queue and not self.stopping:
                    self.cv.wait()
                if not self.queue:
                    return
                item = self.queue[0]
                what, task = item
                self.busy = True
            try:
                task()
            except Exception as e:  # keep order: retry the same task until the backend takes it
                self.errors += 1
                self.last_error = f"{what}: {e}"
                log.warning("upload of %s failed (%s); retrying in %.1fs", what, e, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                with self.cv:
                    self.busy = False
                    if self.stopping:
                        return
                continue
            delay = 0.05
            with self.cv:
                if self.queue and self.queue[0] is item:
                    self.queue.popleft()
                self.busy = False
                self.cv.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish queued uploads (bounded), then stop the thread."""
        self.drain(timeout)
        with self.cv:
            self.stopping = True
            self.cv.notify_all()
        self.thread.join(timeout)

    def status(self) -> dict[str, int | str]:
        with self.cv:
            return {"limit": self.limit, "pending_bytes": self.pending, "cached_bytes": self.cached,
                    "local_meta_bytes": self.local_total,
                    "disk_free_bytes": self._free if self.disk_path is not None else -1,
                    "queued": len(self.queue), "upload_errors": self.errors, "last_error": self.last_error}
