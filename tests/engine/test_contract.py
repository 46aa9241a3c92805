"""The door contract (ovsfs/engine/api.py): the same cases on the in-memory catalog and on
the real engine (`Engine.catalog`), so doors can rely on the contract, not on either one.

Lifecycle rules (issue 10 item 4): delete / rename / rollback of a volume, delete of a
snapshot and shrinking are refused with Busy naming the holder while a handle or job holds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from ovsfs.engine import Capabilities, Holder, VolumeCatalog, VolumeHandle
from ovsfs.engine.engine import Engine
from ovsfs.engine.memory import MemoryCatalog
from ovsfs.errors import AlreadyExists, Busy, InvalidArgument, NotFound, OutOfRange, ReadOnly

from .helpers import small_config

CS = 4096
SIZE = 16 * CS
NBD = Holder("nbd", "127.0.0.1:5555")
FUSE = Holder("fuse", "pid 4242")
JOB = Holder("job", "import job 7")


@pytest.fixture(params=["memory", "engine"])
def cat(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VolumeCatalog]:
    if request.param == "memory":
        yield MemoryCatalog()
        return
    eng = Engine(small_config(tmp_path))
    eng.open()
    eng.create_vpool("default")
    try:
        yield eng.catalog
    finally:
        eng.close()


def fill(byte: int, n: int = 2 * CS) -> bytes:
    return bytes([byte]) * n


def test_both_implement_the_protocols(cat: VolumeCatalog) -> None:
    assert isinstance(cat, VolumeCatalog)
    cat.create_volume("v", SIZE)
    h = cat.open("v", NBD)
    assert isinstance(h, VolumeHandle)
    assert (h.name, h.volume, h.snapshot, h.holder) == ("v", "v", None, NBD)
    assert h.caps == Capabilities(read_only=False, logical_block_size=512, preferred_block_size=CS,
                                  fua=True, trim=True, write_zeroes=True, extents=True, multi_conn=True)
    assert h.size == SIZE
    h.close()


def test_io_round_trip_and_typed_errors(cat: VolumeCatalog) -> None:
    cat.create_volume("v", SIZE)
    h = cat.open("v", NBD)
    h.writev([(0, fill(1)), (5 * CS + 100, b"xyz")])
    h.flush()
    assert h.readv([(0, 2 * CS), (5 * CS + 100, 3), (9 * CS, 10)]) == [fill(1), b"xyz", bytes(10)]
    assert h.extents(0, 4 * CS)[0] == (0, 2 * CS, True)
    assert h.extents(0, 4 * CS)[-1][2] is False
    h.write_zeroes(0, CS)
    h.trim(CS, CS)
    assert h.readv([(0, 2 * CS)]) == [bytes(2 * CS)]
    with pytest.raises(OutOfRange):
        h.readv([(SIZE - 1, 2)])
    with pytest.raises(OutOfRange):
        h.writev([(SIZE, b"x")])
    with pytest.raises(NotFound):
        cat.open("nope", NBD)
    with pytest.raises(NotFound):
        cat.open("v@nope", NBD)
    ro = cat.open("v", FUSE, read_only=True)
    assert ro.caps.read_only
    with pytest.raises(ReadOnly):
        ro.writev([(0, b"x")])
    ro.close()
    h.close()
    h.close()   # idempotent
    with pytest.raises(Busy):
        h.readv([(0, 1)])


def test_snapshot_handle_is_read_only_pinned_and_protects_its_snapshot(cat: VolumeCatalog) -> None:
    """Issue case: a snapshot exported over NBD could be deleted under the client, and after a
    new snapshot of the same name the connection read the new one's data."""
    cat.create_volume("v", SIZE)
    w = cat.open("v", FUSE)
    w.writev([(0, fill(0xAA))])
    cat.create_snapshot("v", "s")
    w.writev([(0, fill(0xBB))])
    h = cat.open("v@s", NBD)
    assert (h.name, h.volume, h.snapshot) == ("v@s", "v", "s")
    assert h.caps.read_only
    with pytest.raises(ReadOnly):
        h.writev([(0, b"x")])
    with pytest.raises(Busy, match=r"snapshot v@s.*nbd client 127\.0\.0\.1:5555"):
        cat.delete_snapshot("v", "s")
    assert [s["holders"] for s in cat.list_snapshots("v")] == [["nbd client 127.0.0.1:5555"]]
    assert cat.holders("v@s") == [NBD]
    assert cat.holders("v") == sorted([NBD, FUSE], key=str)   # a volume's holders include its snapshots'
    # The volume changes and grows; the snapshot handle keeps reading the snapshot.
    w.writev([(0, fill(0xCC))])
    cat.resize_volume("v", 2 * SIZE)
    assert h.size == SIZE
    assert h.readv([(0, 2 * CS)]) == [fill(0xAA)]
    h.close()
    cat.delete_snapshot("v", "s")
    cat.create_snapshot("v", "s")          # same name, other data
    with pytest.raises(Busy):
        h.readv([(0, 1)])                  # the closed handle never reads the new one
    h2 = cat.open("v@s", NBD)
    assert h2.readv([(0, 2 * CS)]) == [fill(0xCC)]
    h2.close()
    w.close()


def test_rollback_refused_while_the_volume_is_held(cat: VolumeCatalog) -> None:
    """Issue case: rollback was accepted while an NBD client or an open FUSE file used the volume."""
    cat.create_volume("v", SIZE)
    h = cat.open("v", NBD)
    h.writev([(0, fill(1))])
    cat.create_snapshot("v", "s")
    h.writev([(0, fill(2))])
    with pytest.raises(Busy, match=r"roll back volume v to s: in use by nbd client 127\.0\.0\.1:5555"):
        cat.rollback("v", "s")
    assert h.readv([(0, 2 * CS)]) == [fill(2)]
    h.close()
    f = cat.open("v", FUSE)
    with pytest.raises(Busy, match="fuse client pid 4242"):
        cat.rollback("v", "s")
    f.close()
    # A handle on a snapshot the rollback would drop keeps it too; one on an older one does not.
    cat.create_snapshot("v", "later")
    later = cat.open("v@later", NBD)
    with pytest.raises(Busy, match="nbd client"):
        cat.rollback("v", "s")
    later.close()
    older = cat.open("v@s", NBD)
    cat.rollback("v", "s")
    assert [s["name"] for s in cat.list_snapshots("v")] == ["s"]
    older.close()
    h = cat.open("v", NBD)
    assert h.readv([(0, 2 * CS)]) == [fill(1)]
    h.close()


def test_delete_and_rename_refused_while_held_by_handle_or_job(cat: VolumeCatalog) -> None:
    cat.create_volume("v", SIZE)
    h = cat.open("v", NBD)
    with pytest.raises(Busy, match=r"delete volume v: in use by nbd client 127\.0\.0\.1:5555"):
        cat.delete_volume("v")
    with pytest.raises(Busy, match="rename volume v: in use by nbd client"):
        cat.rename_volume("v", "w")
    h.close()
    with cat.hold("v", JOB):
        assert cat.holders("v") == [JOB]
        assert cat.info("v")["holders"] == ["import job 7"]
        with pytest.raises(Busy, match=r"in use by import job 7$"):
            cat.delete_volume("v")
        with pytest.raises(Busy, match="import job 7"):
            cat.rollback("v", cat.create_snapshot("v", "s")["name"])
    assert cat.holders("v") == []
    cat.rename_volume("v", "w")
    assert cat.info("w")["name"] == "w"
    cat.delete_volume("w")
    with pytest.raises(NotFound):
        cat.info("w")


def test_a_snapshot_held_by_a_job_cannot_be_deleted(cat: VolumeCatalog) -> None:
    cat.create_volume("v", SIZE)
    cat.create_snapshot("v", "s")
    with cat.hold("v@s", Holder("job", "export job 3")):
        with pytest.raises(Busy, match="snapshot v@s: in use by export job 3"):
            cat.delete_snapshot("v", "s")
        with pytest.raises(Busy, match="export job 3"):
            cat.delete_volume("v")
    cat.delete_snapshot("v", "s")


def test_shrink_refused_while_held_grow_allowed(cat: VolumeCatalog) -> None:
    cat.create_volume("v", SIZE)
    h = cat.open("v", NBD)
    h.writev([(0, fill(1))])
    cat.resize_volume("v", 2 * SIZE)                 # growing under a client is fine
    assert h.size == 2 * SIZE
    with pytest.raises(Busy, match=r"shrink volume v: in use by nbd client"):
        cat.resize_volume("v", SIZE)
    f = cat.open("v", FUSE)
    with pytest.raises(Busy, match="shrink volume v: in use by nbd client"):
        f.resize(SIZE)                               # another holder: refused
    h.close()
    f.resize(4 * CS)                                 # the only holder truncates, data past the end goes
    f.resize(8 * CS)
    assert f.readv([(0, 8 * CS)]) == [fill(1) + bytes(6 * CS)]
    f.writev([(6 * CS, b"z")])
    f.close()
    with pytest.raises(InvalidArgument):             # unheld: still not below written data
        cat.resize_volume("v", 4 * CS)
    cat.resize_volume("v", 7 * CS)
    assert cat.info("v")["size"] == 7 * CS


def test_name_reservations_one_name_one_object(cat: VolumeCatalog) -> None:
    cat.create_volume("v", SIZE)
    with pytest.raises(AlreadyExists):
        cat.reserve_name("v", FUSE)
    cat.reserve_name("new.raw", FUSE)
    cat.reserve_name("new.raw", FUSE)               # again by the same holder: no-op
    with pytest.raises(AlreadyExists):
        cat.reserve_name("new.raw", NBD)
    assert cat.reservations() == [{"name": "new.raw", "vpool": "default", "holder": "fuse client pid 4242"}]
    assert cat.reservations("other") == []
    with pytest.raises(AlreadyExists, match="new.raw"):
        cat.create_volume("new.raw", SIZE)
    with pytest.raises(AlreadyExists):
        cat.rename_volume("v", "new.raw")
    cat.create_snapshot("v", "s")
    with pytest.raises(AlreadyExists):
        cat.clone_volume("v", "s", "new.raw")
    assert [v["name"] for v in cat.list_volumes()] == ["v"]
    # The holder turns its reservation into the volume.
    cat.create_volume("new.raw", SIZE, holder=FUSE)
    assert cat.reservations() == []
    assert [v["name"] for v in cat.list_volumes()] == ["new.raw", "v"]
    cat.reserve_name("tmp", FUSE)
    cat.release_name("tmp", NBD)                     # not its holder: nothing happens
    assert [r["name"] for r in cat.reservations()] == ["tmp"]
    cat.release_name("tmp", FUSE)
    assert cat.reservations() == []
    cat.create_volume("tmp", SIZE)
    with pytest.raises(NotFound):
        cat.reserve_name("x", FUSE, vpool="nopool")
    with pytest.raises(InvalidArgument):
        cat.reserve_name("bad/name", FUSE)


def test_clone_reads_the_snapshot_and_protects_it(cat: VolumeCatalog) -> None:
    cat.create_volume("v", SIZE)
    h = cat.open("v", NBD)
    h.writev([(0, fill(7))])
    cat.create_snapshot("v", "s")
    h.writev([(0, fill(8))])
    info = cat.clone_volume("v", "s", "c")
    assert info["parent"] == "v@s"
    c = cat.open("c", FUSE)
    assert c.readv([(0, 2 * CS)]) == [fill(7)]
    c.close()
    with pytest.raises(Busy, match="clones"):
        cat.delete_snapshot("v", "s")
    h.close()


def test_engine_snapshot_handle_never_reads_another_snapshot(tmp_path: Path) -> None:
    """The pin holds even on a path around the catalog: a snapshot deleted and taken again
    under the same name (here through the Volume directly) makes the old handle fail, not
    read the new snapshot's data."""
    eng = Engine(small_config(tmp_path))
    eng.open()
    try:
        eng.create_vpool("default")
        cat = eng.catalog
        cat.create_volume("v", SIZE)
        w = cat.open("v", FUSE)
        w.writev([(0, fill(1))])
        cat.create_snapshot("v", "s")
        h = cat.open("v@s", NBD)
        w.writev([(0, fill(2))])
        vol = eng.volume("v")
        vol.delete_snapshot("s")          # bypasses the catalog's rules on purpose
        vol.create_snapshot("s")
        with pytest.raises(NotFound, match="v@s"):
            h.readv([(0, CS)])
        with pytest.raises(NotFound):
            h.extents(0, CS)
        h.close()
        assert cat.open("v@s", NBD).readv([(0, 2 * CS)]) == [fill(2)]
        w.close()
    finally:
        eng.close()


def test_legacy_acquire_is_seen_by_the_rules(tmp_path: Path) -> None:
    """Doors not yet on handles hold with Volume.acquire; the same rules see them."""
    eng = Engine(small_config(tmp_path))
    eng.open()
    try:
        eng.create_vpool("default")
        vol = eng.create_volume("v", SIZE)
        vol.create_snapshot("s")
        vol.acquire("nbd:3")
        with pytest.raises(Busy, match="roll back volume v to s: in use by nbd client 3"):
            eng.catalog.rollback("v", "s")
        vol.release("nbd:3")
        vol.acquire("snapshot:s")
        with pytest.raises(Busy, match="snapshot v@s"):
            eng.catalog.delete_snapshot("v", "s")
        vol.release("snapshot:s")
        assert eng.catalog.holders("v") == []
        eng.catalog.delete_snapshot("v", "s")
    finally:
        eng.close()


# ---- the light records doors use for getattr/readdir/statfs/mkdir -------------------------


def test_stat_is_light_and_follows_renames(cat: VolumeCatalog) -> None:
    cat.create_volume("v", SIZE)
    cat.create_volume("a", 2 * SIZE)
    st = cat.stat("v")
    assert set(st) == {"name", "vpool", "namespace", "size", "created"}
    assert (st["name"], st["vpool"], st["size"]) == ("v", "default", SIZE)
    assert isinstance(st["created"], float) and st["created"] > 0
    assert [s["name"] for s in cat.list_stats()] == ["a", "v"]
    assert cat.list_stats("default")[1] == st
    assert cat.list_stats("nosuchpool") == []
    h = cat.open("v", FUSE)
    cat.rename_volume("a", "b")     # namespace is kept across a rename, size is live
    h.resize(2 * SIZE)
    assert cat.stat("v")["size"] == 2 * SIZE
    assert cat.stat("b")["namespace"] != st["namespace"]
    assert cat.stat("v")["namespace"] == st["namespace"]
    h.close()
    with pytest.raises(NotFound):
        cat.stat("a")


def test_vpools_are_listed_and_created(cat: VolumeCatalog) -> None:
    cat.create_volume("v", SIZE)
    rec = cat.create_vpool("p2", sco_clusters=64)
    assert (rec["name"], rec["sco_clusters"], rec["cluster_size"]) == ("p2", 64, CS)
    pools = cat.list_vpools()
    assert [(p["name"], p["volumes"]) for p in pools] == [("default", 1), ("p2", 0)]
    assert cat.vpool("p2")["sco_clusters"] == 64
    with pytest.raises(AlreadyExists):
        cat.create_vpool("p2")
    with pytest.raises(InvalidArgument):
        cat.create_vpool("bad/name")
    with pytest.raises(InvalidArgument):
        cat.create_vpool("p3", sco_clusters=70000)
    with pytest.raises(NotFound):
        cat.vpool("nope")
    cat.create_volume("w", SIZE, "p2")
    assert [s["name"] for s in cat.list_stats("p2")] == ["w"]


def test_usage_for_statfs(cat: VolumeCatalog) -> None:
    u = cat.usage()
    assert set(u) == {"capacity", "free", "block_size", "files"}
    assert u["block_size"] == CS and u["files"] == 0
    assert 0 <= u["free"] <= u["capacity"] and u["capacity"] > 0
    cat.create_volume("v", SIZE)
    cat.create_volume("w", SIZE)
    assert cat.usage()["files"] == 2


def test_stat_answers_while_the_volume_lock_is_held(tmp_path: Path) -> None:
    """getattr at zero FUSE timeouts must not queue behind a write or a snapshot holding
    the volume's lock (info would): stat and list_stats take no volume lock."""
    import threading
    eng = Engine(small_config(tmp_path))
    eng.open()
    try:
        eng.create_vpool("default")
        eng.catalog.create_volume("v", SIZE)
        lock = eng.volume("v").lock
        taken, done = threading.Event(), threading.Event()

        def holder() -> None:
            with lock:
                taken.set()
                done.wait(10)
        t = threading.Thread(target=holder)
        t.start()
        taken.wait(5)
        out: list = []
        s = threading.Thread(target=lambda: out.append((eng.catalog.stat("v"), eng.catalog.list_stats())))
        s.start()
        s.join(5)       # generous: it returns in microseconds; blocked, it never would
        blocked = s.is_alive()
        done.set()
        t.join()
        s.join()
        assert not blocked, "stat waited for the volume lock"
        assert out[0][0]["size"] == SIZE and [x["name"] for x in out[0][1]] == ["v"]
    finally:
        eng.close()


def test_the_engine_offers_what_the_management_api_needs(tmp_path: Path) -> None:
    """The management API holds the engine only as NodeMaintenance (+ its catalog)."""
    from ovsfs.engine.api import NodeMaintenance
    eng = Engine(small_config(tmp_path))
    eng.open()
    try:
        eng.create_vpool("default")
        h = eng.catalog.open(eng.catalog.create_volume("v", 4 * CS)["name"], FUSE)
        h.writev([(0, fill(1))])
        h.writev([(0, fill(2))])            # the first write's clusters become garbage
        h.close()
        assert isinstance(eng, NodeMaintenance)
        assert eng.stats()["volumes"] == 1 and eng.stats()["failed_volumes"] == []
        eng.sync_volume("v", timeout=30)
        (res,) = eng.scrub("v")
        assert res["volume"] == "v" and res["live_clusters"] == 2
        assert eng.drop_cache() >= 0
        assert eng.catalog.open("v", FUSE).readv([(0, 2 * CS)]) == [fill(2)]
    finally:
        eng.close()


def test_a_name_is_reserved_in_one_vpool_only(cat: VolumeCatalog) -> None:
    """Names are global: the holder that reserved one in a vPool cannot take it in another."""
    cat.create_vpool("p2")
    cat.reserve_name("r", FUSE, "p2")
    cat.reserve_name("r", FUSE, "p2")                 # again, same vPool: a no-op
    with pytest.raises(AlreadyExists, match="being created in vPool p2"):
        cat.reserve_name("r", FUSE, "default")
    assert [(r["name"], r["vpool"]) for r in cat.reservations()] == [("r", "p2")]
