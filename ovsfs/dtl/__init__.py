"""The Distributed Transaction Log: a peer's copy of writes not yet on the backend.

The engine calls a DtlSink in its write path; the network client of a later issue
implements it. With no DTL configured the engine uses NoDtl.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class DtlSink(Protocol):
    mode: str  # "none" | "async" | "sync"

    def append(self, volume: str, addrs: np.ndarray, locs: np.ndarray, data: bytes) -> None:
        """sync mode: return only once the peer holds the writes; async: queue them."""

    def flush(self) -> None:
        """Return once everything appended so far is at the peer (async mode's FLUSH)."""


class NoDtl:
    mode = "none"

    def append(self, volume: str, addrs: np.ndarray, locs: np.ndarray, data: bytes) -> None:
        return None

    def flush(self) -> None:
        return None
