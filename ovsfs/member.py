"""This node as a member of a cluster (`[cluster] etcd` set): ownership, the DTL, handovers.

Pieces it puts together (each tested on its own):
- the cluster store on etcd (ovsfs/cluster/etcd.py): the registry of vPools and volumes,
  node records under leases (nodes.py), owner records with generations (ownership.py);
- the engine's NodeRole (`ClusterRole`): a volume is served where its owner record says,
  at that generation; its DTL client ships to a peer chosen in another failure domain;
- the DTL server other nodes ship to (ovsfs/dtl/server.py), refusing old generations;
- the operations that change an owner: `move` (clean handover, no DTL needed) and `restart`
  (steal from a dead or unreachable owner: fence at the DTL and in the backend, replay the
  tail), and the node-to-node `take`;
- a watch that halts a volume as soon as its owner record names another node or
  generation (a node frozen through a restart learns it this way, even with no write).

One commit point per change of owner: the compare-and-swap of the owner record.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import httpx
import trio

from ovsfs.backend.store import Store
from ovsfs.cluster.etcd import EtcdStore
from ovsfs.cluster.nodes import NodeRecord, NodeRegistry
from ovsfs.cluster.ownership import Ownership
from ovsfs.config import Config
from ovsfs.dtl import DtlSink, NoDtl, Peer
from ovsfs.dtl import wire as dtl_wire
from ovsfs.dtl.client import Connection, DtlClient, fetch_tail
from ovsfs.dtl.server import DtlServer
from ovsfs.engine import tail
from ovsfs.engine.engine import Engine
from ovsfs.errors import (AlreadyExists, Busy, ClusterError, DtlError, InvalidArgument, NotFound,
                          NotOwner, OvsfsError, VolumeFailed)

log = logging.getLogger("ovsfs.member")

MODES = "/dtl_mode/"            # /dtl_mode/vpool/<vpool>, /dtl_mode/volume/<ns>: DTL mode settings
CALL_TIMEOUT = 3600.0           # a take waits for a rebuild and uploads on the other node
# Of cluster.lease_ttl: how long after it was sent a lease renewal vouches for ownership. Below
# 1 with a margin: etcd lets the node lease run out no sooner than a ttl after it received
# the renewal, and only then can another node restart the volume.
LEASE_SHARE = 0.85
PING_TIMEOUT = 5.0              # a node that does not answer /status in this time cannot take a volume
UPLOAD_TIMEOUT = 600.0          # a move or restart gives up (and changes nothing) if the backend
                                # has not taken the volume's data by then


def _hostport(addr: str) -> tuple[str, int]:
    host, _sep, port = addr.rpartition(":")
    return host, int(port)


class ClusterRole:
    """The engine's NodeRole on a cluster (see ovsfs/engine/owners.py)."""

    def __init__(self, member: "Member") -> None:
        self.m = member

    def owned(self, ns: str) -> int | None:
        rec = self.m.owners.owner(ns)
        if rec is None:
            # Registered before there was a cluster (the single node this cluster grew
            # from): the first node to look claims it at generation 1.
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

    def __init__(self, member: "Member") -> None:
        self.m = member

    def valid(self) -> bool:
        reg = self.m.node_registry
        return time.monotonic() < reg.last_renewed + LEASE_SHARE * reg.ttl

    def confirm(self, vol: Any) -> None:
        try:
            rec = self.m.owners.owner(vol.ns)
        except ClusterError as e:
            raise ClusterError(f"volume {vol.name}: this node cannot confirm it still owns it "
                               f"(its cluster lease ran out and {e.message})") from None
        if rec is None or rec["node"] != self.m.name or int(rec["gen"]) != vol.gen:
            raise vol.log.halt(f"its owner is {rec['node'] if rec else 'nobody'} at generation "
                               f"{rec['gen'] if rec else '-'} now")


class Member:
    def __init__(self, cfg: Config, store: Store, removed_asds: list[str] | None = None) -> None:
        """`removed_asds`: ASDs drained out of this node's backend: never attached again."""
        self.cfg = cfg
        self.store = store
        self.removed_asds = set(removed_asds or [])
        self.name = cfg.node.name
        self.kv = EtcdStore(cfg.cluster.etcd, cfg.cluster.prefix, timeout=cfg.dtl.timeout)
        self.node_registry = NodeRegistry(self.kv, on_lost=self._lost)
        self.owners = Ownership(self.kv)
        self.role = ClusterRole(self)
        self.engine: Engine | None = None
        self.tls = None
        if cfg.dtl.tls == "required":
            self.tls = dtl_wire.client_ssl_context(cfg.path(cfg.dtl.tls_cert), cfg.path(cfg.dtl.tls_key),
                                                   cfg.path(cfg.dtl.tls_ca))
        self.dtl_server = (DtlServer.from_config(cfg, cluster_gen=self._cluster_gen)
                           if cfg.dtl.port else None)
        self._stop = threading.Event()
        self._dtl_rec_lock = threading.Lock()      # DTL records written in the order read
        self._unsafe_recorded: dict[str, int] = {}  # ns -> unsafe_bytes last recorded out of sync
        self._taking: set[str] = set()      # volumes being opened by take() now
        self._taking_lock = threading.Lock()
        self.watch_interval = max(0.5, cfg.cluster.lease_ttl / 5)   # seconds between owner-watch rounds
        self._http = httpx.Client(timeout=httpx.Timeout(CALL_TIMEOUT, connect=5.0), trust_env=False)

    # ---- the DTL ---------------------------------------------------------------------------

    def _cluster_gen(self, ns: str) -> int:
        rec = self.owners.owner(ns)
        return int(rec["gen"]) if rec else 0

    def dtl_mode(self, meta: dict[str, Any]) -> str:
        """A volume's DTL mode: its own setting, else its vPool's, else `dtl.mode`."""
        for key in (f"{MODES}volume/{meta['ns']}", f"{MODES}vpool/{meta['vpool']}"):
            mode = self.kv.get(key)
            if mode in ("none", "async", "sync"):
                return mode
        return self.cfg.dtl.mode

    def choose_peer(self, exclude: set[str]) -> Peer | None:
        rec = self.owners.choose_dtl_peer(self.name, self.node_registry.list_nodes(), exclude)
        if rec is None:
            return None
        host, port = _hostport(rec.dtl)
        return Peer(rec.name, host, port)

    def dtl_sink(self, vol: Any) -> DtlSink:
        mode = self.dtl_mode(vol.meta)
        ns, gen = vol.ns, vol.gen
        if mode == "none":
            self._record_dtl(ns, gen, {"mode": "none", "state": "standalone", "peer": None,
                                       "unsafe_bytes": None})
            return NoDtl()
        # Recorded before the first write is acknowledged: a restart elsewhere must never
        # take an older record (the previous owner's peer) for this owner's DTL.
        self._record_dtl(ns, gen, {"mode": mode, "state": "catching up"})
        client = DtlClient(ns, gen, mode, self.cfg.dtl, self.choose_peer,
                           lambda start: tail.read_tail(vol, start),
                           lambda status: self._record_dtl(ns, gen, status), tls=self.tls)
        client.trim(tail.backend_pos(vol))   # what is on the backend already is not shipped
        return client

    def _record_dtl(self, ns: str, gen: int, status: dict[str, Any]) -> None:
        """Where a volume's DTL lives and whether it is in sync: what a restart elsewhere reads."""
        rec = {"owner": self.name, "gen": gen, "mode": status.get("mode"), "state": status.get("state"),
               "node": status.get("peer"), "peer": status.get("peer_address"),
               "incarnation": status.get("peer_incarnation"),
               "unsafe_bytes": status.get("unsafe_bytes"), "time": time.time()}
        try:
            with self._dtl_rec_lock:
                written = self.owners.set_dtl_record(ns, rec)
            if not written:
                log.warning("DTL record of %s not written: generation %d is not the newest any more", ns, gen)
        except ClusterError as e:
            log.warning("DTL record of %s not written: %s", ns, e.message)

    def _refresh_dtl_record(self, vol: Any) -> None:
        """While a volume's DTL is not in sync, every write it acknowledges is only here: keep
        the recorded unsafe_bytes current (the DTL client reports state changes only), since
        a forced restart elsewhere reports that figure as what may be lost. ClusterError."""
        with self._dtl_rec_lock:
            # Read under the lock: a state change the sender records meanwhile lands after.
            sink = getattr(vol.state, "dtl", None)
            if sink is None:
                return
            st = sink.status()
            if st.get("mode") == "none" or st.get("state") not in ("degraded", "standalone"):
                self._unsafe_recorded.pop(vol.ns, None)
                return
            if self._unsafe_recorded.get(vol.ns) == st.get("unsafe_bytes"):
                return
            rec = dict(self.owners.dtl_record(vol.ns) or {})
            if rec.get("gen") != vol.gen or rec.get("state") != st["state"]:
                return        # the sender's own record of this state is not written yet
            rec.update(unsafe_bytes=st.get("unsafe_bytes"), time=time.time())
            self.owners.set_dtl_record(vol.ns, rec)
            self._unsafe_recorded[vol.ns] = st.get("unsafe_bytes")

    def _drop_tail(self, dtl: dict[str, Any] | None, ns: str, gen: int) -> None:
        """The previous owner's tail is on the backend now: the peer may forget it."""
        if not dtl or not dtl.get("peer"):
            return
        host, port = _hostport(dtl["peer"])
        try:
            conn = Connection(Peer(dtl.get("node") or "?", host, port), self.cfg.dtl.timeout, self.tls)
            try:
                conn.call(dtl_wire.DROP, ns, gen)
            finally:
                conn.close()
        except OvsfsError as e:
            # Not fatal: the peer keeps a tail nobody reads (this owner's DTL record names
            # its own peer from now on) until the volume is deleted.
            log.warning("could not drop the old DTL tail of %s at %s: %s", ns, dtl["peer"], e.message)

    # ---- records ---------------------------------------------------------------------------

    def _volume_rec(self, volume: str) -> dict[str, Any]:
        rec = self.kv.get(f"/volumes/{volume}")
        if rec is None:
            raise NotFound(f"volume {volume} does not exist")
        return rec

    def _node(self, name: str) -> NodeRecord:
        for n in self.node_registry.list_nodes():
            if n.name == name:
                return n
        raise NotFound(f"node {name} is not in this cluster")

    def _call(self, node: str, method: str, path: str, body: dict[str, Any] | None = None,
              timeout: float = CALL_TIMEOUT) -> dict[str, Any]:
        """Another node's management API (over TCP); its errors come back as OvsfsError."""
        rec = self._node(node)
        if not rec.mgmt:
            raise ClusterError(f"node {node} has no management address (cluster.mgmt_port = 0)")
        try:
            r = self._http.request(method, f"http://{rec.mgmt}{path}", json=body,
                                   timeout=httpx.Timeout(timeout, connect=min(5.0, timeout)))
        except httpx.HTTPError as e:
            raise ClusterError(f"node {node} ({rec.mgmt}) did not answer: {e}") from None
        data = r.json() if r.content else {}
        if r.status_code >= 400:
            err = OvsfsError(f"node {node}: {data.get('error', r.text)}")
            err.http_status = r.status_code
            raise err
        return data

    # ---- ClusterOps (the management API) ---------------------------------------------------

    def nodes_info(self) -> list[dict[str, Any]]:
        count: dict[str, int] = {}
        for rec in self.kv.list("/owners/").values():
            count[rec["node"]] = count.get(rec["node"], 0) + 1
        return [{**n.to_dict(), "volumes": count.get(n.name, 0)} for n in self.node_registry.list_nodes()]

    def nodes(self) -> list[dict[str, Any]]:
        return self.nodes_info()

    def remote_volumes(self, vpool: str | None) -> list[dict[str, Any]]:
        here = set(self.engine.volumes) if self.engine else set()
        owners = self.kv.list("/owners/")
        out = []
        for rec in self.kv.list("/volumes/").values():
            if rec["name"] in here or (vpool is not None and rec["vpool"] != vpool):
                continue
            parent = rec.get("parent")
            own = owners.get(f"/owners/{rec['ns']}") or {}
            out.append({"name": rec["name"], "vpool": rec["vpool"], "namespace": rec["ns"], "size": rec["size"],
                        "snapshots": "-", "parent": f"{parent['name']}@{parent['snapshot']}" if parent else None,
                        "state": "remote", "owner": own.get("node"), "gen": own.get("gen")})
        return out

    def status(self) -> dict[str, Any]:
        try:
            nodes = self.nodes_info()
            vols = self.kv.list("/volumes/")
            state = "ok"
        except ClusterError as e:
            nodes, vols, state = [], {}, f"unreachable: {e.message}"
        attention = []
        names = {r["ns"]: r["name"] for r in vols.values()}
        alive = {n["name"] for n in nodes if n.get("alive")}
        for key, d in (self.kv.list("/dtl/").items() if state == "ok" else []):
            name = names.get(key[len("/dtl/"):], key)
            if d.get("state") not in ("ok", "released") and d.get("mode") != "none":
                attention.append(f"volume {name} (owner {d.get('owner')}): DTL {d.get('state')}")
        for key, own in (self.kv.list("/owners/").items() if state == "ok" else []):
            name = names.get(key[len("/owners/"):])
            if name and own["node"] not in alive:
                attention.append(f"volume {name}: its owner {own['node']} is not alive "
                                 f"(`ovsfs volume restart {name} --on NODE`)")
        owned = len(self.engine.volumes) if self.engine else 0
        return {"node": self.name, "failure_domain": self.cfg.cluster.failure_domain,
                "etcd": self.cfg.cluster.etcd, "prefix": self.cfg.cluster.prefix, "etcd_state": state,
                "nodes": nodes, "volumes": len(vols), "owned": owned, "attention": attention}

    def volume_cluster(self, volume: str) -> dict[str, Any]:
        rec = self._volume_rec(volume)
        return {"volume": volume, "namespace": rec["ns"], "owner": self.owners.owner(rec["ns"]),
                "dtl_mode": self.dtl_mode(rec), "dtl": self.owners.dtl_record(rec["ns"])}

    def set_dtl_mode(self, kind: str, name: str, mode: str | None) -> dict[str, Any]:
        """Set a vPool's default or a volume's own DTL mode in the cluster store. The node that
        serves a volume applies it at its next owner-watch round (`converge`); here at once."""
        assert self.engine is not None
        if kind == "vpool":
            if self.kv.get(f"/vpools/{name}") is None:
                raise NotFound(f"vPool {name} does not exist")
            self.kv.put(f"{MODES}vpool/{name}", mode)
            out: dict[str, Any] = {"vpool": name, "mode": mode}
        else:
            rec = self._volume_rec(name)
            if mode is None:
                self.kv.delete(f"{MODES}volume/{rec['ns']}")
            else:
                self.kv.put(f"{MODES}volume/{rec['ns']}", mode)
            own = self.owners.owner(rec["ns"]) or {}
            out = {"volume": name, "mode": self.dtl_mode(rec), "inherited": mode is None, "owner": own.get("node")}
        self.converge()
        out["applies_within"] = round(self.watch_interval, 1)
        return out

    def _switch_dtl(self, vol: Any) -> None:
        """A new mode takes effect at once: what the old sink holds is flushed first."""
        vol.flush()
        with vol.lock:
            old, vol.state.dtl = vol.state.dtl, self.dtl_sink(vol)
            vol.state.dtl_ticket = None
        old.close(drop=True)

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
        self._check_alone(volume)
        target = self._node(node)
        if target.alive:
            # Answers at all (a frozen node keeps its lease for a while): checked before the
            # volume stops serving here, so a dead target changes nothing.
            try:
                self._call(node, "GET", "/status", timeout=PING_TIMEOUT)
            except ClusterError as e:
                raise Busy(f"node {node} cannot take volume {volume} now: {e.message}") from None
        if not target.alive:
            raise Busy(f"node {node} is not alive: it cannot take volume {volume}")
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

    def _check_alone(self, volume: str) -> None:
        """Clones read through their parent's map on the same node: neither moves alone."""
        assert self.engine is not None
        vol = self.engine.volume(volume)
        if vol.parent is not None or self.engine._has_clones(vol, None):
            raise Busy(f"volume {volume} is a clone or has clones: a clone is served where its parent is, "
                       "and they cannot change owner yet")

    def take(self, volume: str, gen: int, force: bool = False) -> dict[str, Any]:
        """Node-to-node, after a move's commit point: open the volume given to this node."""
        assert self.engine is not None
        rec = self._volume_rec(volume)
        own = self.owners.owner(rec["ns"])
        if own is None or own["node"] != self.name or int(own["gen"]) != gen:
            raise NotOwner(f"volume {volume} is not given to {self.name} at generation {gen} (owner: {own})")
        start = time.monotonic()
        with self._taking_lock:
            if volume in self._taking:
                raise Busy(f"volume {volume} is being opened on {self.name} already")
            self._taking.add(volume)
        try:
            if volume not in self.engine.volumes:
                self.engine.take_volume(volume, gen)
        finally:
            with self._taking_lock:
                self._taking.discard(volume)
        return {"volume": volume, "node": self.name, "gen": gen, "seconds": round(time.monotonic() - start, 3)}

    def converge(self) -> None:
        """One round of putting this node in line with the cluster store: open what was
        handed to it and is not open (a move whose target was frozen or restarting when the
        owner record changed: everything is on the backend then), and give each open volume
        the DTL mode set for it (on any node, for it or its vPool)."""
        assert self.engine is not None
        owners = self.kv.list("/owners/")
        modes = self.kv.list(MODES)
        for rec in self.kv.list("/volumes/").values():
            own = owners.get(f"/owners/{rec['ns']}")
            if (own is None or own["node"] != self.name or rec["name"] in self.engine.volumes
                    or rec["name"] in self.engine.failed or rec["name"] in self._taking):
                continue
            dtl = self.owners.dtl_record(rec["ns"]) or {}
            if dtl.get("state") == "released" and int(dtl.get("gen", -1)) == int(own["gen"]):
                log.info("volume %s was handed to this node (generation %s) and is not open: opening it",
                         rec["name"], own["gen"])
                try:
                    self.take(rec["name"], int(own["gen"]))
                except OvsfsError as e:
                    log.warning("volume %s not opened: %s", rec["name"], e.message)
        for vol in list(self.engine.volumes.values()):
            want = (modes.get(f"{MODES}volume/{vol.ns}") or modes.get(f"{MODES}vpool/{vol.vpool}")
                    or self.cfg.dtl.mode)
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
        if rec.get("parent") or any((r.get("parent") or {}).get("ns") == ns for r in self.kv.list("/volumes/").values()):
            raise Busy(f"volume {volume} is a clone or has clones: a clone is served where its parent is, "
                       "and they cannot change owner yet")
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
        if own.get("node") is None or (state == "released" and int(dtl.get("gen", -1)) == int(own["gen"])):
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
        if dtl.get("state") == "released" and int(dtl.get("gen", -1)) == gen:
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

    # ---- running -------------------------------------------------------------------------

    def _lost(self, reason: str) -> None:
        log.error("this node lost its registration: %s", reason)

    def record(self, mgmt_port: int, dtl_port: int) -> NodeRecord:
        c, n = self.cfg.cluster, self.cfg.nbd
        asds = [f"127.0.0.1:{p}" for p in self.cfg.backend.local_asd_ports]
        return NodeRecord(name=self.name, failure_domain=c.failure_domain,
                          mgmt=f"{c.mgmt_host}:{mgmt_port}" if mgmt_port else "",
                          dtl=f"{self.cfg.dtl.host}:{dtl_port}" if dtl_port else "",
                          nbd=f"{n.tcp_host}:{n.tcp_port}" if n.enabled and n.tcp_port else "",
                          asds=asds)

    def discover_asds(self) -> int:
        """Attach the ASDs other nodes registered (their local ASDs) to this node's proxy, so
        every node of the cluster writes to and reads from the same ASDs. Returns how many
        were attached. Nothing to do on the local-directory backend."""
        asds = getattr(self.store, "asds", None)
        if asds is None:
            return 0
        known = {c.addr for c in [*asds.all(), *asds.pending] if hasattr(c, "addr")}
        added = 0
        for node in self.node_registry.list_nodes():
            for addr in node.asds:
                if addr in known or addr in self.removed_asds:
                    continue
                try:
                    asds.add(addr)
                    added += 1
                    log.info("attached ASD %s of node %s", addr, node.name)
                except OvsfsError as e:
                    log.warning("ASD %s of node %s not attached: %s", addr, node.name, e.message)
        return added

    def watch_owners(self, interval: float) -> None:
        """Halt (and drop) every open volume whose owner record names another node or
        generation, and keep the DTL records of the others current; runs until close()."""
        ticks = 0
        while not self._stop.wait(interval):
            ticks += 1
            if ticks % 5 == 0:
                try:
                    self.discover_asds()
                except ClusterError:
                    pass
            if self.engine is not None:
                try:
                    self.converge()
                except ClusterError:
                    pass
            if self.engine is None:
                continue
            for name, vol in list(self.engine.volumes.items()):
                try:
                    rec = self.owners.owner(vol.ns)
                except ClusterError:
                    break   # cannot tell: the DTL and the backend still fence
                if rec is not None and (rec["node"] != self.name or int(rec["gen"]) != vol.gen):
                    self.engine.drop_volume(name, f"its owner is {rec['node']} at generation {rec['gen']} now")
                    continue
                try:
                    self._refresh_dtl_record(vol)
                except ClusterError:
                    break

    def close(self) -> None:
        self._stop.set()
        try:
            self.node_registry.stop()
        except Exception:  # noqa: BLE001 - stopping: the lease expires anyway
            log.debug("stopping the node registration failed", exc_info=True)
        self._http.close()
        self.kv.close()


async def serve(member: Member, engine: Engine, handler: Callable[..., Any], *,
                task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """The node's cluster services, until cancelled: the DTL server, the management API over
    TCP for the other nodes, the node record under its lease, the owner watch."""
    from ovsfs.mgmt.http import serve_tcp

    cfg = member.cfg
    member.engine = engine
    async with trio.open_nursery() as nursery:
        dtl_port = 0
        if member.dtl_server is not None:
            try:
                dtl_port = await nursery.start(member.dtl_server.serve)
            except OSError as e:
                raise OvsfsError(f"the DTL server cannot listen on {cfg.dtl.host}:{cfg.dtl.port} "
                                 f"(dtl.host / dtl.port): {e.strerror or e}") from None
        mgmt_port = 0
        if cfg.cluster.mgmt_port:
            _host, mgmt_port = await nursery.start(serve_tcp, cfg.cluster.mgmt_host, cfg.cluster.mgmt_port, handler)
        record = member.record(mgmt_port, dtl_port)
        await trio.to_thread.run_sync(member.node_registry.register, record, cfg.cluster.lease_ttl)
        log.info("registered in the cluster as %s (failure domain %s): mgmt %s, DTL %s", member.name,
                 cfg.cluster.failure_domain or "-", record.mgmt or "-", record.dtl or "-")
        await trio.to_thread.run_sync(member.discover_asds)
        nursery.start_soon(lambda: trio.to_thread.run_sync(
            member.watch_owners, member.watch_interval, abandon_on_cancel=True))
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            member._stop.set()
