"""The log side of a volume: appending to SCOs and TLogs, sealing and uploading them,
committing the map, flushing (durability) and syncing to the backend.

A part of Volume (ovsfs/engine/volume.py): it works on the volume's shared state
(state.py, `self.s`); every method here runs with the volume lock held unless it says
otherwise.

Local writes go through `self.s.fio` (fileio.FileIO): short writes are completed, a full
disk is NoSpace. A write is acknowledged only when its SCO data and TLog records are
both whole; a failed TLog append is cut back to the last whole record, so replay
never mis-parses. Durable order: SCO data, then the TLogs that point into it, then
their directories, then (map commit) the replay position that skips those records.
A failed fsync is never retried: the volume fails (VolumeFailed for every later write
and flush) until it is reopened and replays what is really on disk.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import crc32c
import numpy as np

from ovsfs.engine import tail, tlog
from ovsfs.engine.map import SCO_SHIFT, ZERO_LOC, ClusterMap
from ovsfs.engine.checkpoint import queue_checkpoint
from ovsfs.engine.names import sco_name, tlog_name
from ovsfs.engine.state import VolumeState
from ovsfs.errors import (BackendError, Busy, DataError, Fenced, FsyncError, LocalIOError, NoSpace, NotOwner,
                          OvsfsError, VolumeFailed)


log = logging.getLogger("ovsfs.engine.log")

_REPORT_EVERY = 64 << 10   # TLog growth (bytes) between reports to the write-buffer budget


class LogWriter:
    def __init__(self, state: VolumeState) -> None:
        self.s = state

    def check_open(self) -> None:
        """Before any change: raises Busy (closed), VolumeFailed (failed fsync),
        NoSpace / LocalIOError (the map cannot be rebuilt yet after a full disk)."""
        self.s.check_served()
        if self.s.released is not None:
            raise NotOwner(f"volume {self.s.name} is {self.s.released}")
        if self.s.closed or self.s.deleted:
            raise Busy(f"volume {self.s.name} is closed")
        if self.s.failed is not None:
            raise VolumeFailed(f"volume {self.s.name} failed: {self.s.failed}")
        self._ensure_map()

    def _append(self, addrs: np.ndarray, buf: bytes, moved_from: np.ndarray | None = None) -> None:
        """Append whole clusters: one pwrite per SCO touched, one TLog write, one map update.

        With `moved_from` (the scrubber) the clusters are old locations moved to new
        ones: RELOC records, and every map version pointing at them is switched.
        Raises NoSpace / LocalIOError with nothing of the failed SCO run recorded (runs
        of earlier SCOs of the batch are), VolumeFailed when the TLog cannot be repaired.
        """
        cs = self.s.cluster_size
        n = len(addrs)
        locs = np.empty(n, dtype=np.uint64)
        view = memoryview(buf)
        pos = 0
        try:
            while pos < n:
                if self.s.sco_fd is None or self.s.sco_idx >= self.s.sco_clusters:
                    self._roll_sco()
                take = min(n - pos, self.s.sco_clusters - self.s.sco_idx)
                chunk = view[pos * cs:(pos + take) * cs]
                self._mark_unsynced(self.s.sco_path, self.s.sco_fd)  # type: ignore[arg-type]
                try:
                    st = self.s
                    st.fio.pwrite_all(st.sco_fd, chunk, st.sco_idx * cs, str(st.sco_path))  # type: ignore[arg-type]
                except OvsfsError:
                    self._cut_sco_tail()
                    raise
                base = (self.s.sco_no << SCO_SHIFT) | self.s.sco_idx
                seg = np.arange(base, base + take, dtype=np.uint64)
                locs[pos:pos + take] = seg
                crcs = [crc32c.crc32c(chunk[i * cs:(i + 1) * cs]) for i in range(take)]
                # The map follows each SCO's records at once: the next roll may seal the TLog
                # and commit the map, and a commit must cover every record before it.
                if moved_from is None and take == 1:
                    rec = tlog.write_one(int(addrs[pos]), base, int(crcs[0]))
                elif moved_from is None:
                    rec = tlog.writes(addrs[pos:pos + take], seg, crcs)
                else:
                    rec = tlog.relocs(moved_from[pos:pos + take], seg, crcs)
                try:
                    self._tlog_append(rec, chunk if moved_from is None else None, ship=moved_from is None)
                except OvsfsError:
                    self._cut_sco_tail()   # nothing points at these clusters: reuse them
                    raise
                # Recorded: from here on the clusters are taken, whatever the map does.
                self.s.sco_idx += take
                self.s.appended += take * cs
                try:
                    if moved_from is None and take == 1:
                        self.s.map.update_one(int(addrs[pos]), base)
                    elif moved_from is None:
                        self.s.map.update(addrs[pos:pos + take], seg)
                    else:
                        self.s.map.relocate(moved_from[pos:pos + take], seg)
                except (sqlite3.Error, NoSpace, LocalIOError) as e:
                    self._map_failed(e)
                if self.s.map.lost:   # an eviction found SQLite's transaction rolled back
                    self._recover_map()
                pos += take
        finally:
            if pos:
                self.s.write_seq += 1   # what was recorded is flushed like any write

    def _cut_sco_tail(self) -> None:
        """After a failed SCO write: drop bytes past the last recorded cluster (best effort;
        they are never referenced, the size only matters to the upload)."""
        if self.s.sco_fd is None:
            return
        try:
            self.s.fio.truncate(self.s.sco_fd, self.s.sco_idx * self.s.cluster_size, str(self.s.sco_path))
        except OvsfsError:
            pass

    def _mark_unsynced(self, path: Path, fd: int) -> None:
        """Remember a file written since its last fsync, with an fd of its own: a sealed
        file is fsynced through a descriptor opened before its writes, never a reopened
        one (which would not see an earlier writeback error)."""
        if path not in self.s.unsynced:
            self.s.unsynced[path] = os.dup(fd)

    def _tlog_append(self, rec: bytes, data: bytes | memoryview | None = None, ship: bool = True) -> None:
        """Append whole records to the open TLog; on failure it is cut back to the last
        whole record (NoSpace / LocalIOError raised) or the volume fails (VolumeFailed).

        Then (`ship`) the same records, with `data` (the clusters of its WRITE records), go
        to the DTL as one entry at their log position; the ticket is kept in `dtl_ticket`
        for the writer to wait on outside the lock (sync mode)."""
        if self.s.tlog_fd is None:
            self._open_tlog()
        self._mark_unsynced(self.s.tlog_path, self.s.tlog_fd)  # type: ignore[arg-type]
        try:
            self.s.fio.append_all(self.s.tlog_fd, rec, str(self.s.tlog_path))  # type: ignore[arg-type]
        except OvsfsError as e:
            try:
                self.s.fio.truncate(self.s.tlog_fd, self.s.tlog_off, str(self.s.tlog_path))  # type: ignore[arg-type]
            except OvsfsError as e2:
                raise self._fail(f"TLog {self.s.tlog_path} cannot be cut back after a failed append"
                                 f" ({e.message}; {e2.message})") from e2
            raise
        pos = (self.s.tlog_no, self.s.tlog_off)
        self.s.tlog_off += len(rec)
        if ship and self.s.dtl.mode != "none":
            try:
                self.s.dtl_ticket = self.s.dtl.append(pos, tail.encode(rec, data))
            except Fenced as e:
                # Recorded locally, never acknowledged: this node no longer owns the volume.
                raise self.halt(e.message) from e
        self.s._tlog_growth += len(rec)
        if self.s._tlog_growth - self.s._tlog_reported >= _REPORT_EVERY:
            self._report_local()

    def _open_tlog(self) -> None:
        no = self.s.next_tlog
        path = self.s.tlog_dir / str(no)
        fd = self.s.fio.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        self.s.tlog_no, self.s.tlog_path, self.s.tlog_fd = no, path, fd
        self.s.next_tlog += 1
        self.s.tlog_off = 0
        self.s.dirty_dirs.add(self.s.tlog_dir)

    def _roll_sco(self) -> None:
        if self.s.sco_fd is not None:
            self._seal_sco()
            if self.s.scos_in_tlog >= self.s.cfg.tlog_scos:
                self._seal_tlog()
        no = self.s.next_sco
        path = self.s.sco_dir / str(no)
        fd = self.s.fio.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        self.s.sco_no, self.s.sco_path, self.s.sco_fd = no, path, fd
        self.s.next_sco += 1
        self.s.sco_idx = 0
        self.s.local_scos.add(no)
        self.s.dirty_dirs.add(self.s.sco_dir)

    def _seal_sco(self) -> None:
        """Close the open SCO and queue its upload (it never changes again); its unsynced
        entry keeps an fd for the next flush."""
        assert self.s.sco_fd is not None
        os.close(self.s.sco_fd)
        self.s.sco_fd = None
        self.s.scos_in_tlog += 1
        self.queue_sco_upload(self.s.sco_no, self.s.sco_idx * self.s.cluster_size)

    def queue_sco_upload(self, n: int, nbytes: int) -> None:
        path = self.s.sco_dir / str(n)

        def upload() -> None:
            if self.s.deleted or not path.exists():
                self.s.wb.forget((self.s.owner, n), pending=nbytes)
                return
            try:
                self.s.store.put_file(self.s.ns, sco_name(n), path)
            except Fenced:
                return   # halted (OwnedStore): the new owner has this data from the DTL
            self.s.wb.uploaded((self.s.owner, n), nbytes, lambda: self.evict_sco(n))
        self.s.wb.submit(f"{self.s.name} SCO {n}", upload, owner=self.s.owner)


    def _seal_tlog(self) -> None:
        """Close the open TLog, queue its upload, and commit the map at this boundary."""
        if self.s.tlog_fd is None:
            return
        os.close(self.s.tlog_fd)
        self.s.tlog_fd = None
        self.s.scos_in_tlog = 0
        self.queue_tlog_upload(self.s.tlog_no)
        self.s.tlog_no, self.s.tlog_off = self.s.next_tlog, 0   # replay resumes at the next TLog
        self.s.tlogs_since_checkpoint += 1
        try:
            if self.s.tlogs_since_checkpoint >= self.s.cfg.backend_checkpoint_tlogs:
                self.commit()
                self.s.tlogs_since_checkpoint = 0
                self.queue_checkpoint()
            elif time.monotonic() - self.s.last_commit > 1.0:
                self.commit()
        except OvsfsError as e:
            # The seal itself is done; the commit is retried at the next boundary or tick.
            log.warning("%s: map commit at TLog rollover failed: %s", self.s.name, e.message)

    def queue_tlog_upload(self, n: int) -> None:
        path = self.s.tlog_dir / str(n)

        def upload() -> None:
            if self.s.deleted or not path.exists():
                return
            try:
                self.s.store.put_file(self.s.ns, tlog_name(n), path)
            except Fenced:
                return
            with self.s.lock:
                self.s.uploaded_tlogs.add(n)
                # Replay never needs a TLog below the committed position once it is uploaded.
                if n < self.s.committed_tlog:
                    path.unlink(missing_ok=True)
            # Everything up to this TLog is on the backend: the DTL peer may drop it.
            self.s.dtl.trim((n + 1, 0))
        self.s.wb.submit(f"{self.s.name} TLog {n}", upload, owner=self.s.owner)

    def queue_checkpoint(self) -> None:
        queue_checkpoint(self.s)



    def commit(self) -> None:
        """Make the local map durable with the TLog position it reflects.

        First the SCO data, the TLogs and their directories are fsynced, so replay from
        the new position never needs a record whose data could still be torn. Raises
        VolumeFailed (fsync failed), NoSpace / LocalIOError (map.db could not commit:
        the map is rebuilt in memory from the previous commit and the TLogs after it,
        which are kept)."""
        self._ensure_map()
        self._sync_locked()
        try:
            self.s.map.commit(self.s.meta_record())
        except OvsfsError as e:
            log.warning("%s: map commit failed (%s); rebuilding the map from the last commit",
                        self.s.name, e.message)
            try:
                self._recover_map()
            except OvsfsError:
                pass   # map.lost stays set: the next operation tries again
            raise
        self.s.committed_tlog = self.s.tlog_no
        self.s.last_commit = time.monotonic()
        for p in self.s.tlog_dir.iterdir():
            # Local TLogs below the commit point are only needed until they are uploaded.
            if p.name.isdigit() and int(p.name) < self.s.committed_tlog and int(p.name) in self.s.uploaded_tlogs:
                p.unlink(missing_ok=True)
        self._report_local(scan=True)

    def _report_local(self, scan: bool = False) -> None:
        """Tell the write-buffer budget how much disk this volume's TLogs and map take."""
        if scan:
            total = 0
            for p in self.s.tlog_dir.iterdir():
                try:
                    total += p.stat().st_size
                except FileNotFoundError:
                    pass
            self.s._tlog_base, self.s._tlog_growth = total, 0
        mapped = 0
        for suffix in ("", "-wal"):
            try:
                mapped += os.stat(f"{self.s.map.db_path}{suffix}").st_size
            except FileNotFoundError:
                pass
        self.s._tlog_reported = self.s._tlog_growth
        self.s.wb.set_local(self.s.owner, self.s._tlog_base + self.s._tlog_growth + mapped)

    def evict_sco(self, n: int) -> None:
        with self.s.lock:
            if n == self.s.sco_no and self.s.sco_fd is not None:
                return
            fd = self.s.read_fds.pop(n, None)
            if fd is not None:
                os.close(fd)
            self.s.local_scos.discard(n)
            path = self.s.sco_dir / str(n)
            fd = self.s.unsynced.pop(path, None)   # the backend copy is durable (put_file fsyncs)
            if fd is not None:
                os.close(fd)
            path.unlink(missing_ok=True)

    # ---- the map after a failed SQLite write ----------------------------------------------

    @contextmanager
    def _map_op(self) -> Iterator[None]:
        """Around map changes whose TLog record is already written: if SQLite fails, the
        record is what counts, so rebuild the map (which applies it) or raise NoSpace."""
        try:
            yield
        except (sqlite3.Error, NoSpace, LocalIOError) as e:
            self._map_failed(e)
        self._ensure_map()

    def _map_failed(self, e: Exception) -> None:
        if isinstance(e, FsyncError):
            raise e
        self.s.map.lost = True
        log.warning("%s: map update failed (%s); rebuilding the map", self.s.name, e)

    def _ensure_map(self) -> None:
        if self.s.map is not None and self.s.map.lost:
            self._recover_map()

    def _recover_map(self) -> None:
        """Rebuild the in-memory map from map.db's last commit plus every local TLog after
        it: what a restart does. Needed when SQLite rolled back the open transaction
        (pages evicted into it are gone). Raises NoSpace / LocalIOError when SQLite still
        fails; the map then stays `lost` and this runs again at the next operation."""
        old = self.s.map
        keep_sco, keep_tlog = self.s.next_sco, self.s.next_tlog
        try:
            # Opened before the old connection closes: closing the last connection would
            # checkpoint and drop the WAL, which needs the disk space that is missing.
            m = ClusterMap(old.db_path, self.s.nclusters(), self.s.cfg.map_cache_pages)
        except sqlite3.Error as e:
            old.lost = True
            raise LocalIOError(f"{self.s.name}: map.db cannot be reopened: {e}") from e
        try:
            old.close()
        except sqlite3.Error:
            pass
        self.s.map = m
        try:
            meta = m.load_meta()
            if meta is None:
                raise LocalIOError(f"{self.s.name}: map.db holds no commit to rebuild from")
            m.epoch = meta["epoch"]
            self.s.snapshots = meta["snapshots"]
            self.s.size = meta["size"]
            m.resize(self.s.nclusters())
            start, off = meta["tlog"], meta["tlog_off"]
            count = 0
            names = sorted(int(p.name) for p in self.s.tlog_dir.iterdir() if p.name.isdigit())
            for n in names:
                if n < start:
                    continue
                data = (self.s.tlog_dir / str(n)).read_bytes()
                # Every record here was written whole by this process after its data.
                count += self.s.replay(tlog.parse(memoryview(data)[off if n == start else 0:]))
        except (sqlite3.Error, OSError) as e:
            m.lost = True
            raise LocalIOError(f"{self.s.name}: rebuilding the map failed: {e}") from e
        except OvsfsError:
            m.lost = True
            raise
        finally:
            self.s.next_sco, self.s.next_tlog = max(self.s.next_sco, keep_sco), max(self.s.next_tlog, keep_tlog)
        if m.lost:
            raise NoSpace(f"{self.s.name}: the map store is full; rebuilt map not yet stored")
        log.info("%s: map rebuilt in place from its last commit (%d TLog records)", self.s.name, count)

    # ---- a previous owner's tail, and losing the volume to another node ----------------------

    def apply_entry(self, rec: bytes, data: memoryview) -> None:
        """Append one DTL entry of a previous owner as this owner's own log (lock held):
        WRITE records with data become new clusters, trims and markers are appended and
        applied as they were. See tail.py for the entry layout."""
        cs = self.s.cluster_size
        at = 0
        for seg in tlog.parse(memoryview(rec)):
            if seg.kind == tlog.WRITE and seg.records is not None:
                addrs, locs = seg.records["a"].copy(), seg.records["b"].copy()
                has = locs > ZERO_LOC
                if has.all():
                    n = len(addrs)
                    if len(data) < at + n * cs:
                        raise DataError(f"{self.s.name}: DTL entry is missing cluster data")
                    self._append(addrs, bytes(data[at:at + n * cs]))
                    at += n * cs
                elif not has.any():
                    self._tlog_append(tlog.writes(addrs, locs, np.zeros(len(addrs), dtype=np.uint32)))
                    with self._map_op():
                        self.s.map.update(addrs, locs)
                    self.s.write_seq += 1
                else:
                    raise DataError(f"{self.s.name}: DTL entry mixes written and trimmed clusters")
            elif seg.kind == tlog.MARK and seg.payload is not None:
                self._tlog_append(tlog.mark(seg.op, seg.payload))
                self.s.write_seq += 1
                with self._map_op():
                    self.s.apply_mark(seg.op, seg.payload)

    def halt(self, reason: str) -> Fenced:
        """Another node owns the volume now (a Fenced refusal): stop serving it at once,
        reads included, and drop its uploads. Returns the error to raise."""
        with self.s.lock:
            if self.s.fenced is None:
                self.s.fenced = reason
                log.error("%s: fenced, this node stops serving the volume: %s", self.s.name, reason)
        return Fenced(f"volume {self.s.name} is served by another node now: {reason}")

    # ---- durability ------------------------------------------------------------------------

    def _fail(self, reason: str) -> VolumeFailed:
        """Put the volume in the failed state (kept until it is reopened); returns the
        error to raise."""
        if self.s.failed is None:
            self.s.failed = reason
            log.error("%s: volume failed, no more writes or flushes until it is reopened: %s",
                      self.s.name, reason)
        return VolumeFailed(f"volume {self.s.name} failed: {self.s.failed}")

    def _check_failed(self) -> None:
        if self.s.failed is not None:
            raise VolumeFailed(f"volume {self.s.name} failed: {self.s.failed}")

    def _fsync_all(self, files: list[tuple[Path, int]], dirs: list[Path]) -> None:
        """fsync SCOs, then TLogs, then directories; a failure fails the volume."""
        files = sorted(files, key=lambda item: item[0].parent != self.s.sco_dir)
        try:
            for path, fd in files:
                self.s.fio.fsync(fd, str(path))
            for d in dirs:
                self.s.fio.fsync_dir(d)
        except FsyncError as e:
            with self.s.lock:
                raise self._fail(e.message) from e

    def _sync_locked(self) -> None:
        """Everything written so far durable, with the lock held (a map commit needs it)."""
        self._check_failed()
        files = list(self.s.syncing.items()) + list(self.s.unsynced.items())
        self._fsync_all(files, sorted(self.s.dirty_dirs | self.s.syncing_dirs))
        for fd in self.s.unsynced.values():
            os.close(fd)
        self.s.unsynced.clear()
        self.s.dirty_dirs.clear()

    def flush(self) -> None:
        """Return once every write acknowledged before the call is on local disk.

        Group commit: callers arriving while a flush runs wait for the next one, which
        covers all of them with a single round of fsyncs (outside the volume lock).
        Raises VolumeFailed after a failed fsync, now or earlier.
        """
        self.s.check_served()   # a volume another node serves now has nothing to flush here
        with self.s.lock:
            self._check_failed()
            target = self.s.write_seq
        with self.s.flush_cv:
            while self.s.synced_seq < target:
                if not self.s.flushing:
                    self.s.flushing = True
                    break
                self.s.flush_cv.wait()
            else:
                self._check_failed()
                return
        seq, ok = target, False
        files: dict[Path, int] = {}
        try:
            with self.s.lock:
                self._check_failed()
                seq = self.s.write_seq
                files, self.s.unsynced = self.s.unsynced, {}
                self.s.syncing = files
                self.s.syncing_dirs, self.s.dirty_dirs = self.s.dirty_dirs, set()
            self._fsync_all(list(files.items()), sorted(self.s.syncing_dirs))
            try:
                self.s.dtl.flush()
            except Fenced as e:
                raise self.halt(e.message) from e
            ok = True
        finally:
            with self.s.lock:
                for path, fd in files.items():
                    if ok or self.s.failed is not None or path in self.s.unsynced:
                        os.close(fd)
                    else:
                        self.s.unsynced[path] = fd   # not synced (DTL failed): next time
                if not ok:
                    self.s.dirty_dirs |= self.s.syncing_dirs
                self.s.syncing = {}
                self.s.syncing_dirs = set()
            with self.s.flush_cv:
                self.s.flushing = False
                if ok:
                    self.s.synced_seq = max(self.s.synced_seq, seq)
                self.s.flush_cv.notify_all()
        self._check_failed()

    def seal(self) -> None:
        """Close the open SCO and TLog early so that everything so far can be uploaded.
        Does nothing on a failed volume (what it holds may not be on disk)."""
        with self.s.lock:
            if self.s.failed is not None:
                return
            if self.s.sco_fd is not None:
                self._seal_sco()
            if self.s.tlog_fd is not None:
                self._seal_tlog()

    def sync(self, timeout: float | None = None) -> None:
        """Return once everything written so far is on the backend."""
        self._check_failed()
        self.seal()
        if not self.s.wb.drain(timeout, owner=self.s.owner):
            raise BackendError(f"{self.s.name}: backend did not take the uploads in time ({self.s.wb.last_error})")

    def maybe_commit(self, interval: float) -> None:
        with self.s.lock:
            if not self.s.closed and self.s.failed is None and time.monotonic() - self.s.last_commit >= interval:
                self.commit()
