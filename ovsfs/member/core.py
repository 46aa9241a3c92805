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
from typing import Any, Callable

import httpx
import trio

from ovsfs.backend.store import Store
from ovsfs.cluster.etcd import EtcdStore
from ovsfs.cluster.nodes import NodeRecord, NodeRegistry
from ovsfs.cluster.ownership import Ownership
from ovsfs.config import Config
from ovsfs.dtl import wire as dtl_wire
from ovsfs.dtl.server import DtlServer
from ovsfs.engine.engine import Engine
from ovsfs.errors import ClusterError, NotFound, OvsfsError
from ovsfs.member.dtl import MODES, DtlWiring
from ovsfs.member.ops import OwnerChanges
from ovsfs.member.role import ClusterRole

log = logging.getLogger("ovsfs.member")

CALL_TIMEOUT = 3600.0           # a take waits for a rebuild and uploads on the other node


class Member(DtlWiring, OwnerChanges):
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
        self._taking_lock = threading.Condition()
        self.watch_interval = max(0.5, cfg.cluster.lease_ttl / 5)   # seconds between owner-watch rounds
        self._http = httpx.Client(timeout=httpx.Timeout(CALL_TIMEOUT, connect=5.0), trust_env=False)

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

    def nodes(self, owners: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Every node with `alive` and how many volumes it owns. `owners`: the /owners/
        records, when the caller has read them already."""
        count: dict[str, int] = {}
        for rec in (self.kv.list("/owners/") if owners is None else owners).values():
            count[rec["node"]] = count.get(rec["node"], 0) + 1
        return [{**n.to_dict(), "volumes": count.get(n.name, 0)} for n in self.node_registry.list_nodes()]

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
            owners = self.kv.list("/owners/")
            nodes = self.nodes(owners)
            vols = self.kv.list("/volumes/")
            dtls = self.kv.list("/dtl/")
            state = "ok"
        except ClusterError as e:
            owners, nodes, vols, dtls, state = {}, [], {}, {}, f"unreachable: {e.message}"
        attention = []
        names = {r["ns"]: r["name"] for r in vols.values()}
        alive = {n["name"] for n in nodes if n.get("alive")}
        for key, d in dtls.items():
            name = names.get(key[len("/dtl/"):], key)
            if d.get("state") not in ("ok", "released") and d.get("mode") != "none":
                attention.append(f"volume {name} (owner {d.get('owner')}): DTL {d.get('state')}")
        for key, own in owners.items():
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
            try:
                if ticks % 5 == 0:
                    self.discover_asds()
                if self.engine is not None:
                    self._watch_round(self.engine)
            except ClusterError:
                pass   # cannot tell now: the DTL and the backend still fence

    def _watch_round(self, engine: Engine) -> None:
        owners = self.kv.list("/owners/")
        for name, vol in list(engine.volumes.items()):
            rec = owners.get(f"/owners/{vol.ns}")
            if rec is not None and (rec["node"] != self.name or int(rec["gen"]) != vol.gen):
                engine.drop_volume(name, f"its owner is {rec['node']} at generation {rec['gen']} now")
                continue
            self._refresh_dtl_record(vol)
        self.converge(owners)

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
