"""The DTL client against real servers on 127.0.0.1 (in-process, or subprocesses SIGKILLed /
SIGSTOPped by PID): sync and async acknowledgement, flush durability, fencing, degradation,
a new peer caught up, a restarted peer caught up in full, throttling (CONTRACT11.md 2)."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest

from ovsfs.dtl import wire
from ovsfs.dtl.client import fetch_tail
from ovsfs.errors import Fenced
from tests.dtl.helpers import (LocalLog, Peers, ProcServer, ThreadServer, blob, make_client,
                               pos, wait_for)


@pytest.fixture
def srv(tmp_path: Path):
    s = ThreadServer(tmp_path / "dtl")
    yield s
    s.stop()


def file_entries(root: Path, volume: str = "vol") -> list:
    """What the server's file holds (read from disk, not through the server)."""
    f = root / ("v-" + volume.encode().hex() + ".log")
    if not f.exists():
        return []
    return [(p, b) for _at, p, b in wire.iter_records(f.read_bytes())]


def test_sync_mode_acknowledges_once_the_peer_has_it(srv: ThreadServer, tmp_path: Path) -> None:
    local = LocalLog()
    c, changes = make_client(local, Peers(srv.peer), "sync")
    try:
        wait_for(lambda: c.status()["state"] == "ok", what="in sync")
        for i in range(20):
            t = local.write(pos(i), blob(i))
            c.wait(t)
            # Acknowledged: the peer has written it into its file (page cache) already.
            assert file_entries(tmp_path / "dtl")[-1] == (pos(i), blob(i))
        st = c.status()
        assert st["state"] == "ok" and st["peer"] == "inproc" and st["unsafe_bytes"] == 0
        assert st["peer_incarnation"] == srv.server.incarnation
        assert [ch["state"] for ch in changes] == ["catching up", "ok"]
    finally:
        c.close()


def test_sync_group_commit_with_many_writers(srv: ThreadServer) -> None:
    local = LocalLog()
    c, _ = make_client(local, Peers(srv.peer), "sync")
    wait_for(lambda: c.status()["state"] == "ok", what="in sync")
    counter = iter(range(10**6))
    lock = threading.Lock()

    def writer() -> None:
        for _ in range(50):
            with local.lock:                 # pos order = log order, as under the volume lock
                i = next(counter)
                local.entries.append((pos(i), blob(i, 512)))
                t = c.append(pos(i), blob(i, 512))
            c.wait(t)
            with lock:
                pass

    ths = [threading.Thread(target=writer) for _ in range(16)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    try:
        assert fetch_tail(srv.peer, "vol", 1) == local.entries
        assert c.status()["state"] == "ok"
    finally:
        c.close()


def test_async_ships_within_queue_age_and_flush_is_durable(srv: ThreadServer,
                                                           tmp_path: Path) -> None:
    local = LocalLog()
    c, _ = make_client(local, Peers(srv.peer), "async", queue_age=0.05)
    try:
        wait_for(lambda: c.status()["state"] == "ok", what="in sync")
        local.write(pos(0), blob(0))
        assert c.status()["queued_bytes"] == 4096 and c.status()["unsafe_bytes"] == 4096
        # No flush: the age bound ships it (bound generous: queue_age is 50 ms).
        wait_for(lambda: file_entries(tmp_path / "dtl") == local.entries, 5, "shipped by age")
        for i in range(1, 300):
            local.write(pos(i), blob(i))
        c.flush()
        # After flush everything is in the peer's file (fsynced: read back from disk here).
        assert file_entries(tmp_path / "dtl") == local.entries
        assert c.status()["unsafe_bytes"] == 0 and c.status()["queued_bytes"] == 0
    finally:
        c.close()


def test_fenced_by_fetch_of_a_newer_owner(srv: ThreadServer) -> None:
    local = LocalLog()
    c, changes = make_client(local, Peers(srv.peer), "sync", gen=1)
    try:
        wait_for(lambda: c.status()["state"] == "ok", what="in sync")
        for i in range(5):
            c.wait(local.write(pos(i), blob(i)))
        assert fetch_tail(srv.peer, "vol", 2) == local.entries     # the new owner, gen 2
        t = local.write(pos(5), blob(5))
        with pytest.raises(Fenced):
            c.wait(t)
        assert c.status()["state"] == "fenced"      # not degraded: never another peer
        with pytest.raises(Fenced):
            c.append(pos(6), blob(6))
        with pytest.raises(Fenced):
            c.flush()
        assert "degraded" not in [ch["state"] for ch in changes]
        assert fetch_tail(srv.peer, "vol", 2) == local.entries[:5]   # the old write refused
    finally:
        c.close()


def test_fenced_on_hello_by_the_cluster_generation(tmp_path: Path) -> None:
    s = ThreadServer(tmp_path / "dtl", cluster_gen=lambda v: 3)
    local = LocalLog()
    c, _ = make_client(local, Peers(s.peer), "sync", gen=2)
    try:
        wait_for(lambda: c.status()["state"] == "fenced", what="fenced")
        with pytest.raises(Fenced):
            local.write(pos(0), blob(0))
    finally:
        c.close()
        s.stop()


def test_peer_killed_during_sync_writes_then_new_peer_caught_up(tmp_path: Path) -> None:
    a = ProcServer(tmp_path / "a", name="a")
    b = ProcServer(tmp_path / "b", name="b")
    local = LocalLog()
    peers = Peers(a.peer, b.peer)
    c, changes = make_client(local, peers, "sync", retry_seconds=0.3)
    acked: list[int] = []
    try:
        wait_for(lambda: c.status()["peer"] == "a" and c.status()["state"] == "ok", what="a")
        stop = threading.Event()

        def writer() -> None:
            i = 0
            while not stop.is_set() and i < 3000:
                c.wait(local.write(pos(i), blob(i)))
                acked.append(i)
                i += 1

        th = threading.Thread(target=writer)
        th.start()
        wait_for(lambda: len(acked) > 200, what="writes to a")
        c.trim(pos(100))                         # the first 100 reached the backend
        a.kill()                                 # SIGKILL by PID
        n_kill = len(acked)
        wait_for(lambda: len(acked) > n_kill + 300, 20, "writes acknowledged after the kill")
        wait_for(lambda: c.status()["peer"] == "b" and c.status()["state"] == "ok", 20, "b")
        stop.set()
        th.join(30)
        assert not th.is_alive()
        states = [ch["state"] for ch in changes]
        assert "degraded" in states and states[-1] == "ok"
        c.flush()
        # b holds every entry from the trim point on, byte for byte, in order.
        assert fetch_tail(b.peer, "vol", 1) == [e for e in local.entries if e[0] >= pos(100)]
        assert c.status()["unsafe_bytes"] == 0
    finally:
        c.close()
        a.kill()
        b.kill()


def test_peer_restarted_with_old_state_is_caught_up_in_full(tmp_path: Path) -> None:
    a = ProcServer(tmp_path / "a", name="a")
    local = LocalLog()
    c, changes = make_client(local, Peers(a.peer), "sync", retry_seconds=0.2)
    try:
        wait_for(lambda: c.status()["state"] == "ok", what="in sync")
        for i in range(100):
            c.wait(local.write(pos(i), blob(i)))
        inc1 = c.status()["peer_incarnation"]
        port = a.port
        a.kill()
        # It comes back on the same address with its old files, minus the tail a power loss
        # took from its page cache: it must not be taken as in sync.
        logf = next((tmp_path / "a").glob("v-*.log"))
        data = logf.read_bytes()
        logf.write_bytes(data[: len(data) // 2 + 100])
        for i in range(100, 130):                # acknowledged while a is away
            c.wait(local.write(pos(i), blob(i)))
        assert c.status()["state"] in ("degraded", "standalone")
        a = ProcServer(tmp_path / "a", port=port, name="a")
        wait_for(lambda: c.status()["state"] == "ok", 20, "caught up again")
        assert c.status()["peer_incarnation"] == a.incarnation != inc1
        for i in range(130, 140):
            c.wait(local.write(pos(i), blob(i)))
        assert fetch_tail(a.peer, "vol", 1) == local.entries
        assert [ch["state"] for ch in changes][-2:] == ["catching up", "ok"]
    finally:
        c.close()
        a.kill()


def test_async_queue_full_throttles_writers(tmp_path: Path) -> None:
    a = ProcServer(tmp_path / "a", name="a")
    local = LocalLog()
    qb = 64 << 10
    c, _ = make_client(local, Peers(a.peer), "async", queue_bytes=qb, timeout=30.0)
    done: list[int] = []
    try:
        wait_for(lambda: c.status()["state"] == "ok", what="in sync")
        a.signal(signal.SIGSTOP)                 # the peer stops answering (not gone)
        stop = threading.Event()

        def writer() -> None:
            for i in range(200):
                if stop.is_set():
                    return
                local.write(pos(i), blob(i))
                done.append(i)

        th = threading.Thread(target=writer)
        th.start()
        time.sleep(1.0)
        # The writer waits on a full queue: at most queue_bytes are queued, not 200 entries.
        n = len(done)
        assert n <= qb // 4096 + 1 and th.is_alive()
        assert c.status()["queued_bytes"] <= qb and c.status()["state"] == "ok"
        a.signal(signal.SIGCONT)
        th.join(20)
        assert len(done) == 200
        c.flush()
        assert fetch_tail(a.peer, "vol", 1) == local.entries
    finally:
        stop.set()
        a.kill()
        c.close()


def test_max_bytes_refusal_degrades(tmp_path: Path) -> None:
    s = ThreadServer(tmp_path / "dtl", max_bytes=30 * 4200)
    local = LocalLog()
    c, changes = make_client(local, Peers(s.peer), "sync", retry_seconds=30)
    try:
        wait_for(lambda: c.status()["state"] == "ok", what="in sync")
        for i in range(60):                      # never an error, never a hang
            c.wait(local.write(pos(i), blob(i)))
        st = c.status()
        assert st["state"] == "degraded" and st["unsafe_bytes"] >= 30 * 4096
        c.flush()                                # returns at once when degraded
    finally:
        c.close()
        s.stop()


def test_close_with_drop_forgets_the_tail(srv: ThreadServer) -> None:
    local = LocalLog()
    c, _ = make_client(local, Peers(srv.peer), "sync")
    wait_for(lambda: c.status()["state"] == "ok", what="in sync")
    for i in range(5):
        c.wait(local.write(pos(i), blob(i)))
    c.close(drop=True)
    assert fetch_tail(srv.peer, "vol", 1) == []


def test_standalone_without_a_peer_then_caught_up_when_one_appears(srv: ThreadServer) -> None:
    local = LocalLog()
    peers = Peers()
    c, changes = make_client(local, peers, "sync", retry_seconds=0.1)
    try:
        wait_for(lambda: c.status()["state"] == "standalone", what="standalone")
        for i in range(10):
            c.wait(local.write(pos(i), blob(i)))          # acknowledged, local only
        assert c.status()["unsafe_bytes"] == 10 * 4096
        c.trim(pos(3))                                     # on the backend: safe again
        assert c.status()["unsafe_bytes"] == 7 * 4096
        peers.peers.append(srv.peer)
        wait_for(lambda: c.status()["state"] == "ok", what="caught up")
        assert fetch_tail(srv.peer, "vol", 1) == local.entries[3:]
        assert c.status()["unsafe_bytes"] == 0
        assert [ch["state"] for ch in changes] == ["standalone", "catching up", "ok"]
    finally:
        c.close()


class SlowTail(LocalLog):
    def tail(self, from_pos):
        for e in list(super().tail(from_pos)):
            time.sleep(0.005)
            yield e


def test_writes_during_a_long_catch_up_overflowing_the_queue(srv: ThreadServer) -> None:
    local = SlowTail()
    local.entries = [(pos(i), blob(i)) for i in range(60)]    # already in the local log
    c, _ = make_client(local, Peers(srv.peer), "sync", queue_bytes=16 << 10)
    try:
        for i in range(60, 200):                  # while the catch-up reads the tail slowly
            c.wait(local.write(pos(i), blob(i)))
            time.sleep(0.001)
        wait_for(lambda: c.status()["state"] == "ok", 20, "caught up")
        for i in range(200, 210):
            c.wait(local.write(pos(i), blob(i)))
        assert fetch_tail(srv.peer, "vol", 1) == local.entries
    finally:
        c.close()


def test_owner_moved_elsewhere_is_fenced_by_a_connected_peer(tmp_path: Path) -> None:
    """The new owner never contacted this peer: the cluster generation, rechecked on append,
    fences the old owner anyway (and it halts; it does not degrade)."""
    owner_gen = {"vol": 1}
    s = ThreadServer(tmp_path / "dtl", cluster_gen=lambda v: owner_gen.get(v, 0))
    local = LocalLog()
    c, changes = make_client(local, Peers(s.peer), "sync")
    try:
        wait_for(lambda: c.status()["state"] == "ok", what="in sync")
        c.wait(local.write(pos(0), blob(0)))
        owner_gen["vol"] = 2                      # `volume restart --on` another node
        deadline = time.monotonic() + 10
        with pytest.raises(Fenced):
            for i in range(1, 10**6):
                c.wait(local.write(pos(i), blob(i)))
                assert time.monotonic() < deadline, "never fenced"
                time.sleep(0.01)
        assert c.status()["state"] == "fenced"
        assert "degraded" not in [ch["state"] for ch in changes]
    finally:
        c.close()
        s.stop()
