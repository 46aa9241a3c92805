"""The write buffer budget and the upload queue shared by every volume of a node.

Sealed SCOs and TLogs go to the backend in the order they were sealed (one FIFO),
which keeps the backend consistent at every moment: a TLog is uploaded only after
the SCOs it points into, a checkpoint only after the TLogs it covers, and an SCO
the scrubber emptied is deleted only after the TLog recording the move.

Writers wait (they never fail) while SCOs not yet on the backend would exceed the
budget. Uploaded SCOs stay as a local read cache until space is needed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from typing import Callable

log = logging.getLogger("ovsfs.engine.upload")

Task = Callable[[], None]


class WriteBuffer:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.cv = threading.Condition()
        self.pending = 0            # bytes of SCOs (open or sealed) not yet on the backend
        self.cached = 0             # bytes of uploaded SCOs still kept locally
        self.evictable: OrderedDict[tuple[object, int], tuple[int, Callable[[], None]]] = OrderedDict()
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
                    "queued": len(self.queue), "upload_errors": self.errors, "last_error": self.last_error}
