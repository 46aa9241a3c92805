"""The engine over the erasure-coded proxy when ASDs were away (issue 9, case 5): a deleted
volume stays deleted, and a volume that cannot be opened fails alone (real ASD processes)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ovsfs.backend.policy import Policy
from ovsfs.engine.engine import Engine
from ovsfs.errors import VolumeFailed
from ovsfs.errors import AlreadyExists, Busy
from tests.engine.helpers import small_config

from .asd_helpers import AsdCluster, make_proxy

CS = 4096
POLICY = Policy(2, 1, 2, 1)


@pytest.fixture
def cluster(tmp_path: Path):
    cl = AsdCluster(tmp_path / "asds")
    cl.start_many(4)
    yield cl
    cl.stop_all()


def _open(cl: AsdCluster, tmp_path: Path) -> tuple[Engine, object]:
    proxy = make_proxy(cl, tmp_path / "node" / "proxy", policy=POLICY, gc_interval=0)
    eng = Engine(small_config(tmp_path / "node"), proxy)
    eng.open()
    return eng, proxy


def _close(eng: Engine, proxy) -> None:  # type: ignore[no-untyped-def]
    try:
        eng.close()
    finally:
        proxy.close()


def _asd_index(cl: AsdCluster, asd_id: str) -> int:
    for i in cl.addrs:
        if json.loads((cl.dir(i) / "asd.json").read_text())["asd_id"] == asd_id:
            return i
    raise AssertionError(asd_id)


def test_volume_deleted_while_an_asd_is_down_does_not_come_back(cluster: AsdCluster, tmp_path: Path) -> None:
    eng, proxy = _open(cluster, tmp_path)
    try:
        eng.create_vpool("default")
        data = os.urandom(64 * CS)
        for name in ["doomed", "kept"]:
            vol = eng.create_volume(name, 64 * CS)
            vol.write(0, data)
            vol.sync()
        ns = eng.volume("doomed").ns
        victim = _asd_index(cluster, proxy.index.get(ns, "volume.json").replica_ids()[0])
        dead_vids = {m.vid.hex() for n_, _n, m in proxy.index.items() if n_ == ns}
        cluster.kill(victim)
        proxy.asds.refresh()
        eng.delete_volume("doomed")
        assert eng.wb.drain(30)
    finally:
        _close(eng, proxy)
    (tmp_path / "node" / "proxy" / "manifests.bin.clean").unlink()   # the node crashed: index lost
    cluster.start(victim)

    eng, proxy = _open(cluster, tmp_path)
    try:
        assert sorted(eng.volumes) == ["kept"] and not eng.failed
        assert ns not in proxy.namespaces()
        assert eng.volume("kept").read(0, 64 * CS) == data
        res = proxy.maintenance.gc(grace=0)
        assert res["tombstones_left"] == 0, res
        left = {f.name.split("%2F")[0] for i in cluster.addrs for f in cluster.fragments(i)}
        assert not dead_vids & left
    finally:
        _close(eng, proxy)


def test_a_volume_that_cannot_be_opened_fails_alone(cluster: AsdCluster, tmp_path: Path) -> None:
    eng, proxy = _open(cluster, tmp_path)
    try:
        eng.create_vpool("default")
        data = os.urandom(32 * CS)
        for name in ["bad", "good"]:
            vol = eng.create_volume(name, 32 * CS)
            vol.write(0, data)
            vol.create_snapshot("s")
            vol.sync()
        eng.clone_volume("bad", "s", "bad-clone")
        eng.volume("bad-clone").sync()
        bad_ns = eng.volume("bad").ns
        bad_vids = {m.vid.hex() for n_, n, m in proxy.index.items() if n_ == bad_ns and n != "volume.json"}
    finally:
        _close(eng, proxy)
    # The node loses its local state (the map must come from the backend) and every
    # fragment of bad's checkpoints and TLogs is gone: they cannot be decoded.
    shutil.rmtree(tmp_path / "node" / "wb")
    for i in cluster.addrs:
        for f in cluster.fragments(i):
            if f.name.split("%2F")[0] in bad_vids:
                f.unlink()

    eng, proxy = _open(cluster, tmp_path)
    try:
        assert sorted(eng.volumes) == ["good"]
        assert eng.volume("good").read(0, 32 * CS) == data
        failed = {f["name"]: f for f in eng.stats()["failed_volumes"]}
        assert sorted(failed) == ["bad", "bad-clone"]
        assert "fragments readable" in failed["bad"]["reason"], failed
        assert "parent volume bad" in failed["bad-clone"]["reason"], failed
        with pytest.raises(VolumeFailed):
            eng.volume("bad")
        with pytest.raises(AlreadyExists):
            eng.create_volume("bad", 32 * CS)
        with pytest.raises(Busy):
            eng.delete_volume("bad")          # its clone still reads through to it
        eng.delete_volume("bad-clone")
        eng.delete_volume("bad")
        assert not eng.failed and eng.wb.drain(30)
        assert bad_ns not in proxy.namespaces()
        eng.create_volume("bad", 32 * CS)     # the name is free again
    finally:
        _close(eng, proxy)
    eng, proxy = _open(cluster, tmp_path)
    try:
        assert sorted(eng.volumes) == ["bad", "good"] and not eng.failed
    finally:
        _close(eng, proxy)
