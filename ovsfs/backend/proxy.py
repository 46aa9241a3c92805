"""The proxy: a Store whose objects are erasure coded over ASDs.

put: object -> chunks (the ALBA chunk rule) -> compress -> encrypt -> k+m fragments
on distinct live ASDs (at most x per node). Fragments of a chunk go out in
parallel while the next chunk is being encoded; the put returns once every chunk
has c fragments stored and the manifest is on m+1 ASDs. Fragments still in flight
finish in the background; any that fail are left to maintenance.

Atomic puts: every put writes a fresh version id (vid) into the fragment keys and
replaces the manifest last; readers holding the old manifest retry once with the
new one if the old fragments vanish under them.

Reads: with compression and encryption off, fragment j of a chunk holds bytes
[j*fs, (j+1)*fs) of it as they are (systematic Reed-Solomon), so get_range fetches
only the byte ranges of the data fragments it covers, and the ASD verifies only the
64 KiB blocks it touches. With compression or encryption on, the whole chunk is
fetched (any k fragments), decoded and kept in a small RAM cache. A fragment that
is missing, unreachable or fails its CRC is replaced by decoding from the others.

Shared by several nodes: each node runs its own proxy (own state_dir) over the same
ASDs. Namespace records (with their preset) and manifests live on the ASDs, so
`refresh(ns)` re-reads a namespace another node wrote, and `namespaces()` merges the
namespace records of every live ASD. Owner writes carry the volume's owner generation
and `fence` raises it on the ASDs (ovsfs.backend.fencing: the quorum argument).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

from ovsfs.backend import codec
from ovsfs.backend.cache import ChunkCache, FragmentCache
from ovsfs.backend.fencing import Fences
from ovsfs.backend.index import Index, manifest_key, ns_key
from ovsfs.backend.maintenance import Maintenance
from ovsfs.backend.manifest import Manifest, NsRecord, Tombstone
from ovsfs.backend.placement import AsdSet
from ovsfs.backend.policy import EC_HEADER, Preset, PresetStore
from ovsfs.backend.seq import SeqClock
from ovsfs.backend.store import check_name
from ovsfs.backend.writer import ObjectWriter
from ovsfs.errors import BackendError, DataError, Fenced, NotFound, OvsfsError

log = logging.getLogger("ovsfs.backend.proxy")


class ProxyStore:
    def __init__(self, asds: AsdSet | Iterable[str], preset: Preset | None = None,
                 state_dir: Path | None = None, keyring: codec.KeyRing | None = None,
                 cache_bytes: int = 256 << 20, io_threads: int = 32,
                 maintenance: bool = True, down_timeout: float = 900.0,
                 presets: PresetStore | None = None, clock: Callable[[], int] = time.time_ns,
                 gc_interval: float = 600.0, gc_grace: float = 3600.0, fence_wait: float = 3.0) -> None:
        """`clock`: the wall clock in ns that manifest sequence numbers start from (tests
        fake it; numbers stay monotonic when it steps back, see ovsfs.backend.seq).
        `keyring`: encryption keys; pass one KeyRing on a shared file (or with load/save
        callbacks) to every node's proxy so all read what any encrypted. Default: the
        node's own `state_dir/keys.json`. `fence_wait`: seconds a fence waits for ASDs
        beyond its quorum (frozen ones get it later from maintenance)."""
        self.state_dir = Path(state_dir) if state_dir else None
        if self.state_dir:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        # Where create_namespace(ns, preset="name") looks names up (the node's presets).
        self.presets = presets or (PresetStore(self.state_dir / "presets.json") if self.state_dir else None)
        self.asds = asds if isinstance(asds, AsdSet) else AsdSet(
            self.state_dir / "asds.json" if self.state_dir else None, asds)
        self.preset = preset or Preset()
        self.preset.validate()
        self._preset_cache: dict[bytes, Preset] = {}
        if keyring is None and self.state_dir:
            keyring = codec.KeyRing(self.state_dir / "keys.json")
        self.keys = keyring
        if self.preset.encryption != "none" and self.keys is None:
            raise BackendError("encryption needs a key file (state_dir or keyring)")
        self.pool = ThreadPoolExecutor(io_threads, thread_name_prefix="proxy-io")
        self.clock = SeqClock(self.state_dir / "seq" if self.state_dir else None, now=clock)
        # Version ids of puts whose manifest is not installed yet: GC leaves their fragments alone.
        self.inflight: set[bytes] = set()
        self.index = Index(self.state_dir / "manifests.bin" if self.state_dir else None, self.asds,
                           self.clock)
        self.index.open()
        self.fcache = FragmentCache(self.state_dir / "fragcache" if self.state_dir else None, cache_bytes)
        self.ccache = ChunkCache()
        self.dirty: set[tuple[str, str]] = set()
        self.dirty_lock = threading.Lock()
        self._locks = [threading.Lock() for _ in range(64)]
        # The parts get the proxy as their context (backend/context.py), never import it.
        self.writer = ObjectWriter(self)
        self.fences = Fences(self.asds, self.pool, fence_wait)
        self.maintenance = Maintenance(self, down_timeout=down_timeout)
        self.maintenance.gc_interval, self.maintenance.gc_grace = gc_interval, gc_grace
        self.maintenance._last_gc = time.monotonic()  # not at once: a start has enough to do
        if maintenance:
            self.maintenance.start()

    def close(self, timeout: float | None = None) -> bool:
        """Stop maintenance and I/O; save the manifest index. With `timeout` (seconds), I/O
        in flight to ASDs that do not answer (stopped, away) is waited for that long at
        most: the index is saved first, queued I/O is cancelled, and threads still running
        after the bound are left behind. Returns True when everything finished; False when
        threads were left (the saved index is then marked not clean, so the next start
        merges what those threads may still write)."""
        if timeout is None:
            self.maintenance.stop()
            self.pool.shutdown(wait=True)
            self.index.close()
            self.asds.close()
            return True
        deadline = time.monotonic() + timeout
        self.maintenance.stopping.set()
        self.maintenance.wake.set()
        self.index.close()              # first: whatever happens below, the index is saved
        self.pool.shutdown(wait=False, cancel_futures=True)
        done = self.maintenance.stop(max(0.0, deadline - time.monotonic()))
        # The executor's worker threads (no public way to join them with a bound).
        for t in list(getattr(self.pool, "_threads", ())):
            t.join(max(0.0, deadline - time.monotonic()))
            done = done and not t.is_alive()
        if done:
            self.index.close()          # again: with what the finished I/O installed
        else:
            self.index.mark_unclean()
            log.warning("backend closed with I/O still in flight to ASDs that do not answer")
        self.asds.close()
        return done

    def obj_lock(self, ns: str, name: str) -> threading.Lock:
        """Serialises manifest replacement of one object (put vs repair)."""
        return self._locks[hash((ns, name)) % len(self._locks)]

    def mark_dirty(self, ns: str, name: str) -> None:
        with self.dirty_lock:
            self.dirty.add((ns, name))
        self.maintenance.kick()

    # -- namespaces --------------------------------------------------------------

    def create_namespace(self, ns: str, preset: str | Preset | None = None) -> None:
        """Create a namespace; with `preset` (a name from the preset store, or a Preset)
        its objects are written with that preset instead of the proxy's default. The
        preset itself is kept in the namespace record on every ASD, so the binding
        survives the loss of the node's state (the index rebuild reads it back)."""
        check_name("namespace", ns)
        blob = b""
        if preset is not None:
            p = self._resolve_preset(preset)
            blob = json.dumps(p.to_dict(), sort_keys=True).encode()
        if not self.index.has_ns(ns):
            # Another node may have created it: never replace its record (and preset) blindly.
            self.refresh(ns)
        if self.index.has_ns(ns) and (not blob or self.index.ns_preset(ns) == blob):
            return
        with self.obj_lock(ns, ""):
            seq = self.clock.next()
            record = NsRecord(seq, True, blob).encode()
            if not self._everywhere(lambda c: c.put(ns_key(ns), record)):
                raise BackendError(f"no ASD took namespace {ns}")
            self.index.add_ns(ns, blob or None, seq)

    def _resolve_preset(self, preset: str | Preset) -> Preset:
        if isinstance(preset, Preset):
            p = preset
        elif preset == self.preset.name:
            p = self.preset
        elif self.presets is None:
            raise NotFound(f"preset {preset} does not exist (this proxy has no preset store)")
        else:
            p = self.presets.get(preset)
        p.validate()
        if p.encryption != "none" and self.keys is None:
            raise BackendError(f"preset {p.name} encrypts: needs a key file (state_dir or keyring)")
        return p

    def namespace_preset(self, ns: str) -> Preset:
        """The preset new objects of namespace ns are written with."""
        blob = self.index.ns_preset(ns)
        if not blob:
            return self.preset
        p = self._preset_cache.get(blob)
        if p is None:
            try:
                p = Preset.from_dict(json.loads(blob))
            except (ValueError, OvsfsError) as e:
                raise DataError(f"namespace {ns}: unreadable preset record: {e}") from None
            self._preset_cache[blob] = p
        return p

    def delete_namespace(self, ns: str) -> None:
        """A namespace tombstone on every live ASD first (so an ASD that is away cannot
        bring the namespace or its objects back), then its fragments are dropped; what an
        absent ASD still holds is collected by `Maintenance.gc`. Raises BackendError when
        too few ASDs took the tombstone."""
        check_name("namespace", ns)
        if not self.index.has_ns(ns) and self.index.complete():
            return
        with self.obj_lock(ns, ""):
            seq = self.clock.next()
            record = NsRecord(seq, False).encode()
            self._need_quorum(self._everywhere(lambda c: c.put(ns_key(ns), record)), f"namespace {ns}")
            dead = self.index.drop_ns(ns, seq)
        for name, man in dead.items():
            self.purge(man, set(), ns, name)

    def _need_quorum(self, ok: int, what: str) -> None:
        """A tombstone must be on two ASDs (or every live one, when fewer are up)."""
        need = max(1, min(2, len(self.asds.live(writable=False))))
        if ok < need:
            raise BackendError(f"delete of {what}: tombstone stored on {ok} ASD(s), {need} needed")

    def namespaces(self) -> list[str]:
        """Every namespace, including ones other proxies sharing the ASDs created since
        (their records are read from every live ASD in parallel, one small round trip
        each; an ASD that does not answer within a second is left out this time)."""
        self.index.merge_ns_from(self.asds.live(writable=False), self.pool)
        return self.index.namespaces()

    # -- several nodes: fencing and refresh -----------------------------------------

    def fence_gen(self, ns: str) -> int:
        """The highest owner generation this proxy has seen fenced in ns (0: none)."""
        return self.fences.known.get(ns, 0)

    def fence(self, ns: str, gen: int) -> int:
        """Raise ns's owner generation to `gen` on the ASDs (never lower); returns the
        generation in force. Once it returns no put / put_file / delete of ns with a lower
        gen can complete, from any proxy sharing these ASDs (quorum argument in
        ovsfs.backend.fencing). NotFound when ns does not exist; BackendError when too few
        ASDs acknowledged (retry)."""
        check_name("namespace", ns)
        if not self.index.has_ns(ns):
            self.refresh(ns)
            if not self.index.has_ns(ns):
                raise NotFound(f"backend namespace {ns} does not exist")
        return self.fences.fence(ns, gen, self.namespace_preset(ns))

    def refresh(self, ns: str | None = None) -> None:
        """With ns: forget what this proxy knew of namespace ns and read its records and
        manifests again from the ASDs (another node wrote it; call before opening a volume
        here, while this proxy is not writing ns). Without: ping every ASD now (marks
        them up/down); a stacked member calls this as its health probe."""
        if ns is None:
            self.asds.refresh()
            return
        check_name("namespace", ns)
        self.index.reload_ns_from(ns, self.asds.all(), self.pool, complete=not self.asds.pending)
        for c in self.asds.live(writable=False):
            try:
                self.fences.learn(ns, c.fences().get(ns, 0))
                break
            except OvsfsError:
                continue

    def _everywhere(self, fn) -> int:  # type: ignore[no-untyped-def]
        """Run fn on every live ASD in parallel; number of successes."""
        def one(c):  # type: ignore[no-untyped-def]
            try:
                fn(c)
                return True
            except OvsfsError:
                return False
        return sum(self.pool.map(one, self.asds.live(writable=False)))

    # -- objects -----------------------------------------------------------------

    def _known_ns(self, ns: str) -> None:
        """NotFound unless ns exists; a namespace another node created is looked up once."""
        if not self.index.has_ns(ns):
            check_name("namespace", ns)
            self.refresh(ns)
            if not self.index.has_ns(ns):
                raise NotFound(f"backend namespace {ns} does not exist")

    def put(self, ns: str, name: str, data: bytes | memoryview, gen: int = 0) -> None:
        """Fenced when gen is below ns's fence on any ASD it writes to: never retried, and
        nothing of the put becomes current."""
        check_name("object", name)
        self._known_ns(ns)
        self.fences.check(ns, gen)
        try:
            self.writer.put(ns, name, data, self.namespace_preset(ns), gen)
        except Fenced as e:
            self.fences.learn(ns, gen + 1)   # at least: later writes of gen fail fast
            log.warning("put of %s/%s refused: %s", ns, name, e)
            raise

    def put_file(self, ns: str, name: str, path: Path, gen: int = 0) -> None:
        """A sealed local file (SCO, TLog): read once, then the same path as put."""
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise BackendError(f"backend put {ns}/{name}: cannot read {path}: {e.strerror}") from e
        self.put(ns, name, data, gen)

    def install(self, ns: str, name: str, man: Manifest) -> None:
        """Make a freshly written manifest current and retire the version it replaces."""
        old = self.index.set(ns, name, man)
        if old is not None and old.vid != man.vid:
            self.pool.submit(self.purge, old, set(man.replica_ids()), ns, name)

    def purge(self, man: Manifest, keep_replicas: set[str], ns: str, name: str) -> None:
        """Delete an old version's fragments and manifest copies (best effort: garbage
        left on an unreachable ASD is collected by maintenance.gc)."""
        for i, ch in enumerate(man.chunks):
            for j in range(len(ch.asds)):
                key = man.fragment_key(i, j)
                self.fcache.discard(key)
                c = self.asds.get(man.fragment_asd(i, j))
                if c is not None:
                    try:
                        c.delete(key)
                    except OvsfsError:
                        pass
        for a in man.replica_ids():
            c = self.asds.get(a)
            if c is not None and a not in keep_replicas:
                try:
                    c.delete(manifest_key(ns, name))
                except OvsfsError:
                    pass

    def delete(self, ns: str, name: str, gen: int = 0) -> None:
        """A tombstone replaces the manifest on every live ASD (its sequence number is
        above the manifest's, so a copy on an ASD that is away loses to it later), then
        the fragments go. Raises BackendError when too few ASDs took the tombstone, Fenced
        when an ASD refused gen (the object is then left as it is in this proxy)."""
        check_name("object", name)
        self.fences.check(ns, gen)
        if not self.index.has_ns(ns):
            self.refresh(ns)   # a namespace another node wrote: learn its objects first
        with self.obj_lock(ns, name):
            if self.index.get(ns, name) is None and self.index.complete():
                return  # (an incomplete index may lack a copy a late ASD holds: tombstone it anyway)
            seq = self.clock.next()
            blob, key = Tombstone(seq).encode(), manifest_key(ns, name)
            cur = self.index.get(ns, name)
            ok = self.fences.put_everywhere(self.asds.live(writable=False), key, blob, (ns, gen),
                                            restore=cur.encode() if cur is not None else None)
            self._need_quorum(ok, f"{ns}/{name}")
            man = self.index.tombstone(ns, name, seq)
        if man is not None:
            # Manifest keys now hold the tombstone: only fragments are deleted here.
            self.purge(man, set(man.asds), ns, name)

    def list(self, ns: str, prefix: str = "") -> list[str]:
        names = self.index.names(ns)
        if names is None:
            raise NotFound(f"backend namespace {ns} does not exist")
        return [n for n in names if n.startswith(prefix)]

    def usage(self) -> dict[str, int]:
        cap = free = 0
        for c in self.asds.live(writable=False):
            try:
                u = c.usage()
            except OvsfsError:
                continue
            cap += u["capacity"]
            free += u["free"]
        return {"capacity": cap, "free": free}

    def _manifest(self, ns: str, name: str) -> Manifest:
        man = self.index.get(ns, name)
        if man is None:
            if not self.index.has_ns(ns):
                raise NotFound(f"backend namespace {ns} does not exist")
            raise NotFound(f"backend object {ns}/{name} does not exist")
        return man

    def get(self, ns: str, name: str) -> bytes:
        return self._read(ns, name, 0, None)

    def get_range(self, ns: str, name: str, offset: int, length: int) -> bytes:
        return self._read(ns, name, offset, length)

    def _read(self, ns: str, name: str, offset: int, length: int | None) -> bytes:
        for attempt in range(3):
            man = self._manifest(ns, name)
            n = man.size - offset if length is None else length
            if offset < 0 or n < 0 or offset + n > man.size:
                raise BackendError(f"backend object {ns}/{name} is shorter than {offset + n} bytes")
            try:
                return self.read_manifest(man, offset, n, (ns, name))
            except DataError:
                if self.index.get(ns, name) is not man and attempt < 2:
                    continue  # replaced by a put while we read: read the new version
                raise
        raise DataError(f"backend object {ns}/{name} keeps changing under a read")

    # -- the read path -----------------------------------------------------------

    def read_manifest(self, man: Manifest, offset: int, length: int, owner: tuple[str, str]) -> bytes:
        if length == 0:
            return b""
        cs = man.chunk_size
        parts = []
        for i in range(offset // cs, (offset + length - 1) // cs + 1):
            a = max(offset, i * cs) - i * cs
            b = min(offset + length, i * cs + man.chunk_len(i)) - i * cs
            if man.raw:
                parts.append(self._read_raw(man, i, a, b, owner))
            else:
                parts.append(self.chunk_plain(man, i, owner)[a:b])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_raw(self, man: Manifest, i: int, a: int, b: int, owner: tuple[str, str]) -> bytes:
        fs = man.chunks[i].frag_size
        pieces = [(j, max(a, j * fs) - j * fs, min(b, (j + 1) * fs) - j * fs)
                  for j in range(a // fs, (b - 1) // fs + 1)]

        def fetch(p: tuple[int, int, int]) -> bytes | None:
            return self._frag_range(man, i, p[0], p[1], p[2] - p[1], owner)

        got = [fetch(pieces[0])] if len(pieces) == 1 else list(self.pool.map(fetch, pieces))
        if any(g is None for g in got):
            # A data fragment is gone or damaged: decode the chunk from the others.
            return self.chunk_stored(man, i, owner)[a:b]
        return got[0] if len(got) == 1 else b"".join(got)  # type: ignore[arg-type]

    def _frag_range(self, man: Manifest, i: int, j: int, lo: int, n: int,
                    owner: tuple[str, str]) -> bytes | None:
        key = man.fragment_key(i, j)
        data = self.fcache.read(key, EC_HEADER + lo, n)
        if data is not None:
            return data
        c = self.asds.get(man.fragment_asd(i, j))
        if c is None:
            return None
        try:
            return bytes(c.get_range(key, EC_HEADER + lo, n, crc=man.chunks[i].crcs[j]))
        except OvsfsError as e:
            log.info("fragment %s on %s unreadable (%s): decoding around it", key, c.addr, e)
            self._report(man, i, j, owner)
            return None

    def _frag_full(self, man: Manifest, i: int, j: int, owner: tuple[str, str]) -> bytes | None:
        key = man.fragment_key(i, j)
        crc = man.chunks[i].crcs[j]
        data = self.fcache.read(key)
        if data is not None and codec.crc32c.crc32c(data) == crc:
            return data
        c = self.asds.get(man.fragment_asd(i, j))
        if c is None:
            return None
        try:
            data = bytes(c.get(key, crc=crc))
        except OvsfsError as e:
            log.info("fragment %s on %s unreadable (%s)", key, c.addr, e)
            if not isinstance(e, NotFound) or c.up:
                self._report(man, i, j, owner)
            return None
        self.fcache.put(key, data)
        return data

    def _report(self, man: Manifest, i: int, j: int, owner: tuple[str, str]) -> None:
        """Fragment j of chunk i of `man` could not be read: have maintenance check the
        object, unless `man` is no longer where the index keeps that fragment. A reader
        or repair holding a manifest that a put replaced (its fragments purged) or that
        a drain/rebalance moved (the old copy deleted) finds the old fragment gone: that
        is no damage, and a dirty mark for it would count a healthy object as degraded."""
        cur = self.index.get(*owner)
        if cur is None or cur.vid != man.vid or cur.fragment_asd(i, j) != man.fragment_asd(i, j):
            return
        self.mark_dirty(*owner)

    def fetch_fragments(self, man: Manifest, i: int, owner: tuple[str, str], want: int,
                        skip: Iterable[int] = ()) -> dict[int, bytes]:
        """At least `want` readable fragments of chunk i (data fragments first)."""
        width = man.policy.k + man.policy.m
        order = [j for j in range(width) if j not in set(skip)]
        got: dict[int, bytes] = {}
        pos = 0
        while len(got) < want and pos < len(order):
            wave = order[pos:pos + want - len(got)]
            pos += len(wave)
            for j, data in zip(wave, self.pool.map(lambda j: self._frag_full(man, i, j, owner), wave)):
                if data is not None:
                    got[j] = data
        return got

    def chunk_stored(self, man: Manifest, i: int, owner: tuple[str, str]) -> bytes:
        k, m = man.policy.k, man.policy.m
        got = self.fetch_fragments(man, i, owner, k)
        if len(got) < k:
            raise DataError(f"chunk {i} of {owner[0]}/{owner[1]}: only {len(got)} of {k} "
                            f"fragments readable")
        return codec.decode(got, k, m, man.chunks[i].stored_len)

    def chunk_plain(self, man: Manifest, i: int, owner: tuple[str, str]) -> bytes:
        data = self.ccache.get(man.vid, i)
        if data is None:
            aead = self.keys.get(man.key_id) if man.encryption != "none" and self.keys else None
            if man.encryption != "none" and aead is None:
                raise DataError("object is encrypted and no key file was given")
            data = codec.untransform(self.chunk_stored(man, i, owner), man.chunks[i].flags,
                                     man.compression, aead, man.vid, i, man.chunk_len(i))
            self.ccache.put(man.vid, i, data)
        return data

    # -- status ------------------------------------------------------------------

    def drop_caches(self) -> int:
        self.ccache.drop()
        return self.fcache.drop()

    def status(self) -> dict:  # type: ignore[type-arg]
        st = self.maintenance.status()
        # Deletes not yet confirmed by every ASD, and whether the index has every ASD's records.
        st["tombstones"] = len(self.index.tombstones()) + len(self.index.ns_tombstones())
        st["index_complete"] = self.index.complete()
        return st

    def now(self) -> float:
        return time.time()

