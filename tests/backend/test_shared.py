"""A backend shared by several nodes (issue 11): one proxy per node, own state dirs,
the same six real ASD processes. Each sees the others' namespaces, objects and
presets, reads what another encrypted (shared key ring), and never takes another
node's objects for garbage."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ovsfs.backend.codec import KeyRing
from ovsfs.backend.policy import Policy, Preset
from ovsfs.backend.proxy import ProxyStore
from ovsfs.errors import DataError, NotFound

from .asd_helpers import AsdCluster

KiB = 1 << 10



def _proxy(cluster: AsdCluster, state: Path, **kw) -> ProxyStore:  # type: ignore[no-untyped-def]
    kw.setdefault("down_timeout", 3600.0)
    kw.setdefault("maintenance", False)
    preset = kw.pop("preset", None) or Preset(policies=[Policy(4, 2, 5, 1)], max_fragment_size=64 * KiB)
    return ProxyStore(list(cluster.addrs.values()), preset, state_dir=state, **kw)


def test_nodes_see_each_others_namespaces_objects_and_presets(cluster: AsdCluster, tmp_path: Path) -> None:
    a = _proxy(cluster, tmp_path / "a")
    b = _proxy(cluster, tmp_path / "b")
    try:
        special = Preset(name="special", policies=[Policy(3, 3, 4, 1)], compression="zstd",
                         max_fragment_size=32 * KiB)
        a.create_namespace("vol", preset=special)        # B has no preset of that name
        objs = {f"sco/{i}": os.urandom(n) for i, n in enumerate([1, 4 * KiB, 200 * KiB])}
        for name, data in objs.items():
            a.put("vol", name, data)
        assert "vol" in b.namespaces(), "a namespace another node created is listed"
        b.refresh("vol")
        assert b.list("vol") == sorted(objs)
        for name, data in objs.items():
            assert b.get("vol", name) == data
            assert b.get_range("vol", name, 0, 1) == data[:1]
        # B writes into A's namespace with the namespace's preset, which it learnt from
        # the namespace record.
        b.put("vol", "tlog/1", b"t" * 50000)
        man = b.index.get("vol", "tlog/1")
        assert man is not None and (man.policy.k, man.policy.m, man.compression) == (3, 3, "zstd")
        b.delete("vol", "sco/0")
        a.refresh("vol")
        assert a.list("vol") == ["sco/1", "sco/2", "tlog/1"]
        assert a.get("vol", "tlog/1") == b"t" * 50000
        # A namespace that only exists on the ASDs is found by a write too.
        c = _proxy(cluster, tmp_path / "c")
        try:
            c.put("vol", "sco/9", b"from c")
            assert c.get("vol", "sco/1") == objs["sco/1"]
        finally:
            c.close()
        b.refresh("vol")
        assert b.get("vol", "sco/9") == b"from c"
        a.delete_namespace("vol")
        assert "vol" not in b.namespaces(), "a namespace another node deleted is gone"
        with pytest.raises(NotFound):
            b.list("vol")
    finally:
        a.close()
        b.close()


def test_gc_of_one_node_keeps_the_objects_of_another(cluster: AsdCluster, tmp_path: Path) -> None:
    a = _proxy(cluster, tmp_path / "a")
    b = _proxy(cluster, tmp_path / "b")
    try:
        a.create_namespace("vol")
        data = os.urandom(300 * KiB)
        a.put("vol", "sco/1", data)
        b.maintenance.gc(grace=0)       # B never looked at "vol"
        a.drop_caches()
        assert a.get("vol", "sco/1") == data
        assert b.get("vol", "sco/1") == data
    finally:
        a.close()
        b.close()


def test_two_nodes_share_one_key_ring(cluster: AsdCluster, tmp_path: Path) -> None:
    enc = Preset(policies=[Policy(4, 2, 5, 1)], encryption="aes-256-gcm", compression="lz4",
                 max_fragment_size=64 * KiB)
    shared = tmp_path / "shared" / "keys.json"
    a = _proxy(cluster, tmp_path / "a", preset=enc, keyring=KeyRing(shared))
    b = _proxy(cluster, tmp_path / "b", preset=enc, keyring=KeyRing(shared))
    try:
        assert a.keys is not None and b.keys is not None and a.keys.keys == b.keys.keys
        a.create_namespace("vol")
        one = os.urandom(100 * KiB)
        a.put("vol", "one", one)
        a.keys.rotate()                  # B learns key 2 from the shared file when it needs it
        two = os.urandom(100 * KiB)
        a.put("vol", "two", two)
        b.refresh("vol")
        assert b.get("vol", "one") == one and b.get("vol", "two") == two
        # A node with its own key file cannot read them.
        c = _proxy(cluster, tmp_path / "c", preset=enc)
        try:
            c.refresh("vol")
            with pytest.raises(DataError):
                c.get("vol", "two")
        finally:
            c.close()
    finally:
        a.close()
        b.close()


def test_key_ring_kept_through_callbacks(tmp_path: Path) -> None:
    """How the daemon keeps keys in the cluster store: load/save callbacks."""
    store: dict[str, str] = {}
    r1 = KeyRing(load=lambda: store.get("keys"), save=lambda t: store.__setitem__("keys", t))
    r2 = KeyRing(load=lambda: store.get("keys"), save=lambda t: store.__setitem__("keys", t))
    assert r1.keys == r2.keys and r1.current == r2.current == 1
    r2.rotate()
    assert r1.get(2) is not None, "a key another node added is read on demand"
    assert r1.current == 2 and r1.keys == r2.keys
