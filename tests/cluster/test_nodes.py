"""Node registration under a lease (issue 11, item 1): alive while the node runs, not alive
once it stops, is killed or frozen past its ttl; registered again when it comes back; two
daemons can never be alive under one name. The frozen / killed nodes are real processes
(tests/cluster/node_proc.py), signalled by PID."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from ovsfs.cluster.etcd import EtcdStore
from ovsfs.cluster.etcd_launch import EtcdCluster
from ovsfs.cluster.nodes import NodeRecord, NodeRegistry
from ovsfs.errors import Busy

REPO = Path(__file__).resolve().parents[2]
TTL = 2


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll cond every 50 ms; returns the seconds it took. Fails after `timeout` s."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"not within {timeout} s: {what}"
        time.sleep(0.05)
    return time.monotonic() - t0


class NodeProc:
    """tests/cluster/node_proc.py in a subprocess, stopped by PID at teardown."""

    def __init__(self, urls: list[str], prefix: str, name: str, log: Path) -> None:
        self.log = log
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
        with open(log, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.cluster.node_proc", ",".join(urls), prefix, name,
                 str(TTL)], stdout=subprocess.PIPE, stderr=logf, stdin=subprocess.DEVNULL,
                env=env, cwd=REPO, start_new_session=True)

    def line(self, timeout: float = 10.0) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"no output from node process in {timeout} s; log: {self.log.read_text()}"
        return self.proc.stdout.readline().decode().strip()

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def prefix() -> str:
    return f"/n{uuid.uuid4().hex[:12]}"


@pytest.fixture
def store(etcd1: EtcdCluster, prefix: str) -> Iterator[EtcdStore]:
    s = EtcdStore(etcd1.urls, prefix=prefix)
    yield s
    s.close()


@pytest.fixture
def node_procs(etcd1: EtcdCluster, prefix: str, tmp_path: Path) -> Iterator[Callable[[str], NodeProc]]:
    made: list[NodeProc] = []

    def start(name: str) -> NodeProc:
        p = NodeProc(etcd1.urls, prefix, name, tmp_path / f"node-{len(made)}.log")
        made.append(p)
        return p

    yield start
    for p in made:
        p.stop()


def alive(store: EtcdStore, name: str) -> bool:
    rec = NodeRegistry(store).get(name)
    return bool(rec and rec.alive)


def test_register_list_and_stop(store: EtcdStore) -> None:
    a, b = NodeRegistry(store), NodeRegistry(store)
    a.register(NodeRecord("a", failure_domain="fd1", mgmt="127.0.0.1:7001",
                          dtl="127.0.0.1:7002", nbd="127.0.0.1:7003",
                          asds=["127.0.0.1:7100", "127.0.0.1:7101"]), ttl=TTL)
    b.register(NodeRecord("b", failure_domain="fd2"), ttl=TTL)
    try:
        time.sleep(TTL * 1.5)      # past one ttl: the thread renews the lease
        nodes = NodeRegistry(store).list_nodes()
        assert [(n.name, n.alive) for n in nodes] == [("a", True), ("b", True)]
        assert nodes[0].asds == ["127.0.0.1:7100", "127.0.0.1:7101"]
        assert nodes[0].dtl == "127.0.0.1:7002" and nodes[0].failure_domain == "fd1"
        assert nodes[0].started > 0
        a.stop()                    # revoked: not alive at once, record kept
        assert [(n.name, n.alive) for n in NodeRegistry(store).list_nodes()] == \
            [("a", False), ("b", True)]
        with pytest.raises(Busy, match="alive"):
            NodeRegistry(store).remove("b")
        NodeRegistry(store).remove("a")
        assert [n.name for n in NodeRegistry(store).list_nodes()] == ["b"]
    finally:
        a.stop()
        b.stop()


def test_same_name_alive_is_refused(store: EtcdStore, node_procs: Callable[[str], NodeProc]) -> None:
    first = node_procs("dup")
    assert first.line() == "registered"
    second = node_procs("dup")                 # a second daemon with the same name
    out = second.line()
    assert out.startswith("busy:") and "'dup' is alive already" in out
    assert second.proc.wait(10) == 3
    # In this process as well; and once the first has stopped, the name is free.
    reg = NodeRegistry(store)
    with pytest.raises(Busy):
        reg.register(NodeRecord("dup"), ttl=TTL)
    first.stop()
    assert not alive(store, "dup")
    reg.register(NodeRecord("dup"), ttl=TTL)
    assert alive(store, "dup")
    reg.stop()


def test_frozen_node_expires_and_registers_again(store: EtcdStore,
                                                node_procs: Callable[[str], NodeProc]) -> None:
    p = node_procs("frozen")
    assert p.line() == "registered"
    assert alive(store, "frozen")
    p.signal(signal.SIGSTOP)
    # Not renewed: not alive within the ttl plus etcd's expiry check (generous: 3 x ttl).
    wait_for(lambda: not alive(store, "frozen"), 3 * TTL, "frozen node listed as not alive")
    assert NodeRegistry(store).get("frozen") is not None    # the record stays
    p.signal(signal.SIGCONT)
    # Thawed: its keepalive finds the lease gone and registers again within a period or two.
    wait_for(lambda: alive(store, "frozen"), 3 * TTL, "thawed node alive again")
    assert "registered again under a new lease" in p.log.read_text()
    # Killed: not alive after its ttl.
    p.signal(signal.SIGKILL)
    p.proc.wait(10)
    wait_for(lambda: not alive(store, "frozen"), 3 * TTL, "killed node listed as not alive")


def test_name_taken_while_frozen_is_not_taken_back(store: EtcdStore,
                                                   node_procs: Callable[[str], NodeProc]) -> None:
    old = node_procs("n1")
    assert old.line() == "registered"
    old.signal(signal.SIGSTOP)
    wait_for(lambda: not alive(store, "n1"), 3 * TTL, "frozen node listed as not alive")
    new = NodeRegistry(store)
    new.register(NodeRecord("n1", started=12345.0), ttl=TTL)
    try:
        old.signal(signal.SIGCONT)
        out = old.line(timeout=3 * TTL)
        assert out.startswith("lost:") and "'n1' is alive already" in out
        time.sleep(TTL)            # the old daemon gave up: it does not take the name back
        assert "giving up" in old.log.read_text()
        assert store.get("/alive/n1") == {"started": 12345.0}
        assert alive(store, "n1")
    finally:
        new.stop()
