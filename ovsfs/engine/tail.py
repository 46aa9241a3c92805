"""The tail of a volume's log as the DTL carries it, and its replay on a new owner.

A DTL entry is one TLog append of the owner (`LogWriter._tlog_append`): its records and,
for WRITE records with data, the clusters they point at, in record order. Its position
`pos = (TLog number, byte offset)` is where those records start in the owner's log, so
entries are totally ordered and a restarted owner can read them again from its local
TLogs (`read_tail`) to catch a new DTL peer up. RELOC records (the scrubber moving
clusters) are not shipped: they do not change what the volume reads, and the SCOs they
empty are deleted only after the TLog holding them is on the backend.

Blob layout (little endian): u32 length of the TLog records, the records (tlog.RECORD,
24 bytes each), then cluster_size bytes per WRITE record whose location is a cluster.
The DTL frames and checksums blobs; this module only gives them meaning.
"""

from __future__ import annotations

import logging
import struct
from typing import Any, Iterable, Iterator

import numpy as np


from ovsfs.engine import tlog
from ovsfs.engine.map import ZERO_LOC
from ovsfs.errors import DataError

log = logging.getLogger("ovsfs.engine.tail")

Pos = tuple[int, int]
BATCH_BYTES = 4 << 20     # replay appends runs of written clusters in batches of this size
_LEN = struct.Struct("<I")


def encode(rec: bytes, data: bytes | memoryview | None) -> bytes:
    return b"".join((_LEN.pack(len(rec)), rec, data or b""))


def decode(blob: bytes | memoryview) -> tuple[memoryview, memoryview]:
    """(records, cluster data) of an entry; DataError when the blob is not one."""
    view = memoryview(blob)
    if len(view) < _LEN.size:
        raise DataError("DTL entry shorter than its header")
    (n,) = _LEN.unpack_from(view)
    if n % tlog.SIZE or _LEN.size + n > len(view):
        raise DataError(f"DTL entry with a bad record length {n}")
    return view[_LEN.size:_LEN.size + n], view[_LEN.size + n:]


def _segments(data: memoryview) -> Iterator[tuple[int, int, tlog.Segment]]:
    """(start offset, end offset, segment) of every whole segment of a TLog's bytes."""
    at = 0
    for seg in tlog.parse(data):
        end = seg.end if seg.kind == tlog.MARK else at + len(seg.records) * tlog.SIZE  # type: ignore[arg-type]
        yield at, end, seg
        at = end


# `vol` below is a Volume (ovsfs/engine/volume.py), which imports this module through the
# log writer: typed as Any rather than imported back.
def backend_pos(vol: Any) -> Pos:
    """The log position below which everything is on the backend (what a DTL may drop)."""
    st = vol.state
    with st.lock:
        local = [int(p.name) for p in st.tlog_dir.iterdir() if p.name.isdigit()]
        pending = [n for n in local if n not in st.uploaded_tlogs]
        if st.tlog_fd is not None:
            pending.append(st.tlog_no)
        return (min(pending) if pending else st.next_tlog, 0)


def read_tail(vol: Any, start: Pos, until: Pos | None = None) -> Iterator[tuple[Pos, bytes]]:
    """Entries of `vol`'s local log from `start` on (up to, not including, `until`), in order.

    Rebuilt from the local TLogs and the data their WRITE records point at (local SCOs or,
    once uploaded, the backend). TLogs no longer local are on the backend already: skipped.

    WRITE records come one entry per record. The original appends are not marked in the
    TLog, and a peer that kept an older part of the tail drops a re-sent entry whose position
    it has; an entry spanning several appends would then lose the later ones. One record per
    entry means a re-sent record is at worst applied again right after the entry holding it,
    in order, which leaves every sector as it was (the last write of each still comes last).
    """
    st = vol.state
    with st.lock:
        names = sorted(int(p.name) for p in st.tlog_dir.iterdir() if p.name.isdigit())
        end = (st.tlog_no, st.tlog_off) if st.tlog_fd is not None else None
    cs = st.cluster_size
    for n in names:
        if (n, 1 << 62) <= start or (until is not None and (n, 0) >= until):
            continue
        try:
            raw = (st.tlog_dir / str(n)).read_bytes()
        except FileNotFoundError:
            continue   # uploaded and dropped meanwhile
        if end is not None and n == end[0]:
            raw = raw[:end[1]]   # only what was appended whole when we looked
        for lo, hi, seg in _segments(memoryview(raw)):
            if (n, hi) <= start or seg.kind in (tlog.RELOC, tlog.NOOP):
                continue
            if until is not None and (n, lo) >= until:
                return
            if seg.kind == tlog.MARK:
                if (n, lo) >= start:
                    yield (n, lo), encode(bytes(raw[lo:hi]), None)
                continue
            recs = seg.records
            locs = recs["b"]  # type: ignore[index]
            have = locs > ZERO_LOC
            data = bytes(vol.read_locations(locs[have])) if have.any() else b""
            at = 0
            for i in range(len(recs)):  # type: ignore[arg-type]
                pos = (n, lo + i * tlog.SIZE)
                one = data[at:at + cs] if have[i] else None
                at += cs if have[i] else 0
                if pos < start:
                    continue
                if until is not None and pos >= until:
                    return
                yield pos, encode(bytes(raw[pos[1]:pos[1] + tlog.SIZE]), one)


def replay(vol: Any, entries: Iterable[tuple[Pos, bytes]], applied: dict[int, int]) -> int:
    """Append a previous owner's DTL entries to `vol`'s own log, in order, as new writes.

    `applied`: TLog number -> bytes of it already in the map (from the backend: whole;
    from a local TLog: its length); entries inside those are skipped. Runs of entries that
    only write data are appended as one batch (a long tail replays at write speed, not one
    append per entry). Returns the number of entries applied. Every entry is whole (the DTL
    checks its CRC), so none is half applied."""
    count = 0
    recs: list[bytes] = []
    datas: list[bytes] = []
    size = 0

    def push() -> None:
        nonlocal size
        if recs:
            vol.apply_entry(b"".join(recs), memoryview(b"".join(datas)))
            recs.clear()
            datas.clear()
            size = 0

    for pos, blob in sorted(entries, key=lambda e: e[0]):
        n, off = pos
        if off < applied.get(n, -1):
            continue
        rec, data = decode(blob)
        r = np.frombuffer(rec, dtype=tlog.RECORD)
        if len(r) and (r["kind"] == tlog.WRITE).all() and (r["b"] > ZERO_LOC).all():
            recs.append(bytes(rec))
            datas.append(bytes(data))
            size += len(data)
            if size >= BATCH_BYTES:
                push()
        else:
            push()
            vol.apply_entry(bytes(rec), data)
        count += 1
    push()
    if count:
        log.info("%s: replayed %d DTL entries of the previous owner", vol.name, count)
    return count
