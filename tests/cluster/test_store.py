"""The cluster store on a real etcd, and the embedded store's revisions (issue 11, item 1):
same calls on both, compare-and-swap races, leases that expire, fail over between members,
a clear error when etcd is down."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ovsfs.cluster.etcd import EtcdStore, LeaseGone, prefix_range_end
from ovsfs.cluster.etcd_launch import EtcdCluster
from ovsfs.cluster.store import ConfigStore
from ovsfs.errors import ClusterError


def test_prefix_range_end_follows_etcds_rule() -> None:
    assert prefix_range_end(b"/ovsfs/a/") == b"/ovsfs/a0"
    assert prefix_range_end(b"a\xff") == b"b"
    assert prefix_range_end(b"\xff\xff") == b"\0"


def test_same_calls_same_answers(any_store: Any) -> None:
    s = any_store
    values = {"/volumes/v1": {"size": 4096, "vpool": "p"}, "/volumes/v10": [1, "two", 3.5],
              "/volumesx": "not under /volumes/", "/vpools/p": {"mode": "async"},
              "/volumes/ü": True}
    for k, v in values.items():
        s.put(k, v)
    assert s.get("/volumes/v1") == {"size": 4096, "vpool": "p"}
    assert s.get("/nothing") is None
    assert s.list("/volumes/") == {k: values[k] for k in sorted(values)
                                   if k.startswith("/volumes/")}
    assert list(s.list("/volumes")) == ["/volumes/v1", "/volumes/v10", "/volumes/ü",
                                        "/volumesx"]
    s.put("/volumes/v1", {"size": 8192})
    assert s.get("/volumes/v1") == {"size": 8192}
    s.delete("/volumes/v1")
    s.delete("/volumes/v1")   # deleting what is gone is no error
    assert s.get("/volumes/v1") is None
    assert "/volumes/v1" not in s.list("/volumes/")


def test_prefixes_are_separate_clusters(etcd1: EtcdCluster) -> None:
    # "/c1" must not see "/c10": the range of a prefix ends before the next sibling.
    a, b = EtcdStore(etcd1.urls, prefix="/c1"), EtcdStore(etcd1.urls, prefix="/c10")
    try:
        a.put("/k", 1)
        b.put("/k", 2)
        assert a.get("/k") == 1 and b.get("/k") == 2
        assert a.list("") == {"/k": 1}
        assert b.list("/") == {"/k": 2}
    finally:
        a.close()
        b.close()


def test_get_rev_and_cas(any_store: Any) -> None:
    s = any_store
    assert s.get_rev("/owners/v") == (None, 0)
    assert s.cas("/owners/v", 0, {"gen": 1}) is True
    assert s.cas("/owners/v", 0, {"gen": 99}) is False      # exists now
    value, rev = s.get_rev("/owners/v")
    assert value == {"gen": 1} and rev > 0
    assert s.cas("/owners/v", rev, {"gen": 2}) is True
    assert s.cas("/owners/v", rev, {"gen": 3}) is False     # stale revision
    value, rev2 = s.get_rev("/owners/v")
    assert value == {"gen": 2} and rev2 > rev
    # Deleted and written again: the old revision never matches again (no ABA).
    s.delete("/owners/v")
    s.put("/owners/v", {"gen": 2})
    assert s.cas("/owners/v", rev2, {"gen": 4}) is False
    assert s.get("/owners/v") == {"gen": 2}


def test_cas_race_exactly_one_wins(any_store: Any) -> None:
    s = any_store
    threads_n, rounds = 6, 10
    for r in range(rounds):
        key = f"/race/{r}"
        if r % 2:
            s.put(key, {"gen": 0})   # odd rounds race on an existing key, even on a new one
        _, rev = s.get_rev(key)
        barrier = threading.Barrier(threads_n)
        wins: list[int] = []
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            try:
                barrier.wait()
                if s.cas(key, rev, {"winner": i}):
                    wins.append(i)
            except BaseException as e:   # reported below
                errors.append(e)

        ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads_n)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors
        assert len(wins) == 1, f"round {r}: winners {wins}"
        assert s.get(key) == {"winner": wins[0]}


def test_configstore_from_before_revisions(tmp_path: Path) -> None:
    """A config.db written before get_rev/cas existed opens, keeps its values, and its rows
    take part in cas."""
    path = tmp_path / "cluster" / "config.db"
    path.parent.mkdir()
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT)")
    db.execute("INSERT INTO kv VALUES ('/volumes/old', '{\"size\": 1}')")
    db.commit()
    db.close()
    s = ConfigStore(path)
    try:
        assert s.get("/volumes/old") == {"size": 1}
        value, rev = s.get_rev("/volumes/old")
        assert value == {"size": 1} and rev >= 1
        assert s.cas("/volumes/old", 0, {"size": 2}) is False
        assert s.cas("/volumes/old", rev, {"size": 2}) is True
        s.put("/volumes/new", 5)
        assert s.get_rev("/volumes/new")[1] > s.get_rev("/volumes/old")[1]
    finally:
        s.close()
    s = ConfigStore(path)    # reopened: values and revisions stay
    try:
        assert s.get("/volumes/old") == {"size": 2}
        assert s.get_rev("/volumes/new")[1] > s.get_rev("/volumes/old")[1]
    finally:
        s.close()


def test_lease_keepalive_and_expiry(etcd_store: EtcdStore) -> None:
    s = etcd_store
    lease = s.grant(2)
    s.put("/alive/x", {"n": 1}, lease=lease)
    s.put("/nodes/x", {"n": 1})                 # no lease: stays
    # Kept alive past its ttl, the key stays.
    for _ in range(4):
        time.sleep(0.7)
        assert s.keepalive(lease) is True
    assert s.get("/alive/x") == {"n": 1}
    # No more keepalives: gone within ttl plus etcd's lease check (generous bound: 6 s).
    deadline = time.monotonic() + 6.0
    while s.get("/alive/x") is not None:
        assert time.monotonic() < deadline, "leased key still there 6 s after its last renewal"
        time.sleep(0.1)
    assert s.keepalive(lease) is False
    with pytest.raises(LeaseGone, match="lease not found"):
        s.put("/alive/x", {"n": 2}, lease=lease)
    s.revoke(lease)                             # revoking a gone lease is no error
    assert s.get("/nodes/x") == {"n": 1}


def test_revoke_deletes_at_once(etcd_store: EtcdStore) -> None:
    s = etcd_store
    lease = s.grant(30)
    assert s.cas("/alive/y", 0, "me", lease=lease) is True
    s.revoke(lease)
    assert s.get("/alive/y") is None
    assert s.keepalive(lease) is False


def test_etcd_down_is_a_clear_cluster_error(tmp_path: Path) -> None:
    cluster = EtcdCluster(tmp_path / "etcd", members=1)
    cluster.start()
    s = EtcdStore(cluster.urls, prefix="/down", timeout=2.0)
    try:
        s.put("/k", "before")
        cluster.kill(0)                          # SIGKILL by PID
        for call in (lambda: s.get("/k"), lambda: s.put("/k", 1), lambda: s.grant(5),
                     lambda: s.cas("/k", 0, 1), lambda: s.list("/")):
            t = time.monotonic()
            with pytest.raises(ClusterError) as err:
                call()
            assert cluster.urls[0] in str(err.value)            # names the member tried
            assert "cannot connect" in str(err.value)
            assert time.monotonic() - t < 2.0                    # refused, not timed out
        cluster.start_member(0)                  # back, on its data
        assert s.get("/k") == "before"
    finally:
        s.close()
        cluster.stop()


def test_three_members_one_killed_the_store_goes_on(tmp_path: Path) -> None:
    cluster = EtcdCluster(tmp_path / "etcd", members=3)
    cluster.start()
    try:
        for victim in (0, 1):
            urls = [cluster.urls[victim]] + [u for u in cluster.urls if u != cluster.urls[victim]]
            s = EtcdStore(urls, prefix="/ha", timeout=5.0)
            try:
                if victim == 0:
                    s.put("/k", 0)
                assert s.get("/k") == victim     # connected to the victim, which then dies
                cluster.kill(victim)             # SIGKILL by PID
                value, rev = s.get_rev("/k")
                assert value == victim
                assert s.cas("/k", rev, victim + 1) is True
                lease = s.grant(5)
                s.put(f"/alive/{victim}", "x", lease=lease)
                assert s.keepalive(lease) is True
                assert s.list("/alive/") == {f"/alive/{victim}": "x"}
                s.revoke(lease)
            finally:
                s.close()
            cluster.start_member(victim)         # back on its data, catches up
            only = EtcdStore([cluster.urls[victim]], prefix="/ha")
            try:
                deadline = time.monotonic() + 5.0
                while only.get("/k") != victim + 1:
                    assert time.monotonic() < deadline, "restarted member did not catch up"
                    time.sleep(0.05)
            finally:
                only.close()
    finally:
        cluster.stop()
