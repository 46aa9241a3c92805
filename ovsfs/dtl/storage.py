"""The DTL server's per-volume entry logs on local disk (blocking; the server calls it from
worker threads).

Per volume two files under dtl.path, named from the volume name in hex (any name is safe):
- `v-<hex>.log`: entry records (wire.RECORD: position, length, CRC32C, blob), appended in
  position order. An append is written with write() before the server replies (the peer's
  page cache); `sync` fsyncs it. At reload a torn or damaged tail is cut.
- `v-<hex>.meta`: JSON {volume, gen_seen, trim_pos}, replaced atomically and fsynced whenever
  it changes, so fencing (gen_seen) and the trim point survive a restart.

Only an index (position, offset, size) is kept in memory; blobs are read back for fetch.
Trimmed records stay in the file until they outweigh the live ones; then the file is
rewritten (compacted) with the live records only.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

from ovsfs.dtl.wire import Entry, Pos, encode_record, parse_record
from ovsfs.errors import DtlError, Fenced
from ovsfs.fsutil import fsync_path, mkdir_durable

log = logging.getLogger("ovsfs.dtl")

COMPACT_MIN = 1 << 20      # dead bytes in a file before it is worth rewriting
# A trim point is written down at most this often (seconds). Losing one to a crash only
# keeps entries the backend has already, which a restart skips; fsyncing one per trim put
# 10-20 ms pauses in front of sync appends on the same connection.
TRIM_META_SECONDS = 5.0


class VolumeLog:
    """One volume's entries. Every method holds self.lock (the server may run requests of
    several connections for one volume at once)."""

    def __init__(self, root: Path, volume: str) -> None:
        self.volume = volume
        stem = "v-" + volume.encode().hex()
        self.path = root / (stem + ".log")
        self.meta_path = root / (stem + ".meta")
        self.lock = threading.Lock()
        self.gen_seen = 0
        self.trim_pos: Pos = (0, 0)
        self.last_pos: Pos | None = None     # newest position ever accepted (dedupe)
        self.index: list[Pos] = []           # positions of live records, ascending
        self.offsets: list[tuple[int, int]] = []   # (file offset, record size) per live record
        self.dead = 0                        # bytes of trimmed records still in the file
        self.held_bytes = 0                  # bytes of live records
        self.fd: int | None = None
        self._meta_written = 0.0             # time.monotonic() of the last meta write

    # ---- reload ----------------------------------------------------------------------------

    def load(self) -> None:
        """Read meta and log; cut a torn tail. OSError."""
        if self.meta_path.exists():
            meta = json.loads(self.meta_path.read_text())
            self.gen_seen = int(meta.get("gen_seen", 0))
            self.trim_pos = tuple(meta.get("trim_pos", (0, 0)))  # type: ignore[assignment]
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        view = memoryview(data)
        at = 0
        while at < len(view):
            rec = parse_record(view, at)
            if rec is None or (self.last_pos is not None and rec[0] <= self.last_pos):
                break
            pos, _blob, size = rec
            self.last_pos = pos
            if pos < self.trim_pos:
                self.dead += size
            else:
                self.index.append(pos)
                self.offsets.append((at, size))
                self.held_bytes += size
            at += size
        if at < len(data):
            log.warning("dtl: %s: cut %d bytes of torn or damaged tail at offset %d",
                        self.path.name, len(data) - at, at)
            with open(self.path, "r+b") as f:
                f.truncate(at)
                os.fsync(f.fileno())

    # ---- helpers ---------------------------------------------------------------------------

    def _open(self) -> int:
        if self.fd is None:
            new = not self.path.exists()
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            if new:
                fsync_path(self.path.parent)
        return self.fd

    def _write_meta(self) -> None:
        self._meta_written = time.monotonic()
        tmp = self.meta_path.with_suffix(".tmp")
        body = json.dumps({"volume": self.volume, "gen_seen": self.gen_seen,
                           "trim_pos": list(self.trim_pos)})
        with open(tmp, "w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.meta_path)
        fsync_path(self.meta_path.parent)

    def check_gen(self, gen: int, floor: int = 0) -> None:
        """Fenced when gen is older than the newest seen (or `floor`); else remember gen."""
        newest = max(self.gen_seen, floor)
        if gen < newest:
            raise Fenced(f"volume {self.volume}: owner generation {gen} is older than {newest}")
        if gen > self.gen_seen:
            self.gen_seen = gen
            self._write_meta()

    # ---- operations ------------------------------------------------------------------------

    def info(self) -> dict:
        return {"first_pos": list(self.index[0]) if self.index else None,
                "last_pos": list(self.last_pos) if self.last_pos else None,
                "trim_pos": list(self.trim_pos), "gen_seen": self.gen_seen,
                "entries": len(self.index), "bytes": self.held_bytes}

    def append(self, entries: list[Entry], room: Callable[[int], None]) -> int:
        """Write the entries not yet held (pos above last_pos and not below the trim point)
        with one write(). `room(nbytes)` raises when the server's bound would be passed.
        Returns the bytes added. OSError."""
        fresh = [(p, b) for p, b in entries
                 if p >= self.trim_pos and (self.last_pos is None or p > self.last_pos)]
        if not fresh:
            return 0
        recs = [encode_record(p, b) for p, b in fresh]
        total = sum(len(r) for r in recs)
        room(total)
        at = -1
        try:
            fd = self._open()
            at = os.lseek(fd, 0, os.SEEK_END)
            buf = b"".join(recs)
            done = 0
            while done < len(buf):       # a short write continues where it stopped
                done += os.write(fd, buf[done:])
        except BaseException:
            room(-total)
            # A partial record may be in the file: cut it so later appends stay parseable.
            if self.fd is not None and at >= 0:
                os.ftruncate(self.fd, at)
            raise
        for (p, _b), r in zip(fresh, recs):
            self.index.append(p)
            self.offsets.append((at, len(r)))
            at += len(r)
        self.last_pos = fresh[-1][0]
        self.held_bytes += total
        return total

    def sync(self) -> None:
        if self.fd is not None:
            os.fsync(self.fd)

    def trim(self, pos: Pos) -> int:
        """Drop entries below pos; returns the bytes freed. OSError."""
        if pos <= self.trim_pos:
            return 0
        self.trim_pos = pos
        k = bisect.bisect_left(self.index, pos)
        freed = sum(size for _at, size in self.offsets[:k])
        del self.index[:k]
        del self.offsets[:k]
        self.dead += freed
        self.held_bytes -= freed
        if time.monotonic() - self._meta_written >= TRIM_META_SECONDS:
            self._write_meta()
        if self.dead >= COMPACT_MIN and self.dead > self.held_bytes:
            self._compact()
        return freed

    def _compact(self) -> None:
        """Rewrite the file with the live records only (atomic rename)."""
        tmp = self.path.with_suffix(".compact")
        with open(self.path, "rb") as src, open(tmp, "wb") as dst:
            offsets = []
            at = 0
            for off, size in self.offsets:
                src.seek(off)
                dst.write(src.read(size))
                offsets.append((at, size))
                at += size
            dst.flush()
            os.fsync(dst.fileno())
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        os.replace(tmp, self.path)
        fsync_path(self.path.parent)
        self.offsets = offsets
        self.dead = 0

    def fetch(self, start: Pos = (0, 0), limit: int = 1 << 62) -> list[Entry]:
        """The live entries from position `start` on, in order, about `limit` bytes at most
        (at least one entry). DtlError when the file no longer reads back."""
        out: list[Entry] = []
        k = bisect.bisect_left(self.index, start)
        if k >= len(self.index):
            return out
        total = 0
        with open(self.path, "rb") as f:
            for off, size in self.offsets[k:]:
                if out and total + size > limit:
                    break
                total += size
                f.seek(off)
                raw = f.read(size)
                rec = parse_record(memoryview(raw), 0)
                if rec is None or rec[2] != size:
                    raise DtlError(f"dtl: {self.path.name}: record at {off} no longer reads back")
                out.append((rec[0], rec[1]))
        return out

    def drop(self) -> None:
        """Forget the entries; the meta (gen_seen) stays so fencing holds."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.path.unlink(missing_ok=True)
        fsync_path(self.path.parent)
        self.index, self.offsets, self.dead, self.held_bytes = [], [], 0, 0
        # Forget positions too: an owner that comes back to this peer later catches it up
        # from its own trim point, which may be below what was held here.
        self.last_pos, self.trim_pos = None, (0, 0)
        self._write_meta()

    def close(self) -> None:
        if self.meta_path.exists():
            try:
                self._write_meta()   # the latest trim point
            except OSError:
                pass
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class DtlStore:
    """Every volume log under one directory, with the server-wide bound on held bytes."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.volumes: dict[str, VolumeLog] = {}
        self.lock = threading.Lock()     # guards self.volumes and self.held
        self.held = 0

    def load(self) -> None:
        """Reload every volume found on disk. OSError."""
        mkdir_durable(self.root)
        for p in sorted(self.root.glob("v-*.*")):
            if p.suffix not in (".log", ".meta"):
                p.unlink()       # a compaction or meta write cut short by a crash
                continue
            try:
                volume = bytes.fromhex(p.stem[2:]).decode()
            except ValueError:
                log.warning("dtl: ignoring %s (not a volume file)", p.name)
                continue
            if volume not in self.volumes:
                v = VolumeLog(self.root, volume)
                v.load()
                self.volumes[volume] = v
                self.held += v.held_bytes

    def volume(self, name: str) -> VolumeLog:
        with self.lock:
            v = self.volumes.get(name)
            if v is None:
                v = self.volumes[name] = VolumeLog(self.root, name)
            return v

    def reserve(self, nbytes: int) -> None:
        """Count nbytes as held; DtlError when that would pass max_bytes."""
        with self.lock:
            if nbytes > 0 and self.held + nbytes > self.max_bytes:
                raise DtlError(f"dtl.max_bytes reached: holding {self.held} of {self.max_bytes}"
                               f" bytes, refusing {nbytes} more")
            self.held += nbytes

    def release(self, nbytes: int) -> None:
        with self.lock:
            self.held -= nbytes

    def close(self) -> None:
        with self.lock:
            for v in self.volumes.values():
                with v.lock:
                    v.close()
