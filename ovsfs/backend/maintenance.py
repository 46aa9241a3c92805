"""Maintenance: bring objects back to full redundancy, rebalance, drain, report.

A background thread pings the ASDs every few seconds and repairs:
  - at once, objects reported dirty by the I/O path (a fragment write that failed
    after the put was acknowledged, a read that met a missing/corrupt fragment);
  - every object with fragments on an ASD that has been down longer than
    `down_timeout` (default 15 min: a reboot should not trigger a rebuild).
`repair()` does a full pass at once, treating down ASDs as lost, and loops until a
pass finds nothing to fix. A fix rebuilds the missing fragments from any k others
(Reed-Solomon reconstruct, no re-encryption), writes them to the same ASD when it
is up (wiped or corrupted disk) or to another one obeying x, and replaces the
manifest (same version id, sequence + 1) under the object's lock so a concurrent
put always wins. I/O keeps going meanwhile: it only ever sees whole manifests.

Repairs are not owner writes: they carry no owner generation and are not fenced. They
never change content either: a repair rewrites the version its own index holds, and its
manifest copies are conditional (`if_newer`): an ASD holding a newer record of the
object (a put or delete by another proxy sharing the ASDs, e.g. a new owner after a
fence) refuses it, and the repair gives up on that object. So a repair by a fenced
node cannot reinstate the version it knew over what the new owner wrote; and a version
a fenced owner tried to put after the fence never became current anywhere (its put
failed before installing it), so no repair ever sees it.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import Counter
from typing import Any, Callable

from ovsfs.backend import codec
from ovsfs.backend.asd_client import StaleRecord
from ovsfs.backend.context import ProxyContext
from ovsfs.backend.gc import collect
from ovsfs.backend.index import manifest_key
from ovsfs.backend.manifest import Manifest
from ovsfs.errors import BackendError, DataError, NoSpace, NotFound, OvsfsError


log = logging.getLogger("ovsfs.backend.maintenance")
Progress = Callable[[dict[str, Any]], None]


class Maintenance:
    def __init__(self, proxy: ProxyContext, down_timeout: float = 900.0, interval: float = 2.0) -> None:
        self.proxy = proxy
        self.down_timeout = down_timeout
        self.interval = interval
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()  # one repair pass at a time
        self.repaired = 0

    # -- background loop -------------------------------------------------------

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="backend-maintenance", daemon=True)
        self.thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop the loop; wait for it `timeout` seconds at most (None: for good). Returns
        False when it is still running (stuck on an ASD that does not answer)."""
        self.stopping.set()
        self.wake.set()
        if self.thread:
            self.thread.join(timeout)
            return not self.thread.is_alive()
        return True

    def kick(self) -> None:
        self.wake.set()

    def _run(self) -> None:
        while not self.stopping.is_set():
            self.wake.wait(self.interval)
            self.wake.clear()
            if self.stopping.is_set():
                return
            try:
                self.proxy.asds.refresh()
                self.proxy.fences.forget_down()
                self.proxy.fences.sync()    # ASDs back from an absence learn missed fences
                self._auto()
                self.late_and_gc()
            except Exception:  # noqa: BLE001 - the loop must survive anything; it retries next round
                log.exception("maintenance round failed")

    # -- late ASDs, garbage --------------------------------------------------------

    gc_interval = 600.0   # seconds between background garbage-collection passes (0: never)
    gc_grace = 3600.0     # seconds a fragment must have existed before it may be taken for garbage
    _last_gc = 0.0

    def late_and_gc(self) -> None:
        """Each round: merge ASDs the index does not cover yet (back after a crash-time
        rebuild, or never reached); every gc_interval: a garbage-collection pass."""
        self.proxy.index.merge_late()
        now = time.monotonic()
        if self.gc_interval > 0 and now - self._last_gc >= self.gc_interval:
            self._last_gc = now
            self.gc()

    def gc(self, progress: Progress | None = None, grace: float | None = None) -> dict[str, Any]:
        """One garbage-collection pass now (ovsfs.backend.gc); `grace` overrides gc_grace."""
        with self.lock:
            return collect(self.proxy, self.gc_grace if grace is None else grace, progress)

    def _auto(self) -> None:
        p = self.proxy
        now = time.time()
        lost = {c.asd_id for c in p.asds.all()
                if c.down_since is not None and now - c.down_since >= self.down_timeout}
        lost |= self.replaced()
        with p.dirty_lock:
            todo, p.dirty = set(p.dirty), set()
        if lost:
            todo |= {(ns, n) for ns, n, m in p.index.items() if m.used_asds() & lost
                     or set(m.replica_ids()) & lost}
        with self.lock:
            for ns, name in sorted(todo):
                if self.stopping.is_set():
                    return
                try:
                    self.fix(ns, name, lost=lost, verify=True)
                except OvsfsError as e:
                    log.warning("repair of %s/%s failed, retrying later: %s", ns, name, e)
                    with p.dirty_lock:
                        p.dirty.add((ns, name))

    def replaced(self) -> set[str]:
        """ASD ids that fragments are placed on but no registered ASD has any more: a disk
        replaced by an empty one (it came back under its address with a new id) or dropped.
        Known only once every registered address has answered: until then a missing id may
        be an ASD that is merely unreachable."""
        p = self.proxy
        if p.asds.pending:
            return set()
        return {a for a, n in list(p.asds.load.items()) if n > 0 and p.asds.get(a) is None}

    # -- one object --------------------------------------------------------------

    def _bad_fragments(self, man: Manifest, i: int, lost: set[str], verify: bool) -> list[int]:
        bad = []
        for j, crc in enumerate(man.chunks[i].crcs):
            asd_id = man.fragment_asd(i, j)
            c = self.proxy.asds.get(asd_id)
            if c is None or asd_id in lost or asd_id in self.proxy.asds.draining:
                bad.append(j)
            elif not c.up or not verify:
                continue  # down but not yet given up on: its fragments may come back
            else:
                try:
                    if c.verify(man.fragment_key(i, j)) != crc:
                        bad.append(j)
                except (NotFound, DataError):
                    bad.append(j)
                except OvsfsError:
                    pass  # unreachable right now: decided by the down timeout
        return bad

    def fix(self, ns: str, name: str, lost: set[str] = frozenset(), verify: bool = True,  # type: ignore[assignment]
            move: dict[tuple[int, int], str] | None = None) -> int:
        """Rebuild what is missing of one object; returns the number of fragments written.
        `move` forces fragments (chunk, frag) onto other ASDs (drain, rebalance)."""
        p = self.proxy
        man = p.index.get(ns, name)
        if man is None:
            return 0
        new = copy.deepcopy(man)
        owner = (ns, name)
        written = 0
        # Sources of moved fragments: deleted only once the manifest naming the new places
        # is installed (readers holding the current one still read them meanwhile).
        moved_from: list[tuple[Any, str]] = []
        for i, ch in enumerate(man.chunks):
            bad = self._bad_fragments(man, i, lost, verify)
            moving = [j for (ci, j) in (move or {}) if ci == i and j not in bad]
            if not bad and not moving:
                continue
            k, m = man.policy.k, man.policy.m
            data: dict[int, bytes] = {}
            for j in moving:  # a move copies the fragment itself when it can
                c = p.asds.get(man.fragment_asd(i, j))
                try:
                    if c is not None:
                        data[j] = bytes(c.get(man.fragment_key(i, j), crc=ch.crcs[j]))
                except OvsfsError:
                    bad.append(j)
            if bad:
                got = p.fetch_fragments(man, i, owner, k, skip=bad)
                if len(got) < k:
                    raise DataError(f"{ns}/{name} chunk {i}: {len(got)} of {k} fragments left, cannot rebuild")
                data.update(codec.reconstruct(got, k, m, bad) if m else {})
            keep = [j for j in range(k + m) if j not in bad and j not in moving]
            used_nodes = Counter(p.asds.node_of(man.fragment_asd(i, j)) for j in keep)
            used_ids = {man.fragment_asd(i, j) for j in keep}
            for j in sorted(set(bad) | set(moving)):
                if j not in data:
                    continue
                old = man.fragment_asd(i, j)
                oc = p.asds.get(old)
                if (move or {}).get((i, j)):
                    target = move[(i, j)]  # type: ignore[index]
                elif (j in bad and oc is not None and oc.up and old not in lost
                      and old not in p.asds.draining and used_nodes[oc.node] < man.policy.x):
                    target = old  # wiped or corrupted but alive: refill in place
                else:
                    try:
                        (target,) = p.asds.choose(1, man.policy.x, exclude=used_ids | {old}, node_use=used_nodes)
                    except NoSpace:
                        log.warning("%s/%s: no ASD to rebuild fragment %d.%d on", ns, name, i, j)
                        continue
                c = p.asds.get(target)
                try:
                    assert c is not None
                    c.put(man.fragment_key(i, j), data[j], ch.crcs[j])
                except OvsfsError as e:
                    log.warning("%s/%s: rebuilt fragment %d.%d not stored: %s", ns, name, i, j, e)
                    continue
                new.set_fragment(i, j, target)
                used_nodes[c.node] += 1
                used_ids.add(target)
                written += 1
                if old and old != target and j in moving and oc is not None:
                    moved_from.append((oc, man.fragment_key(i, j)))
        replicas_ok = self._replicas_ok(man, ns, name, lost)
        if written == 0 and replicas_ok:
            return 0
        with p.obj_lock(ns, name):
            if p.index.get(ns, name) is not man:
                return 0  # a put replaced the object meanwhile: its own fragments count
            new.seq = man.seq + 1
            old_replicas = set(man.replica_ids())
            try:
                degraded = p.writer.write_manifest(ns, name, new, if_newer=True)
            except StaleRecord as e:
                # Another proxy replaced or deleted the object: this index is behind. Its
                # own refresh (ProxyStore.refresh(ns)) catches up; nothing to repair here.
                log.info("repair of %s/%s skipped: %s", ns, name, e)
                return 0
            installed = p.index.replace_if(ns, name, man, new)
        for oc, key in moved_from if installed else []:
            try:
                oc.delete(key)
            except OvsfsError:
                pass
        for a in old_replicas - set(new.replica_ids()):
            c = p.asds.get(a)
            try:
                if c is not None:
                    c.delete(manifest_key(ns, name))
            except OvsfsError:
                pass
        if degraded:
            raise BackendError(f"{ns}/{name}: fewer than m+1 manifest copies")
        self.repaired += written
        return written

    def _replicas_ok(self, man: Manifest, ns: str, name: str, lost: set[str]) -> bool:
        good = 0
        for a in man.replica_ids():
            c = self.proxy.asds.get(a)
            if c is None or a in lost or a in self.proxy.asds.draining or not c.up:
                continue
            try:
                c.verify(manifest_key(ns, name))
                good += 1
            except OvsfsError:
                pass
        return good >= man.policy.m + 1

    # -- whole backend -----------------------------------------------------------

    def repair(self, progress: Progress | None = None, max_passes: int = 5) -> dict[str, Any]:
        """Full pass now, down ASDs treated as lost; loop until nothing is left to fix."""
        p = self.proxy
        total = 0
        failed: list[str] = []
        for n in range(max_passes):
            p.asds.refresh()
            lost = {c.asd_id for c in p.asds.all() if not c.up}
            items = p.index.items()
            fixed = 0
            failed = []
            with p.dirty_lock:
                reported = set(p.dirty)  # a full verifying pass settles what was reported before it
            with self.lock:
                for done, (ns, name, _m) in enumerate(items, 1):
                    try:
                        fixed += self.fix(ns, name, lost=lost, verify=True)
                    except OvsfsError as e:
                        failed.append(f"{ns}/{name}: {e}")
                        reported.discard((ns, name))
                    if progress:
                        progress({"pass": n + 1, "done": done, "total": len(items), "fragments": total + fixed})
            total += fixed
            with p.dirty_lock:
                p.dirty -= reported
            if fixed == 0 and not failed:
                break
        return {"fragments_rebuilt": total, "objects": len(p.index.items()), "failed": failed,
                "full_redundancy": not failed}

    def drain(self, asd_id: str, progress: Progress | None = None, max_passes: int = 10,
              settle: float = 120.0) -> dict[str, Any]:
        """Move everything off one ASD, then forget it.

        Once the ASD is marked draining no new placement picks it, but a put that chose
        its targets before may still be writing there and install its manifest after a
        pass looked at that object (and a put may replace an object a pass was moving).
        So the drain waits for the puts that were under way when it began (up to
        `settle` seconds) and repeats passes over whatever still names the ASD until a
        pass finds nothing; it forgets the ASD only then."""
        p = self.proxy
        c = p.asds.find(asd_id)
        p.asds.draining.add(c.asd_id)
        earlier = set(p.inflight)  # version ids of puts that may have placed on it already
        deadline = time.monotonic() + settle
        moved = 0
        touched: set[tuple[str, str]] = set()
        failed: list[str] = []
        for n in range(max_passes):
            settled = not (earlier & p.inflight)
            with self.lock:
                items = self._holding(c.asd_id)
                failed = []
                for done, (ns, name, _m) in enumerate(items, 1):
                    try:
                        moved += self.fix(ns, name, verify=False)
                    except OvsfsError as e:
                        failed.append(f"{ns}/{name}: {e}")
                    if progress:
                        progress({"pass": n + 1, "done": done, "total": len(items), "fragments": moved})
                if n and items:
                    log.info("drain of %s: pass %d: %d objects put or changed meanwhile", c.addr, n + 1, len(items))
                touched |= {(ns, name) for ns, name, _m in items}
                left = self._holding(c.asd_id)
            if not left and settled:
                break
            if not left:  # an earlier put may still land on it: wait for those to finish
                while earlier & p.inflight and time.monotonic() < deadline:
                    time.sleep(0.01)
                earlier &= p.inflight
        else:
            left = self._holding(c.asd_id)
        if left or earlier & p.inflight:
            why = failed[:3] or [f"{ns}/{name}" for ns, name, _m in left[:3]] or ["puts still under way"]
            raise BackendError(f"drain of {c.addr} incomplete: {len(left)} objects still on it: {why}")
        p.asds.forget(c.asd_id)
        return {"asd": c.asd_id, "fragments_moved": moved, "objects": len(touched)}

    def _holding(self, asd_id: str) -> list[tuple[str, str, Manifest]]:
        """Objects with a fragment or a manifest copy on the ASD."""
        return [(ns, n, m) for ns, n, m in self.proxy.index.items()
                if asd_id in m.used_asds() or asd_id in m.replica_ids()]

    def rebalance(self, progress: Progress | None = None, max_moves: int = 100000) -> dict[str, Any]:
        """Move fragments from the fullest ASDs to the emptiest (e.g. newly added) ones."""
        p = self.proxy
        moves = 0
        with self.lock:
            for ns, name, man in p.index.items():
                load = p.asds.load
                live = p.asds.live()
                if len(live) < 2 or moves >= max_moves:
                    break
                plan: dict[tuple[int, int], str] = {}
                for i, ch in enumerate(man.chunks):
                    ids = [man.fragment_asd(i, j) for j in range(len(ch.asds))]
                    nodes = Counter(p.asds.node_of(a) for a in ids)
                    for j, src in enumerate(ids):
                        dst = min(live, key=lambda c: load[c.asd_id])
                        if (src and dst.asd_id not in ids and load[src] - load[dst.asd_id] > 1
                                and nodes[dst.node] < man.policy.x + (dst.node == p.asds.node_of(src))):
                            plan[(i, j)] = dst.asd_id
                            ids[j] = dst.asd_id
                            load[src] -= 1
                            load[dst.asd_id] += 1  # provisional, the index recounts on install
                            break
                if plan:
                    for (i, j), dst in plan.items():  # undo provisional counts
                        load[dst] -= 1
                        load[man.fragment_asd(i, j) or ""] += 1
                    try:
                        moves += self.fix(ns, name, verify=False, move=plan)
                    except OvsfsError as e:
                        log.warning("rebalance of %s/%s: %s", ns, name, e)
                if progress:
                    progress({"fragments_moved": moves})
        return {"fragments_moved": moves, "load": dict(p.asds.load)}

    def status(self) -> dict[str, Any]:
        p = self.proxy
        asds = []
        for c in p.asds.all():
            row: dict[str, Any] = {"asd_id": c.asd_id, "addr": c.addr, "node": c.node, "up": c.up,
                                   "down_since": c.down_since, "draining": c.asd_id in p.asds.draining,
                                   "fragments_placed": p.asds.load[c.asd_id]}
            if c.up:
                try:
                    row.update(c.usage())
                except OvsfsError:
                    row["up"] = False
            asds.append(row)
        # Configured ASDs that never answered since the start: their id is not known yet,
        # but they are part of the backend and down.
        for c in list(p.asds.pending):
            asds.append({"asd_id": "", "addr": c.addr, "node": "", "up": False,
                         "down_since": c.down_since, "draining": False, "fragments_placed": 0,
                         "never_answered": True})
        # Fragments on a replaced disk (an id no registered ASD has) are missing too.
        down = ({a["asd_id"] for a in asds if not a["up"]} | set(p.asds.draining)
                | {a for a, n in list(p.asds.load.items()) if n > 0 and p.asds.get(a) is None})
        items = p.index.items()
        with p.dirty_lock:
            dirty = set(p.dirty)
        degraded = sum(1 for ns, n, m in items if (ns, n) in dirty or m.used_asds() & down
                       or any(i == 255 for ch in m.chunks for i in ch.asds))
        return {"asds": asds, "asds_up": sum(a["up"] for a in asds),
                "asds_down": sum(not a["up"] for a in asds),
                "capacity": sum(a.get("capacity", 0) for a in asds),
                "free": sum(a.get("free", 0) for a in asds),
                "namespaces": len(p.index.namespaces()), "objects": len(items),
                "degraded_objects": degraded, "fragments_rebuilt": self.repaired,
                "fragment_cache": p.fcache.stats(), "preset": p.preset.to_dict(),
                "namespace_presets": {ns: p.namespace_preset(ns).name for ns in p.index.namespaces()
                                      if p.index.ns_preset(ns)}}
