"""Volume ownership and DTL placement (issue 11, items 3 and 4): generations bumped by
compare-and-swap on both stores, exactly one winner of a race, DTL peers chosen in another
failure domain first."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from ovsfs.cluster.etcd import EtcdStore
from ovsfs.cluster.nodes import NodeRecord, NodeRegistry
from ovsfs.cluster.ownership import Ownership
from ovsfs.errors import Busy


def test_claim_bumps_the_generation(any_store: Any) -> None:
    own = Ownership(any_store)
    assert own.owner("v") is None
    assert own.claim("v", "a", None) == {"node": "a", "gen": 1}
    assert own.owner("v") == {"node": "a", "gen": 1}
    with pytest.raises(Busy, match="generation is 1"):
        own.claim("v", "b", None)          # expected no owner: there is one
    assert own.claim("v", "b", 1) == {"node": "b", "gen": 2}    # move / restart on b
    with pytest.raises(Busy, match="owner b"):
        own.claim("v", "c", 1)             # a stale view of the owner
    assert own.claim("v", "a", 2) == {"node": "a", "gen": 3}
    assert own.owner("v") == {"node": "a", "gen": 3}
    # gen 0 = never clustered: claiming it from 0 is the same as from no record.
    assert own.claim("w", "a", 0) == {"node": "a", "gen": 1}


def test_claim_race_exactly_one_wins(any_store: Any) -> None:
    own = Ownership(any_store)
    own.claim("v", "a", None)
    for expect in (1, 2, 3):
        barrier = threading.Barrier(5)
        won: list[dict[str, Any]] = []
        busy: list[str] = []

        def worker(node: str) -> None:
            barrier.wait()
            try:
                won.append(own.claim("v", node, expect))
            except Busy as e:
                busy.append(str(e))

        ts = [threading.Thread(target=worker, args=(f"n{i}",)) for i in range(5)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert len(won) == 1 and len(busy) == 4, (won, busy)
        assert won[0]["gen"] == expect + 1
        assert own.owner("v") == won[0]


def test_dtl_record_and_forget(any_store: Any) -> None:
    own = Ownership(any_store)
    own.claim("v", "a", None)
    assert own.dtl_record("v") is None
    rec = {"node": "b", "host": "127.0.0.1", "port": 7002, "incarnation": "x1",
           "state": "ok", "mode": "sync"}
    own.set_dtl_record("v", rec)
    assert own.dtl_record("v") == rec
    own.forget("v")
    assert own.owner("v") is None and own.dtl_record("v") is None
    assert own.claim("v", "a", None)["gen"] == 1     # a new volume of that name starts over


def _node(name: str, fd: str, alive: bool = True, dtl: str | None = None) -> NodeRecord:
    return NodeRecord(name, failure_domain=fd, alive=alive,
                      dtl=f"127.0.0.1:{7000 + int(name[1:])}" if dtl is None else dtl)


def test_choose_dtl_peer(any_store: Any) -> None:
    own = Ownership(any_store)
    nodes = [_node("n1", "rack1"), _node("n2", "rack1"), _node("n3", "rack2"),
             _node("n4", "rack2"), _node("n5", "rack3", alive=False), _node("n6", "rack3", dtl="")]
    pick = lambda excl=(), me="n1", ns=nodes: own.choose_dtl_peer(me, ns, set(excl))  # noqa: E731
    # Another failure domain first (n3, n4 in rack2); n5 is down, n6 holds no DTLs.
    assert pick().name == "n3"
    assert pick({"n3"}).name == "n4"
    assert pick({"127.0.0.1:7003"}).name == "n4"          # excluded by address as well
    # No other domain left: another node of the same domain.
    assert pick({"n3", "n4"}).name == "n2"
    assert pick({"n2", "n3", "n4"}) is None
    assert pick(me="n3").name == "n1"
    # The least loaded first: n3 holds two DTLs, n4 one.
    own.set_dtl_record("v1", {"node": "n3"})
    own.set_dtl_record("v2", {"node": "n3"})
    own.set_dtl_record("v3", {"node": "n4"})
    assert pick().name == "n4"
    # Dicts with the same fields do as well; the choice comes back as given.
    as_dicts = [n.to_dict() for n in nodes]
    assert pick(ns=as_dicts) == as_dicts[3]
    # Nobody else in the cluster: standalone.
    assert own.choose_dtl_peer("n1", [nodes[0]], set()) is None


def test_choose_dtl_peer_from_registered_nodes(etcd_store: EtcdStore) -> None:
    regs = []
    try:
        for name, fd in (("a", "fd1"), ("b", "fd1"), ("c", "fd2"), ("d", "fd2")):
            r = NodeRegistry(etcd_store)
            r.register(NodeRecord(name, failure_domain=fd, dtl=f"127.0.0.1:{ord(name)}"), ttl=5)
            regs.append(r)
        own = Ownership(etcd_store)
        live = NodeRegistry(etcd_store).list_nodes()
        assert own.choose_dtl_peer("a", live, set()).name == "c"
        regs[2].stop()                                     # c stops: d, still in fd2
        live = NodeRegistry(etcd_store).list_nodes()
        assert own.choose_dtl_peer("a", live, set()).name == "d"
        regs[3].stop()                                     # fd2 all down: b, same domain
        live = NodeRegistry(etcd_store).list_nodes()
        assert own.choose_dtl_peer("a", live, set()).name == "b"
    finally:
        for r in regs:
            r.stop()
