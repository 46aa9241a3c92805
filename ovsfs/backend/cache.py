"""Caches on the proxy's side: whole fragments on local disk, decoded chunks in RAM.

Fragment cache: fragments fetched whole (for a decode) are kept as files under the
node's state directory, bounded in bytes, evicted least recently used; a later read
of any range of such a fragment is a local pread. Files are named by the fragment
key, which includes the object's random version id, so a cached fragment can never
be stale (a new put makes new keys).

Chunk cache: with compression or encryption on, a 4 KiB read needs its whole chunk
decoded; the engine reads an SCO in many small pieces, so the last few decoded
chunks stay in RAM.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections import OrderedDict
from pathlib import Path


class FragmentCache:
    def __init__(self, root: Path | None, capacity: int) -> None:
        self.root = Path(root) if root else None
        self.capacity = capacity if root else 0
        self.lock = threading.Lock()
        self.entries: OrderedDict[str, int] = OrderedDict()
        self.size = 0
        self.hits = self.misses = 0
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)  # no index survives a restart: start empty
            self.root.mkdir(parents=True, exist_ok=True)

    def _file(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key.replace("/", "_")

    def put(self, key: str, data: bytes | bytearray) -> None:
        if not self.capacity or len(data) > self.capacity // 4:
            return
        path = self._file(key)
        tmp = path.with_name(path.name + f".{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            return
        evict: list[str] = []
        with self.lock:
            self.size += len(data) - self.entries.pop(key, 0)
            self.entries[key] = len(data)
            while self.size > self.capacity and self.entries:
                old, n = self.entries.popitem(last=False)
                self.size -= n
                evict.append(old)
        for old in evict:
            self._file(old).unlink(missing_ok=True)

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes | None:
        if not self.capacity:
            return None
        with self.lock:
            if key not in self.entries:
                self.misses += 1
                return None
            self.entries.move_to_end(key)
            self.hits += 1
        try:
            with open(self._file(key), "rb", buffering=0) as f:
                if length is None:
                    return f.read()
                data = os.pread(f.fileno(), length, offset)
            return data if len(data) == length else None
        except OSError:
            return None

    def discard(self, key: str) -> None:
        with self.lock:
            n = self.entries.pop(key, None)
            if n is not None:
                self.size -= n
        if n is not None:
            self._file(key).unlink(missing_ok=True)

    def drop(self) -> int:
        """Empty the cache (`ovsfs cache drop`); returns the bytes freed."""
        with self.lock:
            keys, freed = list(self.entries), self.size
            self.entries.clear()
            self.size = 0
        for k in keys:
            self._file(k).unlink(missing_ok=True)
        return freed

    def stats(self) -> dict[str, int]:
        return {"bytes": self.size, "capacity": self.capacity, "fragments": len(self.entries),
                "hits": self.hits, "misses": self.misses}


class ChunkCache:
    def __init__(self, capacity: int = 64 << 20) -> None:
        self.capacity = capacity
        self.lock = threading.Lock()
        self.entries: OrderedDict[tuple[bytes, int], bytes] = OrderedDict()
        self.size = 0

    def get(self, vid: bytes, chunk: int) -> bytes | None:
        with self.lock:
            data = self.entries.get((vid, chunk))
            if data is not None:
                self.entries.move_to_end((vid, chunk))
            return data

    def put(self, vid: bytes, chunk: int, data: bytes) -> None:
        if len(data) > self.capacity:
            return
        with self.lock:
            old = self.entries.pop((vid, chunk), None)
            self.size += len(data) - (len(old) if old else 0)
            self.entries[(vid, chunk)] = data
            while self.size > self.capacity:
                _, d = self.entries.popitem(last=False)
                self.size -= len(d)

    def drop(self) -> None:
        with self.lock:
            self.entries.clear()
            self.size = 0
