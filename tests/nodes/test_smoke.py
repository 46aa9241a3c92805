"""Three nodes, three etcd members, six ASDs: a volume written on one node, restarted on
another after its owner is lost, and moved back (the paths every cluster test builds on)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

from tests.conftest import Daemon

from ovsfs.nbd.protocol import ESHUTDOWN

from .cluster import Cluster, qemu_io
from .nbd_client import Nbd


def test_lost_owner_restart_and_move(cluster: Cluster) -> None:
    n1, n2 = cluster.node("n1"), cluster.node("n2")
    n1.cli("volume", "create", "v", "--size", "64M")
    qemu_io(cluster.nbd_uri("n1", "v"), "write -P 0xab 0 1M", "write -P 0xcd 4k 512")
    info = cluster.wait_dtl("v", "ok", via="n1")
    assert info["dtl"]["mode"] == "sync" and info["dtl"]["peer"] in ("n2", "n3")
    # n1 and its disk are lost.
    n1.kill()
    shutil.rmtree(n1.state / "wb")
    # Refused while n1 may still be alive (its lease runs), then done.
    r = n2.cli("volume", "restart", "v", "--on", "n2", check=False)
    assert r.returncode != 0 and "alive" in r.stderr
    cluster.wait_dead("n1")
    n2.cli("volume", "restart", "v", "--on", "n2")
    qemu_io(cluster.nbd_uri("n2", "v"), "read -P 0xab 0 4k", "read -P 0xcd 4k 512", "read -P 0xab 8k 1016k")
    assert cluster.owner("v")["owner"] == {"node": "n2", "gen": 2}
    # A clean handover to n3. A client of n2 is told (ESHUTDOWN) and disconnected, so that it
    # reconnects rather than getting EIO for ever.
    client = Nbd(n2.nbd_socket, "v")
    assert client.write(3 << 20, b"\x33" * 4096) == 0
    n2.cli("volume", "move", "v", "n3")
    assert client.write(3 << 20, b"\x34" * 4096) in (ESHUTDOWN, Nbd.EOF)
    assert client.read(0, 4096)[0] == Nbd.EOF
    client.close()
    qemu_io(cluster.nbd_uri("n3", "v"), "read -P 0xcd 4k 512", "write -P 0x11 2M 4k", "read -P 0x33 3M 4k")
    listed = {v["name"]: v for v in n2.cli_json("volume", "list")}
    assert listed["v"]["state"] == "remote" and listed["v"]["owner"] == "n3"


def test_nodes_share_the_asds_they_run(tmp_path: Path, daemon_factory: Callable[..., Daemon]) -> None:
    """Each node runs its own local ASDs (as `ovsfs run --asds N`) and registers them; every
    node's backend attaches the others', so a volume moves between nodes on one backend."""
    from ovsfs.cluster.etcd_launch import EtcdCluster

    from tests.conftest import free_ports

    etcd = EtcdCluster(tmp_path / "etcd", members=1)
    etcd.start()
    nodes: list[Daemon] = []
    try:
        for i in (1, 2):
            mgmt, dtl = free_ports(2)
            nodes.append(daemon_factory({"node": {"name": f"n{i}"},
                                         "cluster": {"etcd": etcd.urls, "failure_domain": f"fd{i}",
                                                     "mgmt_port": mgmt, "lease_ttl": 3},
                                         "dtl": {"port": dtl}}, asds=3))
        n1, n2 = nodes
        # n1 started before n2 registered its ASDs: it attaches them on its next look.
        deadline = time.monotonic() + 30
        while len(n1.cli_json("backend", "status")["asds"]) < 6:
            assert time.monotonic() < deadline, n1.cli_json("backend", "status")["asds"]
            time.sleep(0.5)
        assert len(n2.cli_json("backend", "status")["asds"]) == 6
        n1.cli("volume", "create", "v", "--size", "16M")
        qemu_io(f"nbd+unix:///v?socket={n1.nbd_socket}", "write -P 0x42 0 3M")
        n1.cli("volume", "move", "v", "n2")
        qemu_io(f"nbd+unix:///v?socket={n2.nbd_socket}", "read -P 0x42 0 3M")
    finally:
        for d in nodes:
            d.teardown()   # before etcd: a node stops cleanly with its cluster store there
        etcd.stop()


def test_dtl_modes_per_vpool_and_volume(cluster: Cluster) -> None:
    n1 = cluster.node("n1")
    n1.cli("volume", "create", "a", "--size", "16M")
    assert n1.cli_json("volume", "info", "a")["dtl"]["mode"] == "sync"     # [dtl] mode of the nodes
    n1.cli("vpool", "dtl", "default", "none")
    n1.cli("volume", "create", "b", "--size", "16M")
    assert n1.cli_json("volume", "info", "b")["dtl"] == {**n1.cli_json("volume", "info", "b")["dtl"],
                                                          "mode": "none", "state": "standalone"}
    # A volume's own setting wins, takes effect at once, and "default" gives the vPool's back.
    n1.cli("volume", "dtl", "b", "async")
    info = cluster.wait_dtl("b", "ok", via="n1")
    assert info["dtl"]["mode"] == "async" and info["dtl"]["peer"] in ("n2", "n3")
    qemu_io(cluster.nbd_uri("n1", "b"), "write -P 7 0 64k", "flush")
    n1.cli("volume", "dtl", "b", "default")
    assert n1.cli_json("volume", "info", "b")["dtl"]["mode"] == "none"
    r = n1.cli("volume", "dtl", "b", "fast", check=False)
    assert r.returncode != 0 and "invalid choice" in r.stderr


def test_one_node_has_no_cluster_commands(daemon: Daemon) -> None:
    for args in (["cluster", "status"], ["node", "list"], ["volume", "move", "v", "n2"]):
        r = daemon.cli(*args, check=False)
        assert r.returncode == 1 and "not in a cluster" in r.stderr, r.stderr
