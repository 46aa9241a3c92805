"""TLog records: fixed 24-byte entries so a batch is one numpy array and one write.

WRITE  a = cluster address, b = location (0 / ZERO_LOC for trim), crc = CRC32C of the data
RELOC  a = old location,    b = new location (the scrubber moved a cluster), crc = CRC32C
MARK   a = op code,         b = payload length; the JSON payload follows, padded with
       spaces to whole records. JSON text never holds the bytes of a record kind (1..3
       as a little-endian u32), so a payload record can never pass for a real one.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

RECORD = np.dtype([("kind", "<u4"), ("crc", "<u4"), ("a", "<u8"), ("b", "<u8")])
SIZE = RECORD.itemsize  # 24

NOOP, WRITE, RELOC, MARK = 0, 1, 2, 3   # NOOP: a torn write found at replay, neutralised

# Marker op codes
SNAPSHOT, DELETE_SNAPSHOT, ROLLBACK, RESIZE = 1, 2, 3, 4


_ONE = struct.Struct("<IIQQ")
assert _ONE.size == SIZE


def write_one(addr: int, loc: int, crc: int) -> bytes:
    return _ONE.pack(WRITE, crc, addr, loc)


def _records(kind: int, a: np.ndarray, b: np.ndarray, crcs: np.ndarray | list[int]) -> bytes:
    rec = np.empty(len(a), dtype=RECORD)
    rec["kind"] = kind
    rec["crc"] = crcs
    rec["a"] = a
    rec["b"] = b
    return rec.tobytes()


def writes(addrs: np.ndarray, locs: np.ndarray, crcs: np.ndarray | list[int]) -> bytes:
    return _records(WRITE, addrs, locs, crcs)


def relocs(old: np.ndarray, new: np.ndarray, crcs: np.ndarray | list[int]) -> bytes:
    return _records(RELOC, old, new, crcs)


def mark(op: int, payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    pad = (-len(body)) % SIZE
    head = np.zeros(1, dtype=RECORD)
    head["kind"] = MARK
    head["a"] = op
    head["b"] = len(body)
    return head.tobytes() + body + b" " * pad


@dataclass
class Segment:
    """A run of records of one kind, or one marker, in log order."""

    kind: int
    records: np.ndarray | None = None   # WRITE / RELOC
    op: int = 0                         # MARK
    payload: dict[str, Any] | None = None
    end: int = 0                        # byte offset just past this segment


def parse(data: bytes | memoryview, base: int = 0) -> Iterator[Segment]:
    """Yield segments in order; a torn tail (partial record or payload) is ignored."""
    n = len(data) // SIZE
    rec = np.frombuffer(data, dtype=RECORD, count=n)
    kinds = rec["kind"]
    is_mark = np.flatnonzero(kinds == MARK)
    pos = 0
    for m in is_mark:
        if m < pos:
            continue  # inside a previous payload (cannot happen with JSON, kept for safety)
        if m > pos:
            yield from _runs(rec[pos:m], base + m * SIZE)
        length = int(rec["b"][m])
        nrec = -(-length // SIZE)
        if m + 1 + nrec > n:
            return  # torn marker payload: the marker was never acknowledged
        raw = bytes(data[(m + 1) * SIZE:(m + 1) * SIZE + length])
        try:
            payload = json.loads(raw)
        except ValueError:
            return
        pos = m + 1 + nrec
        yield Segment(MARK, op=int(rec["a"][m]), payload=payload, end=base + pos * SIZE)
    if pos < n:
        yield from _runs(rec[pos:n], base + n * SIZE)


def _runs(rec: np.ndarray, end: int) -> Iterator[Segment]:
    kinds = rec["kind"]
    if len(kinds) == 0:
        return
    if np.all(kinds == kinds[0]):
        yield Segment(int(kinds[0]), records=rec, end=end)
        return
    cut = np.flatnonzero(np.diff(kinds)) + 1
    starts = np.concatenate(([0], cut))
    stops = np.concatenate((cut, [len(kinds)]))
    last = len(starts) - 1
    for i, (s, e) in enumerate(zip(starts, stops)):
        # Only the last run ends at `end`; earlier ones are mid-log (offset not needed).
        yield Segment(int(kinds[s]), records=rec[s:e], end=end if i == last else 0)
