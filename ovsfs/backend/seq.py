"""Sequence numbers for manifests and tombstones that never go backwards.

The newest copy of a manifest (or the tombstone that deleted it) is the one with the
highest sequence number, so numbers must grow even when the wall clock steps back
(NTP, a VM restored from a snapshot) and across restarts. Hybrid-logical-clock style:
next = max(wall clock in ns, last + 1, highest number seen on any ASD + 1), and a
high-water mark persisted ahead of use (a write once per `reserve` of advance, not
per number) so a restart, even after a crash, starts above everything handed out.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Callable

RESERVE_NS = 60 * 10**9  # how far ahead of use the persisted high-water mark runs


class SeqClock:
    def __init__(self, path: Path | None = None, now: Callable[[], int] = time.time_ns) -> None:
        """`path`: file holding the high-water mark (None: memory only).
        `now`: the time source in nanoseconds (tests fake it)."""
        self.path = Path(path) if path else None
        self.now = now
        self.lock = threading.Lock()
        self.last = 0
        self.hwm = 0
        if self.path is not None:
            try:
                self.hwm = self.last = int(self.path.read_text().strip() or 0)
            except (OSError, ValueError):
                pass  # a lost or damaged mark: the ASDs' numbers (observe) still bound us

    def next(self) -> int:
        """A number above every one handed out or observed before."""
        with self.lock:
            self.last = max(self.now(), self.last + 1)
            self._persist()
            return self.last

    def observe(self, seq: int) -> None:
        """Note a number read from an ASD: later numbers will be above it."""
        with self.lock:
            if seq > self.last:
                self.last = seq
                self._persist()

    def _persist(self) -> None:
        if self.last <= self.hwm:
            return
        mark = self.last + RESERVE_NS
        if self.path is None:
            self.hwm = mark
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "w") as f:
                f.write(str(mark))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self.hwm = mark
        except OSError:
            pass  # tried again on the next number; the ASDs' numbers (observe) still bound us
