"""A volume (vDisk): thin, fixed-size, log-structured.

Every write appends whole clusters to the open SCO in the write buffer, appends one
TLog record per cluster and updates the cluster map; a batch does each of those
once (the log side is in log.py, reads in reads.py, snapshots and resize in
snapshots.py; Volume puts them together with the write entry points).

All state changes happen under `lock`; the lock is never held while waiting for
the upload thread, so uploads always make progress.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ovsfs.backend.store import Store
from ovsfs.config import EngineSection
from ovsfs.dtl import DtlSink, NoDtl
from ovsfs.engine import tlog
from ovsfs.engine.fileio import FileIO
from ovsfs.engine.holders import HoldTable, legacy_holder
from ovsfs.engine.log import LogWriter
from ovsfs.engine.reads import IDX_MASK, ReadPath
from ovsfs.engine.map import ClusterMap
from ovsfs.engine.names import check_name, sco_name, tlog_name
from ovsfs.engine.snapshots import SnapshotOps
from ovsfs.engine.trim import trim_clusters
from ovsfs.engine.writebuffer import WriteBuffer
from ovsfs.errors import Busy, InvalidArgument, NotFound, OutOfRange, OvsfsError, VolumeFailed, WouldBlock

__all__ = ["Volume", "check_name", "sco_name", "tlog_name", "IDX_MASK"]



class Volume(ReadPath, LogWriter, SnapshotOps):
    def __init__(self, meta: dict[str, Any], wb_root: Path, store: Store, wb: WriteBuffer,
                 cfg: EngineSection, parent: "Volume | None" = None,
                 has_clones: Callable[["Volume", int | None], bool] | None = None) -> None:
        self.meta = meta                       # the registry record: name, ns, vpool, parent
        self.ns: str = meta["ns"]
        self.cluster_size: int = meta["cluster_size"]
        self.sco_clusters: int = meta["sco_clusters"]
        self.cfg = cfg
        self.store = store
        self.wb = wb
        self.parent = parent
        self.parent_epoch: int | None = meta.get("parent", {}).get("epoch") if meta.get("parent") else None
        self.has_clones = has_clones or (lambda v, e: False)
        self.dtl: DtlSink = NoDtl()
        self.lock = threading.RLock()
        self.dir = wb_root / self.ns
        self.sco_dir = self.dir / "sco"
        self.tlog_dir = self.dir / "tlog"
        # Every local write goes through this; replace it (per volume) to inject faults.
        self.fio = FileIO()
        # New directories (and the parents that name them) must survive a power cut.
        self.fio.mkdir_durable(self.sco_dir)
        self.fio.mkdir_durable(self.tlog_dir)
        wb.watch_disk(wb_root, cfg.disk_reserve, cfg.disk_wait)
        self.size: int = meta["size"]
        self.snapshots: list[dict[str, Any]] = []
        self.map: ClusterMap = None  # type: ignore[assignment]  # set by recovery.open_volume
        # Open SCO and TLog
        self.sco_no = 0
        self.sco_idx = 0
        self.sco_fd: int | None = None
        self.sco_path = self.sco_dir / "0"
        self.tlog_no = 0
        self.tlog_fd: int | None = None
        self.tlog_path = self.tlog_dir / "0"
        self.tlog_off = 0
        self.scos_in_tlog = 0
        self.next_sco = 1
        self.next_tlog = 1
        self.local_scos: set[int] = set()
        self.uploaded_tlogs: set[int] = set()
        self.committed_tlog = 0
        self.read_fds: dict[int, int] = {}
        # Durability bookkeeping
        self.write_seq = 0
        self.synced_seq = 0
        self.flushing = False
        self.flush_cv = threading.Condition()
        # Files written since their last fsync -> an fd of their own (see _mark_unsynced),
        # those a running flush is fsyncing, and directories with new names in them.
        self.unsynced: dict[Path, int] = {}
        self.syncing: dict[Path, int] = {}
        self.dirty_dirs: set[Path] = {self.dir}   # map.db is created in it
        self.syncing_dirs: set[Path] = set()
        self.failed: str | None = None         # why the volume stopped (a failed fsync)
        # Write-buffer disk taken by TLogs (bytes, as of the last scan + growth since)
        self._tlog_base = 0
        self._tlog_growth = 0
        self._tlog_reported = 0
        self.last_commit = time.monotonic()
        self.tlogs_since_checkpoint = 0
        self.users: dict[str, int] = {}       # legacy acquire() strings; the holds are in `holds`
        self.holds = HoldTable()               # every handle/job holding this volume or a snapshot
        self._user_epochs: dict[str, int | None] = {}
        self.closed = False
        self.deleted = False
        self.appended = 0                      # bytes appended to SCOs (write-buffer accounting)
        self.replayed = 0                      # TLog records replayed at open (0 after a clean stop)

    # ---- small helpers -------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def vpool(self) -> str:
        return self.meta["vpool"]

    @property
    def read_only(self) -> bool:
        """A failed volume takes no writes (doors export it read-only)."""
        return self.failed is not None

    def _nclusters(self, size: int | None = None) -> int:
        return -(-(self.size if size is None else size) // self.cluster_size)

    def _check_range(self, offset: int, length: int, size: int | None = None) -> None:
        size = self.size if size is None else size
        if offset < 0 or length < 0:
            raise InvalidArgument(f"negative offset or length ({offset}, {length})")
        if offset + length > size:
            raise OutOfRange(f"request {offset}+{length} is past the end of {self.name} ({size} bytes)")

    def _snapshot(self, name: str) -> dict[str, Any]:
        for s in self.snapshots:
            if s["name"] == name:
                return s
        raise NotFound(f"snapshot {self.name}@{name} does not exist")

    def _view(self, snapshot: str | None) -> tuple[int | None, int]:
        if snapshot is None:
            return None, self.size
        s = self._snapshot(snapshot)
        return s["epoch"], s["size"]

    def meta_record(self) -> dict[str, Any]:
        """What the map commit stores beside the pages: enough to resume replay."""
        return {"epoch": self.map.epoch, "snapshots": self.snapshots, "size": self.size,
                "tlog": self.tlog_no, "tlog_off": self.tlog_off,
                "next_sco": self.next_sco, "next_tlog": self.next_tlog}

    # ---- writes ------------------------------------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.writev([(offset, data)])

    def writev(self, reqs: Sequence[tuple[int, bytes | bytearray | memoryview]], nowait: bool = False) -> None:
        """Write a batch; acknowledged (durable against a process crash) on return.

        Raises NoSpace (the write-buffer disk stayed full for `disk_wait` seconds, or
        filled under the write: nothing of the failed part is acknowledged), LocalIOError,
        VolumeFailed (after a failed fsync), besides the argument errors.

        nowait=True is for a door's event loop: the write happens only if nothing can make
        it wait (volume lock free, write buffer has room, whole clusters); otherwise
        WouldBlock is raised before anything is written, and the door hands the same
        batch to a worker thread. It saves a thread hop at queue depth 1.
        """
        if not reqs:
            return
        cs = self.cluster_size
        if nowait:
            self._writev_nowait(reqs)
            return
        if len(reqs) == 1:
            off, data = reqs[0]
            n = len(data)
            if n and off >= 0 and not (off | n) & (cs - 1):
                # One aligned request (a door's queue depth 1): no numpy bookkeeping.
                self._check_range(off, n)
                with self._budget(n):
                    self._check_open()
                    self._check_range(off, n)
                    self._append(np.arange(off // cs, (off + n) // cs, dtype=np.uint64), data)
                return
        n = len(reqs)
        offs = np.fromiter((r[0] for r in reqs), dtype=np.int64, count=n)
        lens = np.fromiter((len(r[1]) for r in reqs), dtype=np.int64, count=n)
        if offs.min() < 0:
            raise InvalidArgument("negative write offset")
        ends = offs + lens
        if ends.max() > self.size:
            bad = int(np.argmax(ends > self.size))
            self._check_range(int(offs[bad]), int(lens[bad]))
        keep = lens > 0
        if not keep.all():
            reqs = [r for r, k in zip(reqs, keep.tolist()) if k]
            offs, lens, ends = offs[keep], lens[keep], ends[keep]
            if not reqs:
                return
        firsts = offs // cs
        counts = (ends - 1) // cs - firsts + 1
        with self._budget(int(counts.sum()) * cs):
            self._check_open()
            if int(ends.max()) > self.size:  # shrunk meanwhile
                self._check_range(int(offs[0]), int(lens[0]))
                raise OutOfRange(f"write past the end of {self.name}")
            if not ((offs | lens) & (cs - 1)).any():
                # Whole clusters only (the usual case): no read-modify-write, no per-request work.
                if (counts == 1).all():
                    addrs = firsts.astype(np.uint64)
                else:
                    starts = np.repeat(np.cumsum(counts) - counts, counts)
                    addrs = (np.repeat(firsts, counts) + np.arange(int(counts.sum())) - starts).astype(np.uint64)
                self._append(addrs, reqs[0][1] if len(reqs) == 1 else b"".join(r[1] for r in reqs))
                return
            addr_parts: list[np.ndarray] = []
            data_parts: list[bytes] = []
            for off, data in reqs:
                first = off // cs
                last = (off + len(data) - 1) // cs
                head, tail = off - first * cs, (last + 1) * cs - off - len(data)
                if head or tail:
                    # Read-modify-write: this write must see earlier writes of the same batch.
                    if data_parts:
                        self._append(np.concatenate(addr_parts), b"".join(data_parts))
                        addr_parts, data_parts = [], []
                    old = self._read_clusters(np.arange(first, last + 1, dtype=np.uint64), None)
                    old[head:head + len(data)] = data
                    data = old
                addr_parts.append(np.arange(first, last + 1, dtype=np.uint64))
                data_parts.append(bytes(data))
            if data_parts:
                self._append(np.concatenate(addr_parts), b"".join(data_parts))

    def _writev_nowait(self, reqs: Sequence[tuple[int, bytes | bytearray | memoryview]]) -> None:
        cs = self.cluster_size
        total = 0
        for off, data in reqs:
            n = len(data)
            if not n or (off | n) & (cs - 1):
                raise WouldBlock("only whole, non-empty clusters are written without waiting")
            self._check_range(off, n)
            total += n
        with self._budget(total, nowait=True):
            self._check_open()
            for off, data in reqs:
                self._check_range(off, len(data))  # a resize may have come in between
            addrs = np.concatenate([np.arange(o // cs, (o + len(d)) // cs, dtype=np.uint64) for o, d in reqs])
            self._append(addrs, reqs[0][1] if len(reqs) == 1 else b"".join(d for _o, d in reqs))

    @contextmanager
    def _budget(self, nbytes: int, nowait: bool = False) -> Iterator[None]:
        """Reserve write-buffer room (before the lock: reserve may wait for uploads), then
        hold the lock; whatever the body did not append is given back, so a failed write
        never keeps budget."""
        nbytes += (nbytes // self.cluster_size) * tlog.SIZE
        if nowait:
            if not self.wb.try_reserve(nbytes):
                raise WouldBlock("write buffer full")
        else:
            self.wb.reserve(nbytes)
        if not self.lock.acquire(blocking=not nowait):
            self.wb.unreserve(nbytes)
            raise WouldBlock("volume busy")
        before = self.appended
        try:
            yield
        finally:
            # The TLog records (counted with the volume's local bytes once written) were
            # reserved as well, so that the disk check saw them.
            unused = nbytes - (self.appended - before)
            if unused > 0:
                self.wb.unreserve(unused)
            self.lock.release()

    def write_room(self, nbytes: int) -> bool:
        """Would a write of `nbytes` find write-buffer room now? Reserves nothing.

        For a door's event loop: writers that would wait for room wait there (polling
        this), not in a worker thread the management API and other volumes need."""
        return self.wb.has_room(nbytes)

    def _check_open(self) -> None:
        """Before any change: raises Busy (closed), VolumeFailed (failed fsync),
        NoSpace / LocalIOError (the map cannot be rebuilt yet after a full disk)."""
        if self.closed or self.deleted:
            raise Busy(f"volume {self.name} is closed")
        if self.failed is not None:
            raise VolumeFailed(f"volume {self.name} failed: {self.failed}")
        self._ensure_map()

    def trim(self, offset: int, length: int) -> None:
        """Release a byte range: it reads as zeros and its old data becomes garbage.

        Cost follows what is mapped in the range, not its length (see trim.py): a 16 GiB
        trim of never-written space writes no TLog record. Whole clusters are done a few
        map pages per hold of the volume lock. Raises OutOfRange / InvalidArgument for a
        bad range, Busy when the volume is closed.
        """
        self._check_range(offset, length)
        if length == 0:
            return
        cs = self.cluster_size
        first_full = -(-offset // cs)
        end_full = (offset + length) // cs
        if offset + length == self.size:
            end_full = -(-self.size // cs)   # a partial last cluster is dropped whole, not zero-filled
        # Partial clusters at the edges are zeroed by writing; whole ones are dropped from the map.
        edges = []
        if first_full > end_full:
            edges.append((offset, length))
        else:
            if offset < first_full * cs:
                edges.append((offset, first_full * cs - offset))
            if end_full * cs < offset + length:
                edges.append((end_full * cs, offset + length - end_full * cs))
        if edges:
            self.writev([(o, bytes(n)) for o, n in edges])
        if first_full < end_full:
            trim_clusters(self, first_full, end_full)

    write_zeroes = trim

    # ---- users and info --------------------------------------------------------------------

    def acquire(self, user: str) -> None:
        """Legacy hold by a user string ("nbd:<cid>", "fuse", "snapshot:<name>"); it is
        registered in `holds` like a handle, so the lifecycle rules see it."""
        with self.lock:
            self._check_open()
            epoch = self._snapshot(user[9:])["epoch"] if user.startswith("snapshot:") else None
            self.users[user] = self.users.get(user, 0) + 1
            self.holds.add(legacy_holder(user), epoch)
            self._user_epochs[user] = epoch

    def release(self, user: str) -> None:
        with self.lock:
            n = self.users.get(user, 0) - 1
            if n > 0:
                self.users[user] = n
            else:
                self.users.pop(user, None)
            if user in self._user_epochs:
                self.holds.remove(legacy_holder(user), self._user_epochs[user])
                if n <= 0:
                    del self._user_epochs[user]

    def info(self) -> dict[str, Any]:
        with self.lock:
            parent = self.meta.get("parent")
            return {
                "name": self.name, "vpool": self.vpool, "namespace": self.ns, "size": self.size,
                "cluster_size": self.cluster_size, "sco_size": self.sco_clusters * self.cluster_size,
                "snapshots": len(self.snapshots), "epoch": self.map.epoch,
                "parent": f"{parent['name']}@{parent['snapshot']}" if parent else None,
                "open_sco": self.sco_no if self.sco_fd is not None else None,
                "tlog": self.tlog_no, "local_scos": len(self.local_scos),
                "map_resident_bytes": self.map.resident_bytes(),
                "map_stored_bytes": self.map.stored_bytes(),
                "users": dict(self.users),
                "failed": self.failed,
            }

    def close(self) -> None:
        """Clean close: everything durable locally, map committed, no replay next time.

        A failed volume is closed without a commit (the next open replays what is on
        disk). Raises what the flush or commit raised, after releasing everything."""
        err: OvsfsError | None = None
        if self.failed is None:
            try:
                self.flush()
            except OvsfsError as e:
                err = e
        with self.lock:
            if self.closed:
                return
            if self.failed is None and err is None:
                try:
                    self.commit()
                except OvsfsError as e:
                    err = e
            self.closed = True
            for fd in [*self.read_fds.values(), *self.unsynced.values()]:
                os.close(fd)
            self.read_fds.clear()
            self.unsynced.clear()
            for fd in (self.sco_fd, self.tlog_fd):
                if fd is not None:
                    os.close(fd)
            self.sco_fd = self.tlog_fd = None
            self.map.close()
        if err is not None:
            raise err
