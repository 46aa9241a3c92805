"""EngineCatalog: the engine as a VolumeCatalog (the contract, ovsfs/engine/api.py).

`Engine.catalog` is the one object doors, jobs and the management API get. Lifecycle is
decided here and in holders.py only: each check runs under the volume's lock together
with the change, and handles register under that lock, so an open cannot slip between
the check and the change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ContextManager

from ovsfs.engine.api import Holder, held, parse_name
from ovsfs.engine.handles import EngineHandle
from ovsfs.engine.names import check_name
from ovsfs.errors import Busy, NotFound

if TYPE_CHECKING:
    from ovsfs.engine.volume import Volume


def _snap_record(vol: "Volume", snap: str) -> dict[str, Any]:
    for s in vol.list_snapshots():
        if s["name"] == snap:
            return s
    raise NotFound(f"snapshot {vol.name}@{snap} does not exist")


class EngineCatalog:
    """The VolumeCatalog of one Engine (see api.VolumeCatalog for every method's contract)."""

    def __init__(self, engine: Any) -> None:
        # engine: ovsfs.engine.engine.Engine, which builds this object (not imported here:
        # no import circle, not even for type checking).
        self._engine = engine

    # ---- handles and holds ------------------------------------------------------------

    def open(self, name: str, holder: Holder, *, read_only: bool = False) -> EngineHandle:
        volname, snap = parse_name(name)
        check_name("volume", volname)
        if snap is not None:
            check_name("snapshot", snap)
        with self._engine.lock:
            vol = self._engine.volume(volname)    # NotFound, VolumeFailed (never opened)
            with vol.lock:
                if vol.closed or vol.deleted:
                    raise Busy(f"volume {volname} is closed")
                epoch, size = None, 0
                if snap is not None:
                    rec = _snap_record(vol, snap)
                    epoch, size = rec["epoch"], rec["size"]
                vol.holds.add(holder, epoch)
        return EngineHandle(vol, holder, snap, epoch, size, read_only)

    def hold(self, name: str, holder: Holder) -> ContextManager[None]:
        return held(self, name, holder)

    def holders(self, name: str) -> list[Holder]:
        volname, snap = parse_name(name)
        vol = self._engine.volume(volname)
        if snap is None:
            return vol.holds.holders()
        return vol.holds.holders([_snap_record(vol, snap)["epoch"]])

    # ---- volumes ------------------------------------------------------------------------

    def _info(self, vol: "Volume") -> dict[str, Any]:
        return {**vol.info(), "holders": [str(h) for h in vol.holds.holders()]}

    def list_volumes(self, vpool: str | None = None) -> list[dict[str, Any]]:
        with self._engine.lock:
            vols = sorted(self._engine.volumes.values(), key=lambda v: v.name)
        return [self._info(v) for v in vols if vpool is None or v.vpool == vpool]

    @staticmethod
    def _stat(vol: "Volume") -> dict[str, Any]:
        # No vol.lock: each field is read once (a racing resize shows either size).
        return {"name": vol.name, "vpool": vol.vpool, "namespace": vol.ns, "size": vol.size,
                "created": float(vol.meta.get("created", 0.0))}

    def stat(self, name: str) -> dict[str, Any]:
        return self._stat(self._engine.volume(name))

    def list_stats(self, vpool: str | None = None) -> list[dict[str, Any]]:
        # A copy of the dict (no engine lock: the engine's lock is held across I/O by
        # create/delete, and getattr must not wait for them).
        vols = sorted(list(self._engine.volumes.values()), key=lambda v: v.name)
        return [self._stat(v) for v in vols if vpool is None or v.vpool == vpool]

    def failed_volumes(self) -> list[dict[str, Any]]:
        return self._engine.failed_volumes()

    def info(self, name: str) -> dict[str, Any]:
        failed = [f for f in self._engine.failed_volumes() if f["name"] == name]
        if failed and name not in self._engine.volumes:
            return failed[0]
        return self._info(self._engine.volume(name))

    def create_volume(self, name: str, size: int, vpool: str = "default",
                      holder: Holder | None = None) -> dict[str, Any]:
        return self._info(self._engine.create_volume(name, size, vpool, holder=holder))

    def delete_volume(self, name: str) -> None:
        self._engine.delete_volume(name)

    def rename_volume(self, old: str, new: str) -> None:
        self._engine.rename_volume(old, new)

    def resize_volume(self, name: str, size: int) -> None:
        vol = self._engine.volume(name)
        with vol.lock:
            if size < vol.size:
                vol.holds.check_shrink(name)
            vol.resize(size)

    def clone_volume(self, src: str, snapshot: str, new: str, vpool: str | None = None) -> dict[str, Any]:
        return self._info(self._engine.clone_volume(src, snapshot, new, vpool))

    # ---- snapshots ----------------------------------------------------------------------

    def create_snapshot(self, name: str, snap: str) -> dict[str, Any]:
        return self._engine.volume(name).create_snapshot(snap)

    def list_snapshots(self, name: str) -> list[dict[str, Any]]:
        vol = self._engine.volume(name)
        snaps = vol.list_snapshots()
        return [{**s, "holders": [str(h) for h in vol.holds.holders([s["epoch"]])]} for s in snaps]

    def delete_snapshot(self, name: str, snap: str) -> None:
        vol = self._engine.volume(name)
        with vol.lock:
            vol.holds.check_delete_snapshot(name, snap, _snap_record(vol, snap)["epoch"])
            vol.delete_snapshot(snap)

    def rollback(self, name: str, snap: str) -> None:
        vol = self._engine.volume(name)
        with vol.lock:
            epoch = _snap_record(vol, snap)["epoch"]
            later = [s["epoch"] for s in vol.list_snapshots() if s["epoch"] > epoch]
            vol.holds.check_rollback(name, snap, later)
            vol.rollback(snap)

    # ---- vPools and the node ----------------------------------------------------------

    def list_vpools(self) -> list[dict[str, Any]]:
        return sorted(self._engine.list_vpools(), key=lambda p: p["name"])

    def vpool(self, name: str) -> dict[str, Any]:
        return self._engine.vpool(name)

    def create_vpool(self, name: str, sco_clusters: int | None = None,
                     preset: str | None = None) -> dict[str, Any]:
        return self._engine.create_vpool(name, sco_clusters, preset)

    def usage(self) -> dict[str, Any]:
        u = self._engine.store.usage()
        return {"capacity": u["capacity"], "free": u["free"],
                "block_size": self._engine.cfg.engine.cluster_size,
                "files": len(self._engine.volumes)}

    # ---- name reservations (FUSE files that are not volumes yet) --------------------------

    def reserve_name(self, name: str, holder: Holder, vpool: str = "default") -> None:
        self._engine.reserve_name(name, holder, vpool)

    def release_name(self, name: str, holder: Holder) -> None:
        self._engine.release_name(name, holder)

    def reservations(self, vpool: str | None = None) -> list[dict[str, Any]]:
        return self._engine.reservations(vpool)
