"""The log side of a volume: appending to SCOs and TLogs, sealing and uploading them,
committing the map, flushing (durability) and syncing to the backend.

A mixin of Volume (ovsfs/engine/volume.py), whose attributes it uses; every method
here runs with the volume lock held unless it says otherwise.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import crc32c
import numpy as np

from ovsfs.engine import tlog
from ovsfs.engine.map import SCO_SHIFT
from ovsfs.engine.names import sco_name, tlog_name
from ovsfs.errors import BackendError

if TYPE_CHECKING:
    from ovsfs.engine.volume import Volume as _Base
else:
    _Base = object


class LogWriter(_Base):
    def _append(self, addrs: np.ndarray, buf: bytes, moved_from: np.ndarray | None = None) -> None:
        """Append whole clusters: one pwrite per SCO touched, one TLog write, one map update.

        With `moved_from` (the scrubber) the clusters are old locations moved to new
        ones: RELOC records, and every map version pointing at them is switched.
        """
        cs = self.cluster_size
        n = len(addrs)
        locs = np.empty(n, dtype=np.uint64)
        view = memoryview(buf)
        pos = 0
        while pos < n:
            if self.sco_fd is None or self.sco_idx >= self.sco_clusters:
                self._roll_sco()
            take = min(n - pos, self.sco_clusters - self.sco_idx)
            chunk = view[pos * cs:(pos + take) * cs]
            os.pwrite(self.sco_fd, chunk, self.sco_idx * cs)  # type: ignore[arg-type]
            base = (self.sco_no << SCO_SHIFT) | self.sco_idx
            seg = np.arange(base, base + take, dtype=np.uint64)
            locs[pos:pos + take] = seg
            crcs = [crc32c.crc32c(chunk[i * cs:(i + 1) * cs]) for i in range(take)]
            # The map follows each SCO's records at once: the next roll may seal the TLog
            # and commit the map, and a commit must cover every record before it.
            if moved_from is None and take == 1:
                addr = int(addrs[pos])
                self._tlog_append(tlog.write_one(addr, base, int(crcs[0])))
                self.map.update_one(addr, base)
            elif moved_from is None:
                self._tlog_append(tlog.writes(addrs[pos:pos + take], seg, crcs))
                self.map.update(addrs[pos:pos + take], seg)
            else:
                self._tlog_append(tlog.relocs(moved_from[pos:pos + take], seg, crcs))
                self.map.relocate(moved_from[pos:pos + take], seg)
            self.sco_idx += take
            self.appended += take * cs
            pos += take
        if moved_from is None:
            self.dtl.append(self.name, addrs, locs, buf)
        self.write_seq += 1

    def _tlog_append(self, rec: bytes) -> None:
        if self.tlog_fd is None:
            self._open_tlog()
        os.write(self.tlog_fd, rec)  # type: ignore[arg-type]
        self.tlog_off += len(rec)

    def _open_tlog(self) -> None:
        self.tlog_no = self.next_tlog
        self.next_tlog += 1
        path = self.tlog_dir / str(self.tlog_no)
        self.tlog_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.tlog_off = 0
        self.unsynced.add(path)
        self.dir_dirty = True

    def _roll_sco(self) -> None:
        if self.sco_fd is not None:
            self._seal_sco()
            if self.scos_in_tlog >= self.cfg.tlog_scos:
                self._seal_tlog()
        self.sco_no = self.next_sco
        self.next_sco += 1
        self.sco_idx = 0
        path = self.sco_dir / str(self.sco_no)
        self.sco_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.local_scos.add(self.sco_no)
        self.unsynced.add(path)
        self.dir_dirty = True

    def _seal_sco(self) -> None:
        """Close the open SCO and queue its upload (it never changes again)."""
        assert self.sco_fd is not None
        os.close(self.sco_fd)
        self.sco_fd = None
        self.scos_in_tlog += 1
        self.queue_sco_upload(self.sco_no, self.sco_idx * self.cluster_size)

    def queue_sco_upload(self, n: int, nbytes: int) -> None:
        path = self.sco_dir / str(n)

        def upload() -> None:
            if self.deleted or not path.exists():
                self.wb.forget((self, n), pending=nbytes)
                return
            self.store.put_file(self.ns, sco_name(n), path)
            self.wb.uploaded((self, n), nbytes, lambda: self.evict_sco(n))
        self.wb.submit(f"{self.name} SCO {n}", upload, owner=self)

    def _seal_tlog(self) -> None:
        """Close the open TLog, queue its upload, and commit the map at this boundary."""
        if self.tlog_fd is None:
            return
        os.close(self.tlog_fd)
        self.tlog_fd = None
        self.scos_in_tlog = 0
        self.queue_tlog_upload(self.tlog_no)
        self.tlog_no, self.tlog_off = self.next_tlog, 0   # replay resumes at the next TLog
        self.tlogs_since_checkpoint += 1
        if self.tlogs_since_checkpoint >= self.cfg.backend_checkpoint_tlogs:
            self.tlogs_since_checkpoint = 0
            self.commit()
            self.queue_checkpoint()
        elif time.monotonic() - self.last_commit > 1.0:
            self.commit()

    def queue_tlog_upload(self, n: int) -> None:
        path = self.tlog_dir / str(n)

        def upload() -> None:
            if self.deleted or not path.exists():
                return
            self.store.put_file(self.ns, tlog_name(n), path)
            with self.lock:
                self.uploaded_tlogs.add(n)
                # Replay never needs a TLog below the committed position once it is uploaded.
                if n < self.committed_tlog:
                    path.unlink(missing_ok=True)
        self.wb.submit(f"{self.name} TLog {n}", upload, owner=self)

    def queue_checkpoint(self) -> None:
        from ovsfs.engine.recovery import queue_checkpoint
        queue_checkpoint(self)

    def commit(self) -> None:
        """Make the local map durable with the TLog position it reflects."""
        self.map.commit(self.meta_record())
        self.committed_tlog = self.tlog_no
        self.last_commit = time.monotonic()
        for p in self.tlog_dir.iterdir():
            # Local TLogs below the commit point are only needed until they are uploaded.
            if p.name.isdigit() and int(p.name) < self.committed_tlog and int(p.name) in self.uploaded_tlogs:
                p.unlink(missing_ok=True)

    def evict_sco(self, n: int) -> None:
        with self.lock:
            if n == self.sco_no and self.sco_fd is not None:
                return
            fd = self.read_fds.pop(n, None)
            if fd is not None:
                os.close(fd)
            self.local_scos.discard(n)
            path = self.sco_dir / str(n)
            self.unsynced.discard(path)   # the backend copy is durable (put_file fsyncs)
            path.unlink(missing_ok=True)

    # ---- durability ------------------------------------------------------------------------

    def flush(self) -> None:
        """Return once every write acknowledged before the call is on local disk.

        Group commit: callers arriving while a flush runs wait for the next one, which
        covers all of them with a single round of fsyncs.
        """
        with self.lock:
            target = self.write_seq
        with self.flush_cv:
            while self.synced_seq < target:
                if not self.flushing:
                    self.flushing = True
                    break
                self.flush_cv.wait()
            else:
                return
        seq, ok = target, False
        try:
            with self.lock:
                seq = self.write_seq
                paths = list(self.unsynced)
                self.unsynced.clear()
                if self.sco_fd is not None:
                    self.unsynced.add(self.sco_dir / str(self.sco_no))
                if self.tlog_fd is not None:
                    self.unsynced.add(self.tlog_dir / str(self.tlog_no))
                dirs = [self.sco_dir, self.tlog_dir] if self.dir_dirty else []
                self.dir_dirty = False
            for p in paths + dirs:
                try:
                    fd = os.open(p, os.O_RDONLY)
                except FileNotFoundError:
                    continue  # uploaded and evicted: the backend holds it
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self.dtl.flush()
            ok = True
        finally:
            with self.flush_cv:
                self.flushing = False
                if ok:
                    self.synced_seq = max(self.synced_seq, seq)
                else:
                    with self.lock:
                        self.unsynced.update(paths)
                        self.dir_dirty = True
                self.flush_cv.notify_all()

    def seal(self) -> None:
        """Close the open SCO and TLog early so that everything so far can be uploaded."""
        with self.lock:
            if self.sco_fd is not None:
                self._seal_sco()
            if self.tlog_fd is not None:
                self._seal_tlog()

    def sync(self, timeout: float | None = None) -> None:
        """Return once everything written so far is on the backend."""
        self.seal()
        if not self.wb.drain(timeout, owner=self):
            raise BackendError(f"{self.name}: backend did not take the uploads in time ({self.wb.last_error})")

    def maybe_commit(self, interval: float) -> None:
        with self.lock:
            if not self.closed and time.monotonic() - self.last_commit >= interval:
                self.commit()

