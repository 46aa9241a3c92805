"""A vPool's preset is applied: each volume's namespace is written with its vPool's preset."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ovsfs.backend.local import LocalStore
from ovsfs.backend.policy import Policy, Preset, PresetStore
from ovsfs.engine.engine import Engine
from ovsfs.errors import NotFound
from tests.engine.helpers import small_config

from .asd_helpers import AsdCluster, make_proxy

CS = 4096
P21, P42, DEFAULT = Policy(2, 1, 2, 1), Policy(4, 2, 5, 1), Policy(3, 2, 4, 1)


def _policies(proxy, ns: str) -> set[Policy]:  # type: ignore[no-untyped-def]
    names = proxy.list(ns)
    assert names
    return {proxy.index.get(ns, n).policy for n in names}


def test_each_vpool_writes_with_its_preset(tmp_path: Path) -> None:
    cl = AsdCluster(tmp_path / "asds")
    cl.start_many(6)
    try:
        state = tmp_path / "node" / "proxy"
        presets = PresetStore(state / "presets.json")
        presets.create(Preset(name="narrow", policies=[P21], max_fragment_size=64 << 10))
        presets.create(Preset(name="wide", policies=[P42], max_fragment_size=64 << 10, compression="lz4"))
        cfg = small_config(tmp_path / "node")
        proxy = make_proxy(cl, state, policy=DEFAULT)
        eng = Engine(cfg, proxy)
        eng.open()
        eng.create_vpool("a", preset="narrow")
        eng.create_vpool("b", preset="wide")
        eng.create_vpool("c")  # no preset: the proxy's default
        data = {p: os.urandom(128 * CS) for p in "abc"}
        vols = {}
        for p in "abc":
            vols[p] = eng.create_volume(f"v{p}", 256 * CS, vpool=p)
            vols[p].write(0, data[p])
            vols[p].sync()
        ns = {p: vols[p].ns for p in "abc"}
        assert _policies(proxy, ns["a"]) == {P21}
        assert _policies(proxy, ns["b"]) == {P42}
        assert _policies(proxy, ns["c"]) == {DEFAULT}
        st = proxy.status()["namespace_presets"]
        assert st[ns["a"]] == "narrow" and st[ns["b"]] == "wide" and ns["c"] not in st
        proxy.drop_caches()
        for p in "abc":
            assert vols[p].read(0, 128 * CS) == data[p]
        eng.close()
        proxy.close()

        # The binding lives on the ASDs: lose the node's state (presets file included),
        # rebuild the index from the ASDs, and new writes still follow the vPool's preset.
        shutil.rmtree(tmp_path / "node")
        cfg = small_config(tmp_path / "node")
        proxy = make_proxy(cl, state, policy=DEFAULT)
        assert proxy.index.rebuilt
        eng = Engine(cfg, proxy)
        eng.open()
        try:
            for p in "abc":
                vol = eng.volume(f"v{p}")
                assert vol.read(0, 128 * CS) == data[p]
                vol.write(128 * CS, data[p])
                vol.sync()
                assert vol.read(0, 256 * CS) == data[p] * 2
            assert _policies(proxy, ns["a"]) == {P21}
            assert _policies(proxy, ns["b"]) == {P42}
            assert _policies(proxy, ns["c"]) == {DEFAULT}
            assert proxy.namespace_preset(ns["b"]).compression == "lz4"
        finally:
            eng.close()
            proxy.close()
    finally:
        cl.stop_all()


def test_unknown_preset_and_local_store(tmp_path: Path) -> None:
    cl = AsdCluster(tmp_path / "asds")
    cl.start_many(3)
    try:
        proxy = make_proxy(cl, tmp_path / "proxy", policy=P21, maintenance=False)
        try:
            with pytest.raises(NotFound):
                proxy.create_namespace("vol-x", preset="nope")
            assert "vol-x" not in proxy.namespaces()
            proxy.create_namespace("vol-y", preset=Preset(name="one", policies=[Policy(1, 1, 1, 1)]))
            proxy.put("vol-y", "o", b"abc" * 1000)
            assert proxy.index.get("vol-y", "o").policy == Policy(1, 1, 1, 1)
            assert proxy.get("vol-y", "o") == b"abc" * 1000
        finally:
            proxy.close()
    finally:
        cl.stop_all()
    # LocalStore has no presets: a vPool's preset is simply not applied there.
    cfg = small_config(tmp_path / "node")
    eng = Engine(cfg, LocalStore(tmp_path / "local"))
    eng.open()
    try:
        eng.create_vpool("p", preset="narrow")
        vol = eng.create_volume("v", 16 * CS, vpool="p")
        vol.write(0, b"z" * CS)
        assert vol.read(0, CS) == b"z" * CS
    finally:
        eng.close()
