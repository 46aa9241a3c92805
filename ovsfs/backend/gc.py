"""Garbage collection: what the ASDs hold that no live object needs any more.

An ASD that was away while objects or namespaces were deleted (or versions replaced)
keeps their fragments and manifest copies; a put that crashed before its manifest
landed leaves fragments nothing points at. One pass over every reachable ASD:

  - manifest copies older than the index's newest record of their object (a
    tombstone, or a newer version not placed on this ASD), and any record older than
    its namespace's tombstone, are deleted;
  - fragments whose version id no live manifest names, or that a manifest places on
    another ASD, are deleted once older than `grace` seconds by the ASD's own clock
    (never those of a put under way: their version ids are in `proxy.inflight`, and a
    put finishes in far less than the grace period).

Every reachable ASD's records are merged into the index first (not only late ASDs):
several proxies (one per node) may share the ASDs, and objects another proxy wrote
must not be taken for garbage by this one; nothing that only a late ASD knows either. Tombstones themselves are collected at the end of a pass that reached
every registered ASD and left none of them holding an older record: from then on no
ASD can bring the deleted object back, so its tombstone has nothing left to beat.
Deletes of manifest keys happen under the object's lock and after re-checking the
index, so a concurrent put of the same name is never undone.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from ovsfs.backend.context import ProxyContext
from ovsfs.backend.index import manifest_key, ns_key, split_manifest_key, unquote_ns
from ovsfs.backend.manifest import Manifest, NsRecord, Tombstone, decode_record
from ovsfs.errors import DataError, OvsfsError


log = logging.getLogger("ovsfs.backend.gc")
Progress = Callable[[dict[str, Any]], None]


def _stale_record(p: ProxyContext, asd_id: str, ns: str, name: str, rec: Manifest | Tombstone) -> bool:
    """True when this ASD's record of ns/name is superseded and not a current replica."""
    idx = p.index
    if rec.seq <= idx.ns_tomb(ns):
        return True
    best = idx.best_seq(ns, name)
    if rec.seq >= best:
        return False  # the current record, or one newer than the index (a put landing now)
    cur = idx.get(ns, name)
    return cur is None or asd_id not in cur.replica_ids()


def _records(p: ProxyContext, c: Any) -> int:
    removed = 0
    for key, blob in c.scan("m/").items():
        ns, name = split_manifest_key(key)
        try:
            rec = decode_record(blob)
        except DataError:
            continue  # damaged: repair rewrites current copies; not ours to judge
        if not _stale_record(p, c.asd_id, ns, name, rec):
            continue
        with p.obj_lock(ns, name):
            if _stale_record(p, c.asd_id, ns, name, rec):
                c.delete(key)
                removed += 1
    for key, blob in c.scan("n/").items():
        ns = unquote_ns(key[2:])
        try:
            rec = NsRecord.decode(blob)
        except DataError:
            continue
        if rec.live and rec.seq <= p.index.ns_tomb(ns):
            with p.obj_lock(ns, ""):
                if rec.seq <= p.index.ns_tomb(ns):
                    c.delete(key)
                    removed += 1
    return removed


def _fragments(p: ProxyContext, c: Any, grace: float) -> int:
    if not hasattr(c, "ages"):
        return 0  # a member without ages (a whole Store under a stacked proxy): left alone
    ages = c.ages("f/")
    # Taken after the listing: a put installed since is in it, one still running is inflight.
    placed = {m.vid.hex(): m for _ns, _n, m in p.index.items()}
    removed = 0
    for key, age in ages.items():
        if age < grace:
            continue
        try:
            _f, vid, chunk, frag = key.split("/")
            i, j = int(chunk), int(frag)
        except ValueError:
            continue
        man = placed.get(vid)
        if man is None:
            if any(v.hex() == vid for v in list(p.inflight)):
                continue
        elif i < len(man.chunks) and j < len(man.chunks[i].asds) and man.fragment_asd(i, j) == c.asd_id:
            continue
        c.delete(key)
        p.fcache.discard(key)
        removed += 1
    return removed


def _collect_tombstones(p: ProxyContext, tombs: list[tuple[str, str, int]], ns_tombs: dict[str, int]) -> int:
    """Delete tombstones from every ASD (all are up and clean): the index forgets them."""
    clients = p.asds.all()
    n = 0
    for ns, name, seq in tombs:
        with p.obj_lock(ns, name):
            if p.index.best_seq(ns, name) != seq or p.index.get(ns, name) is not None:
                continue  # put again since: the key holds a manifest now
            try:
                for c in clients:
                    c.delete(manifest_key(ns, name))
            except OvsfsError:
                continue  # kept: tried again next pass
            n += p.index.forget_tombstone(ns, name, seq)
    for ns, seq in ns_tombs.items():
        with p.obj_lock(ns, ""):
            if p.index.has_ns(ns) or p.index.ns_tombstones().get(ns) != seq:
                continue
            try:
                for c in clients:
                    c.delete(ns_key(ns))
            except OvsfsError:
                continue
            n += p.index.forget_ns_tombstone(ns, seq)
    return n


def collect(p: ProxyContext, grace: float, progress: Progress | None = None) -> dict[str, Any]:
    """One garbage-collection pass; returns what it removed. `grace`: seconds a fragment
    must have existed before it may be taken for an orphan."""
    p.asds.refresh()
    for c in p.asds.all():
        if c.up:
            p.index.merge_from(c)   # also what other proxies sharing the ASDs wrote
    tombs, ns_tombs = p.index.tombstones(), p.index.ns_tombstones()
    clients = p.asds.all()
    everywhere = p.index.complete() and all(c.up for c in clients)
    records = fragments = 0
    skipped: list[str] = []
    for done, c in enumerate(clients, 1):
        if not c.up:
            skipped.append(c.addr)
            continue
        try:
            records += _records(p, c)
            fragments += _fragments(p, c, grace)
        except OvsfsError as e:
            log.warning("garbage collection on %s stopped: %s", c.addr, e)
            skipped.append(c.addr)
        if progress:
            progress({"done": done, "total": len(clients), "fragments_removed": fragments,
                      "records_removed": records})
    collected = 0
    if everywhere and not skipped:
        collected = _collect_tombstones(p, tombs, ns_tombs)
    res = {"fragments_removed": fragments, "records_removed": records,
           "tombstones_collected": collected,
           "tombstones_left": len(p.index.tombstones()) + len(p.index.ns_tombstones()),
           "asds_skipped": skipped}
    if fragments or records or collected:
        log.info("garbage collection: %s", res)
    return res
