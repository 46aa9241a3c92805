"""A volume (vDisk): thin, fixed-size, log-structured.

Every write appends whole clusters to the open SCO in the write buffer, appends one
TLog record per cluster and updates the cluster map; a batch does each of those
once. `Volume` is a facade over parts that share one state object (state.py,
`VolumeState`): the log writer (log.py: SCOs, TLogs, map commits, flush, sync), the
read path (reads.py) and the snapshot and size operations (snapshots.py). The parts
never import each other's owner; Volume builds them, keeps the write entry points,
users and info, and offers the public methods of docs/ENGINE_API.md.

All state changes happen under `lock`; the lock is never held while waiting for
the upload thread, so uploads always make progress.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ovsfs.backend.store import Store
from ovsfs.config import EngineSection
from ovsfs.engine import tlog
from ovsfs.engine.holders import HoldTable, legacy_holder
from ovsfs.engine.log import LogWriter
from ovsfs.engine.owned import OwnedStore
from ovsfs.engine.reads import IDX_MASK, ReadPath
from ovsfs.engine.names import check_name, sco_name, tlog_name
from ovsfs.engine.snapshots import SnapshotOps
from ovsfs.engine.state import VolumeState
from ovsfs.engine.trim import trim_clusters
from ovsfs.engine.writebuffer import WriteBuffer
from ovsfs.errors import Fenced, InvalidArgument, OutOfRange, OvsfsError, WouldBlock

__all__ = ["Volume", "VolumeState", "check_name", "sco_name", "tlog_name", "IDX_MASK"]


class Volume:
    def __init__(self, meta: dict[str, Any], wb_root: Path, store: Store, wb: WriteBuffer,
                 cfg: EngineSection, parent: "Volume | None" = None,
                 has_clones: Callable[["Volume", int | None], bool] | None = None,
                 gen: int = 0) -> None:
        """`gen`: the owner generation this node opens the volume with (0 on one node):
        every backend write carries it (OwnedStore) and SCO / TLog numbers start at gen << 32."""
        parent_meta = meta.get("parent")
        owned = OwnedStore(store, gen, lambda reason: self.log.halt(reason))
        st = VolumeState(meta, wb_root, owned, wb, cfg, gen=gen,
                         parent=parent.state if parent is not None else None,
                         parent_epoch=parent_meta.get("epoch") if parent_meta else None,
                         has_clones=has_clones or (lambda v, e: False))
        st.owner = self
        st.apply_mark = self.apply_mark
        self.state = st
        self.parent = parent
        self.log = LogWriter(st)
        self.reads = ReadPath(st, self.log._ensure_map, parent.reads if parent is not None else None)
        self.snaps = SnapshotOps(st, self.log, self.reads)
        # New directories (and the parents that name them) must survive a power cut.
        st.fio.mkdir_durable(st.sco_dir)
        st.fio.mkdir_durable(st.tlog_dir)
        wb.watch_disk(wb_root, cfg.disk_reserve, cfg.disk_wait)
        # Lifecycle bookkeeping (ovsfs/engine/holders.py): every handle or job holding this
        # volume or one of its snapshots; legacy acquire() strings map onto it.
        self.holds = HoldTable()
        self._user_epochs: dict[str, int | None] = {}

    # ---- small helpers -------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.state.name

    @property
    def vpool(self) -> str:
        return self.state.vpool

    @property
    def read_only(self) -> bool:
        """A failed volume takes no writes (doors export it read-only)."""
        return self.state.failed is not None

    def _nclusters(self, size: int | None = None) -> int:
        return self.state.nclusters(size)

    def _check_range(self, offset: int, length: int, size: int | None = None) -> None:
        self.state.check_range(offset, length, size)

    def _snapshot(self, name: str) -> dict[str, Any]:
        return self.state.snapshot(name)

    def _view(self, snapshot: str | None) -> tuple[int | None, int]:
        return self.state.view(snapshot)

    def meta_record(self) -> dict[str, Any]:
        """What the map commit stores beside the pages: enough to resume replay."""
        return self.state.meta_record()

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
        cs = self.state.cluster_size
        if nowait:
            self._writev_nowait(reqs)
            return
        if len(reqs) == 1:
            off, data = reqs[0]
            n = len(data)
            if n and off >= 0 and not (off | n) & (cs - 1):
                # One aligned request (a door's queue depth 1): no numpy bookkeeping.
                self.state.check_range(off, n)
                with self._budget(n):
                    self.log.check_open()
                    self.state.check_range(off, n)
                    self._append(np.arange(off // cs, (off + n) // cs, dtype=np.uint64), data)
                return
        n = len(reqs)
        offs = np.fromiter((r[0] for r in reqs), dtype=np.int64, count=n)
        lens = np.fromiter((len(r[1]) for r in reqs), dtype=np.int64, count=n)
        if offs.min() < 0:
            raise InvalidArgument("negative write offset")
        ends = offs + lens
        if ends.max() > self.state.size:
            bad = int(np.argmax(ends > self.state.size))
            self.state.check_range(int(offs[bad]), int(lens[bad]))
        keep = lens > 0
        if not keep.all():
            reqs = [r for r, k in zip(reqs, keep.tolist()) if k]
            offs, lens, ends = offs[keep], lens[keep], ends[keep]
            if not reqs:
                return
        firsts = offs // cs
        counts = (ends - 1) // cs - firsts + 1
        with self._budget(int(counts.sum()) * cs):
            self.log.check_open()
            if int(ends.max()) > self.state.size:  # shrunk meanwhile
                self.state.check_range(int(offs[0]), int(lens[0]))
                raise OutOfRange(f"write past the end of {self.state.name}")
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
                    old = self.reads._read_clusters(np.arange(first, last + 1, dtype=np.uint64), None)
                    old[head:head + len(data)] = data
                    data = old
                addr_parts.append(np.arange(first, last + 1, dtype=np.uint64))
                data_parts.append(bytes(data))
            if data_parts:
                self._append(np.concatenate(addr_parts), b"".join(data_parts))

    def _writev_nowait(self, reqs: Sequence[tuple[int, bytes | bytearray | memoryview]]) -> None:
        if self.state.dtl.mode == "sync":
            raise WouldBlock("a sync DTL waits for its peer")
        self.state.check_served(nowait=True)
        cs = self.state.cluster_size
        total = 0
        for off, data in reqs:
            n = len(data)
            if not n or (off | n) & (cs - 1):
                raise WouldBlock("only whole, non-empty clusters are written without waiting")
            self.state.check_range(off, n)
            total += n
        with self._budget(total, nowait=True):
            self.log.check_open()
            for off, data in reqs:
                self.state.check_range(off, len(data))  # a resize may have come in between
            addrs = np.concatenate([np.arange(o // cs, (o + len(d)) // cs, dtype=np.uint64) for o, d in reqs])
            self._append(addrs, reqs[0][1] if len(reqs) == 1 else b"".join(d for _o, d in reqs))

    @contextmanager
    def _budget(self, nbytes: int, nowait: bool = False) -> Iterator[None]:
        """Reserve write-buffer room (before the lock: reserve may wait for uploads), then
        hold the lock; whatever the body did not append is given back, so a failed write
        never keeps budget."""
        nbytes += (nbytes // self.state.cluster_size) * tlog.SIZE
        if nowait:
            if not self.state.wb.try_reserve(nbytes):
                raise WouldBlock("write buffer full")
        else:
            self.state.wb.reserve(nbytes)
        if not self.state.lock.acquire(blocking=not nowait):
            self.state.wb.unreserve(nbytes)
            raise WouldBlock("volume busy")
        before = self.state.appended
        ticket = None
        try:
            yield
            ticket = self.state.dtl_ticket
        finally:
            # The TLog records (counted with the volume's local bytes once written) were
            # reserved as well, so that the disk check saw them.
            unused = nbytes - (self.state.appended - before)
            if unused > 0:
                self.state.wb.unreserve(unused)
            self.state.lock.release()
        self._dtl_wait(ticket)

    def _dtl_wait(self, ticket: object = None) -> None:
        """Sync DTL: return once the peer holds what was appended (the ticket, default the
        latest); outside the volume lock so that other writers batch behind this one.
        Raises Fenced (and halts the volume) when the peer says another node owns it."""
        if self.state.dtl.mode != "sync":
            return
        if ticket is None:
            with self.state.lock:
                ticket = self.state.dtl_ticket
        if ticket is None:
            return
        try:
            self.state.dtl.wait(ticket)
        except Fenced as e:
            raise self.log.halt(e.message) from e

    def write_room(self, nbytes: int) -> bool:
        """Would a write of `nbytes` find write-buffer room now? Reserves nothing.

        For a door's event loop: writers that would wait for room wait there (polling
        this), not in a worker thread the management API and other volumes need."""
        return self.state.wb.has_room(nbytes)

    def waiting_for_room(self, delta: int) -> None:
        """A door's writer starts (+1) or stops (-1) waiting for room outside the engine
        (polling write_room): counted with the writers waiting in the engine, for status."""
        self.state.wb.note_waiting(delta)

    def _check_open(self) -> None:
        """Before any change: raises Busy (closed), VolumeFailed (failed fsync),
        NoSpace / LocalIOError (the map cannot be rebuilt yet after a full disk)."""
        self.log.check_open()

    def trim(self, offset: int, length: int) -> None:
        """Release a byte range: it reads as zeros and its old data becomes garbage.

        Cost follows what is mapped in the range, not its length (see trim.py): a 16 GiB
        trim of never-written space writes no TLog record. Whole clusters are done a few
        map pages per hold of the volume lock. Raises OutOfRange / InvalidArgument for a
        bad range, Busy when the volume is closed.
        """
        self.state.check_range(offset, length)
        if length == 0:
            return
        cs = self.state.cluster_size
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
            trim_clusters(self.state, self.log, first_full, end_full)
            self._dtl_wait()

    write_zeroes = trim

    # ---- users and info --------------------------------------------------------------------

    def acquire(self, user: str) -> None:
        """Legacy hold by a user string ("nbd:<cid>", "fuse", "snapshot:<name>"); it is
        registered in `holds` like a handle, so the lifecycle rules see it."""
        with self.state.lock:
            self.log.check_open()
            epoch = self.state.snapshot(user[9:])["epoch"] if user.startswith("snapshot:") else None
            self.state.users[user] = self.state.users.get(user, 0) + 1
            self.holds.add(legacy_holder(user), epoch)
            self._user_epochs[user] = epoch

    def release(self, user: str) -> None:
        with self.state.lock:
            n = self.state.users.get(user, 0) - 1
            if n > 0:
                self.state.users[user] = n
            else:
                self.state.users.pop(user, None)
            if user in self._user_epochs:
                self.holds.remove(legacy_holder(user), self._user_epochs[user])
                if n <= 0:
                    del self._user_epochs[user]

    def info(self) -> dict[str, Any]:
        st = self.state
        with st.lock:
            parent = st.meta.get("parent")
            return {
                "name": st.name, "vpool": st.vpool, "namespace": st.ns, "size": st.size,
                "cluster_size": st.cluster_size, "sco_size": st.sco_clusters * st.cluster_size,
                "snapshots": len(st.snapshots), "epoch": st.map.epoch,
                "parent": f"{parent['name']}@{parent['snapshot']}" if parent else None,
                "open_sco": st.sco_no if st.sco_fd is not None else None,
                "tlog": st.tlog_no, "local_scos": len(st.local_scos),
                "map_resident_bytes": st.map.resident_bytes(),
                "map_stored_bytes": st.map.stored_bytes(),
                "users": dict(st.users),
                "failed": st.failed,
                "gen": st.gen, "fenced": st.fenced,
                "dtl": st.dtl.status(),
            }

    def close(self) -> None:
        """Clean close: everything durable locally, map committed, no replay next time.

        A failed volume is closed without a commit (the next open replays what is on
        disk). Raises what the flush or commit raised, after releasing everything."""
        err: OvsfsError | None = None
        if self.state.failed is None:
            try:
                self.log.flush()
            except OvsfsError as e:
                err = e
        with self.state.lock:
            if self.state.closed:
                return
            if self.state.failed is None and err is None:
                try:
                    self.log.commit()
                except OvsfsError as e:
                    err = e
            self.state.closed = True
            for fd in [*self.state.read_fds.values(), *self.state.unsynced.values()]:
                os.close(fd)
            self.state.read_fds.clear()
            self.state.unsynced.clear()
            for fd in (self.state.sco_fd, self.state.tlog_fd):
                if fd is not None:
                    os.close(fd)
            self.state.sco_fd = self.state.tlog_fd = None
            self.state.map.close()
        if err is not None:
            raise err

    # ---- the parts' entry points (docs/ENGINE_API.md; recovery, scrub and tests use some) --

    def read(self, offset: int, length: int, snapshot: str | None = None) -> bytes:
        return self.reads.read(offset, length, snapshot)

    def readv(self, reqs: Sequence[tuple[int, int]], snapshot: str | None = None,
              nowait: bool = False) -> list[bytes]:
        return self.reads.readv(reqs, snapshot, nowait)

    def extents(self, offset: int, length: int, snapshot: str | None = None) -> list[tuple[int, int, bool]]:
        return self.reads.extents(offset, length, snapshot)

    def read_locations(self, locs: np.ndarray) -> bytearray:
        return self.reads.read_locations(locs)

    def flush(self) -> None:
        self.log.flush()

    def sync(self, timeout: float | None = None) -> None:
        self.log.sync(timeout)

    def seal(self) -> None:
        self.log.seal()

    def commit(self) -> None:
        self.log.commit()

    def maybe_commit(self, interval: float) -> None:
        self.log.maybe_commit(interval)

    def evict_sco(self, n: int) -> None:
        self.log.evict_sco(n)

    def queue_sco_upload(self, n: int, nbytes: int) -> None:
        self.log.queue_sco_upload(n, nbytes)

    def queue_tlog_upload(self, n: int) -> None:
        self.log.queue_tlog_upload(n)

    def queue_checkpoint(self) -> None:
        self.log.queue_checkpoint()

    def _append(self, addrs: np.ndarray, buf: bytes, moved_from: np.ndarray | None = None) -> None:
        self.log._append(addrs, buf, moved_from)

    def _tlog_append(self, rec: bytes) -> None:
        self.log._tlog_append(rec)

    def _ensure_map(self) -> None:
        self.log._ensure_map()

    # Markers go to the DTL like writes: a sync DTL acknowledges them once the peer has them.
    def create_snapshot(self, name: str) -> dict[str, Any]:
        snap = self.snaps.create_snapshot(name)
        self._dtl_wait()
        return snap

    def list_snapshots(self) -> list[dict[str, Any]]:
        return self.snaps.list_snapshots()

    def delete_snapshot(self, name: str) -> None:
        self.snaps.delete_snapshot(name)
        self._dtl_wait()

    def rollback(self, name: str) -> None:
        self.snaps.rollback(name)
        self._dtl_wait()

    def resize(self, size: int) -> None:
        self.snaps.resize(size)
        self._dtl_wait()

    # TLog replay (recovery.apply) calls these, as the operations above do.
    def apply_snapshot(self, snap: dict[str, Any]) -> None:
        self.snaps.apply_snapshot(snap)

    def apply_delete_snapshot(self, name: str) -> None:
        self.snaps.apply_delete_snapshot(name)

    def apply_rollback(self, name: str) -> None:
        self.snaps.apply_rollback(name)

    def apply_resize(self, size: int) -> None:
        self.snaps.apply_resize(size)

    def apply_entry(self, rec: bytes, data: memoryview) -> None:
        """Append one DTL entry of a previous owner as this owner's own writes (tail.py)."""
        with self._budget(len(data)):
            self.log.check_open()
            self.log.apply_entry(rec, data)

    def apply_mark(self, op: int, p: dict[str, Any]) -> None:
        """Apply one TLog marker (replay of a TLog or of a DTL entry)."""
        if op == tlog.SNAPSHOT:
            self.snaps.apply_snapshot(p)
        elif op == tlog.DELETE_SNAPSHOT:
            self.snaps.apply_delete_snapshot(p["name"])
        elif op == tlog.ROLLBACK:
            self.snaps.apply_rollback(p["name"])
        elif op == tlog.RESIZE:
            self.snaps.apply_resize(p["size"])


def _forward(name: str) -> property:
    return property(lambda self: getattr(self.state, name),
                    lambda self, value: setattr(self.state, name, value),
                    doc=f"VolumeState.{name}")


# The state's fields read (and set: `vol.fio = ...` to inject faults, recovery setting
# `vol.map`) through the volume, as before the parts were split out.
for _name in [f.name for f in fields(VolumeState)
              if f.name not in ("owner", "parent", "wb_root", "replay", "apply_mark", "lease")] + [
        "ns", "cluster_size", "sco_clusters", "dir", "sco_dir", "tlog_dir"]:
    setattr(Volume, _name, _forward(_name))
del _name
