"""A byte-array model of a block volume for property tests of client volumes (VhostVolume
here, and the daemon's shm door through it): batches of requests in flight together."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import strategies as st

SECTOR = 512


@st.composite
def batches(draw: Any, size: int, max_batch: int = 64, max_sectors: int = 40) -> list[list[tuple[str, int, int, int]]]:
    """Batches of (kind, offset, length, seed): kinds write / read / trim / write_zeroes /
    flush. Requests of one batch are in flight together, so a batch never has two requests
    on overlapping bytes where one of them changes them (their order is not defined)."""
    sectors = size // SECTOR
    out = []
    for _ in range(draw(st.integers(1, 4))):
        n = draw(st.integers(1, max_batch))
        rng = random.Random(draw(st.integers(0, 2**32)))
        batch: list[tuple[str, int, int, int]] = []
        taken: list[tuple[int, int, bool]] = []
        for _ in range(n):
            kind = rng.choices(["write", "read", "trim", "write_zeroes", "flush"], [8, 6, 1, 1, 1])[0]
            if kind == "flush":
                batch.append((kind, 0, 0, 0))
                continue
            length = rng.randint(1, max_sectors)
            start = rng.randrange(0, sectors - length + 1) if rng.random() < 0.7 else rng.choice([0, sectors - length])
            changes = kind != "read"
            if any(s < start + length and start < e and (changes or ch) for s, e, ch in taken):
                continue
            taken.append((start, start + length, changes))
            batch.append((kind, start * SECTOR, length * SECTOR, rng.randrange(2**32)))
        out.append(batch)
    return out


class Model:
    def __init__(self, initial: bytes) -> None:
        self.data = bytearray(initial)

    def run(self, vol: Any, batch: list[tuple[str, int, int, int]]) -> None:
        """Submit the whole batch (queue depth permitting), wait for all, check reads and
        update the model. Trimmed sectors may read back as before or as zeroes."""
        reqs = []
        for kind, off, length, seed in batch:
            if kind == "write":
                payload = random.Random(seed).randbytes(length)
                reqs.append((kind, off, length, payload, vol.submit("write", off, data=payload)))
            elif kind == "read":
                reqs.append((kind, off, length, None, vol.submit("read", off, length)))
            else:
                reqs.append((kind, off, length, None, vol.submit(kind, off, length)))
        vol.drain()
        trimmed = []
        for kind, off, length, payload, r in reqs:
            got = r.result()
            if kind == "read":
                assert got == bytes(self.data[off:off + length]), f"read {off}+{length} differs from the model"
            elif kind == "write":
                self.data[off:off + length] = payload
            elif kind == "write_zeroes":
                self.data[off:off + length] = bytes(length)
            elif kind == "trim":
                trimmed.append((off, length))
        for off, length in trimmed:
            now = vol.read(off, length)
            for s in range(0, length, SECTOR):
                sector = now[s:s + SECTOR]
                assert sector == bytes(SECTOR) or sector == self.data[off + s:off + s + SECTOR], \
                    f"trimmed sector {off + s} is neither zeroes nor what it was"
            self.data[off:off + length] = now

    def check(self, vol: Any) -> None:
        assert vol.read(0, len(self.data)) == bytes(self.data)
