"""Node records of a cluster, and the lease that says a node is alive (issue 11).

Keys under the cluster prefix:
- `/nodes/<name>`: the node's record (addresses, failure domain, ASDs), permanent: a node that
  is down is still listed, as not alive.
- `/alive/<name>`: `{"started": ...}` under a lease the node keeps alive from a thread every
  ttl/3 seconds. etcd deletes it when the node has not renewed it for `ttl` seconds (crash,
  SIGSTOP, network cut). It is created with compare-and-swap "must not exist", so two daemons
  with the same name cannot both be alive.

A node whose lease expired while it was still running (SIGSTOP then SIGCONT, etcd away for
longer than the ttl) takes a new lease and registers again when it notices, unless another
node took its name meanwhile; then it logs an error, sets `lost`, calls `on_lost` and stops
renewing.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ovsfs.errors import Busy, ClusterError

log = logging.getLogger(__name__)

NODES = "/nodes/"
ALIVE = "/alive/"


@dataclass
class NodeRecord:
    """What other nodes need to know about one node. Addresses are "host:port" ("" = none)."""

    name: str
    failure_domain: str = ""
    mgmt: str = ""          # management API over TCP
    dtl: str = ""           # DTL server ("" = this node holds no DTL for others)
    nbd: str = ""           # NBD door over TCP
    asds: list[str] = field(default_factory=list)   # "host:port" of the ASDs this node runs
    started: float = 0.0    # unix time the daemon started
    alive: bool = False     # from the lease, filled in by list_nodes(); never stored

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def stored(self) -> dict[str, Any]:
        out = self.to_dict()
        del out["alive"]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], alive: bool = False) -> NodeRecord:
        known = {f.name for f in dataclasses.fields(cls)} - {"alive"}
        return cls(**{k: v for k, v in d.items() if k in known}, alive=alive)


class NodeRegistry:
    """Registers this node (at most one `register` per registry) and lists all nodes.

    `store` is an `EtcdStore` (leases are needed for `register`; `list_nodes` and `get` work on
    any store with `get`/`list`). `on_lost(reason)` is called from the keepalive thread when
    the node could not register again after its lease expired because another node holds the
    name (the daemon should then stop serving)."""

    def __init__(self, store: Any, on_lost: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.on_lost = on_lost
        self.record: NodeRecord | None = None
        self.lease: int | None = None
        self.ttl = 0
        self.lost = False
        # time.monotonic() of the last lease grant or renewal etcd acknowledged: until
        # last_renewed + ttl no other node can see this one as dead (so none can restart its
        # volumes without --force); 0 = never.
        self.last_renewed = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- this node --------------------------------------------------------------------------

    def register(self, record: NodeRecord, ttl: int) -> None:
        """Write `/nodes/<name>` and `/alive/<name>` under a lease of `ttl` seconds (>= 2) and
        start the thread that keeps it alive. Busy when a node with that name is alive;
        ClusterError when etcd cannot be reached."""
        if self._thread is not None:
            raise Busy(f"node {self.record.name if self.record else '?'} is registered already")
        if ttl < 2:
            raise ClusterError(f"lease ttl must be at least 2 seconds, not {ttl}")
        self.record, self.ttl = record, ttl
        if not record.started:
            record.started = time.time()
        self._claim()
        self._stop.clear()
        self._thread = threading.Thread(target=self._keepalive_loop, daemon=True,
                                        name=f"node-lease-{record.name}")
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing and revoke the lease: the node is at once listed as not alive. Errors
        reaching etcd are logged (the lease then expires after its ttl)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.lease is not None:
            try:
                self.store.revoke(self.lease)
            except ClusterError as e:
                log.warning("node %s: could not revoke its lease (it expires in %d s): %s",
                            self.record.name if self.record else "?", self.ttl, e)
            self.lease = None

    def _claim(self) -> None:
        """Take a lease and the name. Busy (lease revoked again) when the name is alive."""
        assert self.record is not None
        name = self.record.name
        lease = self.store.grant(self.ttl)
        try:
            ok = self.store.cas(ALIVE + name, 0, {"started": self.record.started}, lease=lease)
            if not ok:
                other = self.store.get(ALIVE + name)
                raise Busy(f"a node named {name!r} is alive already in this cluster "
                           f"(started {other.get('started') if other else '?'}); "
                           "two daemons cannot share a name")
            self.store.put(NODES + name, self.record.stored())
        except BaseException:
            try:
                self.store.revoke(lease)
            except ClusterError:
                pass   # it expires by itself
            raise
        self.lease = lease
        self.last_renewed = time.monotonic()

    def _keepalive_loop(self) -> None:
        assert self.record is not None
        name = self.record.name
        # Every quarter ttl: the owner lease (ovsfs/member/role.py) lasts 0.85 ttl from a renewal,
        # so etcd may be away for 0.6 ttl before volumes stop serving.
        period = self.ttl / 4
        failing = False
        while not self._stop.wait(period):
            try:
                sent = time.monotonic()   # the lease runs from when etcd got the request, at the latest
                if self.lease is not None and self.store.keepalive(self.lease):
                    self.last_renewed = sent
                    if failing:
                        log.warning("node %s: etcd answers again, lease renewed", name)
                    failing = False
                    continue
                # The lease is gone: we were frozen, or etcd was away, for longer than the ttl.
                log.warning("node %s: its lease expired (process stopped or etcd away for more "
                            "than %d s); registering again", name, self.ttl)
                self.lease = None
                self._claim()
                failing = False
                log.warning("node %s: registered again under a new lease", name)
            except Busy as e:
                # Another daemon took the name while we were away: the name is its now. Stop
                # trying (taking it back later would give two daemons one name in turn).
                log.error("node %s: cannot register again, giving up: %s", name, e)
                self.lost = True
                if self.on_lost is not None:
                    self.on_lost(str(e))
                return
            except ClusterError as e:
                if not failing:   # once per outage, not every period
                    log.warning("node %s: cannot renew its lease: %s", name, e)
                failing = True

    # ---- every node -------------------------------------------------------------------------

    def get(self, name: str) -> NodeRecord | None:
        """The record of node `name` with its alive flag, or None when it never registered."""
        d = self.store.get(NODES + name)
        if d is None:
            return None
        return NodeRecord.from_dict(d, alive=self.store.get(ALIVE + name) is not None)

    def list_nodes(self) -> list[NodeRecord]:
        """Every node that ever registered, by name, each with `alive` from its lease."""
        records = self.store.list(NODES)
        alive = {k[len(ALIVE):] for k in self.store.list(ALIVE)}
        return [NodeRecord.from_dict(d, alive=k[len(NODES):] in alive)
                for k, d in sorted(records.items())]

    def remove(self, name: str) -> None:
        """Forget node `name` (decommissioned). Busy while it is alive."""
        if self.store.get(ALIVE + name) is not None:
            raise Busy(f"node {name!r} is alive: stop it before removing it")
        self.store.delete(NODES + name)
