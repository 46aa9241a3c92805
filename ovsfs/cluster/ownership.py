"""Who owns a volume, at which generation, and where its DTL lives (issue 11).

Keys under the cluster prefix:
- `/owners/<volume>`: `{"node": name, "gen": int}`. Every change of owner (move, restart)
  goes through `claim`, a compare-and-swap on the record's revision that bumps `gen` by one,
  so of two nodes racing for a volume exactly one wins and every generation has one owner.
  The owner stamps backend writes and DTL requests with `gen`; the backend and the DTL refuse
  lower ones (fencing, DESIGN.md "Fencing").
- `/dtl/<volume>`: where the volume's DTL lives (`{"node", "host", "port", "incarnation",
  "state", "mode", ...}` as the owner's DTL client reports it), so a restart on any node finds
  the tail.

Works on the embedded `ConfigStore` and on `EtcdStore` (both have get_rev / cas).
"""

from __future__ import annotations

from typing import Any, Iterable

from ovsfs.errors import Busy, InvalidArgument

OWNERS = "/owners/"
DTL = "/dtl/"


def _field(node: Any, name: str, default: Any = None) -> Any:
    """A field of a NodeRecord or of a dict with the same keys."""
    if isinstance(node, dict):
        return node.get(name, default)
    return getattr(node, name, default)


class Ownership:
    def __init__(self, store: Any) -> None:
        self.store = store

    def owner(self, volume: str) -> dict[str, Any] | None:
        """`{"node": name, "gen": int}` of `volume`, or None when it never had an owner in the
        cluster (generation 0). ClusterError when etcd cannot be reached."""
        return self.store.get(OWNERS + volume)

    def claim(self, volume: str, node: str, expect_gen: int | None) -> dict[str, Any]:
        """Make `node` the owner of `volume` with generation `expect_gen + 1`, provided the
        generation in force is still `expect_gen` (None or 0: the volume has no owner record
        yet, and the new generation is 1). Returns the new record. Busy when the record is not
        at `expect_gen` (another node claimed it meanwhile: read `owner` again and decide);
        ClusterError when etcd cannot be reached (then whether the claim happened is unknown:
        read `owner` again)."""
        if expect_gen is not None and expect_gen < 0:
            raise InvalidArgument(f"owner generation must be >= 0, not {expect_gen}")
        key = OWNERS + volume
        current, rev = self.store.get_rev(key)
        have = None if current is None else int(current["gen"])
        if (have or 0) != (expect_gen or 0) or (current is not None and expect_gen is None):
            raise Busy(f"volume {volume}: owner generation is {have if have is not None else 'none'}"
                       f" (owner {current['node'] if current else 'none'}), not "
                       f"{expect_gen if expect_gen is not None else 'none'} as expected")
        new = {"node": node, "gen": (expect_gen or 0) + 1}
        if not self.store.cas(key, rev, new):
            now = self.store.get(key)
            raise Busy(f"volume {volume}: claimed by another node meanwhile "
                       f"(now {now['node'] if now else 'none'} at gen "
                       f"{now['gen'] if now else 'none'})")
        return new

    def dtl_record(self, volume: str) -> dict[str, Any] | None:
        """Where `volume`'s DTL lives (as last recorded by its owner), or None."""
        return self.store.get(DTL + volume)

    def set_dtl_record(self, volume: str, rec: dict[str, Any]) -> bool:
        """Record where `volume`'s DTL lives. A record carrying `gen` is written only while
        neither the owner record nor the DTL record in place is of a newer generation: an old
        owner thawed after a restart elsewhere must not overwrite the new owner's record (a
        later restart would look for the tail at the wrong peer). True when written."""
        gen = rec.get("gen")
        key = DTL + volume
        while True:
            current, rev = self.store.get_rev(key)
            if gen is not None:
                own = self.owner(volume)
                newest = max(int(own["gen"]) if own else 0,
                             int(current.get("gen") or 0) if isinstance(current, dict) else 0)
                if int(gen) < newest:
                    return False
            if self.store.cas(key, rev, rec):
                return True

    def forget(self, volume: str) -> None:
        """The volume is deleted: drop its owner and DTL records."""
        self.store.delete(OWNERS + volume)
        self.store.delete(DTL + volume)

    def dtl_load(self) -> dict[str, int]:
        """How many volumes' DTLs each peer holds, from the `/dtl/` records: keyed by the
        record's "node" (peer node name), or its "peer" when it has no "node"."""
        load: dict[str, int] = {}
        for rec in self.store.list(DTL).values():
            peer = (rec.get("node") or rec.get("peer")) if isinstance(rec, dict) else None
            if isinstance(peer, str) and peer:
                load[peer] = load.get(peer, 0) + 1
        return load

    def choose_dtl_peer(self, self_node: str, nodes: Iterable[Any],
                        exclude: Iterable[str] = ()) -> Any | None:
        """The node that should hold a DTL for a volume owned by `self_node`, or None.

        Candidates: alive nodes with a DTL address, not `self_node`, not named (by node name
        or by "host:port" DTL address) in `exclude`. Nodes in another failure domain than
        `self_node`'s come first; among those, the one holding the fewest DTLs, then by name
        (deterministic). `nodes` are `NodeRecord`s (e.g. `NodeRegistry.list_nodes()`) or dicts
        with the same fields; the chosen one is returned as given."""
        nodes = list(nodes)
        skip = set(exclude)
        mine = next((_field(n, "failure_domain", "") for n in nodes
                     if _field(n, "name") == self_node), "")
        candidates = [n for n in nodes
                      if _field(n, "alive", False) and _field(n, "dtl")
                      and _field(n, "name") != self_node
                      and _field(n, "name") not in skip and _field(n, "dtl") not in skip]
        if not candidates:
            return None
        load = self.dtl_load()

        def rank(n: Any) -> tuple[int, int, str]:
            same_domain = int(_field(n, "failure_domain", "") == mine)
            held = load.get(_field(n, "name"), 0) + load.get(_field(n, "dtl"), 0)
            return (same_domain, held, _field(n, "name"))

        return min(candidates, key=rank)
