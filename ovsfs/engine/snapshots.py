"""Snapshots and size changes of a volume.

Each change is a TLog marker followed by its `apply_*` method; TLog replay (recovery.py)
calls the same `apply_*` methods, so a change and its replay cannot drift apart. Once
the marker is written the change has happened: if the map store fails under `apply_*`
(a full disk), the map is rebuilt from its last commit and the TLog (`_map_op`).
A mixin of Volume (ovsfs/engine/volume.py), whose attributes it uses.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ovsfs.engine import tlog
from ovsfs.engine.names import check_name, check_size
from ovsfs.errors import AlreadyExists, Busy, DataError, InvalidArgument

if TYPE_CHECKING:
    from ovsfs.engine.volume import Volume as _Base
else:
    _Base = object


class SnapshotOps(_Base):
    # ---- snapshots -------------------------------------------------------------------------

    def create_snapshot(self, name: str) -> dict[str, Any]:
        check_name("snapshot", name)
        with self.lock:
            self._check_open()
            if any(s["name"] == name for s in self.snapshots):
                raise AlreadyExists(f"snapshot {self.name}@{name} already exists")
            snap = {"name": name, "epoch": self.map.epoch, "size": self.size, "created": time.time()}
            self._tlog_append(tlog.mark(tlog.SNAPSHOT, snap))
            self.write_seq += 1
            with self._map_op():
                self.apply_snapshot(snap)
            return dict(snap)

    def apply_snapshot(self, snap: dict[str, Any]) -> None:
        if self.map.epoch != snap["epoch"]:
            raise DataError(f"{self.name}: TLog snapshot epoch {snap['epoch']} does not follow map epoch {self.map.epoch}")
        self.map.new_epoch()
        self.snapshots.append(snap)

    def list_snapshots(self) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(s) for s in self.snapshots]

    def delete_snapshot(self, name: str) -> None:
        with self.lock:
            self._check_open()
            snap = self._snapshot(name)
            if self.has_clones(self, snap["epoch"]):
                raise Busy(f"snapshot {self.name}@{name} has clones")
            if self.users.get(f"snapshot:{name}"):
                raise Busy(f"snapshot {self.name}@{name} is in use")
            self._tlog_append(tlog.mark(tlog.DELETE_SNAPSHOT, {"name": name}))
            self.write_seq += 1
            with self._map_op():
                self.apply_delete_snapshot(name)

    def apply_delete_snapshot(self, name: str) -> None:
        snap = self._snapshot(name)
        later = [s["epoch"] for s in self.snapshots if s["epoch"] > snap["epoch"]]
        self.map.fold(snap["epoch"], min(later) if later else self.map.epoch)
        self.snapshots.remove(snap)

    def rollback(self, name: str) -> None:
        with self.lock:
            self._check_open()
            snap = self._snapshot(name)
            for s in self.snapshots:
                if s["epoch"] > snap["epoch"] and self.has_clones(self, s["epoch"]):
                    raise Busy(f"snapshot {self.name}@{s['name']} after {name} has clones")
                if s["epoch"] > snap["epoch"] and self.users.get(f"snapshot:{s['name']}"):
                    raise Busy(f"snapshot {self.name}@{s['name']} after {name} is in use")
            self._tlog_append(tlog.mark(tlog.ROLLBACK, {"name": name}))
            self.write_seq += 1
            with self._map_op():
                self.apply_rollback(name)

    def apply_rollback(self, name: str) -> None:
        snap = self._snapshot(name)
        self.map.rollback(snap["epoch"])
        self.snapshots = [s for s in self.snapshots if s["epoch"] <= snap["epoch"]]
        self.size = snap["size"]
        self.map.resize(self._nclusters())

    # ---- size ------------------------------------------------------------------------------

    def resize(self, size: int) -> None:
        check_size(size)
        with self.lock:
            self._check_open()
            if size < self.size:
                # Bytes past the end of a partial last cluster always read as zeros (so a
                # later growth shows zeros there, like a sparse file): what is cut off of
                # that cluster must be zeros already, the whole clusters after it unmapped.
                cs = self.cluster_size
                cut = min(-(-size // cs) * cs, self.size)
                tail = self.read(size, cut - size) if cut > size else b""
                used = [(size + tail.index(next(b for b in tail if b)), 0, True)] if any(tail) else []
                used += [e for e in self.extents(cut, self.size - cut) if e[2]]
                if used:
                    raise InvalidArgument(
                        f"cannot shrink {self.name} to {size}: data is written at offset {used[0][0]}")
            self._tlog_append(tlog.mark(tlog.RESIZE, {"size": size}))
            self.write_seq += 1
            with self._map_op():
                self.apply_resize(size)

    def apply_resize(self, size: int) -> None:
        self.size = size
        self.map.resize(self._nclusters())

