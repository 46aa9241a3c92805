"""An in-memory VolumeCatalog: the contract (api.py) over bytearrays.

For the contract tests (the same cases run here and on the real engine) and for doors'
unit tests that need a volume without a write buffer or backend. It follows the same
lifecycle rules through the same HoldTable (holders.py). Not for data that matters.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any, ContextManager, Sequence

from ovsfs.engine.api import Buffer, Capabilities, Holder, held, parse_name
from ovsfs.engine.holders import HoldTable, check_unreserved, reserve
from ovsfs.engine.names import MAX_VOLUME_SIZE, check_name
from ovsfs.errors import AlreadyExists, Busy, InvalidArgument, NotFound, OutOfRange, ReadOnly

CLUSTER = 4096
CAPACITY = 1 << 40      # bytes the in-memory "backend" claims to have (for usage())
_NS = itertools.count(1)


class _MemVolume:
    def __init__(self, name: str, size: int, vpool: str, data: bytearray | None = None) -> None:
        self.name, self.vpool = name, vpool
        self.data = data if data is not None else bytearray(size)
        self.snapshots: list[dict[str, Any]] = []   # {"name", "epoch", "size", "data"}
        self.epoch = 0
        self.holds = HoldTable()
        self.lock = threading.RLock()
        self.parent: str | None = None
        self.ns = f"mem{next(_NS)}"      # like a backend namespace: kept across renames
        self.created = time.time()

    def snap(self, name: str) -> dict[str, Any]:
        for s in self.snapshots:
            if s["name"] == name:
                return s
        raise NotFound(f"snapshot {self.name}@{name} does not exist")


def _check_size(size: int) -> None:
    # TODO(merge): use ovsfs.engine.names.check_size (w3) -- one message everywhere.
    if not isinstance(size, int) or size <= 0 or size % 512 or size > MAX_VOLUME_SIZE:
        raise InvalidArgument(f"size {size} is not a positive multiple of 512 bytes up to {MAX_VOLUME_SIZE}")


class MemoryHandle:
    def __init__(self, vol: _MemVolume, holder: Holder, snap: dict[str, Any] | None, read_only: bool) -> None:
        self._vol, self.holder = vol, holder
        self._snap = snap
        self.volume = vol.name
        self.snapshot = snap["name"] if snap else None
        self.name = f"{vol.name}@{self.snapshot}" if snap else vol.name
        self._epoch = snap["epoch"] if snap else None
        self._closed = False
        self.caps = Capabilities(read_only=read_only or snap is not None, logical_block_size=512,
                                 preferred_block_size=CLUSTER, fua=True, trim=True, write_zeroes=True,
                                 extents=True, multi_conn=True)

    def _buf(self) -> bytearray:
        if self._closed:
            raise Busy(f"handle on {self.name} is closed")
        return self._snap["data"] if self._snap is not None else self._vol.data

    def _range(self, buf: bytearray, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise InvalidArgument(f"negative offset or length ({offset}, {length})")
        if offset + length > len(buf):
            raise OutOfRange(f"request {offset}+{length} is past the end of {self.name} ({len(buf)} bytes)")

    def _writable(self) -> bytearray:
        buf = self._buf()
        if self.caps.read_only:
            raise ReadOnly(f"{'snapshot' if self.snapshot else 'volume'} {self.name} is read-only")
        return buf

    @property
    def size(self) -> int:
        return len(self._snap["data"]) if self._snap is not None else len(self._vol.data)

    def readv(self, reqs: Sequence[tuple[int, int]], nowait: bool = False) -> list[bytes]:
        with self._vol.lock:
            buf = self._buf()
            for o, n in reqs:
                self._range(buf, o, n)
            return [bytes(buf[o:o + n]) for o, n in reqs]

    def writev(self, reqs: Sequence[tuple[int, Buffer]], nowait: bool = False) -> None:
        with self._vol.lock:
            buf = self._writable()
            for o, d in reqs:
                self._range(buf, o, len(d))
            for o, d in reqs:
                buf[o:o + len(d)] = d

    def write_room(self, nbytes: int) -> bool:
        return True

    def flush(self) -> None:
        self._buf()

    def trim(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        with self._vol.lock:
            buf = self._writable()
            self._range(buf, offset, length)
            buf[offset:offset + length] = bytes(length)

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        # Allocation is not tracked: nonzero clusters count as allocated.
        with self._vol.lock:
            buf = self._buf()
            self._range(buf, offset, length)
            out: list[tuple[int, int, bool]] = []
            o = offset
            while o < offset + length:
                end = min(offset + length, (o // CLUSTER + 1) * CLUSTER)
                alloc = any(buf[(o // CLUSTER) * CLUSTER:(o // CLUSTER + 1) * CLUSTER])
                if out and out[-1][2] == alloc:
                    out[-1] = (out[-1][0], out[-1][1] + end - o, alloc)
                else:
                    out.append((o, end - o, alloc))
                o = end
            return out

    def resize(self, size: int) -> None:
        _check_size(size)
        with self._vol.lock:
            buf = self._writable()
            if size < len(buf):
                self._vol.holds.check_shrink(self._vol.name, ignore=self.holder)
                del buf[size:]
            else:
                buf.extend(bytes(size - len(buf)))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._vol.holds.remove(self.holder, self._epoch)


class MemoryCatalog:
    """A VolumeCatalog in memory, with vPool "default" (see api.VolumeCatalog)."""

    def __init__(self, vpools: Sequence[str] = ("default",)) -> None:
        now = time.time()
        self.vpools: dict[str, dict[str, Any]] = {
            p: {"name": p, "sco_clusters": 1024, "cluster_size": CLUSTER, "preset": None, "created": now}
            for p in vpools}
        self.volumes: dict[str, _MemVolume] = {}
        self.reserved: dict[str, tuple[str, Holder]] = {}
        self.lock = threading.RLock()

    def _vol(self, name: str) -> _MemVolume:
        try:
            return self.volumes[name]
        except KeyError:
            raise NotFound(f"volume {name} does not exist") from None

    def _free_name(self, name: str, holder: Holder | None) -> None:
        if name in self.volumes:
            raise AlreadyExists(f"volume {name} already exists")
        check_unreserved(self.reserved, name, holder)

    def _pool(self, vpool: str) -> None:
        if vpool not in self.vpools:
            raise NotFound(f"vPool {vpool} does not exist")

    def open(self, name: str, holder: Holder, *, read_only: bool = False) -> MemoryHandle:
        volname, snap = parse_name(name)
        check_name("volume", volname)
        with self.lock:
            vol = self._vol(volname)
            with vol.lock:
                s = vol.snap(snap) if snap is not None else None
                vol.holds.add(holder, s["epoch"] if s else None)
        return MemoryHandle(vol, holder, s, read_only)

    def hold(self, name: str, holder: Holder) -> ContextManager[None]:
        return held(self, name, holder)

    def holders(self, name: str) -> list[Holder]:
        volname, snap = parse_name(name)
        vol = self._vol(volname)
        return vol.holds.holders() if snap is None else vol.holds.holders([vol.snap(snap)["epoch"]])

    def _info(self, v: _MemVolume) -> dict[str, Any]:
        return {"name": v.name, "vpool": v.vpool, "namespace": v.ns, "size": len(v.data), "cluster_size": CLUSTER,
                "snapshots": len(v.snapshots), "parent": v.parent, "failed": None,
                "holders": [str(h) for h in v.holds.holders()]}

    def list_volumes(self, vpool: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [self._info(v) for _, v in sorted(self.volumes.items()) if vpool in (None, v.vpool)]

    @staticmethod
    def _stat(v: _MemVolume) -> dict[str, Any]:
        return {"name": v.name, "vpool": v.vpool, "namespace": v.ns, "size": len(v.data),
                "created": v.created}

    def stat(self, name: str) -> dict[str, Any]:
        return self._stat(self._vol(name))

    def list_stats(self, vpool: str | None = None) -> list[dict[str, Any]]:
        vols = sorted(list(self.volumes.values()), key=lambda v: v.name)
        return [self._stat(v) for v in vols if vpool in (None, v.vpool)]

    def failed_volumes(self) -> list[dict[str, Any]]:
        return []

    def info(self, name: str) -> dict[str, Any]:
        return self._info(self._vol(name))

    def create_volume(self, name: str, size: int, vpool: str = "default",
                      holder: Holder | None = None, data: bytearray | None = None) -> dict[str, Any]:
        check_name("volume", name)
        _check_size(size)
        with self.lock:
            self._pool(vpool)
            self._free_name(name, holder)
            self.volumes[name] = _MemVolume(name, size, vpool, data)
            self.reserved.pop(name, None)
            return self._info(self.volumes[name])

    def delete_volume(self, name: str) -> None:
        with self.lock:
            vol = self._vol(name)
            with vol.lock:
                vol.holds.check_delete_volume(name)
                if any(v.parent and v.parent.startswith(name + "@") for v in self.volumes.values()):
                    raise Busy(f"volume {name} has clones")
                del self.volumes[name]

    def rename_volume(self, old: str, new: str) -> None:
        check_name("volume", new)
        with self.lock:
            vol = self._vol(old)
            self._free_name(new, None)
            with vol.lock:
                vol.holds.check_rename(old)
                vol.name = new
                self.volumes[new] = self.volumes.pop(old)

    def resize_volume(self, name: str, size: int) -> None:
        _check_size(size)
        vol = self._vol(name)
        with vol.lock:
            if size < len(vol.data):
                vol.holds.check_shrink(name)
                if any(vol.data[size:]):
                    raise InvalidArgument(f"cannot shrink {name} to {size}: data is written past it")
                del vol.data[size:]
            else:
                vol.data.extend(bytes(size - len(vol.data)))

    def clone_volume(self, src: str, snapshot: str, new: str, vpool: str | None = None) -> dict[str, Any]:
        with self.lock:
            vol = self._vol(src)
            s = vol.snap(snapshot)
            info = self.create_volume(new, len(s["data"]), vpool or vol.vpool, data=bytearray(s["data"]))
            self.volumes[new].parent = f"{src}@{snapshot}"
            return {**info, "parent": f"{src}@{snapshot}"}

    def create_snapshot(self, name: str, snap: str) -> dict[str, Any]:
        check_name("snapshot", snap)
        vol = self._vol(name)
        with vol.lock:
            if any(s["name"] == snap for s in vol.snapshots):
                raise AlreadyExists(f"snapshot {name}@{snap} already exists")
            rec = {"name": snap, "epoch": vol.epoch, "size": len(vol.data), "created": time.time(),
                   "data": bytearray(vol.data)}
            vol.epoch += 1
            vol.snapshots.append(rec)
            return {k: v for k, v in rec.items() if k != "data"}

    def list_snapshots(self, name: str) -> list[dict[str, Any]]:
        vol = self._vol(name)
        with vol.lock:
            return [{"name": s["name"], "epoch": s["epoch"], "size": s["size"], "created": s["created"],
                     "holders": [str(h) for h in vol.holds.holders([s["epoch"]])]} for s in vol.snapshots]

    def _clones_of(self, name: str, snap: str) -> bool:
        return any(v.parent == f"{name}@{snap}" for v in self.volumes.values())

    def delete_snapshot(self, name: str, snap: str) -> None:
        vol = self._vol(name)
        with vol.lock:
            s = vol.snap(snap)
            vol.holds.check_delete_snapshot(name, snap, s["epoch"])
            if self._clones_of(name, snap):
                raise Busy(f"snapshot {name}@{snap} has clones")
            vol.snapshots.remove(s)

    def rollback(self, name: str, snap: str) -> None:
        vol = self._vol(name)
        with vol.lock:
            s = vol.snap(snap)
            later = [x for x in vol.snapshots if x["epoch"] > s["epoch"]]
            vol.holds.check_rollback(name, snap, [x["epoch"] for x in later])
            for x in later:
                if self._clones_of(name, x["name"]):
                    raise Busy(f"snapshot {name}@{x['name']} after {snap} has clones")
            vol.snapshots = [x for x in vol.snapshots if x["epoch"] <= s["epoch"]]
            vol.data[:] = s["data"]

    def list_vpools(self) -> list[dict[str, Any]]:
        with self.lock:
            return [{**rec, "volumes": sum(1 for v in self.volumes.values() if v.vpool == p)}
                    for p, rec in sorted(self.vpools.items())]

    def vpool(self, name: str) -> dict[str, Any]:
        self._pool(name)
        return dict(self.vpools[name])

    def create_vpool(self, name: str, sco_clusters: int | None = None,
                     preset: str | None = None) -> dict[str, Any]:
        check_name("vPool", name)
        sc = sco_clusters or 1024
        if not 1 <= sc <= 65535:
            raise InvalidArgument(f"sco_clusters must be 1..65535, not {sc}")
        with self.lock:
            if name in self.vpools:
                raise AlreadyExists(f"vPool {name} already exists")
            rec = {"name": name, "sco_clusters": sc, "cluster_size": CLUSTER, "preset": preset,
                   "created": time.time()}
            self.vpools[name] = rec
            return dict(rec)

    def usage(self) -> dict[str, Any]:
        with self.lock:
            used = sum(len(v.data) + sum(len(s["data"]) for s in v.snapshots) for v in self.volumes.values())
            return {"capacity": CAPACITY, "free": max(0, CAPACITY - used), "block_size": CLUSTER,
                    "files": len(self.volumes)}

    def reserve_name(self, name: str, holder: Holder, vpool: str = "default") -> None:
        check_name("volume", name)
        with self.lock:
            self._pool(vpool)
            if name in self.volumes:
                raise AlreadyExists(f"volume {name} already exists")
            reserve(self.reserved, name, holder, vpool)

    def release_name(self, name: str, holder: Holder) -> None:
        with self.lock:
            if self.reserved.get(name, (None, None))[1] == holder:
                del self.reserved[name]

    def reservations(self, vpool: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [{"name": n, "vpool": p, "holder": str(h)}
                    for n, (p, h) in sorted(self.reserved.items()) if vpool in (None, p)]
