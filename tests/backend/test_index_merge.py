"""The manifest index merge: whatever order ASDs answer in, and however the records are
spread over them, the index ends the same (highest sequence wins; tombstones win over
older manifests; a namespace tombstone kills what is older in it). No ASD processes:
the records are fed to the merge as the ASD scans would return them."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from ovsfs.backend.index import Index, manifest_key, ns_key
from ovsfs.backend.manifest import Manifest, NsRecord, Tombstone
from ovsfs.backend.placement import AsdSet
from ovsfs.backend.policy import Policy, Preset
from ovsfs.backend.seq import SeqClock

NSS, NAMES = ["a", "b"], ["x", "y", "z"]


def _manifest(seq: int) -> Manifest:
    man = Manifest.sample(Policy(1, 0, 1, 1), Preset(policies=[Policy(1, 0, 1, 1)]), 10)
    man.seq = seq
    man.vid = seq.to_bytes(8, "big")
    return man


# One record: (namespace, object name or None for the namespace record, live or tombstone);
# its sequence number is its position in the list.
record = st.tuples(st.sampled_from(NSS), st.sampled_from([None, *NAMES]), st.booleans())


def _state(idx: Index) -> tuple:  # type: ignore[type-arg]
    return ({ns: {n: m.seq for n, m in objs.items()} for ns, objs in idx.objects.items()},
            {ns: dict(t) for ns, t in idx.tombs.items() if t}, dict(idx.ns_tombs))


def _expected(recs: list[tuple[str, str | None, bool, int]]) -> tuple[dict, dict]:  # type: ignore[type-arg]
    """What must be visible, worked out directly: per object the newest record, unless a
    namespace tombstone is newer."""
    ns_tomb = {ns: max([s for n_, name, live, s in recs if n_ == ns and name is None and not live], default=-1)
               for ns in NSS}
    live: dict[str, dict[str, int]] = {}
    for ns in NSS:
        for name in NAMES:
            mine = [(s, alive) for n_, nm, alive, s in recs if n_ == ns and nm == name and s > ns_tomb[ns]]
            if mine and max(mine)[1]:
                live.setdefault(ns, {})[name] = max(mine)[0]
    return live, ns_tomb


def _scans(order: list[tuple[str, str | None, bool, int]]) -> list[tuple[dict[str, bytes], dict[str, bytes]]]:
    """Records packed onto ASDs as they come: an ASD holds one value per key, so a record
    whose key an ASD holds already goes to the next ASD."""
    scans: list[tuple[dict[str, bytes], dict[str, bytes]]] = []
    for ns, name, live, seq in order:
        key = ns_key(ns) if name is None else manifest_key(ns, name)
        blob = (NsRecord(seq, live).encode() if name is None
                else _manifest(seq).encode() if live else Tombstone(seq).encode())
        for nss, mans in scans:
            where = nss if name is None else mans
            if key not in where:
                where[key] = blob
                break
        else:
            scans.append(({key: blob}, {}) if name is None else ({}, {key: blob}))
    return scans


@settings(max_examples=100, deadline=None)
@given(st.lists(record, min_size=1, max_size=25), st.randoms(use_true_random=False))
def test_merge_is_order_independent_and_newest_wins(recs_in, rnd: random.Random) -> None:  # type: ignore[no-untyped-def]
    recs = [(ns, name, live, seq) for seq, (ns, name, live) in enumerate(recs_in, 1)]
    live, ns_tomb = _expected(recs)
    states = []
    for _ in range(3):
        order = list(recs)
        rnd.shuffle(order)
        scans = _scans(order)
        rnd.shuffle(scans)
        idx = Index(None, AsdSet(None, []), SeqClock())
        for i, (nss, mans) in enumerate(scans):
            idx._merge_scan(f"asd{i}", nss, mans)
        got = {ns: {n: m.seq for n, m in objs.items()} for ns, objs in idx.objects.items()}
        assert {ns: o for ns, o in got.items() if o} == live
        for ns in NSS:
            assert idx.ns_tomb(ns) == ns_tomb[ns]
            for name in NAMES:
                if name not in live.get(ns, {}):
                    assert idx.get(ns, name) is None
        assert idx.clock.last >= len(recs)   # later numbers are above everything seen
        assert idx.covered == {f"asd{i}" for i in range(len(scans))}
        states.append(_state(idx))
    assert states[0] == states[1] == states[2]
