"""Issue 11, "What it must show": lost nodes and DTL peers, on three node daemons, three etcd
members and six ASDs (tests/nodes/cluster.py).

A lost node is SIGKILLed and its write buffer deleted; once its lease expired the volume is
restarted on another node (`ovsfs volume restart --on`) from the backend plus the DTL tail,
and read back through the new owner's NBD against what the writer (tests/nodes/acked.py)
recorded as acknowledged.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.conftest import Daemon

from .acked import BS, AckedWriter, check_all_acked, read_blocks, visible_prefix
from .cluster import Cluster
from .conftest import make_cluster

VOL = "v"
BLOCKS = 2048                  # the writers' region: 8 MiB of the volume
ROUNDS = 10
ASYNC_QUEUE = 256 << 10        # dtl.queue_bytes of the async test: 64 writes of 4 KiB


@pytest.fixture
def async_cluster(tmp_path: Path, daemon_factory: Callable[..., Daemon]) -> Any:
    # A queue shipped by age only after 0.5 s: at a kill, up to the whole queue is unshipped.
    yield from make_cluster(tmp_path, daemon_factory, dtl_mode="async",
                            extra={"dtl": {"queue_bytes": ASYNC_QUEUE, "queue_age": 0.5}})


def lose(d: Daemon) -> None:
    """A lost node: killed, and its write buffer gone with its disk."""
    d.kill()
    shutil.rmtree(d.state / "wb", ignore_errors=True)


def revive(d: Daemon, fresh: bool = True) -> None:
    """The lost node's daemon again, on an empty state directory (a replaced disk) unless
    not `fresh`; returns once it is registered in the cluster (a daemon answers /status
    before it registers, and exits if its name is still taken by its old lease)."""
    if fresh:
        for p in d.state.iterdir():
            if p.name != "ovsfs.toml":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    d.start()
    name = d.config["node"]["name"]
    deadline = time.monotonic() + 30
    while True:
        assert d.running(), f"{name} exited after it started:\n{d.log()}"
        status, nodes = d.api("GET", "/nodes")
        if status == 200 and any(n["name"] == name and n["alive"] for n in nodes):
            return
        assert time.monotonic() < deadline, f"{name} did not register: {nodes}"
        time.sleep(0.1)


def restart(c: Cluster, on: str, force: bool = False) -> dict[str, Any]:
    args = ["volume", "restart", VOL, "--on", on] + (["--force"] if force else [])
    return c.node(on).cli_json(*args)


def owner_info(c: Cluster, name: str) -> dict[str, Any]:
    status, info = c.node(name).api("GET", f"/volumes/{VOL}")
    assert status == 200, info
    return info


def test_sync_dtl_lost_owner_ten_rounds(cluster: Cluster) -> None:
    """Ten rounds: QD16 writes, the owner lost mid-stream, restarted on another node; every
    acknowledged write reads back byte for byte (in-flight ones: either version)."""
    c = cluster
    c.node("n1").cli("volume", "create", VOL, "--size", "32M")
    owner = "n1"
    before = [bytes(BS)] * BLOCKS
    t0 = time.monotonic()
    timings = []
    for r in range(ROUNDS):
        t_round = time.monotonic()
        info = c.wait_dtl(VOL, "ok", via=owner)
        peer = info["dtl"]["peer"]
        assert peer not in (None, owner), info["dtl"]
        w = AckedWriter(c.node(owner).nbd_socket, VOL, BLOCKS, tag=r, depth=16, seed=r).start()
        w.wait_acked(150 + 25 * r)
        lose(c.node(owner))
        w.stop()
        assert not w.errors, f"round {r}: NBD errors before the kill: {w.errors}"
        inflight = len(w.writes) - len(w.acked)
        c.wait_dead(owner)
        # Alternately onto the DTL peer (tail local) and the third node (tail over TCP).
        others = [n for n in c.names if n != owner]
        target = peer if r % 2 == 0 else next(n for n in others if n != peer)
        reply = restart(c, target)          # a DTL in sync needs no --force
        assert reply["gen"] == r + 2 and not reply["may_be_lost"], reply
        # The writes acknowledged since the last upload came from the DTL tail.
        assert reply["dtl_entries"] > 0, reply
        after = read_blocks(c.node(target).nbd_socket, VOL, BLOCKS)
        bad = check_all_acked(w, before, after)
        assert not bad, f"round {r}: {len(bad)} blocks lost acknowledged writes: {bad[:5]}"
        before = after
        revive(c.node(owner))
        timings.append(f"r{r}: {owner}->{target} {len(w.acked)} acked, {inflight} in flight, "
                       f"{reply['dtl_entries']} DTL entries, {time.monotonic() - t_round:.1f} s")
        owner = target
    print(f"\n{ROUNDS} rounds in {time.monotonic() - t0:.1f} s:\n  " + "\n  ".join(timings))
    assert c.owner(VOL)["owner"] == {"node": owner, "gen": ROUNDS + 1}


def test_async_dtl_lost_owner_loses_at_most_the_queue(async_cluster: Cluster) -> None:
    """async: writes at QD1 (send order = log order), a FLUSH every 50; the owner lost. The
    volume holds a prefix of the writes, covering every write acknowledged before the last
    completed FLUSH, and missing at most dtl.queue_bytes of acknowledged writes."""
    c = async_cluster
    c.node("n1").cli("volume", "create", VOL, "--size", "32M")
    owner = "n1"
    before = [bytes(BS)] * BLOCKS
    t0 = time.monotonic()
    seen = []
    for r in range(3):
        info = c.wait_dtl(VOL, "ok", via=owner)
        assert info["dtl"]["mode"] == "async", info["dtl"]
        w = AckedWriter(c.node(owner).nbd_socket, VOL, BLOCKS, tag=r, depth=1, flush_every=50, seed=r).start()
        w.wait_acked(230 + 40 * r)
        lose(c.node(owner))
        w.stop()
        assert not w.errors and w.flushes >= 4, (w.errors, w.flushes)
        assert w.acked == list(range(len(w.acked))), "QD1: acknowledged in send order"
        c.wait_dead(owner)
        target = next(n for n in c.names if n != owner)
        reply = restart(c, target)          # an async DTL in sync needs no --force either
        assert "async" in reply["may_be_lost"] and str(ASYNC_QUEUE) in reply["may_be_lost"], reply
        after = read_blocks(c.node(target).nbd_socket, VOL, BLOCKS)
        k, bad = visible_prefix(w, before, after)
        assert not bad, f"round {r}: not a prefix of the writes in order: {bad[:5]}"
        assert k >= w.durable, f"round {r}: writes before a completed FLUSH lost ({k} < {w.durable})"
        lost = max(0, len(w.acked) - k)
        assert lost * BS <= ASYNC_QUEUE, f"round {r}: {lost} acknowledged writes lost, more than the queue"
        seen.append(f"r{r}: {len(w.acked)} acked, {w.durable} flushed, prefix {k}, lost {lost}")
        before = after
        revive(c.node(owner))
        owner = target
    print(f"\nasync, 3 rounds in {time.monotonic() - t0:.1f} s: " + "; ".join(seen))


def test_dtl_peer_killed_during_sync_writes(cluster: Cluster) -> None:
    """The DTL peer is SIGKILLed under QD16 sync writes: no error at the client, the DTL
    degrades (an event in the log), a new peer on the third node is caught up; then the owner
    is lost and the volume restarted on that peer: every acknowledged write is there."""
    c = cluster
    n1 = c.node("n1")
    n1.cli("volume", "create", VOL, "--size", "32M")
    peer = c.wait_dtl(VOL, "ok", via="n1")["dtl"]["peer"]
    third = next(n for n in c.names if n not in ("n1", peer))
    log_at = n1.log_path.stat().st_size
    w = AckedWriter(n1.nbd_socket, VOL, BLOCKS, tag=1, depth=16, seed=7).start()
    w.wait_acked(200)
    c.node(peer).kill()
    acked_at_kill = len(w.acked)
    states = []
    deadline = time.monotonic() + 30
    while True:
        d = owner_info(c, "n1")["dtl"]
        if not states or states[-1] != (d["state"], d["peer"]):
            states.append((d["state"], d["peer"]))
        if d["state"] == "ok" and d["peer"] == third:
            break
        assert time.monotonic() < deadline, f"no new peer caught up: {states}"
        time.sleep(0.02)
    events = n1.log_path.read_bytes()[log_at:].decode(errors="replace")
    assert "DTL degraded" in events, f"no degraded event logged; states seen {states}"
    w.wait_acked(len(w.acked) + 200)          # I/O went on, and goes on with the new peer
    assert not w.errors and not w.gone, w.errors
    print(f"\npeer {peer} killed after {acked_at_kill} writes; states seen {states}; "
          f"{len(w.acked)} acknowledged without an error")
    lose(n1)
    w.stop()
    c.wait_dead("n1")
    reply = restart(c, third)
    assert not reply["may_be_lost"], reply
    before = [bytes(BS)] * BLOCKS
    after = read_blocks(c.node(third).nbd_socket, VOL, BLOCKS)
    bad = check_all_acked(w, before, after)
    assert not bad, f"{len(bad)} blocks lost acknowledged writes: {bad[:5]}"


def test_restart_refused_when_the_dtl_is_not_in_sync(cluster: Cluster) -> None:
    """With no DTL peer left the owner runs degraded / standalone; lost then, it may be
    restarted only with --force, and the reply says what may be lost."""
    c = cluster
    n1 = c.node("n1")
    n1.cli("volume", "create", VOL, "--size", "32M")
    peer = c.wait_dtl(VOL, "ok", via="n1")["dtl"]["peer"]
    third = next(n for n in c.names if n not in ("n1", peer))
    c.node(third).kill()
    c.wait_dead(third)
    c.node(peer).kill()                       # the last possible peer
    w = AckedWriter(n1.nbd_socket, VOL, BLOCKS, tag=1, depth=16, seed=3).start()
    w.wait_acked(100)                         # acknowledged with the local copy only
    w.stop()
    assert not w.errors, w.errors
    state = owner_info(c, "n1")["dtl"]["state"]
    assert state in ("degraded", "standalone"), state
    c.wait_dead(peer)                         # (a node's name is taken until its lease expired)
    unsafe = owner_info(c, "n1")["dtl"]["unsafe_bytes"]
    assert unsafe >= 50 * BS, f"{unsafe} bytes only on n1: the writes went somewhere else?"
    lose(n1)
    revive(c.node(peer), fresh=False)         # a node to restart on (it kept its state)
    c.wait_dead("n1")
    r = c.node(peer).cli("volume", "restart", VOL, "--on", peer, check=False)
    assert r.returncode != 0 and "--force" in r.stderr and "may be lost" in r.stderr, r
    assert c.owner(VOL)["owner"]["node"] == "n1", "a refused restart changed the owner"
    reply = restart(c, peer, force=True)
    assert reply["node"] == peer and reply["gen"] == 2
    assert VOL in reply["may_be_lost"] and "may be lost" in reply["may_be_lost"], reply
    # It says how much: at least what n1 had acknowledged with only its local copy (the
    # owner's count stopped growing with the writes, seconds before the loss).
    m = re.search(r"\((\d+) bytes when last recorded\)", reply["may_be_lost"])
    assert m and int(m.group(1)) >= unsafe, (unsafe, reply["may_be_lost"])
    print(f"\nforced restart with the DTL {state}: {reply['may_be_lost']}")
    read_blocks(c.node(peer).nbd_socket, VOL, BLOCKS)   # serves it again
