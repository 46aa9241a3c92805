"""The volume engine on top of the erasure-coded proxy (real ASD processes)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ovsfs.backend.policy import Policy
from ovsfs.engine.engine import Engine
from tests.engine.helpers import small_config

from .asd_helpers import AsdCluster, make_proxy

CS = 4096


@pytest.mark.parametrize("comp,enc", [("none", "none"), ("zstd", "aes-256-gcm")])
def test_volumes_write_read_sync_restart_through_the_proxy(tmp_path: Path, comp: str, enc: str) -> None:
    cl = AsdCluster(tmp_path / "asds")
    cl.start_many(6)
    try:
        cfg = small_config(tmp_path / "node")
        proxy = make_proxy(cl, tmp_path / "node" / "proxy", policy=Policy(4, 2, 5, 1),
                           compression=comp, encryption=enc)
        eng = Engine(cfg, proxy)
        eng.open()
        eng.create_vpool("default")
        vol = eng.create_volume("v", 512 * CS)
        data = os.urandom(512 * CS)
        vol.write(0, data)
        vol.create_snapshot("s1")
        vol.write(0, b"newr" * 1024)
        vol.sync()
        assert vol.read(8 * CS, 64 * CS) == data[8 * CS:72 * CS]
        eng.close()
        proxy.close()
        # Lose the node's local state and m ASDs: everything comes back from the ASDs.
        shutil.rmtree(tmp_path / "node")
        cl.wipe(0)
        cl.kill(3)
        if enc != "none":
            # Before opening a proxy: one left open would keep repairing after the ASDs stop.
            pytest.skip("key file went with the node state; covered in test_proxy")
        cfg = small_config(tmp_path / "node")
        proxy = make_proxy(cl, tmp_path / "node" / "proxy", policy=Policy(4, 2, 5, 1),
                           compression=comp, encryption=enc)
        eng = Engine(cfg, proxy)
        eng.open()
        try:
            vol = eng.volume("v")
            assert vol.read(0, 4) == b"newr"
            assert vol.read(CS, 511 * CS) == data[CS:]
            assert vol.read(0, 4, snapshot="s1") == data[:4]
        finally:
            eng.close()
            proxy.close()
    finally:
        cl.stop_all()


def test_engine_restart_with_local_state_and_encryption(tmp_path: Path) -> None:
    cl = AsdCluster(tmp_path / "asds")
    cl.start_many(6)
    try:
        cfg = small_config(tmp_path / "node")
        for round_ in range(2):
            proxy = make_proxy(cl, tmp_path / "node" / "proxy", policy=Policy(4, 2, 5, 1),
                               compression="lz4", encryption="aes-256-gcm")
            eng = Engine(cfg, proxy)
            eng.open()
            if round_ == 0:
                eng.create_vpool("default")
                vol = eng.create_volume("v", 256 * CS)
                vol.write(0, b"x" * 256 * CS)
                vol.sync()
            else:
                shutil.rmtree(tmp_path / "node" / "wb")
                vol = eng.volume("v")
                assert vol.read(0, 256 * CS) == b"x" * 256 * CS
            eng.close()
            proxy.close()
    finally:
        cl.stop_all()
