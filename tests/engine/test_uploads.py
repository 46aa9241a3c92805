"""Upload lanes: one volume whose uploads fail never stops another's (issue 9, case 6);
items retry with backoff and catch up once the fault is lifted; a clean stop with the
backend away is bounded, keeps everything locally and uploads it at the next start.

The faults are injected in a store wrapper (a LocalStore whose puts fail, or hang as an
unanswering backend would, for chosen namespaces and names) - the daemon-level tests in
tests/daemon/test_backend_away.py take real ASD processes away instead.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from ovsfs.backend.local import LocalStore
from ovsfs.config import Config
from ovsfs.engine.engine import Engine
from ovsfs.errors import BackendError, Busy

from .helpers import opened, small_config

CS = 4096
TLOG_CLUSTERS = 8 * 2          # small_config: 8 clusters per SCO, 2 SCOs per TLog


class FaultyStore(LocalStore):
    """A LocalStore whose puts fail (mode "fail") or hang until released (mode "hang")
    for objects of the chosen namespaces whose names start with `prefix`."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.namespaces_: set[str] = set()
        self.prefix = ""
        self.mode = "fail"
        self.released = threading.Event()
        self.failed = 0

    def faulty(self, ns: str, name: str) -> bool:
        return ns in self.namespaces_ and name.startswith(self.prefix)

    def _fault(self, ns: str, name: str) -> None:
        if not self.faulty(ns, name):
            return
        self.failed += 1
        if self.mode == "hang":
            self.released.wait()
        raise BackendError(f"injected: backend refuses {ns}/{name}")

    def put(self, ns: str, name: str, data: bytes | memoryview, gen: int = 0) -> None:
        self._fault(ns, name)
        super().put(ns, name, data, gen=gen)

    def put_file(self, ns: str, name: str, path: Path, gen: int = 0) -> None:
        self._fault(ns, name)
        super().put_file(ns, name, path, gen=gen)

    def lift(self) -> None:
        self.namespaces_.clear()
        self.released.set()


def pattern(tag: int, i: int) -> bytes:
    return bytes([tag]) * 8 + i.to_bytes(4, "little") + bytes(CS - 12)


def fill(vol, tag: int, clusters: int) -> None:
    for i in range(clusters):
        vol.write(i * CS, pattern(tag, i))


def check(vol, tag: int, clusters: int) -> None:
    for i in range(clusters):
        assert vol.read(i * CS, CS) == pattern(tag, i), f"{vol.name} cluster {i}"


def reopen_from_backend_alone(cfg: Config, store: LocalStore, vols: dict[str, tuple[int, int]]) -> None:
    """Drop the local write buffer (maps and all) and check every volume rebuilt from the backend."""
    shutil.rmtree(cfg.path(cfg.engine.write_buffer))
    eng = Engine(cfg, store)
    eng.open()
    try:
        for name, (tag, n) in vols.items():
            check(eng.volume(name), tag, n)
    finally:
        eng.close()


def test_a_failing_checkpoint_upload_blocks_no_other_volume(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, upload_retry_max_seconds=0.2)
    store = FaultyStore(cfg.path(cfg.backend.path))
    eng = Engine(cfg, store)
    eng.open()
    try:
        eng.create_vpool("default")
        a = eng.create_volume("a", 128 * CS)
        b = eng.create_volume("b", 128 * CS)
        store.namespaces_, store.prefix = {a.ns}, "checkpoint/"
        # Three TLogs: a map checkpoint is queued after the second (backend_checkpoint_tlogs=2).
        fill(a, 1, 3 * TLOG_CLUSTERS)
        fill(b, 2, 3 * TLOG_CLUSTERS)
        b.sync(timeout=10)      # case 6: this waited forever behind a's checkpoint
        assert store.failed >= 1, "the fault never fired: the test did not test anything"
        with pytest.raises(BackendError):
            a.sync(timeout=0.5)
        st = eng.wb.status()
        lane = st["lanes"]["a"]
        assert lane["errors"] >= 1 and "checkpoint" in lane["last_error"] and lane["last_error_at"] > 0
        assert "b" not in st["lanes"], "b had nothing queued and no error"
        store.lift()
        a.sync(timeout=10)      # the retried checkpoint goes with the snapshot it was queued with
        assert [n for n in store.list(a.ns) if n.startswith("checkpoint/")]
    finally:
        eng.close()
    reopen_from_backend_alone(cfg, store, {"a": (1, 3 * TLOG_CLUSTERS), "b": (2, 3 * TLOG_CLUSTERS)})


def test_a_volume_whose_uploads_fail_catches_up_and_the_others_go_on(tmp_path: Path) -> None:
    # Room for all of it: a's uploads are refused, the others must not wait behind them.
    cfg = small_config(tmp_path, upload_retry_max_seconds=0.2, upload_workers=2, write_buffer_size=8 << 20)
    store = FaultyStore(cfg.path(cfg.backend.path))
    eng = Engine(cfg, store)
    eng.open()
    try:
        eng.create_vpool("default")
        vols = [eng.create_volume(name, 128 * CS) for name in ("a", "b", "c")]
        store.namespaces_ = {vols[0].ns}      # every put of a: SCOs, TLogs, checkpoints
        for tag, vol in enumerate(vols, 1):
            fill(vol, tag, 3 * TLOG_CLUSTERS)
        for vol in vols[1:]:
            vol.sync(timeout=10)
        assert eng.wb.status()["lanes"]["a"]["queued"] > 0
        time.sleep(0.5)                       # a few more failed tries, with backoff
        st = eng.wb.status()
        assert st["lanes"]["a"]["errors"] >= 2 and st["upload_errors"] == st["lanes"]["a"]["errors"]
        # Writes go on meanwhile (the buffer has room), to every volume.
        fill(vols[1], 5, 2 * TLOG_CLUSTERS)
        vols[1].sync(timeout=10)
        store.lift()
        vols[0].sync(timeout=10)
        assert eng.wb.drain(timeout=10)
        assert eng.wb.status()["queued"] == 0
    finally:
        eng.close()
    reopen_from_backend_alone(cfg, store, {"a": (1, 3 * TLOG_CLUSTERS), "b": (5, 2 * TLOG_CLUSTERS),
                                           "c": (3, 3 * TLOG_CLUSTERS)})


def test_close_with_the_backend_away_is_bounded_and_the_backlog_uploads_at_restart(tmp_path: Path) -> None:
    stop_timeout = 2.0
    # The buffer holds 4 SCOs: writers soon wait for room that never comes while the backend hangs.
    cfg = small_config(tmp_path, stop_timeout=stop_timeout, upload_retry_max_seconds=0.2)
    store = FaultyStore(cfg.path(cfg.backend.path))
    eng = Engine(cfg, store)
    eng.open()
    written: list[int] = []
    outcome: list[BaseException | None] = []
    try:
        eng.create_vpool("default")
        vol = eng.create_volume("v", 256 * CS)
        other = eng.create_volume("w", 64 * CS)
        fill(other, 9, 16)                   # on the backend side only v hangs
        store.namespaces_, store.mode = {vol.ns}, "hang"

        def writer() -> None:
            try:
                for i in range(256):
                    vol.write(i * CS, pattern(7, i))
                    written.append(i)
                outcome.append(None)
            except BaseException as e:  # noqa: BLE001 - handed to the test thread
                outcome.append(e)

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        deadline = time.monotonic() + 10
        while eng.wb.status()["pending_bytes"] + CS <= eng.wb.limit and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert t.is_alive() and len(written) < 256, "the writer should wait for room"
        other.flush()
        vol.flush()
        start = time.monotonic()
        eng.close()
        took = time.monotonic() - start
        t.join(5)
        assert not t.is_alive(), "a writer waiting for room must be woken at stop"
        assert outcome and (outcome[0] is None or isinstance(outcome[0], Busy)), outcome
        # Generous bound: stop_timeout plus slack for a loaded 2-core machine.
        assert took < stop_timeout + 3, f"close took {took:.1f} s with the backend away"
    finally:
        store.lift()   # abandoned uploads finish (into the backend) and their threads end
    # Restart on a backend that answers: everything acknowledged is there, and the backlog
    # uploads (then the backend alone holds it).
    acknowledged = len(written)
    with opened(cfg) as eng2:
        v2 = eng2.volume("v")
        check(v2, 7, acknowledged)
        check(eng2.volume("w"), 9, 16)
        v2.sync(timeout=10)
        eng2.volume("w").sync(timeout=10)
    reopen_from_backend_alone(cfg, store, {"v": (7, acknowledged), "w": (9, 16)})


def test_lanes_order_backoff_supersede_and_stop(tmp_path: Path) -> None:
    """The queue itself: order within a lane, independence across lanes, a waiting item of
    the same kind superseded (its inputs released), and a stop that gives up early on a
    lane that keeps failing, leaving its items for the next start."""
    from ovsfs.engine.uploads import UploadQueues

    cv = threading.Condition()
    q = UploadQueues(cv, workers=2, retry_min=0.01, retry_max=0.05)
    done: list[str] = []
    broken = {"on": True}

    def ok(name: str):
        return lambda: done.append(name)

    def flaky(name: str):
        def run() -> None:
            if broken["on"]:
                raise BackendError("injected")
            done.append(name)
        return run

    released: list[str] = []
    q.submit("a1", flaky("a1"), owner="A")
    q.submit("a-cp1", ok("a-cp1"), owner="A", kind="checkpoint", on_drop=lambda: released.append("a-cp1"))
    q.submit("a2", ok("a2"), owner="A")
    q.submit("a-cp2", ok("a-cp2"), owner="A", kind="checkpoint", on_drop=lambda: released.append("a-cp2"))
    for i in range(5):
        q.submit(f"b{i}", ok(f"b{i}"), owner="B")
    assert q.drain(timeout=5, owner="B"), "lane B waits for nothing of lane A"
    assert done == [f"b{i}" for i in range(5)]
    assert released == ["a-cp1"], "the older waiting checkpoint is superseded"
    assert not q.drain(timeout=0.2, owner="A")
    st = q.status()
    assert st["lanes"]["A"]["errors"] >= 2 and st["lanes"]["A"]["head"] == "a1"
    broken["on"] = False
    assert q.drain(timeout=5)
    assert done[5:] == ["a1", "a2", "a-cp2"], "order within a lane is kept"
    broken["on"] = True
    q.submit("a3", flaky("a3"), owner="A")
    q.submit("a-cp3", ok("a-cp3"), owner="A", kind="checkpoint", on_drop=lambda: released.append("a-cp3"))
    start = time.monotonic()
    assert q.stop(timeout=10) == 2, "what failed stays queued for the next start"
    assert time.monotonic() - start < 5, "stop gives up once every lane left failed again"
    assert released == ["a-cp1", "a-cp3"]
    q.join(5)
    assert not any(t.is_alive() for t in q.threads)
