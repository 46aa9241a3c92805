"""Fencing and handovers with three node daemons, three etcd members and six ASDs (issue 11).

- fencing: an owner frozen (SIGSTOP) through a restart elsewhere, then thawed: none of its
  writes is acknowledged or reaches the backend, it stops serving the volume, and it never
  takes the refusal for an unreachable DTL peer;
- handover under fio load, and every write acknowledged during a move is on the new owner;
- a node restarted on local state of a volume it no longer owns sets it aside;
- two failures in a row (A to B, then B lost before its writes are uploaded) lose nothing;
- with etcd away too, the DTL's and the backend's refusals alone halt the old owner;
- a read the thawed owner takes at once is never answered from its stale copy (the owner
  lease: past it, every read first confirms the owner record).

What reaches the backend is checked at the backend itself: a probe proxy of the test's own
over the same ASDs lists the volume's namespace; SCO and TLog names carry the owner
generation (numbers of generation g start at g << 32), so an object of the old owner
written after the fence would show up there.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import threading
import time
from typing import Any

import pytest

from ovsfs.backend.policy import Preset
from ovsfs.backend.proxy import ProxyStore
from ovsfs.engine.owners import GEN_SHIFT
from ovsfs.nbd import protocol as P
from tests.conftest import Daemon

from .cluster import Cluster
from .nbd_client import KiB, Nbd, block, connect

MiB = 1 << 20


# ---- the backend as seen from outside any node -----------------------------------------------

def probe_store(cluster: Cluster) -> ProxyStore:
    return ProxyStore(list(cluster.asds.addrs.values()), Preset(), state_dir=cluster.tmp / "probe",
                      maintenance=False)


def backend_objects(probe: ProxyStore, ns: str) -> set[str]:
    probe.refresh(ns)
    return set(probe.list(ns))


def of_gen(names: set[str], gen: int) -> set[str]:
    """SCOs and TLogs written by owner generation `gen`."""
    out = set()
    for n in names:
        kind, _sep, num = n.partition("/")
        if kind in ("sco", "tlog") and int(num, 16) >> GEN_SHIFT == gen:
            out.add(n)
    return out


def ns_of(cluster: Cluster, volume: str) -> str:
    return str(cluster.owner(volume)["namespace"])


def served(node: Daemon, volume: str) -> dict[str, Any]:
    return {v["name"]: v for v in node.cli_json("volume", "list")}[volume]


def since(node: Daemon, mark: int) -> str:
    return node.log_path.read_bytes()[mark:].decode(errors="replace")


# ---- 1. fencing --------------------------------------------------------------------------------

def test_frozen_owner_is_fenced_and_halts(cluster: Cluster) -> None:
    """SIGSTOP the owner, restart the volume elsewhere, SIGCONT: the old owner's writes all
    fail and none reaches the backend; it serves neither new connections nor stale reads;
    its DTL goes fenced (halted), never degraded with a new peer."""
    n1, n2 = cluster.node("n1"), cluster.node("n2")
    n1.cli("volume", "create", "v", "--size", "64M")
    ns = ns_of(cluster, "v")
    old = Nbd(n1.nbd_socket, "v")
    for i in range(64):                 # acknowledged before the freeze: must survive
        assert old.write(i * KiB, block(1, i)) == 0
    assert old.flush() == 0
    cluster.wait_dtl("v", "ok", via="n1")
    gen1 = cluster.owner("v")["owner"]["gen"]

    os.kill(n1.pid, signal.SIGSTOP)
    try:
        cluster.wait_dead("n1")
        n2.cli("volume", "restart", "v", "--on", "n2")   # a DTL in sync: no --force needed
        assert cluster.owner("v", via="n2")["owner"] == {"node": "n2", "gen": gen1 + 1}
        new = connect(n2, "v")
        for i in range(16):             # the new owner overwrites the first 16 blocks
            assert new.write(i * KiB, block(2, i)) == 0
        assert new.flush() == 0
        probe = probe_store(cluster)
        old_objects = of_gen(backend_objects(probe, ns), gen1)
        dtl_rec = cluster.owner("v", via="n2")["dtl"]
        assert dtl_rec["owner"] == "n2" and dtl_rec["gen"] == gen1 + 1, dtl_rec
        mark = n1.log_path.stat().st_size
        # Queued while frozen: the old owner sees this write the moment it runs again.
        old.s.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 7, 0, KiB) + block(3, 0))
    finally:
        os.kill(n1.pid, signal.SIGCONT)

    magic, err, _cookie = struct.unpack(">IIQ", old.recv(16))
    assert magic == P.SIMPLE_REPLY_MAGIC and err != 0, "a write to the fenced owner was acknowledged"
    refused = 1
    deadline = time.monotonic() + 3.0
    i = 0
    while time.monotonic() < deadline:   # the client keeps writing: every write fails
        i += 1
        assert old.write((i % 256) * KiB, block(3, i)) != 0, f"write {i} acknowledged by the fenced owner"
        refused += 1
        if i % 16 == 0:
            assert old.flush() != 0
    err, data = old.read(0, KiB)
    assert err != 0 and data == b"", "the fenced owner served a read"
    assert refused > 10

    # The old owner stops serving the volume: a new connection is refused, it lists it as remote.
    with pytest.raises(LookupError):
        Nbd(n1.nbd_socket, "v")
    listed = served(n1, "v")
    assert listed["state"] == "remote" and listed["owner"] == "n2", listed

    # None of its writes is anywhere: not on the new owner, not on the backend.
    for i in range(64):
        err, data = new.read(i * KiB, KiB)
        assert err == 0 and data == block(2 if i < 16 else 1, i), f"block {i}"
    for i in range(64, 256):
        assert new.read(i * KiB, KiB) == (0, bytes(KiB)), f"block {i}"
    after = of_gen(backend_objects(probe, ns), gen1)
    assert after <= old_objects, f"the fenced owner wrote {sorted(after - old_objects)}"
    new.close()
    old.close()

    # A refusal for a stale generation halts; it is never an unreachable peer.
    text = since(n1, mark)
    assert "DTL degraded" not in text and "no DTL peer" not in text and "in sync" not in text, text
    dtl_rec = cluster.owner("v", via="n2")["dtl"]
    assert dtl_rec["owner"] == "n2" and dtl_rec["gen"] == gen1 + 1, f"the old owner rewrote the DTL record: {dtl_rec}"


# ---- 2. handovers under load --------------------------------------------------------------------

PHASE = 4 * MiB


def fio(uri: str, k: int, verify_only: bool = False) -> subprocess.CompletedProcess[str]:
    """Phase k of a fio job: 4 KiB random writes (QD16) over [k * PHASE, (k + 1) * PHASE)
    with crc32c verify headers; `verify_only` re-checks them."""
    args = ["fio", f"--name=phase{k}", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
            "--iodepth=16", f"--offset={k * PHASE}", f"--size={PHASE}", "--verify=crc32c",
            "--verify_state_save=0", "--output-format=terse"]
    args += ["--verify_only=1"] if verify_only else ["--do_verify=0"]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def test_handover_under_fio_load(cluster: Cluster) -> None:
    """fio writes phase after phase on the owner while `volume move` hands it to n3: the
    phase cut by the move may fail (the client sees the disconnect); run again on the new
    owner it sees no error, and every completed phase verifies there."""
    n1 = cluster.node("n1")
    n1.cli("volume", "create", "v", "--size", "64M")
    cluster.wait_dtl("v", "ok", via="n1")
    moved: dict[str, Any] = {}
    started = threading.Event()

    def mover() -> None:
        started.wait(30)
        time.sleep(0.2)
        moved["result"] = n1.cli("volume", "move", "v", "n3", check=False)

    t = threading.Thread(target=mover)
    t.start()
    done, failed_on_n1 = [], []
    node = "n1"
    try:
        for k in range(8):
            if k == 1:
                started.set()
            r = fio(cluster.nbd_uri(node, "v"), k)
            if r.returncode != 0:
                # The move cut this phase: the client reconnects to the new owner.
                assert node == "n1" and k >= 1, f"fio phase {k} failed on {node}:\n{r.stdout}\n{r.stderr}"
                failed_on_n1.append(k)
                t.join(60)
                assert moved["result"].returncode == 0, moved["result"].stderr
                node = "n3"
                assert cluster.owner("v")["owner"]["node"] == "n3"
                r = fio(cluster.nbd_uri(node, "v"), k)
                assert r.returncode == 0, f"fio failed on the new owner:\n{r.stdout}\n{r.stderr}"
            done.append(k)
            if node == "n1" and not t.is_alive():
                node = "n3"     # the move finished between two phases
    finally:
        started.set()
        t.join(60)
    assert moved["result"].returncode == 0, moved["result"].stderr
    assert cluster.owner("v")["owner"]["node"] == "n3"
    assert node == "n3", "the move did not finish during the fio phases"
    for k in done:   # every completed phase, read back from the new owner
        r = fio(cluster.nbd_uri("n3", "v"), k, verify_only=True)
        assert r.returncode == 0, f"phase {k} does not verify on n3:\n{r.stdout}\n{r.stderr}"
    # Verification reads the data: a verify of a phase never written must fail (the check bites).
    r = fio(cluster.nbd_uri("n3", "v"), 15, verify_only=True)
    assert r.returncode != 0


def test_write_acknowledged_during_move_is_kept(cluster: Cluster) -> None:
    """A client writes distinct blocks as fast as it can while the volume moves to n3:
    every write the old owner acknowledged is on the new owner (one commit point)."""
    n1 = cluster.node("n1")
    n1.cli("volume", "create", "v", "--size", "64M")
    cluster.wait_dtl("v", "ok", via="n1")
    acked: list[int] = []
    refused = [0]
    stop = threading.Event()

    def writer() -> None:
        c = Nbd(n1.nbd_socket, "v")
        try:
            for i in range(16384):
                if stop.is_set():
                    return
                if c.write(i * KiB, block(5, i)) == 0:
                    acked.append(i)
                else:
                    refused[0] += 1
                    if c.dead:
                        return
        finally:
            c.close()

    t = threading.Thread(target=writer)
    t.start()
    try:
        while len(acked) < 200 and t.is_alive():
            time.sleep(0.02)
        r = n1.cli("volume", "move", "v", "n3", check=False)
    finally:
        time.sleep(0.3)
        stop.set()
        t.join(60)
    assert r.returncode == 0, r.stderr
    assert refused[0] > 0, "no write reached the old owner after the handover started"
    new = connect(cluster.node("n3"), "v")
    last = acked[-1]
    for i in acked:
        err, data = new.read(i * KiB, KiB)
        assert err == 0 and data == block(5, i), f"acknowledged write {i} (of {len(acked)}, last {last}) lost"
    new.close()


# ---- 3. the failure classes ---------------------------------------------------------------------

def test_restarted_node_sets_aside_state_it_no_longer_owns(cluster: Cluster) -> None:
    """n1 dies with acknowledged writes not uploaded; v restarts on n2, which writes over
    them; n1 comes back on its old state directory: it neither opens, replays nor uploads
    v (its state goes to wb/.stale), and n2's data stays intact."""
    n1, n2 = cluster.node("n1"), cluster.node("n2")
    n1.cli("volume", "create", "v", "--size", "64M")
    ns = ns_of(cluster, "v")
    cluster.wait_dtl("v", "ok", via="n1")
    c = Nbd(n1.nbd_socket, "v")
    for i in range(32):
        assert c.write(i * KiB, block(1, i)) == 0
    assert c.flush() == 0
    c.close()
    n1.kill()                   # acknowledged, in the open SCO: not on the backend
    assert (n1.state / "wb" / ns).exists()
    probe = probe_store(cluster)
    gen1 = cluster.owner("v")["owner"]["gen"]
    assert not {n for n in of_gen(backend_objects(probe, ns), gen1) if n.startswith("sco/")}, \
        "n1's writes were uploaded already: the case needs them only local"
    cluster.wait_dead("n1")
    n2.cli("volume", "restart", "v", "--on", "n2")
    gen2 = cluster.owner("v")["owner"]["gen"]
    new = connect(n2, "v")
    for i in range(16):
        assert new.write(i * KiB, block(2, i)) == 0
    assert new.flush() == 0
    before = backend_objects(probe, ns)
    mark = n1.log_path.stat().st_size
    n1.start()
    # v is not served on n1: listed as remote, its export refused, its state set aside.
    listed = served(n1, "v")
    assert listed["state"] == "remote" and listed["owner"] == "n2", listed
    with pytest.raises(LookupError):
        Nbd(n1.nbd_socket, "v")
    assert not (n1.state / "wb" / ns).exists()
    stale = list((n1.state / "wb" / ".stale").glob(f"{ns}-*"))
    assert len(stale) == 1 and any(stale[0].rglob("*")), stale
    text = since(n1, mark)
    assert "set aside" in text and "v: map rebuilt" not in text and "replayed" not in text, text
    time.sleep(1.0)   # give a wrong upload the time to happen
    after = backend_objects(probe, ns)
    assert not of_gen(after, gen1) - of_gen(before, gen1), f"n1 uploaded {sorted(after - before)}"
    for i in range(64):
        err, data = new.read(i * KiB, KiB)
        want = block(2, i) if i < 16 else block(1, i) if i < 32 else bytes(KiB)
        assert err == 0 and data == want, f"block {i}"
    new.close()
    assert cluster.owner("v")["owner"] == {"node": "n2", "gen": gen2}


def test_two_failures_in_a_row_lose_nothing(cluster: Cluster) -> None:
    """n1 is lost with writes only in its DTL; v restarts on n2, which acknowledges more
    writes and is lost in turn before uploading them; v restarts on n3: everything either
    of them acknowledged is there."""
    n1, n2, n3 = cluster.node("n1"), cluster.node("n2"), cluster.node("n3")
    n1.cli("volume", "create", "v", "--size", "64M")
    cluster.wait_dtl("v", "ok", via="n1")
    c = Nbd(n1.nbd_socket, "v")
    for i in range(32):
        assert c.write(i * KiB, block(1, i)) == 0
    c.close()
    n1.kill()
    shutil.rmtree(n1.state / "wb")           # a lost node: its disk is gone too
    cluster.wait_dead("n1")
    n2.cli("volume", "restart", "v", "--on", "n2")
    cluster.wait_dtl("v", "ok", via="n2")
    ns, gen2 = ns_of(cluster, "v"), cluster.owner("v")["owner"]["gen"]
    probe = probe_store(cluster)
    uploaded = of_gen(backend_objects(probe, ns), gen2)   # n1's tail, uploaded by the restart
    c = connect(n2, "v")
    for i in range(16, 48):
        assert c.write(i * KiB, block(2, i)) == 0
    c.close()
    n2.kill()
    assert of_gen(backend_objects(probe, ns), gen2) == uploaded, "n2 uploaded its writes: the case needs them local"
    shutil.rmtree(n2.state / "wb")
    cluster.wait_dead("n2")
    n3.cli("volume", "restart", "v", "--on", "n3")
    c = connect(n3, "v")
    for i in range(64):
        err, data = c.read(i * KiB, KiB)
        want = block(1, i) if i < 16 else block(2, i) if i < 48 else bytes(KiB)
        assert err == 0 and data == want, f"block {i}"
    c.close()


def test_stale_generation_refusals_halt_never_degrade(cluster: Cluster) -> None:
    """The old owner thawed while etcd is away (it cannot learn the new owner from the
    cluster store): its owner lease has run out, so it asks etcd before any I/O and fails it;
    the DTL peer's and the backend's refusals stand behind that. Never degraded, never a new
    peer, never an acknowledged write."""
    n1, n2 = cluster.node("n1"), cluster.node("n2")
    n1.cli("volume", "create", "v", "--size", "64M")
    ns = ns_of(cluster, "v")
    old = Nbd(n1.nbd_socket, "v")
    for i in range(64):
        assert old.write(i * KiB, block(1, i)) == 0
    cluster.wait_dtl("v", "ok", via="n1")
    gen1 = cluster.owner("v")["owner"]["gen"]
    etcd_pids = [p for p in cluster.etcd.pids if p]
    os.kill(n1.pid, signal.SIGSTOP)
    try:
        cluster.wait_dead("n1")
        n2.cli("volume", "restart", "v", "--on", "n2")
        probe = probe_store(cluster)
        old_objects = of_gen(backend_objects(probe, ns), gen1)
        mark = n1.log_path.stat().st_size
        for pid in etcd_pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            old.s.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 7, 0, KiB) + block(3, 0))
            os.kill(n1.pid, signal.SIGCONT)
            magic, err, _cookie = struct.unpack(">IIQ", old.recv(16))
            assert err != 0, "a write to the fenced owner was acknowledged"
            for i in range(1, 40):
                assert old.write(i * KiB, block(3, i)) != 0, f"write {i} acknowledged by the fenced owner"
            assert old.flush() != 0
            status, info = n1.api("GET", "/volumes/v", timeout=30)
        finally:
            for pid in etcd_pids:
                os.kill(pid, signal.SIGCONT)
    finally:
        os.kill(n1.pid, signal.SIGCONT)
    # Halted by a refusal, or (its owner lease ran out while frozen, etcd cannot answer) not
    # serving at all until it can ask: either way no write acknowledged, no stale read.
    text = since(n1, mark)
    assert status == 200 and (info["fenced"] or "cannot confirm it still owns it" in text), (info, text)
    assert info["dtl"]["state"] in ("fenced", "ok"), info["dtl"]
    assert "DTL degraded" not in text and "no DTL peer" not in text and "in sync" not in text, text
    old.close()
    after = of_gen(backend_objects(probe, ns), gen1)
    assert after <= old_objects, f"the fenced owner wrote {sorted(after - old_objects)}"
    dtl_rec = cluster.owner("v", via="n2")["dtl"]
    assert dtl_rec["owner"] == "n2" and dtl_rec["gen"] == gen1 + 1, dtl_rec


@pytest.mark.parametrize("cluster", [10], indirect=True)
def test_owner_dtl_stays_in_sync_while_etcd_is_away(cluster: Cluster) -> None:
    """Found with the test above: etcd away for longer than dtl.timeout must not make the
    DTL peer hold appends (its generation recheck) until the owner degrades for nothing.
    (Away for longer than the owner lease, 0.85 x cluster.lease_ttl after the last renewal,
    I/O would stop instead: the owner could no longer be sure it still owns the volume.)"""
    n1 = cluster.node("n1")
    n1.cli("volume", "create", "v", "--size", "64M")
    cluster.wait_dtl("v", "ok", via="n1")
    c = Nbd(n1.nbd_socket, "v")
    assert c.write(0, block(1, 0)) == 0
    etcd_pids = [p for p in cluster.etcd.pids if p]
    mark = n1.log_path.stat().st_size
    for pid in etcd_pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        end = time.monotonic() + 2.5      # longer than dtl.timeout (2 s in the harness)
        i = 0
        while time.monotonic() < end:
            i += 1
            assert c.write(i * KiB, block(1, i)) == 0
            time.sleep(0.05)
        assert c.flush() == 0
    finally:
        for pid in etcd_pids:
            os.kill(pid, signal.SIGCONT)
    c.close()
    text = since(n1, mark)
    assert "DTL degraded" not in text, text
    assert cluster.wait_dtl("v", "ok", via="n1")["dtl"]["unsafe_bytes"] == 0


def test_thawed_owner_never_serves_a_stale_read(cluster: Cluster) -> None:
    """A read the frozen owner receives the moment it runs again, after the volume was
    restarted elsewhere and overwritten there, fails: it is never answered with old data."""
    n1, n2 = cluster.node("n1"), cluster.node("n2")
    n1.cli("volume", "create", "v", "--size", "64M")
    old = Nbd(n1.nbd_socket, "v")
    for i in range(16):
        assert old.write(i * KiB, block(1, i)) == 0
    assert old.flush() == 0 and old.read(0, KiB) == (0, block(1, 0))
    cluster.wait_dtl("v", "ok", via="n1")
    os.kill(n1.pid, signal.SIGSTOP)
    try:
        cluster.wait_dead("n1")
        n2.cli("volume", "restart", "v", "--on", "n2")
        new = connect(n2, "v")
        assert new.write(0, block(2, 0)) == 0 and new.flush() == 0
        new.close()
        old.s.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 7, 0, KiB))
    finally:
        os.kill(n1.pid, signal.SIGCONT)
    _magic, err, _cookie = struct.unpack(">IIQ", old.recv(16))
    data = old.recv(KiB) if err == 0 else b""
    old.close()
    assert err != 0, f"the thawed owner answered a read with {'its stale copy' if data == block(1, 0) else data[:16]!r}"
