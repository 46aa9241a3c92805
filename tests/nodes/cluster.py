"""A whole cluster on one machine for tests: etcd members, ASD processes, node daemons.

Everything runs on 127.0.0.1 with free ports and its own state directory under the test's
tmp_path; every process is stopped by PID at teardown (etcd by its launcher, ASDs by the
backend tests' AsdCluster, daemons by the shared daemon fixture). The nodes share the six
ASDs (two per node's failure domain) and one preset, as DESIGN.md's clusters do.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from ovsfs.cluster.etcd_launch import EtcdCluster
from tests.backend.asd_helpers import AsdCluster
from tests.conftest import Daemon, _merge, free_ports


class Cluster:
    def __init__(self, tmp: Path, daemon_factory: Callable[..., Daemon], nodes: int = 3,
                 etcd_members: int = 3, asds: int = 6, dtl_mode: str = "sync", lease_ttl: int = 3,
                 extra: dict[str, Any] | None = None) -> None:
        self.tmp = tmp
        self.etcd = EtcdCluster(tmp / "etcd", members=etcd_members)
        self.asds = AsdCluster(tmp / "asds")
        self.nodes: list[Daemon] = []
        self.names = [f"n{i + 1}" for i in range(nodes)]
        self._factory = daemon_factory
        self._extra = extra or {}
        self.dtl_mode, self.lease_ttl, self.nasds = dtl_mode, lease_ttl, asds

    def start(self) -> "Cluster":
        self.etcd.start()
        # Two ASDs per failure domain (x = 1 per domain: the default preset's 2+1 policy).
        addrs = self.asds.start_many(self.nasds, [self.names[j % len(self.names)] for j in range(self.nasds)])
        for i, name in enumerate(self.names):
            mgmt, dtl = free_ports(2)
            cfg = {"node": {"name": name},
                   "backend": {"kind": "asd", "asds": addrs, "down_timeout": 3600.0},
                   "cluster": {"etcd": self.etcd.urls, "failure_domain": f"fd{i + 1}",
                               "mgmt_port": mgmt, "lease_ttl": self.lease_ttl},
                   "dtl": {"port": dtl, "mode": self.dtl_mode, "timeout": 2.0, "retry_seconds": 1.0}}
            cfg = _merge(cfg, self._extra)    # per key: extra={"dtl": {...}} keeps the port
            self.nodes.append(self._factory(cfg, start=True))
        return self

    def stop(self) -> None:
        for d in self.nodes:
            if d.running():
                try:
                    os.kill(d.pid, signal.SIGCONT)   # a frozen daemon acts on SIGTERM only once thawed
                except ProcessLookupError:
                    pass
                d.teardown()
        for i in list(self.asds.procs):
            self.asds.kill(i)
        self.etcd.stop()

    # ---- looking at it -------------------------------------------------------------------

    def node(self, name: str) -> Daemon:
        return self.nodes[self.names.index(name)]

    def nbd_uri(self, name: str, volume: str) -> str:
        return f"nbd+unix:///{volume}?socket={self.node(name).nbd_socket}"

    def owner(self, volume: str, via: str | None = None) -> dict[str, Any]:
        d = self.node(via) if via else next(d for d in self.nodes if d.running())
        status, info = d.api("GET", f"/volumes/{volume}/cluster")
        assert status == 200, info
        return info

    def wait_dead(self, name: str, timeout: float = 30.0, via: str | None = None) -> None:
        """Until the other nodes (`via`: that one, say when another is frozen) see `name` as
        not alive (its lease expired)."""
        deadline = time.monotonic() + timeout
        other = self.node(via) if via else next(d for n, d in zip(self.names, self.nodes)
                                                if n != name and d.running())
        while time.monotonic() < deadline:
            status, nodes = other.api("GET", "/nodes")
            if status == 200 and not next(n for n in nodes if n["name"] == name)["alive"]:
                return
            time.sleep(0.2)
        raise AssertionError(f"node {name} still alive after {timeout} s")

    def wait_dtl(self, volume: str, state: str, via: str, timeout: float = 30.0) -> dict[str, Any]:
        """Until the owner reports its DTL in `state` (ok, degraded, ...); returns the info."""
        deadline = time.monotonic() + timeout
        info: Any = None
        while time.monotonic() < deadline:
            status, info = self.node(via).api("GET", f"/volumes/{volume}")
            if status == 200 and info["dtl"]["state"] == state:
                return info
            time.sleep(0.1)
        raise AssertionError(f"DTL of {volume} not {state} within {timeout} s: {info}")


def qemu_io(uri: str, *cmds: str) -> str:
    """Run qemu-io commands (`write -P 0xab 0 1M`, `read -P ...`) on an NBD URI; fails the
    test on any error or pattern mismatch."""
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    r = subprocess.run([*args, uri], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "fail" not in r.stdout.lower() and "error" not in r.stderr.lower(), r
    return r.stdout
