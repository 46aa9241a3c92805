"""Owner-generation fences of the EC proxy: raising them on the ASDs, spreading them.

Every ASD keeps a durable fence per namespace and refuses owner writes (fragment puts,
manifest puts, tombstones carrying ns + gen) from a lower generation (asd.py). This
module is the proxy's side: `fence` sends a fence to every ASD of the set, and `sync`
(run by maintenance every round) hands the highest fence any ASD holds to every ASD
that missed it, e.g. one that was down or frozen during the fence.

Why a fence may return before every ASD took it (the quorum argument). A put of an
object under policy (k, m, c, x) completes only when (1) every chunk has c fragments
accepted, on c *distinct* ASDs (placement never puts two fragments of a chunk on one
ASD, and a fragment that fails is retried on another ASD, which checks the fence too),
and (2) its manifest was accepted by min(2, m+1, live) >= 1 ASDs, each write carrying
the same ns + gen. So a put by a stale generation needs at least w = c ASDs that have
not taken the fence (c >= k >= 1 and c >= the manifest copies: c >= 2 unless k = c = 1).
With N ASDs in the set (including ones registered but never reached) and F of them
fenced, the stale put can complete only if N - F >= w. The fence therefore needs

    F >= N - w + 1,   w = the smallest c over the namespace preset's policies,

acknowledgements (a degraded policy choice still needs c acks, so the smallest c
bounds every choice). Example: 6 ASDs, (4, 2, 5, 1): 2 acks; (4, 2, 6, 1): 1 ack.
New ASDs added to the set after the fence get it from `sync` before they are used
much; a set that grows by g ASDs between a fence and its sync weakens the bound by g.

The quorum only bounds *completion*. Visibility is stronger when every live ASD has
the fence, so `fence` waits (up to `wait` seconds) for every ASD it can reach, not just
for the quorum: a manifest copy a stale owner stored on an unfenced ASD before its put
failed is replaced again by that owner with what the key held before (writer.py), and
an ASD that was away during the fence gets it from the first `sync` of any proxy after
it returns. The window left: a stale owner that is still running and writes to an ASD
that was away during the fence, after it returns and before any proxy's maintenance
round (2 s) synced it; its put still fails (the quorum), and the copy it left there is
put back by that owner only if it is not frozen or killed in between.

Fences outlive delete_namespace (an ASD that was away would bring an older one back
anyway): a namespace deleted and created again under the same name must be written
with generations above the old ones (the cluster keeps a volume's generation growing).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

from ovsfs.backend.placement import AsdSet
from ovsfs.backend.policy import Preset
from ovsfs.backend.store import fenced
from ovsfs.errors import BackendError, Fenced, InvalidArgument, OvsfsError

log = logging.getLogger("ovsfs.backend.fencing")


def fence_quorum(preset: Preset, n_asds: int) -> int:
    """ASD acknowledgements a fence needs so that no put with a lower generation can
    complete under `preset` (see the module docstring)."""
    w = max(1, min((p.c for p in preset.policies), default=1))
    return max(1, n_asds - w + 1)


class Fences:
    def __init__(self, asds: AsdSet, pool: ThreadPoolExecutor, wait: float = 3.0) -> None:
        self.asds = asds
        self.pool = pool
        self.wait = wait                     # seconds a fence waits for ASDs beyond the quorum
        self.lock = threading.Lock()
        self.known: dict[str, int] = {}      # ns -> highest generation seen on any ASD
        self.synced: set[str] = set()        # ASD ids known to hold every fence in `known`
        # Every so often every ASD is checked again: one restarted between two maintenance
        # rounds with a wiped disk was never seen down, yet lost its fences.
        self.resync_interval = 30.0
        self._last_full = time.monotonic()

    def check(self, ns: str, gen: int) -> None:
        """Fail fast (Fenced) for a generation this proxy already knows is stale; the ASDs
        enforce it anyway."""
        with self.lock:
            in_force = self.known.get(ns, 0)
        if gen < in_force:
            raise fenced(ns, gen, in_force)

    def learn(self, ns: str, gen: int) -> None:
        with self.lock:
            if gen > self.known.get(ns, 0):
                self.known[ns] = gen
                self.synced.clear()   # every ASD must be told again

    def fence(self, ns: str, gen: int, preset: Preset) -> int:
        """Raise ns's fence to `gen` on every ASD it reaches within `wait` seconds; returns
        the generation in force (higher than gen when a newer owner fenced already).
        BackendError when fewer than the quorum acknowledged."""
        if gen < 0:
            raise InvalidArgument(f"owner generation {gen} is negative")
        clients = self.asds.all()
        n = len(clients) + len(self.asds.pending)
        need = fence_quorum(preset, n)
        futs = {self.pool.submit(c.fence, ns, gen): c for c in clients}
        done, _late = wait(futs, timeout=self.wait)
        acked: list[Any] = []
        in_force = gen
        for f in done:
            try:
                in_force = max(in_force, int(f.result()))
                acked.append(futs[f])
            except OvsfsError as e:
                log.warning("fence of %s on %s failed: %s", ns, futs[f].addr, e)
        self.learn(ns, in_force)
        with self.lock:
            self.synced |= {c.asd_id for c in acked}
            self.synced -= {c.asd_id for c in clients if c not in acked}
        if len(acked) < need:
            raise BackendError(f"fence of {ns} at generation {gen}: {len(acked)} of {n} ASDs "
                               f"acknowledged, {need} needed")
        log.info("namespace %s fenced at generation %d on %d of %d ASDs (quorum %d)",
                 ns, in_force, len(acked), n, need)
        return in_force

    def sync(self) -> int:
        """Give every live ASD the highest fence of every namespace (read from all of
        them): ASDs back from an absence learn the fences they missed. Returns fences sent."""
        live = [c for c in self.asds.live(writable=False)]
        with self.lock:
            if time.monotonic() - self._last_full >= self.resync_interval:
                self._last_full = time.monotonic()
                self.synced.clear()
            todo = [c for c in live if c.asd_id not in self.synced]
        if not todo:
            return 0
        held = dict(zip((c.asd_id for c in todo), self.pool.map(self._fences_of, todo)))
        for got in held.values():
            for ns, g in (got or {}).items():
                self.learn(ns, g)
        sent = 0
        with self.lock:
            known = dict(self.known)
        for c in todo:
            theirs = held.get(c.asd_id)
            if theirs is None:
                continue   # did not answer: next round
            try:
                for ns, g in known.items():
                    if theirs.get(ns, 0) < g:
                        c.fence(ns, g)
                        sent += 1
            except OvsfsError as e:
                log.info("cannot sync fences to %s: %s", c.addr, e)
                continue
            with self.lock:
                if self.known == known:
                    self.synced.add(c.asd_id)
        if sent:
            log.info("handed %d missed fence(s) to returning ASDs", sent)
        return sent

    def put_everywhere(self, clients: list[Any], key: str, blob: bytes, guard: tuple[str, int],
                       restore: bytes | None = None) -> int:
        """An owner's record (a tombstone) on every given ASD in parallel; returns how many
        took it. Fenced when any refused the generation: the copies that landed are taken
        back first (replaced by `restore`, the record they overwrote as this proxy knows
        it, or deleted), so a stale owner's tombstone never hides what the new owner writes."""
        def one(c: Any) -> bool | Fenced:
            try:
                c.put(key, blob, guard=guard)
                return True
            except Fenced as e:
                return e
            except OvsfsError:
                return False
        results = list(self.pool.map(one, clients))
        refused = [r for r in results if isinstance(r, Fenced)]
        if refused:
            take_back([c for c, r in zip(clients, results) if r is True], key, restore, guard)
            self.learn(guard[0], guard[1] + 1)
            raise refused[0]
        return sum(r is True for r in results)

    def forget_down(self) -> None:
        """ASDs that went down may miss the next fence: sync them when they return."""
        with self.lock:
            self.synced -= {c.asd_id for c in self.asds.all() if not c.up}

    @staticmethod
    def _fences_of(c: Any) -> dict[str, int] | None:
        try:
            return c.fences()
        except OvsfsError:
            return None


def take_back(clients: list[Any], key: str, restore: bytes | None, guard: tuple[str, int]) -> int:
    """Undo a refused owner write on the ASDs where it landed: put back `restore` (what the
    key held before, as this proxy knows it) or delete the key. Still guarded, so an ASD
    fenced meanwhile keeps the copy; best effort (an ASD away keeps it too, see the module
    doc). Returns how many copies could not be undone: while any is left, what it points
    at must stay (it may be the newest record a reader finds)."""
    left = 0
    for c in clients:
        if c is None:
            left += 1
            continue
        try:
            if restore is not None:
                c.put(key, restore, guard=guard)
            else:
                c.delete(key, guard=guard)
        except OvsfsError:
            left += 1
    return left
