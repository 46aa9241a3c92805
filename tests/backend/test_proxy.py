"""The proxy over real ASD processes: redundancy, damage, repair, encryption, churn."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest

from ovsfs.backend.policy import Policy, Preset

from .asd_helpers import AsdCluster, make_proxy

KiB, MiB = 1 << 10, 1 << 20



def _objects(proxy, rnd: random.Random, n: int = 6) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    proxy.create_namespace("vol")
    objs = {f"sco/{i:04x}": rnd.randbytes(rnd.choice([1, 4 * KiB, 700 * KiB, 2 * MiB + 3])) for i in range(n)}
    for name, data in objs.items():
        proxy.put("vol", name, data)
    return objs


def _check(proxy, objs: dict[str, bytes], rnd: random.Random) -> None:  # type: ignore[no-untyped-def]
    for name, data in objs.items():
        assert proxy.get("vol", name) == data, name
        for _ in range(4):
            off = rnd.randrange(len(data))
            n = rnd.randrange(min(len(data) - off, 300 * KiB) + 1)
            assert proxy.get_range("vol", name, off, n) == data[off:off + n], (name, off, n)


@pytest.mark.parametrize("comp,enc", [("none", "none"), ("zstd", "aes-256-gcm"), ("lz4", "none")])
def test_data_survives_wiping_any_m_asds(cluster: AsdCluster, tmp_path: Path, comp: str, enc: str) -> None:
    rnd = random.Random(1)
    proxy = make_proxy(cluster, tmp_path / "st", compression=comp, encryption=enc)
    try:
        objs = _objects(proxy, rnd)
        for pair in [(0, 1), (2, 5), (3, 4)]:
            for i in pair:
                cluster.wipe(i)
            proxy.drop_caches()
            _check(proxy, objs, rnd)
            report = proxy.maintenance.repair()
            assert report["full_redundancy"], report
            assert proxy.status()["degraded_objects"] == 0
    finally:
        proxy.close()


def test_corrupt_fragments_are_decoded_around_and_repaired(cluster: AsdCluster, tmp_path: Path) -> None:
    rnd = random.Random(2)
    proxy = make_proxy(cluster, tmp_path / "st")
    try:
        objs = _objects(proxy, rnd)
        assert cluster.corrupt(1, rnd) + cluster.corrupt(4, rnd) > 0
        _check(proxy, objs, rnd)
        assert proxy.maintenance.repair()["fragments_rebuilt"] > 0
        cluster.wipe(0)
        cluster.wipe(2)  # m other ASDs: still readable after the repair
        proxy.drop_caches()
        _check(proxy, objs, rnd)
    finally:
        proxy.close()


def test_repair_restores_full_redundancy_after_losing_asds(cluster: AsdCluster, tmp_path: Path) -> None:
    rnd = random.Random(3)
    cluster.start_many(2)  # 8 ASDs: room to rebuild elsewhere
    proxy = make_proxy(cluster, tmp_path / "st")
    try:
        objs = _objects(proxy, rnd, 8)
        cluster.kill(0)
        cluster.kill(3)
        _check(proxy, objs, rnd)
        seen = []
        report = proxy.maintenance.repair(progress=seen.append)
        assert report["full_redundancy"] and report["fragments_rebuilt"] > 0 and seen
        st = proxy.status()
        assert st["asds_down"] == 2 and st["degraded_objects"] == 0
        for i in (1, 5):
            cluster.wipe(i)
        proxy.drop_caches()
        _check(proxy, objs, rnd)
    finally:
        proxy.close()


def test_automatic_repair_after_down_timeout(cluster: AsdCluster, tmp_path: Path) -> None:
    rnd = random.Random(4)
    cluster.start_many(1)
    proxy = make_proxy(cluster, tmp_path / "st", down_timeout=1.0)
    proxy.maintenance.interval = 0.3
    try:
        objs = _objects(proxy, rnd, 4)
        cluster.kill(2)
        deadline = time.time() + 30
        while time.time() < deadline:
            st = proxy.status()
            if st["asds_down"] == 1 and all(
                    not ({a["asd_id"] for a in st["asds"] if not a["up"]} & m.used_asds())
                    for _, _, m in proxy.index.items()):
                break
            time.sleep(0.3)
        else:
            pytest.fail("fragments of the dead ASD were not rebuilt")
        cluster.wipe(0)
        cluster.wipe(1)
        proxy.drop_caches()
        _check(proxy, objs, rnd)
    finally:
        proxy.close()


def test_no_plaintext_on_asds_with_encryption(cluster: AsdCluster, tmp_path: Path) -> None:
    marker = b"OVSFS-SECRET-PATTERN-0123456789"
    proxy = make_proxy(cluster, tmp_path / "st", encryption="aes-256-gcm")
    try:
        proxy.create_namespace("vol")
        data = marker * 40000
        proxy.put("vol", "sco/1", data)
        proxy.put("vol", "small", marker)
        assert proxy.get("vol", "sco/1") == data
    finally:
        proxy.close()
    for i in cluster.addrs:
        for f in (cluster.dir(i)).rglob("*"):
            if f.is_file():
                assert marker not in f.read_bytes() and marker[:12] not in f.read_bytes(), f
    assert (tmp_path / "st" / "keys.json").stat().st_mode & 0o077 == 0
    # Without the key file the data cannot be read back.
    (tmp_path / "st" / "keys.json").unlink()
    proxy = make_proxy(cluster, tmp_path / "st2", encryption="aes-256-gcm")
    try:
        with pytest.raises(Exception):
            proxy.get("vol", "sco/1")
    finally:
        proxy.close()


def test_c_below_k_plus_m_keeps_writing_with_a_dead_asd(cluster: AsdCluster, tmp_path: Path) -> None:
    rnd = random.Random(5)
    proxy = make_proxy(cluster, tmp_path / "st", policy=Policy(4, 2, 5, 1))
    try:
        proxy.create_namespace("vol")
        cluster.kill(5)
        # The proxy has not noticed yet: placement still picks the dead ASD, c=5 acks anyway.
        objs = {}
        for i in range(6):
            objs[f"o{i}"] = rnd.randbytes(512 * KiB)
            proxy.put("vol", f"o{i}", objs[f"o{i}"])
        for name, data in objs.items():
            assert proxy.get("vol", name) == data
        cluster.start(5)
        proxy.asds.refresh()
        for c in proxy.asds.all():
            c.retry_after = 0
        assert proxy.maintenance.repair()["full_redundancy"]
        assert proxy.status()["degraded_objects"] == 0
    finally:
        proxy.close()


def test_killing_asds_during_writes_and_reads(cluster: AsdCluster, tmp_path: Path) -> None:
    rnd = random.Random(6)
    cluster.start_many(2)
    proxy = make_proxy(cluster, tmp_path / "st", policy=Policy(4, 2, 5, 1))
    written: dict[str, bytes] = {}
    errors: list[BaseException] = []
    stop = threading.Event()
    proxy.create_namespace("vol")

    def writer() -> None:
        r = random.Random(7)
        i = 0
        while not stop.is_set():
            data = r.randbytes(r.choice([8 * KiB, 300 * KiB, 1 * MiB]))
            try:
                proxy.put("vol", f"w{i}", data)
                written[f"w{i}"] = data
            except Exception as e:  # noqa: BLE001
                errors.append(e)
            i += 1

    def reader() -> None:
        r = random.Random(8)
        while not stop.is_set():
            if not written:
                continue
            name = r.choice(list(written))
            data = written[name]
            off = r.randrange(len(data))
            try:
                assert proxy.get_range("vol", name, off, min(4096, len(data) - off)) == data[off:off + 4096]
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        cluster.kill(1)
        time.sleep(1)
        cluster.kill(6)
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    try:
        assert not errors, errors[:3]
        assert len(written) > 5
        proxy.drop_caches()
        for name, data in written.items():
            assert proxy.get("vol", name) == data
        assert proxy.maintenance.repair()["full_redundancy"]
    finally:
        proxy.close()


def test_add_and_remove_asds_under_load(cluster: AsdCluster, tmp_path: Path) -> None:
    rnd = random.Random(9)
    proxy = make_proxy(cluster, tmp_path / "st", policy=Policy(4, 2, 6, 1))
    try:
        objs = _objects(proxy, rnd, 10)
        errors: list[BaseException] = []
        stop = threading.Event()

        def load() -> None:
            r = random.Random(10)
            i = 0
            while not stop.is_set():
                name = f"load{i % 5}"
                data = r.randbytes(200 * KiB)
                try:
                    proxy.put("vol", name, data)
                    objs[name] = data
                    assert proxy.get("vol", r.choice(list(objs))) is not None
                except Exception as e:  # noqa: BLE001
                    errors.append(e)
                i += 1

        t = threading.Thread(target=load)
        t.start()
        try:
            new = cluster.start_many(2)
            for a in new:
                proxy.asds.add(a)
            moved = proxy.maintenance.rebalance()
            assert moved["fragments_moved"] > 0
            victim = proxy.asds.find(cluster.addrs[0])
            proxy.maintenance.drain(victim.asd_id)
            victim2 = proxy.asds.find(cluster.addrs[3])
            proxy.maintenance.drain(victim2.asd_id)
        finally:
            stop.set()
            t.join()
        assert not errors, errors[:3]
        for name in ("vol",):
            pass
        cluster.kill(0)
        cluster.kill(3)  # drained: nothing may depend on them any more
        assert proxy.status()["degraded_objects"] == 0
        proxy.drop_caches()
        _check(proxy, objs, rnd)
        cluster.wipe(1)
        cluster.wipe(2)
        proxy.drop_caches()
        _check(proxy, objs, rnd)
    finally:
        proxy.close()


def test_drain_moves_a_put_that_placed_on_the_asd_before_it_began(
        cluster: AsdCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A put that chose its ASDs just before a drain began installs its manifest after the
    drain's pass over the objects: the drain must still move it before forgetting the ASD."""
    from ovsfs.backend.writer import ObjectWriter

    cluster.start_many(1)  # 7 ASDs: room to move a fragment
    proxy = make_proxy(cluster, tmp_path / "st", policy=Policy(4, 2, 6, 1))
    try:
        objs = _objects(proxy, random.Random(12), 4)
        placed, release = threading.Event(), threading.Event()
        held: list = []
        write_object = ObjectWriter.write_object

        def slow_write_object(self, data, preset, guard=None):  # type: ignore[no-untyped-def]
            man, writes = write_object(self, data, preset, guard)
            if not held:  # every fragment is stored; the manifest is not installed yet
                held.append(man)
                placed.set()
                release.wait(30)
            return man, writes

        monkeypatch.setattr(ObjectWriter, "write_object", slow_write_object)
        objs["late"] = random.Random(13).randbytes(300 * KiB)
        put = threading.Thread(target=proxy.put, args=("vol", "late", objs["late"]))
        put.start()
        assert placed.wait(30)
        victim = proxy.asds.get(sorted(held[0].used_asds())[0])
        assert victim is not None
        result: list = []
        drain = threading.Thread(target=lambda: result.append(proxy.maintenance.drain(victim.asd_id)))
        drain.start()
        drain.join(1.0)  # the old drain forgot the ASD here, with "late" still to land on it
        release.set()
        put.join()
        drain.join()
        assert result and result[0]["asd"] == victim.asd_id
        assert not [n for _, n, m in proxy.index.items()
                    if victim.asd_id in m.used_asds() | set(m.replica_ids())]
        assert proxy.status()["degraded_objects"] == 0
        cluster.kill(next(i for i, a in cluster.addrs.items() if a == victim.addr))
        proxy.drop_caches()
        _check(proxy, objs, random.Random(14))
    finally:
        proxy.close()


def test_cold_start_rebuilds_manifests_from_asds(cluster: AsdCluster, tmp_path: Path) -> None:
    rnd = random.Random(11)
    proxy = make_proxy(cluster, tmp_path / "st")
    objs = _objects(proxy, rnd)
    proxy.put("vol", "sco/0000", b"new version")
    objs["sco/0000"] = b"new version"
    proxy.delete("vol", "sco/0001")
    del objs["sco/0001"]
    proxy.create_namespace("empty")
    proxy.close()
    # The node is lost (no local state) and so are m ASDs.
    cluster.kill(0)
    cluster.wipe(4)
    proxy = make_proxy(cluster, tmp_path / "other-node")
    try:
        assert proxy.index.rebuilt
        assert proxy.namespaces() == ["empty", "vol"]
        assert proxy.list("vol") == sorted(objs)
        _check(proxy, objs, rnd)
    finally:
        proxy.close()
