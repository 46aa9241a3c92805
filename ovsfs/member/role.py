"""The engine's view of a cluster member: which volumes this node serves (ClusterRole, the
engine's NodeRole) and how long it may take itself for their owner (NodeLease)."""

from __future__ import annotations

import logging
import time
from typing import Any

from ovsfs.dtl import DtlSink
from ovsfs.errors import Busy, ClusterError
from ovsfs.member.dtl import MODES

log = logging.getLogger("ovsfs.member")

# Of cluster.lease_ttl: how long after it was sent a lease renewal vouches for ownership. Below
# 1 with a margin: etcd lets the node lease run out no sooner than a ttl after it received
# the renewal, and only then can another node restart the volume.
LEASE_SHARE = 0.85
CONFIRM_RETRY = 2.0   # seconds a failed confirmation answers for (etcd away: fail fast)

# `member` below is the Member (ovsfs/member/core.py), which builds these: typed Any.

class ClusterRole:
    """The engine's NodeRole on a cluster (see ovsfs/engine/owners.py)."""

    def __init__(self, member: Any) -> None:
        self.m = member

    def owned(self, ns: str) -> int | None:
        rec = self.m.owners.owner(ns)
        if rec is None:
            # Registered before there was a cluster: the single node this cluster grew from
            # (the one with its write buffer) claims it at generation 1. Any other node
            # leaves it: it may not know what that write buffer holds.
            if not (self.m.cfg.path(self.m.cfg.engine.write_buffer) / ns).exists():
                return None
            try:
                rec = self.m.owners.claim(ns, self.m.name, None)
                log.info("volume namespace %s had no owner: claimed it (generation 1)", ns)
            except Busy:
                rec = self.m.owners.owner(ns)
        if rec is None or rec["node"] != self.m.name:
            return None
        return int(rec["gen"])

    def claim_new(self, ns: str) -> int:
        return int(self.m.owners.claim(ns, self.m.name, None)["gen"])

    def dtl_sink(self, vol: Any) -> DtlSink:
        return self.m.dtl_sink(vol)

    def recover(self, rec: dict[str, Any], gen: int) -> tuple[int, list[Any] | None]:
        return self.m.recover(rec, gen)

    def lease(self, vol: Any) -> "NodeLease":
        return NodeLease(self.m)

    def forget(self, ns: str) -> None:
        self.m.owners.forget(ns)
        for key in (f"{MODES}volume/{ns}",):
            self.m.kv.delete(key)

    def owner_of(self, ns: str) -> str | None:
        try:
            rec = self.m.owners.owner(ns)
        except ClusterError:
            return None
        return rec["node"] if rec else None


class NodeLease:
    """A volume's owner lease is this node's lease in the cluster store.

    Nobody restarts a volume elsewhere (without --force) before its owner's node lease has
    expired, and that lease only runs while this node renews it. So while the last renewal
    is younger than LEASE_SHARE of the ttl, the owner record cannot have changed by a
    restart (a move is this node's own doing; the owner watch catches a forced restart).
    Past that (the process was frozen, or etcd unreachable), every read and write first
    reads the owner record again."""

    def __init__(self, member: Any) -> None:
        self.m = member
        self._failed: tuple[float, str] | None = None   # (when, why) the last confirm failed

    def valid(self) -> bool:
        reg = self.m.node_registry
        return time.monotonic() < reg.last_renewed + LEASE_SHARE * reg.ttl

    def confirm(self, vol: Any) -> None:
        failed = self._failed
        if failed is not None and time.monotonic() - failed[0] < CONFIRM_RETRY:
            raise ClusterError(failed[1])   # etcd just failed: do not wait for it per request
        try:
            rec = self.m.owners.owner(vol.ns)
        except ClusterError as e:
            why = (f"volume {vol.name}: this node cannot confirm it still owns it "
                   f"(its cluster lease ran out and {e.message})")
            self._failed = (time.monotonic(), why)
            raise ClusterError(why) from None
        self._failed = None
        if rec is None or rec["node"] != self.m.name or int(rec["gen"]) != vol.gen:
            raise vol.log.halt(f"its owner is {rec['node'] if rec else 'nobody'} at generation "
                               f"{rec['gen'] if rec else '-'} now")
