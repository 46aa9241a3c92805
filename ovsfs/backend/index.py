"""The proxy's manifest index: every object's manifest in RAM, a local copy on disk.

The ASDs hold the truth: each manifest on m+1 of them, each tombstone (a deleted
object or namespace) on every ASD that was up when it was written. Every record
carries a sequence number (ovsfs.backend.seq) and the index keeps, per object and per
namespace, the record with the highest one: a delete seen by any ASD that answers
wins over an older manifest brought back by an ASD that was down during the delete.

`covered` names the ASDs whose records the index has merged. After a crash the index
is rebuilt from the ASDs that answer at that moment; an ASD that comes back later (or
was never reached) is merged when it answers (`merge_from`, called at open and by
maintenance), so objects whose manifests only it held become readable again. The
local file is trusted only after a clean shutdown (`close` writes it and a `clean`
marker, `open` removes the marker), and it records which ASDs it covers: a clean stop
with an ASD away never passes the index off as complete.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from ovsfs.backend.manifest import NONE, Manifest, NsRecord, Tombstone, decode_record
from ovsfs.backend.placement import AsdSet
from ovsfs.backend.seq import SeqClock
from ovsfs.errors import DataError, OvsfsError

log = logging.getLogger("ovsfs.backend.index")
_MAGIC = b"OIX2"
_ENT = struct.Struct(">BHHI")   # kind (0 namespace record, 1 object record), ns len, name len, value len
Record = Manifest | Tombstone


def quote_ns(ns: str) -> str:
    return ns.replace("%", "%25").replace("/", "%2F")


def unquote_ns(q: str) -> str:
    return q.replace("%2F", "/").replace("%25", "%")


def manifest_key(ns: str, name: str) -> str:
    return f"m/{quote_ns(ns)}/{name}"


def ns_key(ns: str) -> str:
    return f"n/{quote_ns(ns)}"


def split_manifest_key(key: str) -> tuple[str, str]:
    qns, _, name = key[2:].partition("/")
    return unquote_ns(qns), name


class Index:
    def __init__(self, path: Path | None, asds: AsdSet, clock: SeqClock | None = None) -> None:
        self.path = Path(path) if path else None
        self.asds = asds
        self.clock = clock or SeqClock()
        self.lock = threading.RLock()
        self.objects: dict[str, dict[str, Manifest]] = {}   # live namespaces -> live objects
        self.ns_presets: dict[str, bytes] = {}  # namespace -> its preset (JSON), when bound
        self.ns_seq: dict[str, int] = {}        # live namespace -> sequence of its record
        self.ns_tombs: dict[str, int] = {}      # deleted namespace -> tombstone sequence
        self.tombs: dict[str, dict[str, int]] = {}  # deleted objects: ns -> name -> sequence
        self.covered: set[str] = set()          # ASD ids whose records are merged in
        self.rebuilt = False

    # -- load / save -------------------------------------------------------------

    @property
    def _clean(self) -> Path:
        assert self.path is not None
        return self.path.parent / (self.path.name + ".clean")

    def open(self) -> None:
        if self.path is not None and self._clean.exists():
            try:
                self._load()
                self._clean.unlink()
            except (OSError, DataError, struct.error, UnicodeDecodeError, ValueError) as e:
                log.warning("local manifest cache unusable (%s): rebuilding from the ASDs", e)
                self._reset()
                self.rebuild()
        else:
            self.rebuild()
        self.merge_late()

    def _reset(self) -> None:
        with self.lock:
            self.objects, self.ns_presets, self.ns_seq = {}, {}, {}
            self.ns_tombs, self.tombs, self.covered = {}, {}, set()
            self.asds.load.clear()

    def _load(self) -> None:
        assert self.path is not None
        data = self.path.read_bytes()
        if data[:4] != _MAGIC:
            raise DataError("old or foreign index file")
        (hlen,) = struct.unpack_from(">I", data, 4)
        head = json.loads(data[8:8 + hlen])
        pos = 8 + hlen
        with self.lock:
            while pos < len(data):
                kind, a, b, c = _ENT.unpack_from(data, pos)
                pos += _ENT.size
                ns = data[pos:pos + a].decode()
                name = data[pos + a:pos + a + b].decode()
                value = data[pos + a + b:pos + a + b + c]
                pos += a + b + c
                if kind == 0:
                    self._merge_ns(ns, NsRecord.decode(value))
                else:
                    self._merge_obj(ns, name, decode_record(value))
            self.covered = set(head.get("covered", []))
        self.clock.observe(int(head.get("seq", 0)))

    def close(self) -> None:
        if self.path is None:
            return
        parts = []
        with self.lock:
            head = json.dumps({"covered": sorted(self.covered), "seq": self.clock.last}).encode()
            parts.append(_MAGIC + struct.pack(">I", len(head)) + head)

            def ent(kind: int, ns: str, name: str, blob: bytes) -> None:
                nb, name_b = ns.encode(), name.encode()
                parts.append(_ENT.pack(kind, len(nb), len(name_b), len(blob)) + nb + name_b + blob)

            for ns, seq in self.ns_tombs.items():
                ent(0, ns, "", NsRecord(seq, False).encode())
            for ns in self.objects:
                ent(0, ns, "", NsRecord(self.ns_seq.get(ns, 0), True, self.ns_presets.get(ns, b"")).encode())
            for ns, objs in self.objects.items():
                for name, man in objs.items():
                    ent(1, ns, name, man.encode())
            for ns, tombs in self.tombs.items():
                for name, seq in tombs.items():
                    ent(1, ns, name, Tombstone(seq).encode())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(b"".join(parts))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._clean.write_text("")

    def mark_unclean(self) -> None:
        """The saved index may miss what I/O still running writes: the next open rebuilds."""
        if self.path is not None:
            self._clean.unlink(missing_ok=True)

    # -- merging what the ASDs hold ------------------------------------------------

    @staticmethod
    def _scan(c: Any) -> tuple[dict[str, bytes], dict[str, bytes]] | None:
        try:
            return c.scan("n/"), c.scan("m/")
        except OvsfsError as e:
            log.warning("cannot scan %s: %s", c.addr, e)
            return None

    def rebuild(self) -> None:
        """Cold start: read every manifest and tombstone of every reachable ASD."""
        self.asds.refresh()
        live = [c for c in self.asds.all() if c.up]
        with ThreadPoolExecutor(max(1, len(live))) as pool:
            results = list(pool.map(self._scan, live))
        self._reset()
        for c, res in zip(live, results):
            if res is not None:
                self._merge_scan(c.asd_id, *res)
        self.rebuilt = True
        log.info("manifest index rebuilt from %d of %d ASDs: %d namespaces, %d objects",
                 len(self.covered), len(self.asds.all()) + len(self.asds.pending),
                 len(self.objects), sum(len(o) for o in self.objects.values()))

    def uncovered(self) -> list[Any]:
        """Reachable ASDs whose records the index has not merged yet."""
        return [c for c in self.asds.all() if c.up and c.asd_id not in self.covered]

    def complete(self) -> bool:
        """True when every registered ASD is merged in."""
        return not self.asds.pending and all(c.asd_id in self.covered for c in self.asds.all())

    def merge_from(self, c: Any) -> int:
        """Merge one ASD's manifests and tombstones (a late ASD); returns records taken."""
        res = self._scan(c)
        if res is None:
            return 0
        n = self._merge_scan(c.asd_id, *res)
        log.info("merged %d newer records from ASD %s (%s)", n, c.addr, c.asd_id[:8])
        return n

    def merge_late(self) -> int:
        return sum(self.merge_from(c) for c in self.uncovered())

    def _merge_scan(self, asd_id: str, nss: dict[str, bytes], mans: dict[str, bytes]) -> int:
        with self.lock:
            n = self.merge_ns_records(nss) + self._merge_manifests(mans)
            self.covered.add(asd_id)
        return n

    def _merge_manifests(self, mans: dict[str, bytes]) -> int:
        """Merge manifest records (`m/...` keys) read from an ASD; returns records taken."""
        n = 0
        with self.lock:
            for key, blob in mans.items():
                try:
                    rec = decode_record(blob)
                except DataError:
                    continue  # a damaged copy: another ASD answers
                n += self._merge_obj(*split_manifest_key(key), rec)
        return n

    def _merge_ns(self, ns: str, rec: NsRecord) -> bool:
        self.clock.observe(rec.seq)
        if rec.seq <= self.ns_tombs.get(ns, -1):
            return False
        if rec.live:
            if rec.seq < self.ns_seq.get(ns, -1):
                return False
            self.objects.setdefault(ns, {})
            changed = rec.seq > self.ns_seq.get(ns, -1)
            self.ns_seq[ns] = rec.seq
            if rec.preset:
                self.ns_presets[ns] = rec.preset
            return changed
        self._kill_ns(ns, rec.seq)
        return True

    def _kill_ns(self, ns: str, seq: int) -> dict[str, Manifest]:
        """Namespace tombstone `seq`: everything of ns older than it is dead."""
        self.ns_tombs[ns] = seq
        dead: dict[str, Manifest] = {}
        objs = self.objects.get(ns, {})
        for name in [n for n, m in objs.items() if m.seq < seq]:
            dead[name] = objs[name]
            self._add_load(objs, name, None)
        tombs = self.tombs.get(ns, {})
        for name in [n for n, s in tombs.items() if s < seq]:
            del tombs[name]
        if not tombs:
            self.tombs.pop(ns, None)
        if self.ns_seq.get(ns, -1) < seq:
            self.ns_seq.pop(ns, None)
            self.ns_presets.pop(ns, None)
            if not objs:
                self.objects.pop(ns, None)
        return dead

    def _merge_obj(self, ns: str, name: str, rec: Record) -> bool:
        self.clock.observe(rec.seq)
        if rec.seq <= self.ns_tombs.get(ns, -1):
            return False
        if rec.seq <= self.best_seq(ns, name):
            return False
        if isinstance(rec, Tombstone):
            if ns in self.objects:
                self._add_load(self.objects[ns], name, None)
                if not self.objects[ns] and ns not in self.ns_seq:
                    del self.objects[ns]  # known only through that object: the same in any order
            self.tombs.setdefault(ns, {})[name] = rec.seq
        else:
            self._drop_tomb(ns, name)
            self._add_load(self.objects.setdefault(ns, {}), name, rec)
        return True

    def _drop_tomb(self, ns: str, name: str) -> None:
        tombs = self.tombs.get(ns)
        if tombs and tombs.pop(name, None) is not None and not tombs:
            del self.tombs[ns]

    # -- a backend shared by several proxies ---------------------------------------

    def merge_ns_records(self, nss: dict[str, bytes]) -> int:
        """Merge namespace records (`n/...` keys) read from an ASD: namespaces another
        proxy created or deleted. Returns records taken."""
        n = 0
        with self.lock:
            for key, value in nss.items():
                try:
                    n += self._merge_ns(unquote_ns(key[2:]), NsRecord.decode(value))
                except DataError:
                    continue  # a damaged copy: another ASD answers
        return n

    def merge_ns_from(self, clients: list[Any], pool: ThreadPoolExecutor, timeout: float = 1.0) -> int:
        """Merge the namespace records of the given ASDs (read in parallel; those that do
        not answer within `timeout` seconds are skipped: every live ASD holds every
        namespace record, so any answer is enough to learn a namespace)."""
        def scan(c: Any) -> dict[str, bytes]:
            try:
                return c.scan("n/")
            except OvsfsError:
                return {}
        done, _late = wait([pool.submit(scan, c) for c in clients], timeout=timeout)
        return sum(self.merge_ns_records(f.result()) for f in done)

    def reload_ns_from(self, ns: str, clients: list[Any], pool: ThreadPoolExecutor,
                       complete: bool) -> int:
        """reload_ns with ns's records read from the given ASDs in parallel; replaces what
        the index knew when `complete` (they are the whole set) and every one answered."""
        q = quote_ns(ns)

        def scan(c: Any) -> tuple[dict[str, bytes], dict[str, bytes]] | None:
            try:
                nss = {k: v for k, v in c.scan(f"n/{q}").items() if k == ns_key(ns)}
                return nss, c.scan(f"m/{q}/")
            except OvsfsError as e:
                log.info("refresh of %s: %s does not answer: %s", ns, c.addr, e)
                return None
        scans = list(pool.map(scan, clients))
        got = [r for r in scans if r is not None]
        return self.reload_ns(ns, got, complete and len(got) == len(clients))

    def reload_ns(self, ns: str, scans: list[tuple[dict[str, bytes], dict[str, bytes]]],
                  replace: bool) -> int:
        """Take namespace ns as the ASDs hold it now (another proxy wrote it): `scans` are
        (namespace records, manifest records) of ns read from each ASD that answered. With
        `replace` (every ASD of the set answered) what the index knew of ns is dropped
        first, so objects deleted and collected elsewhere go too; otherwise the records
        are merged (the newest record of each object wins). Returns records taken."""
        n = 0
        with self.lock:
            if replace:
                for man in self.objects.pop(ns, {}).values():
                    self._count(man, -1)
                self.ns_presets.pop(ns, None)
                self.ns_seq.pop(ns, None)
                self.ns_tombs.pop(ns, None)
                self.tombs.pop(ns, None)
            for nss, mans in scans:
                n += self.merge_ns_records(nss) + self._merge_manifests(mans)
        return n

    # -- access ----------------------------------------------------------------

    def _add_load(self, bucket: dict[str, Manifest], name: str, man: Manifest | None) -> Manifest | None:
        old = bucket.pop(name, None)
        if old is not None:
            self._count(old, -1)
        if man is not None:
            bucket[name] = man
            self._count(man, +1)
            self.clock.observe(man.seq)
        return old

    def _count(self, man: Manifest, sign: int) -> None:
        load: Counter[str] = self.asds.load
        for c in man.chunks:
            for i in c.asds:
                if i != NONE:
                    load[man.asds[i]] += sign

    def best_seq(self, ns: str, name: str) -> int:
        """Sequence of the newest record of an object the index knows (manifest or tombstone), -1 if none."""
        with self.lock:
            man = self.objects.get(ns, {}).get(name)
            return max(man.seq if man else -1, self.tombs.get(ns, {}).get(name, -1))

    def get(self, ns: str, name: str) -> Manifest | None:
        with self.lock:
            return self.objects.get(ns, {}).get(name)

    def set(self, ns: str, name: str, man: Manifest | None) -> Manifest | None:
        """Install (or forget, with None) a manifest; returns the one it replaces."""
        with self.lock:
            bucket = self.objects.setdefault(ns, {})
            if man is not None:
                self._drop_tomb(ns, name)
            return self._add_load(bucket, name, man)

    def tombstone(self, ns: str, name: str, seq: int) -> Manifest | None:
        """Record that the object was deleted at `seq`; returns the manifest it ends."""
        with self.lock:
            old = self._add_load(self.objects[ns], name, None) if ns in self.objects else None
            self.tombs.setdefault(ns, {})[name] = seq
            return old

    def forget_tombstone(self, ns: str, name: str, seq: int) -> bool:
        """Drop a collected tombstone, unless the object changed since."""
        with self.lock:
            if self.tombs.get(ns, {}).get(name) != seq:
                return False
            self._drop_tomb(ns, name)
            return True

    def forget_ns_tombstone(self, ns: str, seq: int) -> bool:
        with self.lock:
            if self.ns_tombs.get(ns) != seq:
                return False
            del self.ns_tombs[ns]
            return True

    def tombstones(self) -> list[tuple[str, str, int]]:
        with self.lock:
            return [(ns, n, s) for ns, t in self.tombs.items() for n, s in t.items()]

    def ns_tomb(self, ns: str) -> int:
        """Sequence of the namespace's tombstone, -1 if none."""
        with self.lock:
            return self.ns_tombs.get(ns, -1)

    def ns_tombstones(self) -> dict[str, int]:
        with self.lock:
            return dict(self.ns_tombs)

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

    def add_ns(self, ns: str, preset: bytes | None = None, seq: int = 0) -> None:
        with self.lock:
            self.objects.setdefault(ns, {})
            self.ns_seq[ns] = max(seq, self.ns_seq.get(ns, 0))
            if preset:
                self.ns_presets[ns] = preset

    def ns_preset(self, ns: str) -> bytes | None:
        with self.lock:
            return self.ns_presets.get(ns)

    def drop_ns(self, ns: str, seq: int) -> dict[str, Manifest]:
        """Namespace deleted at `seq`: returns the manifests that ends."""
        with self.lock:
            self.ns_seq.pop(ns, None)
            self.ns_presets.pop(ns, None)
            dead = self._kill_ns(ns, seq)
            if not self.objects.get(ns):
                self.objects.pop(ns, None)
            return dead

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

    def vids(self) -> set[str]:
        """Version ids (hex) of every live manifest: fragments of any other vid are garbage."""
        with self.lock:
            return {m.vid.hex() for objs in self.objects.values() for m in objs.values()}
