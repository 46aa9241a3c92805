"""The write buffer budget shared by every volume of a node, and its upload queues.

Sealed SCOs and TLogs go to the backend in the order they were sealed, per volume
(ovsfs/engine/uploads.py: one lane per volume, a small pool of workers), which keeps
the backend consistent at every moment: a TLog is uploaded only after the SCOs it
points into, a checkpoint only after the TLogs it covers, and an SCO the scrubber
emptied is deleted only after the TLog recording the move.

Writers wait (they never fail) while SCOs not yet on the backend would exceed the
budget. Uploaded SCOs stay as a local read cache until space is needed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

from ovsfs.engine.uploads import Task, UploadQueues


class WriteBuffer:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.cv = threading.Condition()
        self.pending = 0            # bytes of SCOs (open or sealed) not yet on the backend
        self.cached = 0             # bytes of uploaded SCOs still kept locally
        self.evictable: OrderedDict[tuple[object, int], tuple[int, Callable[[], None]]] = OrderedDict()
        self.stopping = False
        # Per-volume upload lanes; they wait on the same condition as the budget.
        self.uploads = UploadQueues(self.cv)
        # Called (with no lock held) when writers wait and nothing is queued for upload:
        # open SCOs of idle volumes hold the budget, so the engine seals them.
        self.on_pressure: Callable[[], None] = lambda: None

    # ---- budget -----------------------------------------------------------------------

    def reserve(self, nbytes: int) -> None:
        """Count bytes about to be written; waits while the buffer is full of unsent SCOs."""
        while True:
            with self.cv:
                if self.pending + nbytes <= self.limit or self.pending == 0 or self.stopping:
                    self.pending += nbytes
                    return
                if self.queue or self.busy:
                    self.cv.wait(1.0)
                    continue
            self.on_pressure()   # nothing queued: open SCOs of idle volumes hold the budget
            with self.cv:
                if not self.queue and not self.busy:
                    self.cv.wait(0.05)

    def try_reserve(self, nbytes: int) -> bool:
        """reserve() that never waits: False when the bytes do not fit now."""
        with self.cv:
            if self.pending + nbytes <= self.limit or self.pending == 0:
                self.pending += nbytes
                return True
            return False

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
        """A volume went away: drop its cached SCOs and its unsent open SCO from the counts."""
        with self.cv:
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
                                     "cached_bytes": self.cached}
            st.update(self.uploads.status())
            return st
