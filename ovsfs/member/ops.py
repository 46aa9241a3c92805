"""A member's changes of owner: `move` (clean handover), `take` (a move's target), `restart`
(from a dead or cut-off owner, with the DTL tail), `recover` (this node's own write buffer
of a volume is gone), and `converge` (open what was handed here, apply DTL modes). One
commit point per change: the compare-and-swap of the owner record."""

from __future__ import annotations

import logging
import time
from typing import Any

from ovsfs.dtl import Peer
from ovsfs.dtl.client import fetch_tail
from ovsfs.errors import AlreadyExists, Busy, ClusterError, DtlError, InvalidArgument, NotOwner, OvsfsError, VolumeFailed
from ovsfs.member.dtl import MODES, _hostport, released

log = logging.getLogger("ovsfs.member")

PING_TIMEOUT = 5.0              # a node that does not answer /status in this time cannot take a volume
UPLOAD_TIMEOUT = 600.0          # a move or restart gives up (and changes nothing) if the backend
                                # has not taken the volume's data by then


class OwnerChanges:
    """Mixed into Member (ovsfs/member/core.py): uses its engine, owners, kv, node_registry,
    name, cfg, tls and its _call / _node / _volume_rec / _record_dtl / _drop_tail."""

    def move(self, volume: str, node: str) -> dict[str, Any]:
        """Clean handover, run on the owner: writes stop (Busy), everything goes to the
        backend, the owner record moves to `node` at the next generation (the commit
        point), `node` opens the volume. A failure before the commit point leaves the
        volume served here as before."""
        assert self.engine is not None
        rec = self._volume_rec(volume)
        own = self.owners.owner(rec["ns"])
        if own is None or own["node"] != self.name:
            if own is None:
                raise NotOwner(f"volume {volume} has no owner")
            return self._call(own["node"], "POST", f"/volumes/{volume}/move", {"node": node})
        if node == self.name:
            raise InvalidArgument(f"volume {volume} is served by {node} already")
        self._check_alone(rec)
        if not self._node(node).alive:
            raise Busy(f"node {node} is not alive: it cannot take volume {volume}")
        # Answers at all (a frozen node keeps its lease for a while): checked before the
        # volume stops serving here, so a dead target changes nothing.
        try:
            self._call(node, "GET", "/status", timeout=PING_TIMEOUT)
        except ClusterError as e:
            raise Busy(f"node {node} cannot take volume {volume} now: {e.message}") from None
        start = time.monotonic()
        mode = self.dtl_mode(rec)
        self.engine.release_volume(volume, UPLOAD_TIMEOUT)
        try:
            new = self.owners.claim(rec["ns"], node, int(own["gen"]))
        except BaseException:
            self.engine.take_volume(volume, int(own["gen"]))
            raise
        self._record_dtl(rec["ns"], new["gen"], {"mode": mode, "state": "released", "peer": None,
                                                 "unsafe_bytes": 0})
        log.info("volume %s: ownership handed to %s (generation %d)", volume, node, new["gen"])
        self._call(node, "POST", f"/volumes/{volume}/take", {"gen": new["gen"]})
        return {"volume": volume, "node": node, "gen": new["gen"], "seconds": round(time.monotonic() - start, 3)}

    def _check_alone(self, rec: dict[str, Any]) -> None:
        """Clones read through their parent's map on the same node: neither changes owner
        alone (Busy). `rec`: the volume's registry record."""
        ns = rec["ns"]
        if rec.get("parent") or any((r.get("parent") or {}).get("ns") == ns
                                    for r in self.kv.list("/volumes/").values()):
            raise Busy(f"volume {rec['name']} is a clone or has clones: a clone is served where its parent "
                       "is, and they cannot change owner yet")

    def take(self, volume: str, gen: int, force: bool = False) -> dict[str, Any]:
        """Node-to-node, after a move's commit point: open the volume given to this node."""
        assert self.engine is not None
        rec = self._volume_rec(volume)
        own = self.owners.owner(rec["ns"])
        if own is None or own["node"] != self.name or int(own["gen"]) != gen:
            raise NotOwner(f"volume {volume} is not given to {self.name} at generation {gen} (owner: {own})")
        start = time.monotonic()
        with self._taking_lock:
            # The move's own call and this node's watch round (converge) may both take it:
            # the second waits for the first rather than failing the move.
            while volume in self._taking:
                self._taking_lock.wait()
            if volume in self.engine.volumes:
                return {"volume": volume, "node": self.name, "gen": gen, "seconds": 0.0}
            self._taking.add(volume)
        try:
            self.engine.take_volume(volume, gen)
        finally:
            with self._taking_lock:
                self._taking.discard(volume)
                self._taking_lock.notify_all()
        return {"volume": volume, "node": self.name, "gen": gen, "seconds": round(time.monotonic() - start, 3)}

    def converge(self, owners: dict[str, Any] | None = None) -> None:
        """One round of putting this node in line with the cluster store: open what was
        handed to it and is not open (a move whose target was frozen or restarting when the
        owner record changed: everything is on the backend then), and give each open volume
        the DTL mode set for it (on any node, for it or its vPool). `owners`: the /owners/
        records, when the caller has read them already."""
        assert self.engine is not None
        owners = self.kv.list("/owners/") if owners is None else owners
        modes = self.kv.list(MODES)
        for rec in self.kv.list("/volumes/").values():
            own = owners.get(f"/owners/{rec['ns']}")
            if (own is None or own["node"] != self.name or rec["name"] in self.engine.volumes
                    or rec["name"] in self.engine.failed or rec["name"] in self._taking):
                continue
            if released(self.owners.dtl_record(rec["ns"]), int(own["gen"])):
                log.info("volume %s was handed to this node (generation %s) and is not open: opening it",
                         rec["name"], own["gen"])
                try:
                    self.take(rec["name"], int(own["gen"]))
                except OvsfsError as e:
                    log.warning("volume %s not opened: %s", rec["name"], e.message)
        for vol in list(self.engine.volumes.values()):
            want = self.dtl_mode(vol.meta, modes)
            st = vol.state
            if st.dtl.mode != want and st.fenced is None and st.released is None and not st.closed:
                log.info("volume %s: DTL mode %s -> %s", vol.name, st.dtl.mode, want)
                try:
                    self._switch_dtl(vol)
                except OvsfsError as e:
                    log.warning("volume %s: DTL mode not changed: %s", vol.name, e.message)

    def restart(self, volume: str, on: str, force: bool) -> dict[str, Any]:
        """Take a volume from an owner that is dead or cut off, onto node `on`.

        Refused (Busy) while the owner is alive, and when the DTL is not in sync (what the
        owner acknowledged since is nowhere else) unless `force`: then the reply says what
        may be lost. Order: claim the owner record at the next generation (the commit
        point: the DTL peer and the backend refuse the old owner from then on), fetch the
        tail, open here (fences the backend, replays the tail, uploads it), drop the old
        tail. A tail that cannot be read leaves the volume claimed and closed: a later
        restart (when the peer answers) finds it where it was."""
        assert self.engine is not None
        if on != self.name:
            return self._call(on, "POST", f"/volumes/{volume}/restart", {"on": on, "force": force})
        rec = self._volume_rec(volume)
        ns = rec["ns"]
        self._check_alone(rec)
        own = self.owners.owner(ns) or {"node": None, "gen": 0}
        if volume in self.engine.volumes and own["node"] == self.name:
            raise AlreadyExists(f"volume {volume} is served by {self.name} already")
        alive = {n.name for n in self.node_registry.list_nodes() if n.alive}
        owner_alive = own["node"] in alive and own["node"] != self.name
        if owner_alive and not force:
            raise Busy(f"volume {volume}: its owner {own['node']} is alive; use `ovsfs volume move` "
                       "(or --force if it is cut off from its clients)")
        start = time.monotonic()
        dtl = self.owners.dtl_record(ns) or {}
        lost, must_force = self._tail_risk(volume, own, dtl, owner_alive)
        if must_force and not force:
            raise Busy(f"refusing to restart {volume}: {lost}; --force to restart anyway")
        new = self.owners.claim(ns, self.name, int(own["gen"]))
        log.warning("volume %s: taken from %s (generation %d -> %d)%s", volume, own["node"], own["gen"],
                    new["gen"], f"; {lost}" if lost else "")
        entries, fetch_lost = self._fetch(volume, ns, int(new["gen"]), dtl, force)
        lost = fetch_lost or lost
        if volume in self.engine.volumes:   # a stale open copy of an older generation
            self.engine.drop_volume(volume, "restarted at a newer generation")
        self.engine.take_volume(volume, int(new["gen"]), entries, UPLOAD_TIMEOUT,
                                drop_old=lambda: self._drop_tail(dtl, ns, int(new["gen"])))
        return {"volume": volume, "node": self.name, "gen": new["gen"], "dtl_entries": len(entries),
                "may_be_lost": lost, "seconds": round(time.monotonic() - start, 3)}

    def _tail_risk(self, volume: str, own: dict[str, Any], dtl: dict[str, Any],
                   owner_alive: bool) -> tuple[str | None, bool]:
        """What a restart may lose, from the DTL record the owner kept: (what, whether only
        --force may accept it). (None, False): nothing."""
        state, mode = dtl.get("state"), dtl.get("mode")
        if own.get("node") is None or released(dtl, int(own["gen"])):
            return None, False   # handed over cleanly (or never owned): everything is on the backend
        if mode in (None, "none") or state != "ok" or not dtl.get("peer"):
            return (f"the DTL of {volume} was {mode or 'none'} / {state or 'unknown'}: writes {own['node']} "
                    "acknowledged since its last upload"
                    + (f" ({dtl['unsafe_bytes']} bytes when last recorded)" if dtl.get("unsafe_bytes") else "")
                    + " may be lost"), True
        if mode == "async":
            return (f"the DTL of {volume} is async: up to {self.cfg.dtl.queue_bytes} bytes of the last writes "
                    f"{own['node']} acknowledged (its queue) may be lost"
                    + ("; its owner is alive and may acknowledge more until it learns" if owner_alive else "")), False
        return None, False

    def _fetch(self, volume: str, ns: str, gen: int, dtl: dict[str, Any], force: bool) -> tuple[list[Any], str | None]:
        """The previous owner's tail from its DTL peer, at generation `gen` (which fences the
        old owner there). DtlError unless `force` when the peer cannot give it whole."""
        if dtl.get("state") == "released" or not dtl.get("peer"):
            return [], None
        host, port = _hostport(dtl["peer"])
        try:
            return fetch_tail(Peer(dtl.get("node") or "?", host, port), ns, gen, self.tls,
                              timeout=max(10.0, 4 * self.cfg.dtl.timeout),
                              incarnation=dtl.get("incarnation") if dtl.get("state") == "ok" else None), None
        except DtlError as e:
            if not force:
                raise DtlError(f"volume {volume} is now owned by {self.name} (generation {gen}) but its DTL "
                               f"tail could not be read from {dtl['peer']} ({e.message}): it is not served until "
                               f"`ovsfs volume restart {volume} --on {self.name}` succeeds (when that peer "
                               "answers), or, without what only that peer held, with --force") from e
            return [], f"the DTL peer {dtl['peer']} could not give the tail ({e.message}): writes since the last upload may be lost"

    def recover(self, rec: dict[str, Any], gen: int) -> tuple[int, list[Any] | None]:
        """This node owns `rec` at `gen` but its local write buffer of it is gone (a lost disk,
        or a crash before it ever opened it): restart it here at the next generation from the
        backend and the DTL tail, as `restart` does. VolumeFailed when the DTL cannot give
        what the lost write buffer held (then `volume restart --force` is the way out)."""
        ns, name = rec["ns"], rec["name"]
        own = {"node": self.name, "gen": gen}
        dtl = self.owners.dtl_record(ns) or {}
        if released(dtl, gen):
            return gen, None    # handed over here: everything is on the backend
        lost, must_force = self._tail_risk(name, own, dtl, owner_alive=False)
        if must_force:
            raise VolumeFailed(f"its local write buffer is gone and {lost}; `ovsfs volume restart {name} "
                               f"--on {self.name} --force` opens it from the backend alone")
        new = self.owners.claim(ns, self.name, gen)
        try:
            entries, _lost = self._fetch(name, ns, int(new["gen"]), dtl, force=False)
        except DtlError as e:
            raise VolumeFailed(e.message) from e
        log.warning("volume %s: local write buffer gone; restarted here at generation %d with %d DTL entries",
                    name, new["gen"], len(entries))
        return int(new["gen"]), entries
