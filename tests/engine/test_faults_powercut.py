"""Issue 9, case 3: a power cut, simulated at engine level.

`PowerCutIO` (tests/engine/helpers.py) sees every write and fsync the engine makes to
its SCOs and TLogs; a power cut drops whatever was not fsynced (zeros inside the last
fsynced size, cut off past it), after an in-process crash (SQLite keeps only what it
committed). Then every write acknowledged before the last completed flush must read
back, and every other cluster reads as its flushed value or as something written
after it: never as garbage, never as an I/O error.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ovsfs.config import Config
from ovsfs.engine.engine import Engine

from .helpers import PowerCutIO, crash, small_config

CS = 4096
CLUSTERS = 96


def block(i: int, gen: int) -> bytes:
    return gen.to_bytes(4, "little") * 2 + i.to_bytes(4, "little") * ((CS - 8) // 4)


def start(cfg: Config) -> tuple[Engine, PowerCutIO]:
    eng = Engine(cfg)
    eng.open()
    if "v" not in eng.volumes:
        eng.create_vpool("default")
        eng.create_volume("v", CLUSTERS * CS)
    pc = PowerCutIO()
    eng.volume("v").fio = pc
    return eng, pc


def test_flushed_then_overwritten_cluster_survives_a_power_cut(tmp_path: Path) -> None:
    """The issue's reproduction: a periodic map commit after an overwrite, then the plug."""
    cfg = small_config(tmp_path)
    eng, pc = start(cfg)
    vol = eng.volume("v")
    vol.write(0, block(0, 1))
    vol.flush()
    vol.write(0, block(0, 2))
    for i in range(1, 5):       # all in the open SCO: not sealed, so not yet uploaded
        vol.write(i * CS, block(i, 2))
    with vol.lock:
        vol.commit()            # what the ticker does every checkpoint_seconds
    crash(eng)
    pc.power_cut()
    eng = Engine(cfg)
    eng.open()
    try:
        vol = eng.volume("v")
        assert vol.read(0, CS) in (block(0, 1), block(0, 2))
        for i in range(1, 5):
            assert vol.read(i * CS, CS) in (bytes(CS), block(i, 2))
    finally:
        eng.close()


@pytest.mark.parametrize("seed", range(4))
def test_random_workload_power_cut(tmp_path: Path, seed: int) -> None:
    rnd = random.Random(seed)
    cfg = small_config(tmp_path)
    flushed: dict[int, bytes] = {}              # cluster -> value as of the last completed flush
    since: dict[int, set[bytes]] = {}           # values written after it (old or new may show)
    gen = 0
    for cut in range(3):                        # cut after cut on the same state
        eng, pc = start(cfg)
        vol = eng.volume("v")
        current = {i: vol.read(i * CS, CS) for i in range(CLUSTERS)}
        flushed = dict(current)
        since = {}
        for _ in range(rnd.randrange(20, 120)):
            op = rnd.random()
            if op < 0.75:
                gen += 1
                first = rnd.randrange(CLUSTERS)
                count = min(rnd.choice([1, 1, 2, 5, 9]), CLUSTERS - first)
                vol.write(first * CS, b"".join(block(first + k, gen) for k in range(count)))
                for k in range(count):
                    current[first + k] = block(first + k, gen)
                    since.setdefault(first + k, set()).add(current[first + k])
            elif op < 0.85:
                vol.flush()
                flushed = dict(current)
                since = {}
            elif op < 0.92:
                with vol.lock:
                    vol.commit()
            elif op < 0.96:
                vol.seal()
            else:
                eng.scrub("v")
        crash(eng)
        pc.power_cut()
        eng = Engine(cfg)
        eng.open()
        try:
            vol = eng.volume("v")
            for i in range(CLUSTERS):
                got = vol.read(i * CS, CS)
                assert got == flushed[i] or got in since.get(i, set()), \
                    f"cut {cut}: cluster {i} reads neither its flushed value nor a later write"
        finally:
            eng.close()
