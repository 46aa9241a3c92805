"""Upload queues: one ordered lane per volume, served fairly by a small pool of workers.

Order matters only within a volume: its SCOs before the TLog that points into them,
its TLogs before the checkpoint covering them, a scrubber's moves before the deletion
of the SCOs they emptied. So each owner (a volume) has its own FIFO lane, with at most
one item of a lane running at a time; lanes do not wait for each other, and a lane
whose head keeps failing (backoff with jitter, up to a cap) never stops another.

An item whose inputs are gone is finished or dropped, never retried forever: tasks
check their inputs on every try and return normally when their file or volume is
gone (the next try of a failed upload of a deleted volume is a no-op), and a
checkpoint still waiting is superseded by a newer one of the same volume (`kind`).

The lanes share the write buffer's condition variable, so writers waiting for room
are woken by every upload that finishes.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("ovsfs.engine.upload")

Task = Callable[[], None]

NODE = "node"           # the lane of items submitted without an owner


@dataclass
class Item:
    seq: int
    what: str
    task: Task
    kind: str | None = None                  # items of one lane with the same kind supersede each other
    on_drop: Callable[[], None] | None = None  # releases what the task holds when it never runs again
    attempts: int = 0
    not_before: float = 0.0                  # monotonic time before which it is not retried


@dataclass
class Lane:
    owner: object
    items: deque[Item] = field(default_factory=deque)
    running: bool = False                    # items[0] is being run by a worker
    errors: int = 0
    last_error: str = ""
    last_error_at: float = 0.0               # wall-clock time of last_error
    failed_in_stop: bool = False             # its head failed after stop() began

    @property
    def name(self) -> str:
        return self.owner if isinstance(self.owner, str) else str(getattr(self.owner, "name", self.owner))


class UploadQueues:
    """Per-owner FIFO lanes and `workers` threads that run them.

    `workers`: threads (lanes served round-robin); `retry_min`/`retry_max`: seconds of
    the first and the longest backoff after a failure (doubling, with jitter).
    """

    def __init__(self, cv: threading.Condition, workers: int = 4, retry_min: float = 0.05,
                 retry_max: float = 10.0) -> None:
        self.cv = cv
        self.workers = max(1, workers)
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.lanes: OrderedDict[object, Lane] = OrderedDict()   # round-robin order
        self.threads: list[threading.Thread] = []
        self.seq = itertools.count(1)
        self.errors = 0
        self.last_error = ""
        self.last_error_at = 0.0
        self.stopping = False                # stop() began: one last try per lane, no backoff
        self.stopped = False                 # workers exit; queued items stay local

    def configure(self, workers: int, retry_max: float) -> None:
        """Set the pool size and backoff cap (before the first submit starts the workers)."""
        self.workers = max(1, workers)
        self.retry_max = retry_max

    # ---- submitting and waiting -------------------------------------------------------

    def submit(self, what: str, task: Task, owner: object = None, kind: str | None = None,
               on_drop: Callable[[], None] | None = None) -> None:
        """Queue `task` behind everything queued before for the same owner (None: the node
        lane). With `kind`, a queued item of that kind not yet running is dropped: the new
        one supersedes it (its on_drop runs). After stop() nothing is queued any more: what
        the task would upload stays in the local write buffer for the next start."""
        new = Item(0, what, task, kind, on_drop)
        dropped: list[Item] = []
        with self.cv:
            if self.stopped:
                dropped.append(new)
            else:
                key = NODE if owner is None else owner
                lane = self.lanes.get(key)
                if lane is None:
                    lane = self.lanes[key] = Lane(key)
                if kind is not None:
                    keep: deque[Item] = deque()
                    for i, it in enumerate(lane.items):
                        superseded = it.kind == kind and not (i == 0 and lane.running)
                        (dropped if superseded else keep).append(it)
                    lane.items = keep
                new.seq = next(self.seq)
                lane.items.append(new)
                if not self.threads:
                    self._start()
                self.cv.notify_all()
        for it in dropped:
            if it is new:
                log.warning("not queued, the node is stopping: %s", what)
            else:
                log.info("%s superseded by %s", it.what, what)
            _drop(it)

    def drain(self, timeout: float | None = None, owner: object = None) -> bool:
        """Wait until everything queued before the call (for `owner`, or for every owner
        when None) has run or been dropped; False on timeout (seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cv:
            if owner is None:
                targets = {k: lane.items[-1].seq for k, lane in self.lanes.items() if lane.items}
            else:
                lane = self.lanes.get(owner)
                targets = {owner: lane.items[-1].seq} if lane and lane.items else {}
            while True:
                for k in list(targets):
                    lane = self.lanes.get(k)
                    if lane is None or not lane.items or lane.items[0].seq > targets[k]:
                        del targets[k]
                if not targets:
                    return True
                if self.stopped:
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.cv.wait(left)

    # ---- the workers ------------------------------------------------------------------

    def _start(self) -> None:
        for i in range(self.workers):
            t = threading.Thread(target=self._run, name=f"ovsfs-upload-{i}", daemon=True)
            t.start()
            self.threads.append(t)

    def _pick(self, now: float) -> tuple[Lane | None, float | None]:
        """The next lane to serve (round-robin), or how long until one is due. Holds cv."""
        wait: float | None = None
        for key, lane in self.lanes.items():
            if lane.running or not lane.items:
                continue
            due = lane.items[0].not_before - now
            if due <= 0:
                self.lanes.move_to_end(key)      # fairness: served last next time
                return lane, None
            wait = due if wait is None else min(wait, due)
        return None, wait

    def _run(self) -> None:
        while True:
            with self.cv:
                while True:
                    if self.stopped:
                        return
                    lane, wait = self._pick(time.monotonic())
                    if lane is not None:
                        break
                    self.cv.wait(wait)
                lane.running = True
                item = lane.items[0]
            try:
                item.task()
            except Exception as e:  # noqa: BLE001 - any failure is retried below
                self._failed(lane, item, e)
            else:
                with self.cv:
                    lane.running = False
                    if lane.items and lane.items[0] is item:   # abandon() may have cleared it
                        lane.items.popleft()
                    self._forget_if_done(lane)
                    self.cv.notify_all()

    def _failed(self, lane: Lane, item: Item, e: Exception) -> None:
        with self.cv:
            lane.running = False
            item.attempts += 1
            now = time.time()
            msg = f"{item.what}: {e}"
            lane.errors += 1
            lane.last_error, lane.last_error_at = msg, now
            self.errors += 1
            self.last_error, self.last_error_at = msg, now
            if self.stopping:
                lane.failed_in_stop = True
            # Exponential backoff with jitter: lanes failing together do not retry in step.
            delay = min(self.retry_max, self.retry_min * 2 ** min(item.attempts - 1, 30))
            delay *= random.uniform(0.5, 1.0)
            item.not_before = time.monotonic() + delay
            self.cv.notify_all()
        log.warning("upload of %s failed (attempt %d: %s); retrying in %.1f s", item.what, item.attempts, e, delay)

    def _forget_if_done(self, lane: Lane) -> None:
        """An empty lane of a deleted volume holds nothing worth reporting. Holds cv."""
        if not lane.items and getattr(lane.owner, "deleted", False):
            self.lanes.pop(lane.owner, None)

    # ---- stopping -----------------------------------------------------------------------

    def stop(self, timeout: float) -> int:
        """Try what is queued once more (no backoff) for up to `timeout` seconds, giving up
        early once every lane left has failed again (the backend is away: waiting longer
        does not help), then stop the workers without waiting for a backend that does not
        answer. Returns the number of items left; their inputs stay in the local write
        buffer and are queued again at the next start."""
        deadline = time.monotonic() + timeout
        with self.cv:
            self.stopping = True
            for lane in self.lanes.values():
                lane.failed_in_stop = False
                if lane.items:
                    lane.items[0].not_before = 0.0
            self.cv.notify_all()
            while True:
                busy = [lane for lane in self.lanes.values() if lane.items]
                if not busy or all(lane.failed_in_stop for lane in busy):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cv.wait(left)
        return self.abandon()

    def abandon(self) -> int:
        """Stop the workers now; queued items are dropped (a running one finishes in its
        daemon thread, unwaited). Returns how many items were left."""
        with self.cv:
            self.stopped = True
            items = [it for lane in self.lanes.values() for it in lane.items]
            running = {id(lane.items[0]) for lane in self.lanes.values() if lane.running and lane.items}
            for lane in self.lanes.values():
                lane.items.clear()
            self.cv.notify_all()
        for it in items:
            if id(it) not in running:
                _drop(it)
        if items:
            log.warning("stopped with %d uploads not done (%s); they stay in the write buffer",
                        len(items), self.last_error or "still running")
        return len(items)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # ---- reporting ------------------------------------------------------------------------

    def queued(self) -> int:
        return sum(len(lane.items) for lane in self.lanes.values())

    def busy(self) -> bool:
        return any(lane.running for lane in self.lanes.values())

    def status(self) -> dict[str, object]:
        """Counts, and per lane with something queued or an error: queued items, errors,
        the last error and its time (seconds since the epoch), seconds until the next try."""
        now = time.monotonic()
        with self.cv:
            lanes = {}
            for lane in self.lanes.values():
                if not lane.items and not lane.errors:
                    continue
                head = lane.items[0] if lane.items else None
                lanes[lane.name] = {
                    "queued": len(lane.items), "errors": lane.errors, "last_error": lane.last_error,
                    "last_error_at": lane.last_error_at, "running": lane.running,
                    "head": head.what if head else None, "head_attempts": head.attempts if head else 0,
                    "retry_in": round(max(0.0, head.not_before - now), 3) if head and not lane.running else 0.0,
                }
            return {"queued": self.queued(), "upload_errors": self.errors, "last_error": self.last_error,
                    "last_error_at": self.last_error_at, "upload_workers": self.workers, "lanes": lanes}


def _drop(item: Item) -> None:
    if item.on_drop is not None:
        try:
            item.on_drop()
        except Exception:  # noqa: BLE001 - releasing must not stop the others
            log.exception("releasing %s failed", item.what)
