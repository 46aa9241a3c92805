"""Three nodes, three etcd members, six ASDs: a volume written on one node, restarted on
another after its owner is lost, and moved back (the paths every cluster test builds on)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.conftest import Daemon

from .cluster import Cluster


@pytest.fixture
def cluster(tmp_path: Path, daemon_factory: Callable[..., Daemon]) -> Any:
    c = Cluster(tmp_path, daemon_factory)
    try:
        yield c.start()
    finally:
        c.stop()


def qemu_io(uri: str, *cmds: str) -> str:
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    r = subprocess.run([*args, uri], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "fail" not in r.stdout.lower() and "error" not in r.stderr.lower(), r
    return r.stdout


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
    # A clean handover to n3.
    n2.cli("volume", "move", "v", "n3")
    qemu_io(cluster.nbd_uri("n3", "v"), "read -P 0xcd 4k 512", "write -P 0x11 2M 4k")
    listed = {v["name"]: v for v in n2.cli_json("volume", "list")}
    assert listed["v"]["state"] == "remote" and listed["v"]["owner"] == "n3"
