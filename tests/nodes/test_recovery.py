"""Cases found by trying the cluster as a new user would (issue 11), each a test on three
nodes, three etcd members and six ASDs:

- a node restarted on an empty write buffer of a volume it owns replays its DTL tail;
- a DTL peer restarted without its state while the volume is idle is caught up again, never
  taken for in sync (and a restart checks the peer's incarnation);
- a DTL mode set on any node reaches the owner;
- a move to a node that does not answer is refused before anything changes;
- a restart whose DTL peer cannot give the tail leaves the volume claimed and closed, and the
  next restart, once the peer answers, finds everything.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

from .cluster import Cluster, qemu_io


def peer_of(cluster: Cluster, volume: str, owner: str) -> str:
    return cluster.wait_dtl(volume, "ok", via=owner)["dtl"]["peer"]


def test_owner_back_on_an_empty_write_buffer_replays_its_dtl_tail(cluster: Cluster) -> None:
    n1 = cluster.node("n1")
    n1.cli("volume", "create", "v", "--size", "64M")
    qemu_io(cluster.nbd_uri("n1", "v"), "write -P 0xaa 0 1M", "flush")
    peer_of(cluster, "v", "n1")
    n1.kill()
    shutil.rmtree(n1.state / "wb")       # its disk is gone; the node itself comes back
    cluster.wait_dead("n1")
    n1.start()
    qemu_io(cluster.nbd_uri("n1", "v"), "read -P 0xaa 0 1M")
    assert cluster.owner("v")["owner"] == {"node": "n1", "gen": 2}


def test_dtl_peer_restarted_empty_while_idle_is_caught_up_again(cluster: Cluster) -> None:
    n1, n3 = cluster.node("n1"), cluster.node("n3")
    n1.cli("volume", "create", "v", "--size", "64M")
    qemu_io(cluster.nbd_uri("n1", "v"), "write -P 0x4b 0 1M", "flush")
    name = peer_of(cluster, "v", "n1")
    peer = cluster.node(name)
    before = cluster.owner("v")["dtl"]["incarnation"]
    peer.kill()
    shutil.rmtree(peer.state / "dtl")   # the peer lost the tail it held
    cluster.wait_dead(name)
    peer.start()
    # The idle owner asks its peer whether it restarted, and catches a peer up again.
    deadline = time.monotonic() + 30
    while True:
        d = cluster.owner("v")["dtl"]
        if d["state"] == "ok" and d["incarnation"] != before:
            break
        assert time.monotonic() < deadline, d
        time.sleep(0.2)
    n1.kill()
    shutil.rmtree(n1.state / "wb")
    cluster.wait_dead("n1")
    n3.cli("volume", "restart", "v", "--on", "n3")
    qemu_io(cluster.nbd_uri("n3", "v"), "read -P 0x4b 0 1M")


def test_dtl_mode_set_on_any_node_reaches_the_owner(cluster: Cluster) -> None:
    n1, n2 = cluster.node("n1"), cluster.node("n2")
    n1.cli("volume", "create", "v", "--size", "16M")
    assert n1.cli_json("volume", "info", "v")["dtl"]["mode"] == "sync"
    n2.cli("volume", "dtl", "v", "none")            # not the owner
    deadline = time.monotonic() + 15
    while n1.cli_json("volume", "info", "v")["dtl"]["mode"] != "none":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    n2.cli("volume", "dtl", "v", "default")         # back to the vPool's ...
    n2.cli("vpool", "dtl", "default", "async")      # ... which is async now
    deadline = time.monotonic() + 15
    while n1.cli_json("volume", "info", "v")["dtl"]["mode"] != "async":
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_move_to_a_node_that_does_not_answer_is_refused(cluster: Cluster) -> None:
    n1, n2 = cluster.node("n1"), cluster.node("n2")
    n1.cli("volume", "create", "v", "--size", "16M")
    qemu_io(cluster.nbd_uri("n1", "v"), "write -P 0x21 0 64k")
    os.kill(n2.pid, signal.SIGSTOP)     # frozen: its lease still runs
    try:
        r = n1.cli("volume", "move", "v", "n2", check=False, timeout=60)
    finally:
        os.kill(n2.pid, signal.SIGCONT)
    assert r.returncode == 1 and "cannot take volume v now" in r.stderr, r.stderr
    assert cluster.owner("v")["owner"]["node"] == "n1"
    qemu_io(cluster.nbd_uri("n1", "v"), "read -P 0x21 0 64k", "write -P 0x22 64k 4k")


def test_restart_whose_peer_cannot_give_the_tail_is_finished_later(cluster: Cluster) -> None:
    n1, n3 = cluster.node("n1"), cluster.node("n3")
    n1.cli("volume", "create", "v", "--size", "64M")
    name = None
    # The peer must be n2 so that n3 is neither owner nor peer.
    deadline = time.monotonic() + 30
    while name != "n2":
        name = peer_of(cluster, "v", "n1")
        if name == "n2":
            break
        n1.cli("volume", "dtl", "v", "none")
        n1.cli("volume", "dtl", "v", "default")
        assert time.monotonic() < deadline
    qemu_io(cluster.nbd_uri("n1", "v"), "write -P 0x5a 0 512k", "flush")
    peer_of(cluster, "v", "n1")
    n2 = cluster.node("n2")
    n1.kill()
    shutil.rmtree(n1.state / "wb")
    os.kill(n2.pid, signal.SIGSTOP)
    try:
        cluster.wait_dead("n1", via="n3")
        r = n3.cli("volume", "restart", "v", "--on", "n3", check=False, timeout=120)
        assert r.returncode == 1 and "could not be read" in r.stderr, r.stderr
        assert cluster.owner("v", via="n3")["owner"]["node"] == "n3"    # claimed, not served
    finally:
        os.kill(n2.pid, signal.SIGCONT)
    n3.cli("volume", "restart", "v", "--on", "n3")
    qemu_io(cluster.nbd_uri("n3", "v"), "read -P 0x5a 0 512k")


def test_forced_restart_reads_the_tail_of_the_last_peer(cluster: Cluster) -> None:
    """The owner's peer and the third node die (the owner goes on alone), then the owner is
    lost with its disk: a forced restart on the node that was its peer replays the tail that
    peer still holds (what it had when it was lost), not nothing."""
    n1 = cluster.node("n1")
    n1.cli("volume", "create", "v", "--size", "64M")
    name = peer_of(cluster, "v", "n1")
    peer = cluster.node(name)
    third = next(d for n, d in zip(cluster.names, cluster.nodes) if n not in ("n1", name))
    asds = list(cluster.asds.procs.values())
    for p in asds:
        os.kill(p.pid, signal.SIGSTOP)        # nothing reaches the backend from here on
    try:
        qemu_io(cluster.nbd_uri("n1", "v"), "write -P 0x5a 0 1M", "flush")
        peer.kill()
        third.kill()
        qemu_io(cluster.nbd_uri("n1", "v"), "write -P 0x77 2M 64k")   # only on n1 now
        deadline = time.monotonic() + 30
        while n1.cli_json("volume", "info", "v")["dtl"]["state"] != "standalone":   # no peer left
            assert time.monotonic() < deadline
            time.sleep(0.2)
        n1.kill()
        shutil.rmtree(n1.state / "wb")
    finally:
        for p in asds:
            os.kill(p.pid, signal.SIGCONT)
    time.sleep(cluster.lease_ttl + 1)          # every lease ran out (no node is up to ask)
    peer.start()                               # the peer comes back with the tail it held
    r = peer.cli("volume", "restart", "v", "--on", name, check=False)
    assert r.returncode == 1 and "--force" in r.stderr, r.stderr
    reply = json.loads(peer.cli("volume", "restart", "v", "--on", name, "--force", "--json").stdout)
    assert reply["dtl_entries"] > 0 and "may be lost" in reply["may_be_lost"], reply
    qemu_io(cluster.nbd_uri(name, "v"), "read -P 0x5a 0 1M")
