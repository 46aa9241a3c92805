"""tools/etcd.sh: start and stop an etcd for tests and demos, by PID (issue 11, item 1)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from ovsfs.cluster.etcd import EtcdStore
from ovsfs.cluster.etcd_launch import EtcdCluster

REPO = Path(__file__).resolve().parents[2]


def etcd_sh(*args: str) -> subprocess.CompletedProcess[str]:
    # PYTHON: the interpreter running the tests (a worktree has no .venv of its own).
    return subprocess.run(["bash", str(REPO / "tools" / "etcd.sh"), *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHON": sys.executable})


def two_free_ports() -> int:
    """A port p with p and p + 1 free on 127.0.0.1 (client and peer port of one member)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            p = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", p + 1))
                except OSError:
                    continue
        return p
    raise AssertionError("no two consecutive free ports")


def runs_etcd(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"etcd")
    except OSError:
        return False


def test_etcd_sh_start_stop_restart(tmp_path: Path) -> None:
    d = tmp_path / "etcd"
    port = two_free_ports()
    pids: list[int] = []
    try:
        r = etcd_sh("start", str(d), "1", str(port))
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f'etcd = ["http://127.0.0.1:{port}"]'
        rec = json.loads((d / "pids.json").read_text())
        pids = [m["pid"] for m in rec["members"]]
        assert rec["members"][0]["peer_port"] == port + 1 and runs_etcd(pids[0])
        s = EtcdStore(rec["urls"], prefix="/demo")
        s.put("/k", "kept")
        again = etcd_sh("start", str(d))
        assert again.returncode == 1 and "runs already" in again.stderr
        r = etcd_sh("stop", str(d))
        assert r.returncode == 0, r.stderr
        assert not runs_etcd(pids[0])
        assert json.loads((d / "pids.json").read_text())["members"][0]["pid"] is None
        # Started again: same port, same data.
        r = etcd_sh("start", str(d))
        assert r.returncode == 0, r.stderr
        pids = [m["pid"] for m in json.loads((d / "pids.json").read_text())["members"]]
        assert s.get("/k") == "kept"
        s.close()
        # A frozen member is still stopped (SIGCONT before SIGTERM).
        os.kill(pids[0], signal.SIGSTOP)
        r = etcd_sh("stop", str(d))
        assert r.returncode == 0, r.stderr
        assert not runs_etcd(pids[0])
    finally:
        for pid in pids:          # whatever the test left running, by PID
            if runs_etcd(pid):
                os.kill(pid, signal.SIGKILL)


def test_cluster_stop_stops_frozen_members(tmp_path: Path) -> None:
    cluster = EtcdCluster(tmp_path / "etcd", members=3)
    cluster.start()
    pids = list(cluster.pids)
    try:
        cluster.kill(1, signal.SIGSTOP)
        assert cluster.pids[1] == pids[1]     # frozen, still counted as running
    finally:
        cluster.stop()
    assert cluster.pids == [None, None, None]
    assert not any(runs_etcd(p) for p in pids if p)
