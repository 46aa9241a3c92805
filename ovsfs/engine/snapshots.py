"""Snapshots and size changes of a volume.

Each change is a TLog marker followed by its `apply_*` method; TLog replay (recovery.py)
calls the same `apply_*` methods, so a change and its replay cannot drift apart. Once
the marker is written the change has happened: if the map store fails under `apply_*`
(a full disk), the map is rebuilt from its last commit and the TLog (`_map_op`).
A part of Volume (ovsfs/engine/volume.py): it works on the volume's shared state
(state.py, `self.s`) and writes its markers through the volume's log writer.
"""

from __future__ import annotations

import time
from typing import Any

from ovsfs.engine import tlog
from ovsfs.engine.log import LogWriter
from ovsfs.engine.names import check_name, check_size
from ovsfs.engine.reads import ReadPath
from ovsfs.engine.state import VolumeState
from ovsfs.errors import AlreadyExists, Busy, DataError, InvalidArgument



class SnapshotOps:
    def __init__(self, state: VolumeState, log: LogWriter, reads: ReadPath) -> None:
        self.s = state
        self.log = log
        self.reads = reads

    # ---- snapshots -------------------------------------------------------------------------

    def create_snapshot(self, name: str) -> dict[str, Any]:
        check_name("snapshot", name)
        with self.s.lock:
            self.log.check_open()
            if any(s["name"] == name for s in self.s.snapshots):
                raise AlreadyExists(f"snapshot {self.s.name}@{name} already exists")
            snap = {"name": name, "epoch": self.s.map.epoch, "size": self.s.size, "created": time.time()}
            self.log._tlog_append(tlog.mark(tlog.SNAPSHOT, snap))
            self.s.write_seq += 1
            with self.log._map_op():
                self.apply_snapshot(snap)
            return dict(snap)

    def apply_snapshot(self, snap: dict[str, Any]) -> None:
        if self.s.map.epoch != snap["epoch"]:
            raise DataError(f"{self.s.name}: TLog snapshot epoch {snap['epoch']} does not follow "
                            f"map epoch {self.s.map.epoch}")
        self.s.map.new_epoch()
        self.s.snapshots.append(snap)

    def list_snapshots(self) -> list[dict[str, Any]]:
        with self.s.lock:
            return [dict(s) for s in self.s.snapshots]

    def delete_snapshot(self, name: str) -> None:
        with self.s.lock:
            self.log.check_open()
            snap = self.s.snapshot(name)
            if self.s.has_clones(self.s.owner, snap["epoch"]):
                raise Busy(f"snapshot {self.s.name}@{name} has clones")
            if self.s.users.get(f"snapshot:{name}"):
                raise Busy(f"snapshot {self.s.name}@{name} is in use")
            self.log._tlog_append(tlog.mark(tlog.DELETE_SNAPSHOT, {"name": name}))
            self.s.write_seq += 1
            with self.log._map_op():
                self.apply_delete_snapshot(name)

    def apply_delete_snapshot(self, name: str) -> None:
        snap = self.s.snapshot(name)
        later = [s["epoch"] for s in self.s.snapshots if s["epoch"] > snap["epoch"]]
        self.s.map.fold(snap["epoch"], min(later) if later else self.s.map.epoch)
        self.s.snapshots.remove(snap)

    def rollback(self, name: str) -> None:
        with self.s.lock:
            self.log.check_open()
            snap = self.s.snapshot(name)
            for s in self.s.snapshots:
                if s["epoch"] > snap["epoch"] and self.s.has_clones(self.s.owner, s["epoch"]):
                    raise Busy(f"snapshot {self.s.name}@{s['name']} after {name} has clones")
                if s["epoch"] > snap["epoch"] and self.s.users.get(f"snapshot:{s['name']}"):
                    raise Busy(f"snapshot {self.s.name}@{s['name']} after {name} is in use")
            self.log._tlog_append(tlog.mark(tlog.ROLLBACK, {"name": name}))
            self.s.write_seq += 1
            with self.log._map_op():
                self.apply_rollback(name)

    def apply_rollback(self, name: str) -> None:
        snap = self.s.snapshot(name)
        self.s.map.rollback(snap["epoch"])
        self.s.snapshots = [s for s in self.s.snapshots if s["epoch"] <= snap["epoch"]]
        self.s.size = snap["size"]
        self.s.map.resize(self.s.nclusters())

    # ---- size ------------------------------------------------------------------------------

    def resize(self, size: int) -> None:
        check_size(size)
        with self.s.lock:
            self.log.check_open()
            if size < self.s.size:
                # Bytes past the end of a partial last cluster always read as zeros (so a
                # later growth shows zeros there, like a sparse file): what is cut off of
                # that cluster must be zeros already, the whole clusters after it unmapped.
                cs = self.s.cluster_size
                cut = min(-(-size // cs) * cs, self.s.size)
                tail = self.reads.read(size, cut - size) if cut > size else b""
                used = [(size + tail.index(next(b for b in tail if b)), 0, True)] if any(tail) else []
                used += [e for e in self.reads.extents(cut, self.s.size - cut) if e[2]]
                if used:
                    raise InvalidArgument(
                        f"cannot shrink {self.s.name} to {size}: data is written at offset {used[0][0]}")
            self.log._tlog_append(tlog.mark(tlog.RESIZE, {"size": size}))
            self.s.write_seq += 1
            with self.log._map_op():
                self.apply_resize(size)

    def apply_resize(self, size: int) -> None:
        self.s.size = size
        self.s.map.resize(self.s.nclusters())

