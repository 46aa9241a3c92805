"""Deletes while an ASD is away, late ASDs, garbage collection, sequence numbers (issue 9, cases 5 and 10).

Real ASD processes; an ASD "away" is a stopped process (SIGKILL by PID, restarted on
the same port and disk later); a proxy "crash" is a proxy whose local manifest index
is lost (the clean marker removed after close, so the next start rebuilds from the
ASDs that answer).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from ovsfs.backend.asd_client import AsdClient
from ovsfs.backend.policy import Policy
from ovsfs.errors import NotFound

from .asd_helpers import AsdCluster, make_proxy

KiB = 1 << 10
POLICY = Policy(2, 1, 2, 1)   # 3 fragments per chunk, manifest on 2 ASDs


@pytest.fixture
def cluster(tmp_path: Path):
    cl = AsdCluster(tmp_path / "asds")
    cl.start_many(4)
    yield cl
    cl.stop_all()


def _proxy(cl: AsdCluster, state: Path, **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("gc_interval", 0)   # GC only when a test asks: results stay exact
    return make_proxy(cl, state, policy=POLICY, mfs=64 * KiB, **kw)


def _crash(state: Path) -> None:
    """What a crash leaves: the index file may miss the last changes, so it is not trusted."""
    (state / "manifests.bin.clean").unlink()


def _asd_index(cl: AsdCluster, asd_id: str) -> int:
    for i in cl.addrs:
        if json.loads((cl.dir(i) / "asd.json").read_text())["asd_id"] == asd_id:
            return i
    raise AssertionError(f"no ASD {asd_id}")


def _vids_on(cl: AsdCluster, i: int) -> set[str]:
    return {f.name.split("%2F")[0] for f in cl.fragments(i)}


def _keys_on(cl: AsdCluster, i: int, kind: str) -> set[str]:
    d = cl.dir(i) / kind
    return {p.name for p in d.iterdir() if not p.name.startswith(".")} if d.is_dir() else set()


def test_deletes_while_an_asd_is_away_stay_deleted_and_gc_clears_its_disk(cluster: AsdCluster,
                                                                          tmp_path: Path) -> None:
    rnd = random.Random(5)
    state = tmp_path / "st"
    proxy = _proxy(cluster, state)
    try:
        proxy.create_namespace("vol")
        proxy.create_namespace("gone")
        data = {n: rnd.randbytes(rnd.choice([100, 150 * KiB])) for n in ["keep", "del1", "del2"]}
        for n, d in data.items():
            proxy.put("vol", n, d)
        for n in ["a", "b"]:
            proxy.put("gone", n, rnd.randbytes(90 * KiB))
        dead_vids = {proxy.index.get("vol", n).vid.hex() for n in ["del1", "del2"]}
        dead_vids |= {proxy.index.get("gone", n).vid.hex() for n in ["a", "b"]}
        # The ASD away is one holding a manifest copy of del1: that copy must not win later.
        victim = _asd_index(cluster, proxy.index.get("vol", "del1").replica_ids()[0])
        cluster.kill(victim)
        proxy.asds.refresh()
        proxy.delete("vol", "del1")
        proxy.delete("vol", "del2")
        proxy.delete_namespace("gone")
        assert proxy.list("vol") == ["keep"]
    finally:
        proxy.close()
    _crash(state)
    cluster.start(victim)
    assert dead_vids & _vids_on(cluster, victim), "the ASD away should still hold deleted fragments"

    proxy = _proxy(cluster, state)
    try:
        # Rebuilt from all four ASDs, the one that was away included: deletes win.
        assert proxy.index.complete()
        assert proxy.list("vol") == ["keep"]
        assert proxy.get("vol", "keep") == data["keep"]
        with pytest.raises(NotFound):
            proxy.get("vol", "del1")
        assert "gone" not in proxy.namespaces()
        with pytest.raises(NotFound):
            proxy.list("gone")

        res = proxy.maintenance.gc(grace=0)
        assert res["fragments_removed"] > 0 and res["records_removed"] > 0, res
        assert res["tombstones_collected"] == 3 and res["tombstones_left"] == 0, res
        live = proxy.index.vids()
        for i in cluster.addrs:
            assert _vids_on(cluster, i) <= live, i          # no orphaned fragment anywhere
            assert not dead_vids & _vids_on(cluster, i)
            assert _keys_on(cluster, i, "m") <= {"vol%2Fkeep"}
            assert _keys_on(cluster, i, "n") == {"vol"}
        assert proxy.get("vol", "keep") == data["keep"]
    finally:
        proxy.close()
    # With the tombstones collected, another crash finds nothing that could come back.
    _crash(state)
    proxy = _proxy(cluster, state)
    try:
        assert proxy.namespaces() == ["vol"] and proxy.list("vol") == ["keep"]
        assert proxy.get("vol", "keep") == data["keep"]
    finally:
        proxy.close()


def test_late_asds_are_merged_and_a_clean_stop_never_passes_off_a_partial_index(
        cluster: AsdCluster, tmp_path: Path) -> None:
    rnd = random.Random(6)
    state = tmp_path / "st"
    # Objects written while ASDs 2 and 3 are away: fragments and manifests on 0 and 1 only.
    cluster.kill(2)
    cluster.kill(3)
    mirror = dict(policy=Policy(1, 1, 2, 1))
    proxy = make_proxy(cluster, state, gc_interval=0, **mirror)
    try:
        proxy.create_namespace("vol")
        data = {f"o{i}": rnd.randbytes(rnd.choice([10, 70 * KiB])) for i in range(6)}
        for n, d in data.items():
            proxy.put("vol", n, d)
    finally:
        proxy.close()
    _crash(state)
    # The node comes back while 0 and 1 are away: the index is rebuilt from 2 and 3 alone.
    cluster.start(2)
    cluster.start(3)
    cluster.kill(0)
    cluster.kill(1)
    proxy = make_proxy(cluster, state, gc_interval=0, **mirror)
    try:
        assert not proxy.index.complete()
        assert "vol" not in proxy.namespaces()
    finally:
        proxy.close()     # a clean stop of an index that covers only ASDs 2 and 3
    saved = (state / "manifests.bin").read_bytes()
    assert (state / "manifests.bin.clean").exists() and b'"covered"' in saved
    cluster.start(0)
    cluster.start(1)
    # The clean file says what it covers: the ASDs it lacks are merged at open.
    proxy = make_proxy(cluster, state, gc_interval=0, **mirror)
    try:
        assert proxy.index.complete()
        assert proxy.list("vol") == sorted(data)
        for n, d in data.items():
            assert proxy.get("vol", n) == d
    finally:
        proxy.close()

    # The same while running: a crash-time rebuild without 0 and 1, then they come back
    # and the maintenance round merges them without a restart.
    _crash(state)
    cluster.kill(0)
    cluster.kill(1)
    proxy = make_proxy(cluster, state, gc_interval=0, **mirror)
    try:
        assert "vol" not in proxy.namespaces()
        cluster.start(0)
        cluster.start(1)
        deadline = time.monotonic() + 10   # a down ASD is retried every 2 s (AsdClient.retry_after)
        while not proxy.index.complete() and time.monotonic() < deadline:
            proxy.asds.refresh()
            proxy.maintenance.late_and_gc()   # what each maintenance round does
            time.sleep(0.2)
        assert proxy.index.complete()
        for n, d in data.items():
            assert proxy.get("vol", n) == d
    finally:
        proxy.close()
    _crash(state)
    proxy = make_proxy(cluster, state, gc_interval=0, **mirror)
    try:
        assert proxy.list("vol") == sorted(data)
    finally:
        proxy.close()


class FakeClock:
    def __init__(self, t: int) -> None:
        self.t = t

    def __call__(self) -> int:
        return self.t


def test_sequence_numbers_stay_monotonic_when_the_clock_steps_back(cluster: AsdCluster, tmp_path: Path) -> None:
    state = tmp_path / "st"
    clock = FakeClock(2_000_000_000 * 10**9)
    proxy = _proxy(cluster, state, clock=clock)
    try:
        proxy.create_namespace("vol")
        proxy.put("vol", "x", b"old" * 100)
        proxy.put("vol", "y", b"y" * 100)
        first = proxy.index.get("vol", "x").seq
        clock.t -= 3600 * 10**9       # the wall clock steps back an hour
        proxy.put("vol", "x", b"new" * 100)
        assert proxy.index.get("vol", "x").seq > first
        proxy.delete("vol", "y")      # a tombstone numbered after y's manifest
    finally:
        proxy.close()
    # A crash loses the index; the clock is still an hour behind, and steps back again.
    _crash(state)
    clock.t -= 600 * 10**9
    proxy = _proxy(cluster, state, clock=clock)
    try:
        assert proxy.get("vol", "x") == b"new" * 100
        with pytest.raises(NotFound):
            proxy.get("vol", "y")
        proxy.put("vol", "y", b"again")   # put after delete, with a clock far behind both
        assert proxy.get("vol", "y") == b"again"
    finally:
        proxy.close()
    # Even with the persisted mark lost, the numbers seen on the ASDs bound the next ones.
    _crash(state)
    (state / "seq").unlink()
    proxy = _proxy(cluster, state, clock=clock)
    try:
        proxy.put("vol", "x", b"newest")
        assert proxy.get("vol", "y") == b"again"
    finally:
        proxy.close()
    _crash(state)
    proxy = _proxy(cluster, state, clock=clock)
    try:
        assert proxy.get("vol", "x") == b"newest"
        assert proxy.get("vol", "y") == b"again"
    finally:
        proxy.close()


def test_gc_takes_fragments_of_crashed_puts_only_after_the_grace_period(cluster: AsdCluster,
                                                                        tmp_path: Path) -> None:
    proxy = _proxy(cluster, tmp_path / "st")
    try:
        proxy.create_namespace("vol")
        proxy.put("vol", "live", b"z" * 5000)
        c = AsdClient(*cluster.addrs[0].split(":"))
        # A put that crashed before its manifest landed, and one still under way.
        c.put("f/00000000deadbeef/0/0", b"orphan")
        c.put("f/00000000feedf00d/0/1", b"in flight")
        proxy.inflight.add(bytes.fromhex("00000000feedf00d"))
        res = proxy.maintenance.gc(grace=3600)
        assert res["fragments_removed"] == 0, res   # young: could still be a put under way
        assert {"f/00000000deadbeef/0/0", "f/00000000feedf00d/0/1"} <= set(c.list("f/"))
        res = proxy.maintenance.gc(grace=0)
        assert res["fragments_removed"] == 1, res
        keys = set(c.list("f/"))
        assert "f/00000000deadbeef/0/0" not in keys and "f/00000000feedf00d/0/1" in keys
        assert proxy.get("vol", "live") == b"z" * 5000
        c.close()
    finally:
        proxy.close()


def test_delete_while_an_asd_is_frozen(cluster: AsdCluster, tmp_path: Path) -> None:
    """The ASD hangs (SIGSTOP) instead of refusing: deletes time out on it, succeed on the
    others, and win over what it still holds once it thaws, after a crash of the proxy."""
    from ovsfs.backend.placement import AsdSet
    from ovsfs.backend.policy import Preset
    from ovsfs.backend.proxy import ProxyStore

    state = tmp_path / "st"

    def open_proxy() -> ProxyStore:
        asds = AsdSet(state / "asds.json", list(cluster.addrs.values()), timeout=1.0)
        return ProxyStore(asds, Preset(policies=[POLICY], max_fragment_size=64 * KiB), state_dir=state,
                          down_timeout=3600, gc_interval=0)

    proxy = open_proxy()
    pid = None
    try:
        proxy.create_namespace("vol")
        proxy.create_namespace("gone")
        for name in ["keep", "del"]:
            proxy.put("vol", name, name.encode() * 1000)
        proxy.put("gone", "a", b"a" * 1000)
        frozen = _asd_index(cluster, proxy.index.get("vol", "del").replica_ids()[0])
        pid = cluster.procs[frozen].pid
        os.kill(pid, signal.SIGSTOP)
        proxy.delete("vol", "del")
        proxy.delete_namespace("gone")
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
        proxy.close()
    _crash(state)
    proxy = open_proxy()
    try:
        assert proxy.index.complete()
        assert proxy.namespaces() == ["vol"] and proxy.list("vol") == ["keep"]
        assert proxy.get("vol", "keep") == b"keep" * 1000
        assert proxy.maintenance.gc(grace=0)["tombstones_left"] == 0
        assert _keys_on(cluster, frozen, "m") <= {"vol%2Fkeep"}
    finally:
        proxy.close()


def test_two_refreshes_attach_a_late_asd_once(cluster: AsdCluster, tmp_path: Path) -> None:
    """The maintenance round and a caller refreshed the ASD set at once; both pinged an ASD
    that had come up, and the second to attach it raised ValueError (seen in a full run)."""
    import threading

    from ovsfs.backend.placement import AsdSet

    cluster.kill(3)
    asds = AsdSet(None, list(cluster.addrs.values()), timeout=2.0)
    try:
        [late] = asds.pending
        cluster.start(3)
        both = threading.Barrier(2)
        real_ping = late.ping
        deadline = time.monotonic() + 20     # a down ASD is retried every 2 s
        while not real_ping():
            assert time.monotonic() < deadline, "the ASD did not come back"
            time.sleep(0.2)

        def ping() -> bool:
            ok = real_ping()
            both.wait(10)        # both refreshes hold the late ASD's successful ping
            return ok

        late.ping = ping         # type: ignore[method-assign]
        errors: list[BaseException] = []

        def refresh() -> None:
            try:
                asds.refresh()
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=refresh) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        assert not asds.pending and late.asd_id in asds.by_id
    finally:
        for c in asds.all():
            c.close()
