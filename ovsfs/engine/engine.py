"""The engine: one per node, holding every vPool and volume.

The registry (which vPools and volumes exist, and in which backend namespace a
volume lives) is in the cluster config store. Each volume's namespace also holds
a `volume.json`, so volumes can be found again from the backend alone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from typing import Any, Callable

from ovsfs.backend.local import LocalStore
from ovsfs.backend.store import Store
from ovsfs.cluster.store import ConfigStore
from ovsfs.config import Config
from ovsfs.engine.api import Holder
from ovsfs.engine import handover
from ovsfs.engine.catalog import EngineCatalog
from ovsfs.engine.holders import check_unreserved, reserve
from ovsfs.engine.recovery import open_volume
from ovsfs.engine.reopen import mark_failed, retry_failed
from ovsfs.engine.scrub import scrub_volume
from ovsfs.engine.names import check_size
from ovsfs.engine.owners import NodeRole, SingleNode, check_local_state, local_gen, set_aside
from ovsfs.engine.volume import Volume, check_name
from ovsfs.engine.writebuffer import WriteBuffer
from ovsfs.fsutil import mkdir_durable
from ovsfs.errors import AlreadyExists, Busy, InvalidArgument, NotFound, NotOwner, OvsfsError, VolumeFailed

log = logging.getLogger("ovsfs.engine")

MAX_CLONE_DEPTH = 255


def _reason(e: BaseException) -> str:
    return e.message if isinstance(e, OvsfsError) else f"{type(e).__name__}: {e}"


class Engine:
    def __init__(self, cfg: Config, store: Store | None = None, registry: Any = None,
                 role: NodeRole | None = None) -> None:
        """`registry`: the cluster store holding vPools and volumes (default: the embedded
        one under the state directory; etcd with several nodes). `role`: which volumes this
        node owns and where their DTL goes (default: SingleNode, everything, no DTL)."""
        self.cfg = cfg
        self.store: Store = store if store is not None else LocalStore(cfg.path(cfg.backend.path))
        self._own_registry = registry is None   # closed with the engine; a given one by its giver
        self.registry = registry if registry is not None else ConfigStore(cfg.state_dir / "cluster" / "config.db")
        self.role: NodeRole = role if role is not None else SingleNode()
        self.wb_root = cfg.path(cfg.engine.write_buffer)
        mkdir_durable(self.wb_root)
        self.wb = WriteBuffer(cfg.engine.write_buffer_size)
        self.wb.on_pressure = self._seal_open_scos
        self.wb.configure_uploads(cfg.engine.upload_workers, cfg.engine.upload_retry_max_seconds)
        self.volumes: dict[str, Volume] = {}
        # Volumes that could not be opened at start: name -> registry record + "reason".
        self.failed: dict[str, dict[str, Any]] = {}
        self.lock = threading.RLock()
        # Names reserved by a door before they are volumes (FUSE files being created):
        # name -> (vPool, holder). In memory: a reservation ends with its file or the node.
        self.reserved: dict[str, tuple[str, Holder]] = {}
        # The contract (ovsfs/engine/api.py): what doors, jobs and the management API use.
        self.catalog = EngineCatalog(self)
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    # ---- life cycle -------------------------------------------------------------------

    def open(self) -> None:
        records = list(self.registry.list("/volumes/").values())
        # Volumes on the backend the registry does not know: a lost registry, or the single
        # node a cluster grew from (the first node to look then owns them, ClusterRole.owned).
        self._adopt(records)
        gens = {r["name"]: self.role.owned(r["ns"]) for r in records}
        for r in records:
            if gens[r["name"]] is None:
                # Another node owns it: local state from an earlier ownership is stale.
                set_aside(self.wb_root, r["ns"], f"volume {r['name']} is owned by "
                          f"{self.role.owner_of(r['ns']) or 'another node'}")
        records = [r for r in records if gens[r["name"]] is not None]
        by_ns = {r["ns"]: r for r in records}
        opened: dict[str, Volume] = {}
        failed: dict[str, str] = {}   # namespace -> why it could not be opened

        def open_one(rec: dict[str, Any]) -> Volume:
            if rec["ns"] in opened:
                return opened[rec["ns"]]
            if rec["ns"] in failed:
                raise VolumeFailed(failed[rec["ns"]])
            try:
                parent = None
                if rec.get("parent"):
                    prec = by_ns.get(rec["parent"]["ns"])
                    if prec is not None and gens.get(prec["name"]) is None:
                        raise NotOwner(f"clone {rec['name']}: its parent {prec['name']} is served by "
                                       "another node (a clone is served where its parent is)")
                    if prec is None:
                        raise NotFound(f"clone {rec['name']}: parent namespace {rec['parent']['ns']} is gone")
                    try:
                        parent = open_one(prec)
                    except Exception as e:  # noqa: BLE001 - recorded for the parent already
                        raise VolumeFailed(f"its parent volume {prec['name']} could not be opened "
                                           f"({_reason(e)})") from e
                vol = self._open_record(rec, parent, gens[rec["name"]] or 0, recover=True)
            except Exception as e:  # noqa: BLE001 - any reason at all: this volume fails, not the node
                failed[rec["ns"]] = _reason(e)
                mark_failed(self.failed, rec, e, _reason(e), str(self.wb_root), self.cfg.engine.reopen_seconds)
                log.error("volume %s not opened: %s", rec["name"], _reason(e), exc_info=not isinstance(e, OvsfsError))
                raise
            opened[rec["ns"]] = vol
            return vol

        for rec in records:
            try:
                vol = open_one(rec)
            except Exception:  # noqa: BLE001 - recorded in self.failed by open_one
                continue
            self.volumes[vol.name] = vol
        self._ticker = threading.Thread(target=self._tick, name="ovsfs-commit", daemon=True)
        self._ticker.start()
        log.info("engine open: %d vPools, %d volumes%s", len(self.list_vpools()), len(self.volumes),
                 f", {len(self.failed)} failed ({', '.join(sorted(self.failed))})" if self.failed else "")
        e = self.cfg.engine
        log.info("engine limits: write buffer %d MiB (engine.write_buffer_size), disk reserve %d MiB"
                 " (engine.disk_reserve) then NoSpace after %.0f s (engine.disk_wait); map cache %d MiB"
                 " per volume (engine.map_cache_pages); %d upload workers, retry backoff up to %.0f s;"
                 " stop within %.0f s (engine.stop_timeout)",
                 e.write_buffer_size >> 20, e.disk_reserve >> 20, e.disk_wait, e.map_cache_pages * 32 // 1024,
                 e.upload_workers, e.upload_retry_max_seconds, e.stop_timeout)

    @staticmethod
    def _abandon(vol: Volume) -> None:
        """Release what a volume that failed half-way through opening holds (best effort)."""
        vol.closed = True
        try:
            if vol.map is not None:
                vol.map.close()
        except Exception:  # noqa: BLE001 - already failing; the reason that counts is the first one
            log.debug("closing the map of %s failed", vol.name, exc_info=True)
        for fd in [*vol.read_fds.values(), vol.sco_fd, vol.tlog_fd]:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        vol.read_fds.clear()
        vol.sco_fd = vol.tlog_fd = None

    def failed_volumes(self) -> list[dict[str, Any]]:
        """Volumes that could not be opened at start, each with its `reason`."""
        # No engine lock: a copy of the dict is enough, and status must answer while a create holds it.
        return [{"name": r["name"], "vpool": r["vpool"], "namespace": r["ns"], "size": r["size"],
                 "parent": (f"{r['parent']['name']}@{r['parent']['snapshot']}" if r.get("parent") else None),
                 "state": "failed", "reason": r["reason"], "hint": r.get("hint", "")}
                for r in sorted(list(self.failed.values()), key=lambda r: r["name"])]

    def _adopt(self, records: list[dict[str, Any]]) -> None:
        """Register volumes found on the backend but missing from the registry."""
        known = {r["ns"] for r in records}
        names = {r["name"] for r in records}
        for ns in self.store.namespaces():
            if ns in known or not ns.startswith("vol-"):
                continue
            try:
                rec = json.loads(self.store.get(ns, "volume.json"))
            except (NotFound, ValueError):
                continue
            except OvsfsError as e:
                # Unreadable now (ASDs away, undecodable): not adopted this time; a volume
                # that is registered already is opened (or reported failed) on its own.
                log.error("backend namespace %s: volume.json unreadable, not adopted: %s", ns, e.message)
                continue
            if rec["name"] in names:
                continue
            log.info("found volume %s on the backend (namespace %s): registering it", rec["name"], ns)
            if self.registry.get(f"/vpools/{rec['vpool']}") is None:
                self.registry.put(f"/vpools/{rec['vpool']}", {"name": rec["vpool"], "sco_clusters": rec["sco_clusters"],
                                                              "cluster_size": rec["cluster_size"]})
            self.registry.put(f"/volumes/{rec['name']}", rec)
            records.append(rec)
            names.add(rec["name"])

    def _seal_open_scos(self) -> None:
        for vol in list(self.volumes.values()):
            if vol.sco_fd is not None and not vol.closed:
                vol.seal()

    def _tick(self) -> None:
        interval = self.cfg.engine.checkpoint_seconds
        while not self._stop.wait(min(1.0, interval)):
            for vol in list(self.volumes.values()):
                try:
                    vol.maybe_commit(interval)
                except Exception:  # a failing volume must not stop commits of the others
                    log.exception("periodic map commit of %s failed", vol.name)
            try:
                retry_failed(self, self._reopen)
            except Exception:  # noqa: BLE001 - the ticker must go on committing
                log.exception("retrying failed volumes failed")

    def _reopen(self, rec: dict[str, Any]) -> Volume:
        """Open one volume that failed before (engine lock held): its parent must be open."""
        rec = self.registry.get(f"/volumes/{rec['name']}") or rec
        gen = self.role.owned(rec["ns"])
        if gen is None:
            raise NotOwner(f"volume {rec['name']} is owned by {self.role.owner_of(rec['ns']) or 'another node'}")
        parent = self._by_ns(rec["parent"]["ns"]) if rec.get("parent") else None
        return self._open_record(rec, parent, gen, recover=True)

    def _open_record(self, rec: dict[str, Any], parent: Volume | None, gen: int = 0,
                     tail_entries: list[Any] | None = None, attach_dtl: bool = True,
                     recover: bool = False) -> Volume:
        """Open an existing volume (recovery included); what a failed open holds is released.

        `recover` (a start or a retry, not a handover): when this node owns the volume but its
        write buffer of it is gone, the node decides how it may open it (role.recover)."""
        if recover and gen and local_gen(self.wb_root / rec["ns"]) is None:
            gen, tail_entries = self.role.recover(rec, gen)
        vol = self._volume(rec, parent, gen)
        try:
            open_volume(vol, create=False, tail_entries=tail_entries)
            if attach_dtl:
                self.attach(vol)
        except BaseException:
            self._abandon(vol)
            raise
        return vol

    def close(self) -> None:
        """Clean stop within `engine.stop_timeout` seconds, also with the backend away.

        Local work first (every volume flushed and its map committed), then whatever time
        is left goes to queued uploads; what is not uploaded stays in the write buffer and
        is queued again by the next open (recovery._requeue)."""
        deadline = time.monotonic() + self.cfg.engine.stop_timeout
        self._stop.set()
        # Writers waiting for write-buffer room are woken: nobody makes room any more.
        # Each either gets in before its volume closes (and is flushed below) or gets Busy.
        self.wb.begin_stop()
        if self._ticker is not None:
            self._ticker.join()
        for vol in list(self.volumes.values()):
            try:
                vol.close()
            except Exception:
                log.exception("closing %s failed", vol.name)
        left = self.wb.stop(max(0.0, deadline - time.monotonic()))
        if left:
            log.warning("engine closed with %d uploads left in the write buffer (%s): "
                        "they are queued again at the next start", left, self.wb.last_error or "backend slow")
        if self._own_registry:
            self.registry.close()

    def attach(self, vol: Volume) -> None:
        """What the node around the engine gives an opened volume: its DTL and owner lease."""
        vol.state.dtl = self.role.dtl_sink(vol)
        vol.state.lease = self.role.lease(vol)

    def _volume(self, rec: dict[str, Any], parent: Volume | None, gen: int = 0) -> Volume:
        check_local_state(self.wb_root, rec["ns"], gen)
        return Volume(rec, self.wb_root, self.store, self.wb, self.cfg.engine, parent, self._has_clones, gen)

    def _has_clones(self, vol: Volume, epoch: int | None) -> bool:
        # Clones that failed to open count too: they still read through to this volume.
        for meta in [*(v.meta for v in list(self.volumes.values())), *list(self.failed.values())]:
            p = meta.get("parent")
            if p and p["ns"] == vol.ns and (epoch is None or p["epoch"] == epoch):
                return True
        return False

    # ---- vPools -------------------------------------------------------------------------

    def create_vpool(self, name: str, sco_clusters: int | None = None,
                     preset: str | None = None) -> dict[str, Any]:
        check_name("vPool", name)
        with self.lock:
            if self.registry.get(f"/vpools/{name}") is not None:
                raise AlreadyExists(f"vPool {name} already exists")
            sc = sco_clusters or self.cfg.engine.sco_clusters
            if not 1 <= sc <= 65535:
                raise InvalidArgument(f"sco_clusters must be 1..65535, not {sc}")
            rec = {"name": name, "sco_clusters": sc, "cluster_size": self.cfg.engine.cluster_size,
                   "preset": preset, "created": time.time()}
            self.registry.put(f"/vpools/{name}", rec)
            return rec

    def list_vpools(self) -> list[dict[str, Any]]:
        with self.lock:
            vols = list(self.volumes.values())
        out = []
        for rec in self.registry.list("/vpools/").values():
            rec = dict(rec)
            rec["volumes"] = sum(1 for v in vols if v.vpool == rec["name"])
            out.append(rec)
        return out

    def vpool(self, name: str) -> dict[str, Any]:
        rec = self.registry.get(f"/vpools/{name}")
        if rec is None:
            raise NotFound(f"vPool {name} does not exist")
        return rec

    # ---- volumes ------------------------------------------------------------------------

    def volume(self, name: str) -> Volume:
        try:
            return self.volumes[name]
        except KeyError:
            failed = self.failed.get(name)
            if failed is not None:
                raise VolumeFailed(f"volume {name} could not be opened: {failed['reason']}") from None
            rec = self.registry.get(f"/volumes/{name}")
            if rec is not None:
                raise NotOwner(f"volume {name} is served by "
                               f"{self.role.owner_of(rec['ns']) or 'another node'}, not this one") from None
            raise NotFound(f"volume {name} does not exist") from None

    def list_volumes(self, vpool: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            vols = sorted(self.volumes.values(), key=lambda v: v.name)
        return [v.info() for v in vols if vpool is None or v.vpool == vpool]

    def create_volume(self, name: str, size: int, vpool: str = "default",
                      parent: dict[str, Any] | None = None, holder: Holder | None = None) -> Volume:
        """A new volume. A name reserved by `holder` becomes this volume (the reservation
        ends); reserved by anyone else it is AlreadyExists."""
        check_name("volume", name)
        with self.lock:
            pool = self.vpool(vpool)
            if name in self.volumes or self.registry.get(f"/volumes/{name}") is not None:
                raise AlreadyExists(f"volume {name} already exists")
            self._check_unreserved(name, holder)
            if name in self.failed:
                raise AlreadyExists(f"volume {name} already exists (it could not be opened: "
                                    f"{self.failed[name]['reason']}; delete it first)")
            cs = pool["cluster_size"]
            check_size(size)
            rec = {"name": name, "ns": f"vol-{uuid.uuid4().hex[:16]}", "vpool": vpool, "size": size,
                   "cluster_size": cs, "sco_clusters": pool["sco_clusters"], "parent": parent,
                   "created": time.time()}
            parent_vol = self._by_ns(parent["ns"]) if parent else None
            gen = self.role.claim_new(rec["ns"])
            vol = self._volume(rec, parent_vol, gen)
            open_volume(vol, create=True, preset=pool.get("preset"))
            self.attach(vol)
            self.registry.put(f"/volumes/{name}", rec)
            self.volumes[name] = vol
            self.reserved.pop(name, None)
            log.info("created volume %s (%d bytes) in vPool %s", name, size, vpool)
            return vol

    def _by_ns(self, ns: str) -> Volume:
        for v in self.volumes.values():
            if v.ns == ns:
                return v
        raise NotFound(f"no volume in namespace {ns}")

    def clone_volume(self, src: str, snapshot: str, new: str, vpool: str | None = None) -> Volume:
        with self.lock:
            parent = self.volume(src)
            snap = parent._snapshot(snapshot)
            depth, p = 1, parent
            while p.parent is not None:
                depth, p = depth + 1, p.parent
            if depth >= MAX_CLONE_DEPTH:
                raise InvalidArgument(f"clone chain of {src} is already {depth} deep (max {MAX_CLONE_DEPTH})")
            ref = {"ns": parent.ns, "name": parent.name, "snapshot": snapshot, "epoch": snap["epoch"]}
            # The parent's lock keeps the snapshot from being deleted or rolled away until
            # the clone is registered (from then on has_clones protects it).
            with parent.lock:
                parent._snapshot(snapshot)
                return self.create_volume(new, snap["size"], vpool or parent.vpool, parent=ref)

    def delete_volume(self, name: str) -> None:
        with self.lock:
            if name in self.failed and name not in self.volumes:
                self._delete_failed(name)
                return
            vol = self.volume(name)
            vol.holds.check_delete_volume(name)
            if self._has_clones(vol, None):
                raise Busy(f"volume {name} has clones")
            # First, and synchronously: without volume.json the namespace is no volume any
            # more, so a crash before the queued namespace deletion runs cannot bring the
            # volume back (open() would otherwise adopt it from the backend).
            vol.store.delete(vol.ns, "volume.json")
            with vol.lock:
                vol.holds.check_delete_volume(name)
                vol.deleted = True   # no write gets in after this (_check_open)
                # The open SCO never reaches the upload queue: its bytes are given back here.
                open_bytes = vol.sco_idx * vol.cluster_size if vol.sco_fd is not None else 0
            vol.close()
            self.wb.forget_owner(vol, open_bytes)
            del self.volumes[name]
            self.registry.delete(f"/volumes/{name}")
            vol.dtl.close(drop=True)
            self.role.forget(vol.ns)
            # Queued behind the volume's uploads, which see `deleted` and do nothing.
            self.wb.submit(f"delete namespace {vol.ns}", lambda: self.store.delete_namespace(vol.ns), owner=vol)
            shutil.rmtree(vol.dir, ignore_errors=True)
            log.info("deleted volume %s", name)

    # ---- ownership changes (several nodes; ovsfs/member/ decides, handover.py does) -----

    def take_volume(self, name: str, gen: int, tail_entries: list[Any] | None = None,
                    timeout: float | None = None, drop_old: Callable[[], None] | None = None) -> Volume:
        """See handover.take."""
        return handover.take(self, name, gen, tail_entries, timeout, drop_old)

    def release_volume(self, name: str, timeout: float | None = None) -> None:
        """See handover.release."""
        handover.release(self, name, timeout)

    def drop_volume(self, name: str, why: str) -> None:
        """See handover.drop."""
        handover.drop(self, name, why)

    def _delete_failed(self, name: str) -> None:
        """Remove a volume that could not be opened: the operator's way out. Its namespace
        goes the same way as a healthy volume's (volume.json first, so it is not adopted
        again; then the namespace in the background)."""
        rec = self.failed[name]
        if any(r.get("parent") and r["parent"]["ns"] == rec["ns"]
               for r in [*(v.meta for v in self.volumes.values()), *self.failed.values()]):
            raise Busy(f"volume {name} has clones")
        try:
            self.store.delete(rec["ns"], "volume.json")
        except NotFound:
            pass  # its namespace is gone already (perhaps why it failed)
        self.registry.delete(f"/volumes/{name}")
        del self.failed[name]
        ns = rec["ns"]

        def drop() -> None:
            try:
                self.store.delete_namespace(ns)
            except NotFound:
                pass
        self.wb.submit(f"delete namespace {ns}", drop)
        shutil.rmtree(self.wb_root / ns, ignore_errors=True)
        log.info("deleted volume %s (it had failed to open)", name)

    def rename_volume(self, old: str, new: str) -> None:
        check_name("volume", new)
        with self.lock:
            vol = self.volume(old)
            if new in self.failed:
                raise AlreadyExists(f"volume {new} already exists (it could not be opened)")
            if new in self.volumes:
                raise AlreadyExists(f"volume {new} already exists")
            self._check_unreserved(new, None)
            vol.holds.check_rename(old)
            if self.registry.get(f"/volumes/{new}") is not None:
                raise AlreadyExists(f"volume {new} already exists (on another node)")
            vol.meta["name"] = new
            vol.store.put(vol.ns, "volume.json", json.dumps(vol.meta).encode())
            self.registry.put(f"/volumes/{new}", vol.meta)
            self.registry.delete(f"/volumes/{old}")
            self.volumes[new] = self.volumes.pop(old)
            for v in self.volumes.values():
                p = v.meta.get("parent")
                if p and p["ns"] == vol.ns:
                    p["name"] = new
                    self.registry.put(f"/volumes/{v.name}", v.meta)

    # ---- name reservations -------------------------------------------------------------------

    def _check_unreserved(self, name: str, holder: Holder | None) -> None:
        check_unreserved(self.reserved, name, holder)

    def reserve_name(self, name: str, holder: Holder, vpool: str = "default") -> None:
        """Take `name` for a volume-to-be (one name, one object). AlreadyExists if a volume
        (open or failed) or another holder has it; reserving it again is a no-op."""
        check_name("volume", name)
        with self.lock:
            self.vpool(vpool)
            if name in self.volumes or name in self.failed:
                raise AlreadyExists(f"volume {name} already exists")
            reserve(self.reserved, name, holder, vpool)

    def release_name(self, name: str, holder: Holder) -> None:
        with self.lock:
            r = self.reserved.get(name)
            if r is not None and r[1] == holder:
                del self.reserved[name]

    def reservations(self, vpool: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            items = sorted(self.reserved.items())
        return [{"name": n, "vpool": p, "holder": str(h)} for n, (p, h) in items if vpool is None or p == vpool]

    # ---- maintenance --------------------------------------------------------------------

    def scrub(self, name: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            vols = [self.volume(name)] if name else list(self.volumes.values())
        return [scrub_volume(v, self.cfg.engine.scrub_threshold) for v in vols]

    def drop_cache(self) -> int:
        """Drop the uploaded SCOs kept in the write buffer as a read cache; bytes freed."""
        before = self.wb.cached
        self.wb.drop_cache()
        return max(0, before - self.wb.cached)

    def sync_volume(self, name: str, timeout: float | None = None) -> None:
        """Wait until all of a volume is on the backend. NotFound, VolumeFailed."""
        self.volume(name).sync(timeout)

    def stats(self) -> dict[str, Any]:
        with self.lock:
            vols = list(self.volumes.values())
        infos = [v.info() for v in vols]
        return {
            "vpools": len(self.list_vpools()), "volumes": len(infos),
            "failed_volumes": self.failed_volumes(),
            "map_resident_bytes": sum(i["map_resident_bytes"] for i in infos),
            "map_stored_bytes": sum(i["map_stored_bytes"] for i in infos),
            "write_buffer": self.wb.status(),
        }
