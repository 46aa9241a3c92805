"""Ownership at engine level (issue 11): a volume written by one owner is restarted by
another from the shared backend plus the DTL tail; generations fence the old owner.

The DTL here is an in-process peer (`MemoryPeer`) that keeps entries by position and
honours trims exactly as the network DTL does; the network DTL has its own tests
(tests/dtl). Both engines share one backend directory and one registry, as two nodes
on one machine do.
"""

from __future__ import annotations

import random
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ovsfs.backend.local import LocalStore
from ovsfs.cluster.store import ConfigStore
from ovsfs.engine.engine import Engine
from ovsfs.engine import tail
from ovsfs.engine.owners import GEN_SHIFT
from ovsfs.errors import Fenced, NotOwner

from .helpers import crash, small_config

CS = 4096
SIZE = 64 * CS


class MemoryPeer:
    """One DTL peer's copy of every volume's tail, by log position."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: dict[str, dict[tuple[int, int], bytes]] = {}
        self.gen_seen: dict[str, int] = {}

    def tail(self, ns: str, gen: int) -> list[tuple[tuple[int, int], bytes]]:
        with self.lock:
            self.gen_seen[ns] = max(self.gen_seen.get(ns, 0), gen)
            return sorted(self.entries.get(ns, {}).items())


class PeerSink:
    mode = "sync"

    def __init__(self, peer: MemoryPeer, ns: str, gen: int) -> None:
        self.peer, self.ns, self.gen = peer, ns, gen

    def _check(self) -> None:
        if self.peer.gen_seen.get(self.ns, 0) > self.gen:
            raise Fenced(f"{self.ns}: generation {self.gen} is older than {self.peer.gen_seen[self.ns]}")

    def append(self, pos: tuple[int, int], blob: bytes) -> object:
        with self.peer.lock:
            self._check()
            self.peer.entries.setdefault(self.ns, {})[pos] = blob
        return pos

    def wait(self, ticket: object) -> None:
        with self.peer.lock:
            self._check()

    def flush(self) -> None:
        self.wait(None)

    def trim(self, pos: tuple[int, int]) -> None:
        with self.peer.lock:
            if self.peer.gen_seen.get(self.ns, 0) > self.gen:
                return
            held = self.peer.entries.get(self.ns, {})
            for p in [p for p in held if p < pos]:
                del held[p]

    def status(self) -> dict[str, Any]:
        return {"mode": "sync", "peer": "memory", "state": "ok", "unsafe_bytes": 0}

    def close(self, drop: bool = False) -> None:
        if drop:
            with self.peer.lock:
                self.peer.entries.pop(self.ns, None)


class Role:
    """Ownership as a test decides it: ns -> generation for this node (absent: not ours)."""

    def __init__(self, peer: MemoryPeer, gens: dict[str, int]) -> None:
        self.peer, self.gens = peer, gens

    def owned(self, ns: str) -> int | None:
        return self.gens.get(ns)

    def claim_new(self, ns: str) -> int:
        self.gens[ns] = 1
        return 1

    def dtl_sink(self, vol: Any) -> PeerSink:
        return PeerSink(self.peer, vol.ns, vol.gen)

    def lease(self, vol: Any) -> None:
        return None   # the tests decide ownership; the node lease is tested in tests/nodes

    def forget(self, ns: str) -> None:
        self.gens.pop(ns, None)

    def owner_of(self, ns: str) -> str | None:
        return "the other node"


def node(tmp: Path, name: str, peer: MemoryPeer, gens: dict[str, int]) -> Engine:
    cfg = small_config(tmp / name)
    eng = Engine(cfg, store=LocalStore(tmp / "backend"), registry=ConfigStore(tmp / "registry.db"),
                 role=Role(peer, gens))
    eng.open()
    return eng


def lose(eng: Engine) -> None:
    """The node and its disk are gone: a crash, then its write buffer deleted."""
    crash(eng)
    shutil.rmtree(eng.wb_root)


def test_restart_elsewhere_has_every_acknowledged_write(tmp_path: Path) -> None:
    peer = MemoryPeer()
    a = node(tmp_path, "a", peer, {})
    a.create_vpool("default")
    vol = a.create_volume("v", SIZE)
    model = bytearray(SIZE)
    rnd = random.Random(7)
    for i in range(300):
        # 512-byte and 4 KiB writes overlapping, so replay order matters sector by sector.
        n = rnd.choice([512, 4096, 8192])
        off = rnd.randrange(0, SIZE - n, 512)
        data = bytes([i % 251 + 1]) * n
        vol.write(off, data)
        model[off:off + n] = data
        if i == 150:
            vol.trim(8 * CS, 4 * CS)
            model[8 * CS:12 * CS] = bytes(4 * CS)
            vol.create_snapshot("s1")
    lose(a)
    b = node(tmp_path, "b", peer, {})
    b.role.gens[vol.ns] = 2  # type: ignore[attr-defined]
    got = b.take_volume("v", 2, peer.tail(vol.ns, 2))
    assert got.read(0, SIZE) == bytes(model)
    assert [s["name"] for s in got.list_snapshots()] == ["s1"]
    # The new owner's objects are numbered in its own generation.
    assert got.next_sco >> GEN_SHIFT == 2 and got.next_tlog >> GEN_SHIFT == 2
    b.close()


def test_old_owner_is_fenced_and_halts(tmp_path: Path) -> None:
    peer = MemoryPeer()
    a = node(tmp_path, "a", peer, {})
    a.create_vpool("default")
    old = a.create_volume("v", SIZE)
    old.write(0, b"a" * CS)
    old.flush()
    # B restarts the volume while A is cut off (A still runs).
    b = node(tmp_path, "b", peer, {})
    b.role.gens[old.ns] = 2  # type: ignore[attr-defined]
    new = b.take_volume("v", 2, peer.tail(old.ns, 2))
    new.write(CS, b"b" * CS)
    # A's next acknowledgement needs the DTL, which refuses its generation: halted.
    with pytest.raises(Fenced):
        old.write(2 * CS, b"x" * CS)
    with pytest.raises(Fenced):
        old.read(0, CS)
    # A's uploads are refused by the backend too: nothing of A's after the fence lands.
    old.seal()
    a.wb.drain(5.0, owner=old)
    assert new.read(0, 3 * CS) == b"a" * CS + b"b" * CS + bytes(CS)
    b.close()
    a.close()


def test_a_moved_volume_refuses_writes_during_the_handover(tmp_path: Path) -> None:
    peer = MemoryPeer()
    a = node(tmp_path, "a", peer, {})
    a.create_vpool("default")
    vol = a.create_volume("v", SIZE)
    vol.write(0, b"m" * 3 * CS)
    ns = vol.ns
    a.release_volume("v", timeout=10)
    with pytest.raises(NotOwner):
        vol.write(0, b"late")
    a.role.gens.pop(ns)  # type: ignore[attr-defined]
    b = node(tmp_path, "b", peer, {})
    b.role.gens[ns] = 2  # type: ignore[attr-defined]
    got = b.take_volume("v", 2)
    assert got.read(0, 3 * CS) == b"m" * 3 * CS
    b.close()
    a.close()


def test_local_state_of_another_generation_is_set_aside(tmp_path: Path) -> None:
    peer = MemoryPeer()
    gens: dict[str, int] = {}
    a = node(tmp_path, "a", peer, gens)
    a.create_vpool("default")
    vol = a.create_volume("v", SIZE)
    vol.write(0, b"1" * CS)
    ns = vol.ns
    crash(a)                      # A dies with local state ...
    b = node(tmp_path, "b", peer, {})
    b.role.gens[ns] = 2  # type: ignore[attr-defined]
    b.take_volume("v", 2, peer.tail(ns, 2)).write(CS, b"2" * CS)
    b.close()
    # ... and comes back, no longer the owner: the volume is not opened, its state set aside.
    gens.pop(ns)
    a2 = node(tmp_path, "a", peer, gens)
    assert "v" not in a2.volumes
    assert not (a2.wb_root / ns).exists()
    assert any(p.name.startswith(ns) for p in (a2.wb_root / ".stale").iterdir())
    a2.close()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["w", "w", "w", "t", "f", "s"]),
                              st.integers(0, SIZE // 512 - 1), st.integers(1, 16)),
                    min_size=1, max_size=60))
def test_two_failures_in_a_row_lose_nothing(tmp_path_factory: pytest.TempPathFactory,
                                            ops: list[tuple[str, int, int]]) -> None:
    """A dies; B takes over and dies before uploading; C still finds every write."""
    tmp = tmp_path_factory.mktemp("own")
    peer = MemoryPeer()
    a = node(tmp, "a", peer, {})
    a.create_vpool("default")
    vol = a.create_volume("v", SIZE)
    ns = vol.ns
    model = bytearray(SIZE)
    for i, (op, sector, n) in enumerate(ops):
        off = sector * 512
        n = min(n * 512, SIZE - off)
        if op == "w":
            data = bytes([i % 250 + 1]) * n
            vol.write(off, data)
            model[off:off + n] = data
        elif op == "t":
            vol.trim(off, n)
            model[off:off + n] = bytes(n)
        elif op == "f":
            vol.flush()
        else:
            vol.seal()
    lose(a)
    b = node(tmp, "b", peer, {})
    b.role.gens[ns] = 2  # type: ignore[attr-defined]
    # B replays A's tail, uploads it, and only then drops it at the peer (as a restart
    # does); B's own writes go to the peer after that, and B dies before uploading them.
    got = b.take_volume("v", 2, peer.tail(ns, 2), drop_old=lambda: peer.entries.pop(ns, None))
    for i, (op, sector, n) in enumerate(ops[:10]):
        off = sector * 512
        n = min(n * 512, SIZE - off)
        data = bytes([(i + 100) % 250 + 1]) * n
        got.write(off, data)
        model[off:off + n] = data
    lose(b)
    c = node(tmp, "c", peer, {})
    c.role.gens[ns] = 3  # type: ignore[attr-defined]
    got = c.take_volume("v", 3, peer.tail(ns, 3))
    assert got.read(0, SIZE) == bytes(model)
    c.close()


def test_catch_up_of_a_peer_that_kept_part_of_the_tail(tmp_path: Path) -> None:
    """A peer restarted with an older part of the tail is caught up from the owner's local
    log (tail.read_tail) with the DTL's rule (entries at or below the last position it holds
    are dropped): a restart from it still has every write, in order."""
    peer = MemoryPeer()
    a = node(tmp_path, "a", peer, {})
    a.create_vpool("default")
    vol = a.create_volume("v", SIZE)
    model = bytearray(SIZE)
    rnd = random.Random(3)
    for i in range(40):
        # Batches of several clusters (one DTL entry each), some writing a cluster twice.
        reqs = []
        for _ in range(rnd.randrange(1, 6)):
            off = rnd.randrange(0, SIZE // CS) * CS
            data = bytes([rnd.randrange(1, 255)]) * CS
            reqs.append((off, data))
            model[off:off + CS] = data
        vol.writev(reqs)
        if i == 20:
            vol.create_snapshot("mid")
    live = peer.tail(vol.ns, 1)
    kept = dict(live[: len(live) // 2])           # what the restarted peer still had
    last = max(kept)
    for pos, blob in tail.read_tail(vol, (0, 0)):
        if pos > last:
            kept[pos] = blob
            last = pos
    lose(a)
    b = node(tmp_path, "b", peer, {})
    b.role.gens[vol.ns] = 2  # type: ignore[attr-defined]
    got = b.take_volume("v", 2, sorted(kept.items()))
    assert got.read(0, SIZE) == bytes(model)
    assert [s["name"] for s in got.list_snapshots()] == ["mid"]
    b.close()
