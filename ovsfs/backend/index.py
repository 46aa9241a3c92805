"""The proxy's manifest index: every object's manifest in RAM, a local copy on disk.

The ASDs hold the truth (each manifest on m+1 of them); the local file only makes
restarts fast. It is trusted only after a clean shutdown: `close` writes it and a
`clean` marker, `open` removes the marker, so after a crash (when the file may miss
the last puts) the index is rebuilt by scanning the ASDs, keeping the newest copy
(highest sequence number) of each manifest.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ovsfs.backend.manifest import NONE, Manifest
from ovsfs.backend.placement import AsdSet
from ovsfs.errors import DataError, OvsfsError

log = logging.getLogger("ovsfs.backend.index")
_ENT = struct.Struct(">HHI")


def quote_ns(ns: str) -> str:
    return ns.replace("%", "%25").replace("/", "%2F")


def unquote_ns(q: str) -> str:
    return q.replace("%2F", "/").replace("%25", "%")


def manifest_key(ns: str, name: str) -> str:
    return f"m/{quote_ns(ns)}/{name}"


def ns_key(ns: str) -> str:
    return f"n/{quote_ns(ns)}"


class Index:
    def __init__(self, path: Path | None, asds: AsdSet) -> None:
        self.path = Path(path) if path else None
        self.asds = asds
        self.lock = threading.RLock()
        self.objects: dict[str, dict[str, Manifest]] = {}
        self.ns_presets: dict[str, bytes] = {}  # namespace -> its preset (JSON), when bound
        self.rebuilt = False

    # -- load / save -------------------------------------------------------------

    def open(self) -> None:
        clean = self.path is not None and (self.path.parent / (self.path.name + ".clean")).exists()
        if clean:
            try:
                self._load()
                (self.path.parent / (self.path.name + ".clean")).unlink()
                return
            except (OSError, DataError, struct.error, UnicodeDecodeError) as e:
                log.warning("local manifest cache unusable (%s): rebuilding from the ASDs", e)
                self.objects.clear()
        self.rebuild()

    def _load(self) -> None:
        assert self.path is not None
        data = self.path.read_bytes()
        pos = 0
        while pos < len(data):
            a, b, c = _ENT.unpack_from(data, pos)
            pos += _ENT.size
            ns = data[pos:pos + a].decode()
            name = data[pos + a:pos + a + b].decode()
            pos += a + b
            bucket = self.objects.setdefault(ns, {})
            if b:  # an entry without a name just records the namespace (and its preset)
                self._add_load(bucket, name, Manifest.decode(data[pos:pos + c]))
            elif c:
                self.ns_presets[ns] = bytes(data[pos:pos + c])
            pos += c

    def close(self) -> None:
        if self.path is None:
            return
        parts = []
        with self.lock:
            for ns, objs in self.objects.items():
                nb = ns.encode()
                pb = self.ns_presets.get(ns, b"")
                parts.append(_ENT.pack(len(nb), 0, len(pb)) + nb + pb)
                for name, man in objs.items():
                    blob, name_b = man.encode(), name.encode()
                    parts.append(_ENT.pack(len(nb), len(name_b), len(blob)) + nb + name_b + blob)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(b"".join(parts))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        (self.path.parent / (self.path.name + ".clean")).write_text("")

    def rebuild(self) -> None:
        """Cold start: read every manifest copy of every reachable ASD."""
        self.asds.refresh()
        live = [c for c in self.asds.all() if c.up]

        def scan(c):  # type: ignore[no-untyped-def]
            try:
                return c.scan("n/"), c.scan("m/")
            except OvsfsError as e:
                log.warning("cannot scan %s: %s", c.addr, e)
                return {}, {}

        with ThreadPoolExecutor(max(1, len(live))) as pool:
            results = list(pool.map(scan, live))
        objects: dict[str, dict[str, Manifest]] = {}
        presets: dict[str, bytes] = {}
        for nss, mans in results:
            for key, value in nss.items():
                ns = unquote_ns(key[2:])
                objects.setdefault(ns, {})
                if len(value) > 1 and ns not in presets:  # b"\x01" + preset JSON
                    presets[ns] = bytes(value[1:])
            for key, blob in mans.items():
                qns, _, name = key[2:].partition("/")
                try:
                    man = Manifest.decode(blob)
                except DataError:
                    continue  # a damaged copy: another replica answers
                bucket = objects.setdefault(unquote_ns(qns), {})
                old = bucket.get(name)
                if old is None or man.seq > old.seq:
                    bucket[name] = man
        with self.lock:
            self.objects = {}
            self.ns_presets = presets
            self.asds.load.clear()
            for ns, objs in objects.items():
                bucket = self.objects.setdefault(ns, {})
                for name, man in objs.items():
                    self._add_load(bucket, name, man)
        self.rebuilt = True
        log.info("manifest index rebuilt from %d ASDs: %d namespaces, %d objects",
                 len(live), len(objects), sum(len(o) for o in objects.values()))

    # -- access ----------------------------------------------------------------

    def _add_load(self, bucket: dict[str, Manifest], name: str, man: Manifest | None) -> Manifest | None:
        old = bucket.pop(name, None)
        if old is not None:
            self._count(old, -1)
        if man is not None:
            bucket[name] = man
            self._count(man, +1)
        return old

    def _count(self, man: Manifest, sign: int) -> None:
        load: Counter[str] = self.asds.load
        for c in man.chunks:
            for i in c.asds:
                if i != NONE:
                    load[man.asds[i]] += sign

    def get(self, ns: str, name: str) -> Manifest | None:
        with self.lock:
            return self.objects.get(ns, {}).get(name)

    def set(self, ns: str, name: str, man: Manifest | None) -> Manifest | None:
        """Install (or remove, with None) a manifest; returns the one it replaces."""
        with self.lock:
            bucket = self.objects.setdefault(ns, {})
            return self._add_load(bucket, name, man)

    def replace_if(self, ns: str, name: str, expected: Manifest, man: Manifest) -> bool:
        """Swap in a repaired manifest unless a put replaced the object meanwhile."""
        with self.lock:
            cur = self.objects.get(ns, {}).get(name)
            if cur is None or cur.vid != expected.vid:
                return False
            self._add_load(self.objects[ns], name, man)
            return True

    def has_ns(self, ns: str) -> bool:
        with self.lock:
            return ns in self.objects

    def add_ns(self, ns: str, preset: bytes | None = None) -> None:
        with self.lock:
            self.objects.setdefault(ns, {})
            if preset:
                self.ns_presets[ns] = preset

    def ns_preset(self, ns: str) -> bytes | None:
        with self.lock:
            return self.ns_presets.get(ns)

    def drop_ns(self, ns: str) -> dict[str, Manifest]:
        with self.lock:
            self.ns_presets.pop(ns, None)
            objs = self.objects.pop(ns, {})
            for man in objs.values():
                self._count(man, -1)
            return objs

    def namespaces(self) -> list[str]:
        with self.lock:
            return sorted(self.objects)

    def names(self, ns: str) -> list[str] | None:
        with self.lock:
            objs = self.objects.get(ns)
            return None if objs is None else sorted(objs)

    def items(self) -> list[tuple[str, str, Manifest]]:
        with self.lock:
            return [(ns, n, m) for ns, objs in self.objects.items() for n, m in objs.items()]
