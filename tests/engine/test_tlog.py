"""TLog encoding: round trips, markers with payloads, torn tails."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from ovsfs.engine import tlog


def records(n: int, seed: int) -> bytes:
    r = np.random.default_rng(seed)
    return tlog.writes(r.integers(0, 1 << 40, n, dtype=np.uint64), r.integers(2, 1 << 50, n, dtype=np.uint64),
                       r.integers(0, 1 << 32, n, dtype=np.uint32))


@given(st.lists(st.one_of(st.integers(1, 50), st.text(max_size=80)), max_size=12), st.integers(0, 1000))
def test_round_trip_with_markers(parts: list[int | str], seed: int) -> None:
    blob, want = b"", []
    for i, p in enumerate(parts):
        if isinstance(p, int):
            blob += records(p, seed + i)
            want.append(("w", p))
        else:
            blob += tlog.mark(tlog.SNAPSHOT, {"name": p, "epoch": i})
            want.append(("m", p))
    got = []
    for seg in tlog.parse(blob):
        if seg.kind == tlog.WRITE:
            assert seg.records is not None
            if got and got[-1][0] == "w":
                got[-1] = ("w", got[-1][1] + len(seg.records))
            else:
                got.append(("w", len(seg.records)))
        else:
            assert seg.payload is not None
            got.append(("m", seg.payload["name"]))
    merged: list[tuple[str, int | str]] = []
    for kind, v in want:
        if kind == "w" and merged and merged[-1][0] == "w":
            merged[-1] = ("w", merged[-1][1] + v)  # type: ignore[operator]
        else:
            merged.append((kind, v))
    assert got == merged


@given(st.integers(0, 10 * tlog.SIZE))
def test_torn_tail_is_ignored(cut: int) -> None:
    blob = records(3, 1) + tlog.mark(tlog.RESIZE, {"size": 1 << 20}) + records(4, 2)
    segs = list(tlog.parse(blob[:len(blob) - cut]))
    n = sum(len(s.records) for s in segs if s.records is not None)
    assert n <= 7
    for s in segs:
        if s.kind == tlog.MARK:
            assert s.payload == {"size": 1 << 20}
