"""Stacked backends: a global proxy over three local proxies (one per data centre)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from ovsfs.backend.policy import Policy, Preset
from ovsfs.backend.stacked import StoreMember, decode_key, encode_key, stacked_proxy

from .asd_helpers import AsdCluster, make_proxy

KiB = 1 << 10
POLICY = Policy(2, 1, 3, 1)


def test_key_encoding_is_a_prefix_code() -> None:
    for key in ["f/00ff/0/1", "m/vol%2Fa/sco/0001", "n/a_b%25c", "m/x__y/_z_"]:
        assert decode_key(encode_key(key)) == key
        assert encode_key(key).startswith(encode_key(key[:5]))
        assert "%" not in encode_key(key)


@pytest.fixture
def dcs(tmp_path: Path):
    clusters = [AsdCluster(tmp_path / f"dc{d}") for d in range(3)]
    try:
        for d, cl in enumerate(clusters):
            cl.start_many(3, nodes=[f"dc{d}-n{i}" for i in range(3)])
        yield clusters
    finally:
        for cl in clusters:
            cl.stop_all()


def _wait_up(member: StoreMember, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not member.ping():
        assert time.monotonic() < deadline, f"{member} did not come back"
        time.sleep(0.3)


def test_global_backend_survives_losing_a_data_centre(dcs: list[AsdCluster], tmp_path: Path) -> None:
    rnd = random.Random(7)
    locals_ = [make_proxy(cl, tmp_path / f"local{d}", policy=POLICY, mfs=16 * KiB, maintenance=False)
               for d, cl in enumerate(dcs)]
    glob = stacked_proxy({f"dc{d}": p for d, p in enumerate(locals_)},
                         Preset(policies=[POLICY], max_fragment_size=32 * KiB),
                         state_dir=tmp_path / "global", maintenance=False)
    try:
        assert sorted(c.node for c in glob.asds.live()) == ["dc0", "dc1", "dc2"]
        glob.create_namespace("vol-a")
        objs = {f"sco/{i:04x}": rnd.randbytes(rnd.choice([1, 5 * KiB, 100 * KiB + 7])) for i in range(6)}
        for name, data in objs.items():
            glob.put("vol-a", name, data)
        for name, man in ((n, glob.index.get("vol-a", n)) for n in objs):
            assert man.policy == POLICY
            for i in range(len(man.chunks)):  # one fragment per data centre (x = 1)
                assert len({man.fragment_asd(i, j) for j in range(3)}) == 3
        for p in locals_:  # the fragments are objects of each local backend
            assert p.list("stacked", "f/")

        def check() -> None:
            glob.drop_caches()
            for p in locals_:
                p.drop_caches()
            for name, data in objs.items():
                assert glob.get("vol-a", name) == data, name
                off = rnd.randrange(len(data))
                n = rnd.randrange(len(data) - off + 1)
                assert glob.get_range("vol-a", name, off, n) == data[off:off + n]

        # Data centre 0 is lost: every ASD of it killed.
        for i in list(dcs[0].procs):
            dcs[0].kill(i)
        check()
        assert glob.list("vol-a") == sorted(objs)

        # It comes back with empty disks: global repair rebuilds its fragments there.
        for i in range(3):
            dcs[0].start(i)
            dcs[0].wipe(i)
        member0 = glob.asds.find("store:dc0")
        _wait_up(member0)
        report = glob.maintenance.repair()
        assert report["full_redundancy"], report
        assert report["fragments_rebuilt"] > 0
        assert glob.status()["degraded_objects"] == 0

        # Full redundancy again: now data centre 1 can go, and everything still reads.
        for i in range(3):
            dcs[1].wipe(i)
        check()
        # A fresh global proxy (no local state) finds everything through the members.
        glob.close()
        glob = stacked_proxy({f"dc{d}": p for d, p in enumerate(locals_)},
                             Preset(policies=[POLICY], max_fragment_size=32 * KiB),
                             state_dir=tmp_path / "global2", maintenance=False)
        assert glob.index.rebuilt
        check()
    finally:
        glob.close()
        for p in locals_:
            p.close()
