"""The write path of the proxy: encode, place, send, acknowledge at c, replicate the manifest.

Kept apart from proxy.py because it is the one place with background work that
outlives the call: fragments beyond the c-th keep being written after the put
returned, and report failures to maintenance through `mark_dirty`.

Owner writes carry a guard (namespace, owner generation): every fragment put and every
manifest copy of a put is checked by its ASD against that namespace's fence. One
refusal ends the put with Fenced (never retried elsewhere, never taken for an ASD
that is down): the fragments written are purged and manifest copies already stored
are replaced by what the key held before (best effort; ovsfs.backend.fencing says why
no such put completes).
"""

from __future__ import annotations

import os
import threading
from collections import Counter

from ovsfs.backend import codec
from ovsfs.backend.asd_client import Guard, StaleRecord
from ovsfs.backend.context import ProxyContext
from ovsfs.backend.fencing import take_back
from ovsfs.backend.index import manifest_key
from ovsfs.backend.manifest import NONE, Chunk, Manifest
from ovsfs.backend.policy import Preset, chunk_layout
from ovsfs.errors import BackendError, Fenced, NoSpace, OvsfsError


IN_FLIGHT_CHUNKS = 2  # chunks encoded ahead of the acknowledged ones: bounds memory


class ManifestLeft(Fenced):
    """A refused put whose manifest copy could not be taken back everywhere (an ASD fenced
    or gone meanwhile): to the caller it is Fenced like any other; inside the writer it
    means the put's fragments must stay."""


class ChunkWrite:
    """The k+m fragment puts of one chunk, acknowledged once c succeed."""

    def __init__(self, proxy: ProxyContext, man: Manifest, i: int, frags: list[bytes],
                 targets: list[str | None], c: int, guard: Guard | None = None) -> None:
        self.proxy, self.man, self.i = proxy, man, i
        self.guard = guard
        self.fenced: Fenced | None = None   # an ASD refused the owner generation
        self.frags, self.targets, self.c = frags, targets, c
        self.cv = threading.Condition()
        self.ok: set[int] = set()
        self.done = 0
        self.owner: tuple[str, str] | None = None  # set once the put is acknowledged
        self.late_failure = False

    def start(self) -> None:
        for j, asd in enumerate(self.targets):
            self.proxy.pool.submit(self._one, j, asd)

    def _one(self, j: int, asd_id: str) -> None:
        ok = self.put_fragment(j, asd_id)
        with self.cv:
            self.done += 1
            if ok:
                self.ok.add(j)
            owner = None if ok else self.owner
            self.cv.notify_all()
        if owner is not None and owner[0]:
            self.proxy.mark_dirty(*owner)  # failed after the put was acknowledged

    def put_fragment(self, j: int, asd_id: str | None) -> bool:
        c = self.proxy.asds.get(asd_id)
        if c is None:
            return False
        try:
            c.put(self.man.fragment_key(self.i, j), self.frags[j], self.man.chunks[self.i].crcs[j],
                  guard=self.guard)
            return True
        except Fenced as e:
            with self.cv:
                self.fenced = e
                self.cv.notify_all()
            return False
        except OvsfsError:
            return False

    def wait_ack(self) -> None:
        with self.cv:
            self.cv.wait_for(lambda: len(self.ok) >= self.c or self.done == len(self.targets)
                             or self.fenced is not None)

    def wait_all(self) -> None:
        with self.cv:
            self.cv.wait_for(lambda: self.done == len(self.targets))

    def finish(self) -> None:
        """Return once c fragments are stored, placing failed ones on other ASDs if needed."""
        self.wait_ack()
        with self.cv:
            if self.fenced is not None:
                raise self.fenced
            if len(self.ok) >= self.c:
                return
            failed = [j for j in range(len(self.targets)) if j not in self.ok]
        asds = self.proxy.asds
        used = Counter(asds.node_of(self.targets[j]) for j in self.ok)
        tried = {t for t in self.targets if t}
        for j in failed:
            if len(self.ok) >= self.c:
                break
            try:
                (alt,) = asds.choose(1, self.man.policy.x, exclude=self.man.used_asds() | tried, node_use=used)
            except NoSpace:
                break
            ok = self.put_fragment(j, alt)
            if self.fenced is not None:
                raise self.fenced
            if ok:
                self.man.set_fragment(self.i, j, alt)
                self.ok.add(j)
                used[asds.node_of(alt)] += 1
            tried.add(alt)
        if len(self.ok) < self.c:
            raise BackendError(f"chunk {self.i}: only {len(self.ok)} of {self.c} fragments could be stored")

    def acknowledge(self, owner: tuple[str, str]) -> bool:
        """Record who to report late failures to; True if some already failed."""
        with self.cv:
            self.owner = owner
            return self.done > len(self.ok)


class ObjectWriter:
    def __init__(self, proxy: ProxyContext) -> None:
        self.proxy = proxy

    def put(self, ns: str, name: str, data: bytes | memoryview, preset: Preset,
            gen: int = 0) -> Manifest:
        """Fenced when an ASD refused `gen` for ns (nothing of this put becomes current)."""
        guard = (ns, gen)
        man, writes = self.write_object(data, preset, guard)
        try:
            with self.proxy.obj_lock(ns, name):
                try:
                    degraded = self.write_manifest(ns, name, man, guard=guard)
                except ManifestLeft:
                    # A copy of our manifest stayed on an ASD fenced meanwhile: it may be the
                    # newest record the next owner reads, so its fragments must stay whole
                    # (garbage for GC once a newer version replaces it).
                    for w in writes:
                        w.wait_all()
                    raise
                except Fenced:
                    for w in writes:
                        w.wait_all()
                    self.proxy.purge(man, set(man.replica_ids()), "", "")
                    raise
                for w in writes:
                    degraded |= w.acknowledge((ns, name))
                self.proxy.install(ns, name, man)
        finally:
            self.proxy.inflight.discard(man.vid)
        if degraded:
            self.proxy.mark_dirty(ns, name)
        return man

    def write_object(self, data: bytes | memoryview, preset: Preset,
                     guard: Guard | None = None) -> tuple[Manifest, list[ChunkWrite]]:
        p = self.proxy
        view = memoryview(data).cast("B")
        counts = p.asds.node_counts()
        policy = preset.choose(counts) or preset.choose_degraded(counts)
        if policy is None:
            raise NoSpace(f"preset {preset.name}: no policy fits the {len(p.asds.live())} live ASDs")
        k, m = policy.k, policy.m
        aead, key_id = None, 0
        if preset.encryption != "none":
            assert p.keys is not None
            key_id = p.keys.current
            aead = p.keys.get(key_id)
        chunk, n = chunk_layout(len(view), k, preset.max_fragment_size)
        vid = os.urandom(8)
        p.inflight.add(vid)  # until installed (or given up): GC must not take its fragments
        man = Manifest(0, vid, len(view), policy, preset.compression, preset.encryption,
                       key_id, preset.max_fragment_size, chunk)
        writes: list[ChunkWrite] = []
        try:
            for i in range(n):
                if i >= IN_FLIGHT_CHUNKS:
                    writes[i - IN_FLIGHT_CHUNKS].wait_ack()
                stored, flags = codec.transform(view[i * chunk:(i + 1) * chunk], preset.compression,
                                                aead, vid, i)
                frags, crcs, fsize = codec.encode(stored, k, m)
                placed = p.asds.choose(k + m, policy.x, at_least=policy.c)
                targets: list[str | None] = [*placed, *[None] * (k + m - len(placed))]
                man.chunks.append(Chunk(len(stored), fsize, flags,
                                        [NONE if t is None else man.asd_index(t) for t in targets], crcs))
                w = ChunkWrite(p, man, i, frags, targets, policy.c, guard)
                w.start()
                writes.append(w)
            for w in writes:
                w.finish()
        except BaseException:
            for w in writes:  # nothing will point at these fragments: drop them
                w.wait_all()
            p.purge(man, set(), "", "")
            p.inflight.discard(vid)
            raise
        return man, writes

    def write_manifest(self, ns: str, name: str, man: Manifest, guard: Guard | None = None,
                       if_newer: bool = False) -> bool:
        """Store the manifest on m+1 ASDs (preferring ones holding its fragments).
        Returns True when fewer copies than that could be made (maintenance adds them).
        `guard`: an owner put, Fenced when any ASD refuses its generation (copies already
        stored are replaced by the version this put replaces, or deleted). `if_newer` (repairs): StaleRecord when an ASD holds a
        record of the object newer than `man` (another proxy replaced or deleted it)."""
        p = self.proxy
        # Numbered here, under the object's lock, so that the manifest a reader sees last
        # is always the one with the highest number (a delete or repair in between included).
        man.seq = p.clock.next()
        want = man.policy.m + 1
        prefer = [man.asds[i] for i in (man.chunks[0].asds if man.chunks else []) if i != NONE]
        try:
            targets = p.asds.choose(min(want, len(p.asds.live())), want,
                                    prefer=prefer)
        except NoSpace:
            targets = []
        key = manifest_key(ns, name)
        stored: list[str] = []
        try:
            ok = self._copies(man, key, targets, guard, if_newer, stored)
            tried = set(targets)
            while len(ok) < want:
                # Not on a draining ASD: a drain that already passed this object would miss it.
                spare = [c.asd_id for c in p.asds.live() if c.asd_id not in tried]
                if not spare:
                    break
                extra = spare[:want - len(ok)]
                tried |= set(extra)
                ok += self._copies(man, key, extra, guard, if_newer, stored)
        except Fenced as e:
            # A stale owner's manifest must not stay readable where it landed; put back what
            # the key held before as this proxy knows it (the version this put replaces,
            # whose copy ours overwrote there), or nothing. Still guarded: an ASD fenced
            # meanwhile keeps our copy, which then raced the fence (a put concurrent with a
            # fence may show, complete, as a crash mid-put may).
            prev = p.index.get(ns, name)
            left = take_back([p.asds.get(a) for a in stored], key,
                             prev.encode() if prev is not None else None, guard)
            if left:
                raise ManifestLeft(str(e)) from e
            raise
        # One copy is one ASD loss from losing the object: acknowledge only with two
        # (or every live ASD, on a backend that has fewer).
        need = min(2, want, len(p.asds.live()))
        if len(ok) < max(need, 1):
            raise BackendError(f"manifest of {ns}/{name} stored on {len(ok)} ASD(s); {max(need, 1)} needed")
        if set(ok) != set(targets):
            # copies name each other: rewrite them with the final list
            self._copies(man, key, ok, guard, if_newer, stored)
        return len(ok) < want

    def _copies(self, man: Manifest, key: str, targets: list[str], guard: Guard | None = None,
                if_newer: bool = False, stored: list[str] | None = None) -> list[str]:
        """Write the manifest to `targets`; returns those that took it. Raises Fenced (guard
        refused) or StaleRecord (if_newer refused) once every write has finished."""
        p = self.proxy
        man.replicas = [man.asd_index(t) for t in targets]
        blob = man.encode()

        def one(asd_id: str) -> bool | OvsfsError:
            c = p.asds.get(asd_id)
            try:
                if c is None:
                    return False
                c.put(key, blob, guard=guard, if_newer=man.seq if if_newer else None)
                return True
            except (Fenced, StaleRecord) as e:
                return e
            except OvsfsError:
                return False

        results = list(p.pool.map(one, targets))
        ok = [t for t, r in zip(targets, results) if r is True]
        if stored is not None:
            stored.extend(a for a in ok if a not in stored)
        for r in results:
            if isinstance(r, Fenced):
                raise r
        for r in results:
            if isinstance(r, StaleRecord):
                raise r
        man.replicas = [man.asd_index(t) for t in ok]
        return ok
