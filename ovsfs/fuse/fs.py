"""The vPool filesystem: pyfuse3 operations over the shared engine.

Files are opened through the engine's catalog as volume handles (ovsfs.engine.api), all
held by this mount's one Holder ("fuse client MOUNTPOINT"), so the engine's lifecycle
rules cover open files (delete, rename, rollback, snapshot delete: EBUSY). Reads, writes,
fsync, trim and extents go through the doors' async adapter (ovsfs.doors.adapter: the
nowait-or-thread rule, write room waited for in trio, bounds in flight); name and
attribute calls run in this door's own worker threads. pyfuse3 runs many requests at
once as trio tasks. Files are opened with
direct_io and no kernel caching (attribute and entry timeouts of 0), so a write through
another door (NBD, vhost-user, iSCSI) is visible here at once and vice versa.

Decisions (see tree.py for the layout):
The vPool directory behaves as a directory of sparse raw images (issue 10, item 5), so
`cp` (also --sparse=always), `dd` (with and without conv=notrunc), `rsync --inplace`,
`qemu-img convert`, `truncate` and `fallocate` work into it:
- A new file is a placeholder whose name is reserved in the engine (tree.py) until its
  first growth creates the volume: a truncate, a fallocate, or a write.
- A write past the end grows the volume to the write's end, like a sparse file (the gap
  reads as zeros, nothing is allocated for it). Sizes follow the one size rule
  (names.check_size: multiples of 512 bytes, kept to the byte): a truncate to, or a
  write ending at, another size past the end gets EINVAL and one log line. (Rounding
  the file up would leave an image silently longer than its source.)
- A truncate to a smaller size (O_TRUNC is a truncate to 0) drops the data past the new
  end, like truncate(2) on a file; the volume's snapshots keep theirs. EBUSY (one log
  line) while a door other than FUSE has the volume open.
- A placeholder removed while open never becomes a volume: writes and truncates through
  its descriptors get ENOENT and one log line.

- Only volumes live in a vPool. A name that does not end in `.raw` is refused with
  EPERM (create, mknod, rename to it), mkdir inside a vPool too; a bad volume name gets
  EINVAL, a name over 200 characters (before `.raw`) ENAMETOOLONG.
- rm deletes the volume (EBUSY while it is open here or exported through another door);
  mv renames within a vPool (EXDEV across vPools, EEXIST rather than replacing a volume,
  EBUSY while in use). mkdir at the top creates a vPool.
- `.snapshots/NAME/SNAP.raw` are read-only (EROFS for writes, truncate, rm, mv).
- fsync and fdatasync are vol.flush(); close does not flush. fallocate PUNCH_HOLE and
  ZERO_RANGE are trim / write_zeroes; SEEK_DATA / SEEK_HOLE come from the cluster map
  (both through lowlevel.py, as pyfuse3 lacks them). st_blocks reports the full size:
  allocation is not counted per getattr.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import pyfuse3
import trio

from ovsfs.doors.adapter import READ, DoorIO, Op
from ovsfs.engine.api import Holder, VolumeCatalog
from ovsfs.engine.names import check_size
from ovsfs.errors import Busy, InvalidArgument, OvsfsError
from ovsfs.fuse.batch import WriteBatcher
from ovsfs.fuse.ranges import RangeOps
from ovsfs.fuse.tree import SUFFIX, Tree, fail, volume_name

log = logging.getLogger("ovsfs.fuse")

TIMEOUT = 0.0             # entry and attribute timeouts: other doors change things too
BLKSIZE = 1 << 20         # st_blksize: tools size their buffers from it
RELEASE_WAIT = 0.5        # seconds rm / mv wait for releases still in flight
THREADS = {"meta": 8, "data": 16, "flush": 4}   # worker threads per class of FUSE request
# Operations that change the directory, and the errnos that mean "refused": each such
# refusal is logged once, with why where the engine said (a lookup's ENOENT is not; size
# changes log their own line in _truncate).
_CHANGES = frozenset({"create", "mknod", "mkdir", "unlink", "rmdir", "rename"})
_REFUSALS = frozenset({errno.EBUSY, errno.EEXIST, errno.EPERM, errno.EROFS, errno.EXDEV, errno.EINVAL,
                       errno.ENOSPC, errno.ENOENT, errno.EISDIR, errno.ENOTDIR})


@dataclass
class Handle:
    ino: int
    vol: Any = None             # the VolumeHandle; None while the file is a placeholder
    snapshot: str | None = None
    writable: bool = True
    batcher: WriteBatcher | None = None


class VpoolFS(RangeOps, pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, engine: Any, holder: Holder | None = None) -> None:
        super().__init__()
        # Only the contract from here on (tests/test_contract_only.py): the engine object
        # is what the daemon hands every door at start-up.
        self.catalog: VolumeCatalog = engine.catalog
        # One holder for the whole mount: a truncate through one descriptor is not kept
        # from shrinking by another descriptor of the same file (as with any file).
        self.holder = holder or Holder("fuse", "mount")
        self.tree = Tree(self.catalog, self.holder)
        self._io: DoorIO | None = None
        self.handles: dict[int, Handle] = {}
        self.hlock = threading.Lock()
        self.next_fh = 1
        self.dirs: dict[int, list[tuple[str, pyfuse3.EntryAttributes]]] = {}
        self.mtimes: dict[int, int] = {}
        self.started = time.time_ns()
        self.limiters: dict[str, trio.CapacityLimiter] = {}
        self.grow_lock = threading.Lock()   # one size change at a time (writes past the end race)

    # ---- plumbing -----------------------------------------------------------------------

    @property
    def io(self) -> DoorIO:
        """The door's adapter (created in the trio run that uses it)."""
        if self._io is None:
            self._io = DoorIO("fuse", threads=THREADS["data"], flush_threads=THREADS["flush"])
        return self._io

    async def _run(self, what: str, handle: Any, ops: list[Op]) -> list[Op]:
        """Run ops through the adapter; the first error becomes FUSEError(errno)."""
        await self.io.run(handle, ops)
        for op in ops:
            if op.error is not None:
                e = op.error
                (log.error if e.errno == errno.EIO else log.debug)("%s: %s", what, e)
                raise fail(e.errno or errno.EIO)
        return ops

    def _open_handle(self, name: str, read_only: bool = False) -> Any:
        return self.catalog.open(name, self.holder, read_only=read_only)

    def _limiter(self, kind: str) -> trio.CapacityLimiter:
        """The door's own thread limiters (created in the trio run that uses them): data
        calls (read, write, fallocate) cannot take the threads that lookups, `ls` and
        fsync need, and none of them the threads of other doors or the management API."""
        lim = self.limiters.get(kind)
        if lim is None:
            lim = self.limiters[kind] = trio.CapacityLimiter(THREADS[kind])
        return lim

    async def _call(self, what: str, fn: Callable, *args: Any, kind: str = "meta") -> Any:
        """Run fn in a worker thread of the `kind` limiter (meta, data or flush);
        engine errors become FUSEError(errno). Data calls are abandoned on cancel (the
        door stopping): one stuck waiting for a backend that is away must not keep the
        door, and so the daemon, from stopping; nothing of it was acknowledged."""
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter(kind),
                                                 abandon_on_cancel=kind == "data")
        except pyfuse3.FUSEError as e:
            if what.split(" ", 1)[0] in _CHANGES and e.errno in _REFUSALS:
                log.warning("%s refused (%s)", what, errno.errorcode.get(e.errno, e.errno))
            raise
        except OvsfsError as e:
            if e.errno == errno.EIO:
                log.error("%s: %s", what, e)
            elif what.split(" ", 1)[0] in _CHANGES:
                # Whatever the vPool directory refuses gets one line saying why (issue 10).
                log.warning("%s refused (%s): %s", what, errno.errorcode.get(e.errno, e.errno), e.message)
            else:
                log.debug("%s: %s", what, e)
            raise fail(e.errno) from None
        except OSError as e:
            log.error("%s: %s", what, e)
            raise fail(e.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed", what)
            raise fail(errno.EIO) from None

    def _attr(self, key: tuple, ino: int) -> pyfuse3.EntryAttributes:
        """Attributes of a key (synchronous; in a worker thread)."""
        if key[0] != "gone":        # a removed placeholder still open: an empty file
            self.tree.check(key)
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = a.attr_timeout = TIMEOUT
        a.st_uid, a.st_gid = os.getuid(), os.getgid()
        a.st_blksize = BLKSIZE
        t = self.started
        kind = key[0]
        if kind in ("root", "pool", "snaps", "snapdir"):
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        else:
            a.st_nlink = 1
            if kind == "vol":
                vol = self.tree.by_ns(key[1])
                a.st_mode = stat.S_IFREG | 0o644
                a.st_size = vol["size"]
                t = int(vol["created"] * 1e9)
            elif kind == "snap":
                snap = self.tree.snapshot(self.tree.by_ns(key[1]), key[2])
                a.st_mode = stat.S_IFREG | 0o444
                a.st_size = snap["size"]
                t = int(snap["created"] * 1e9)
            else:
                a.st_mode = stat.S_IFREG | 0o644
            a.st_blocks = (a.st_size + 511) // 512
        a.st_ctime_ns = t
        a.st_atime_ns = a.st_mtime_ns = self.mtimes.get(ino, t)
        return a

    def _entry(self, key: tuple) -> pyfuse3.EntryAttributes:
        return self._attr(key, self.tree.inodes.ino(key))

    def _pool_of(self, ino: int) -> str:
        key = self.tree.inodes.key(ino)
        if key[0] == "pool":
            return key[1]
        if key[0] in ("snaps", "snapdir", "snap"):
            raise fail(errno.EROFS)
        raise fail(errno.EPERM if key[0] == "root" else errno.ENOTDIR)

    def _new_fh(self, h: Handle) -> int:
        with self.hlock:
            fh, self.next_fh = self.next_fh, self.next_fh + 1
            self.handles[fh] = h
            return fh

    def _handle(self, fh: int) -> Handle:
        try:
            return self.handles[fh]
        except KeyError:
            raise fail(errno.EBADF) from None

    def shutdown(self) -> None:
        """At unmount: the holds of files still open and the names of placeholders end
        with the mount (a lazy unmount sends no more releases)."""
        with self.hlock:
            hs = list(self.handles.values())
            self.handles.clear()
        for h in hs:
            if h.vol is not None:
                try:
                    h.vol.close()
                except Exception:  # noqa: BLE001 - the engine may be closing too; nothing to keep
                    log.debug("closing a handle at unmount failed", exc_info=True)
        self.tree.release_all()

    # ---- names --------------------------------------------------------------------------

    async def lookup(self, parent_inode, name, ctx=None):
        name = os.fsdecode(name)
        return await self._call(f"lookup {name}",
                                lambda: self._entry(self.tree.child(self.tree.inodes.key(parent_inode), name)))

    async def getattr(self, inode, ctx=None):
        return await self._call("getattr", lambda: self._attr(self.tree.inodes.key(inode), inode))

    async def opendir(self, inode, ctx):
        def build() -> list[tuple[str, pyfuse3.EntryAttributes]]:
            out = []
            for name, key in self.tree.listing(self.tree.inodes.key(inode)):
                try:
                    out.append((name, self._entry(key)))
                except pyfuse3.FUSEError:
                    continue  # gone meanwhile
            return out
        entries = await self._call("opendir", build)
        fh = self._new_fh(Handle(inode))
        self.dirs[fh] = entries
        return fh

    async def readdir(self, fh, start_id, token):
        entries = self.dirs.get(fh, [])
        for i in range(start_id, len(entries)):
            name, attr = entries[i]
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, i + 1):
                break

    async def releasedir(self, fh):
        self.dirs.pop(fh, None)
        with self.hlock:
            self.handles.pop(fh, None)

    async def statfs(self, ctx):
        usage = await self._call("statfs", self.catalog.usage)
        s = pyfuse3.StatvfsData()
        bs = usage["block_size"]
        s.f_bsize = s.f_frsize = bs
        s.f_blocks = usage["capacity"] // bs
        s.f_bfree = s.f_bavail = usage["free"] // bs
        s.f_files = usage["files"] + 1
        s.f_ffree = s.f_favail = 1 << 20
        s.f_namemax = 200 + len(SUFFIX)
        return s

    async def mkdir(self, parent_inode, name, mode, ctx):
        if parent_inode != pyfuse3.ROOT_INODE:
            self._pool_of(parent_inode)
            raise fail(errno.EPERM)
        name = os.fsdecode(name)
        await self._call(f"mkdir {name}", self.catalog.create_vpool, name)
        return await self.lookup(parent_inode, os.fsencode(name))

    async def rmdir(self, parent_inode, name, ctx):
        raise fail(errno.EPERM)

    def _make_pending(self, parent_inode: int, name: bytes) -> tuple:
        pool = self._pool_of(parent_inode)
        base = volume_name(os.fsdecode(name))
        self.tree.reserve(pool, base)
        log.info("new file %s/%s%s: a reserved name until it grows (truncate, fallocate or a write)",
                 pool, base, SUFFIX)
        return ("pending", pool, base)

    async def create(self, parent_inode, name, mode, flags, ctx):
        def run() -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
            key = self._make_pending(parent_inode, name)
            attr = self._entry(key)
            fh = self._new_fh(Handle(attr.st_ino))
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False), attr
        return await self._call("create", run)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        if not stat.S_ISREG(mode):
            raise fail(errno.EPERM)
        return await self._call("mknod", lambda: self._entry(self._make_pending(parent_inode, name)))

    async def unlink(self, parent_inode, name, ctx):
        def run() -> None:
            pool = self._pool_of(parent_inode)
            fname = os.fsdecode(name)
            key = self.tree.child(("pool", pool), fname)
            if key[0] == "snaps":
                raise fail(errno.EISDIR)
            if key[0] == "pending":
                self.tree.release(key[1], key[2])
                self.tree.inodes.orphan(key)
                return
            self._settled(fname[:-len(SUFFIX)])
            self.catalog.delete_volume(fname[:-len(SUFFIX)])
        await self._call(f"unlink {os.fsdecode(name)}", run)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        def run() -> None:
            pool = self._pool_of(parent_inode_old)
            new_pool = self._pool_of(parent_inode_new)
            if new_pool != pool:
                raise fail(errno.EXDEV)
            if flags & pyfuse3.RENAME_EXCHANGE:
                raise fail(errno.EINVAL)
            old, new = os.fsdecode(name_old), os.fsdecode(name_new)
            key = self.tree.child(("pool", pool), old)
            if key[0] == "snaps":
                raise fail(errno.EPERM)
            base_new = volume_name(new)
            if old == new:
                return
            if self.tree.name_taken(pool, base_new):
                raise fail(errno.EEXIST)  # never replace a volume
            if key[0] == "pending":
                self.tree.move(pool, key[2], base_new)
                self.tree.inodes.rebind(key, ("pending", pool, base_new))
                return
            self._settled(old[:-len(SUFFIX)])
            self.catalog.rename_volume(old[:-len(SUFFIX)], base_new)
        await self._call(f"rename {os.fsdecode(name_old)}", run)

    def _settled(self, name: str) -> None:
        """Wait (up to RELEASE_WAIT) for releases of handles that are already closed.

        The kernel sends RELEASE asynchronously after close(2), so `dd ...; rm` could
        otherwise see EBUSY for a file nobody has open any more."""
        deadline = time.monotonic() + RELEASE_WAIT
        while time.monotonic() < deadline:
            try:
                holders = self.catalog.holders(name)
            except OvsfsError:
                return
            if not holders or set(holders) != {self.holder}:
                return
            time.sleep(0.005)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        raise fail(errno.EPERM)

    async def symlink(self, parent_inode, name, target, ctx):
        raise fail(errno.EPERM)

    # ---- attributes ---------------------------------------------------------------------

    async def setattr(self, inode, attr, fields, fh, ctx):
        def run() -> pyfuse3.EntryAttributes:
            key = self.tree.inodes.key(inode)
            if fields.update_size:
                self._truncate(inode, key, attr.st_size)
            elif key[0] == "snap" and (fields.update_mode or fields.update_uid or fields.update_gid):
                raise fail(errno.EROFS)
            if fields.update_mtime and key[0] != "snap":
                # Kept for the life of the mount (not stored): rsync's quick check and `make`
                # compare mtimes, so one set by utimensat must read back.
                self.mtimes[inode] = attr.st_mtime_ns
            return self._attr(self.tree.inodes.key(inode), inode)
        return await self._call("setattr", run)

    def _truncate(self, inode: int, key: tuple, size: int, why: str = "truncate") -> None:
        """Set a file's size (synchronous): create the volume of a placeholder, grow, or
        shrink dropping the data past the new end. Errors as FUSEError / OvsfsError."""
        kind = key[0]
        if kind == "snap":
            raise fail(errno.EROFS)
        if kind == "gone":
            log.warning("%s of a file removed before it became a volume: refused (ENOENT), nothing is stored", why)
            raise fail(errno.ENOENT)
        if kind not in ("pending", "vol"):
            raise fail(errno.EISDIR)
        try:
            check_size(size)
        except InvalidArgument as e:
            log.warning("%s of %s to %d bytes refused (EINVAL): %s", why, self._label(key), size, e.message)
            raise fail(errno.EINVAL) from None
        with self.grow_lock:
            key = self.tree.inodes.key(inode)   # a racing growth may have made the volume
            if key[0] == "pending":
                self._create(inode, key, size)
                return
            if key[0] == "gone":
                return self._truncate(inode, key, size, why)
            vol = self.tree.by_ns(key[1])
            if size == vol["size"]:
                return
            # Like truncate(2): shrinking drops what is past the new end (snapshots keep
            # theirs); Busy while another door holds the volume.
            h = self._open_handle(vol["name"])
            try:
                h.resize(size)
            except Busy as e:
                log.warning("%s of %s to %d bytes refused (EBUSY): %s", why, vol["name"], size, e.message)
                raise
            finally:
                h.close()
            self.mtimes[inode] = time.time_ns()

    def _create(self, inode: int, key: tuple, size: int) -> None:
        """A placeholder grows: its reservation becomes a volume of `size` bytes (size 0
        stays a placeholder). Open descriptors of it now write to the volume."""
        if size == 0:
            return
        _, pool, base = key
        info = self.catalog.create_volume(base, size, pool, holder=self.holder)  # the reservation becomes it
        self.tree.forget(pool, base)
        self.tree.inodes.rebind(key, ("vol", info["namespace"]))
        with self.hlock:
            waiting = [h for h in self.handles.values() if h.ino == inode and h.vol is None]
        for h in waiting:
            h.vol = self._open_handle(base)
        log.info("new file %s/%s%s is now a volume of %d bytes", pool, base, SUFFIX, size)

    def _label(self, key: tuple) -> str:
        if key[0] == "pending":
            return f"{key[1]}/{key[2]}{SUFFIX}"
        if key[0] == "vol":
            try:
                return self.tree.by_ns(key[1])["name"] + SUFFIX
            except pyfuse3.FUSEError:
                pass
        return str(key)

    def _grow(self, h: Handle, end: int) -> None:
        """Before a write ending at `end` past the end of the file: grow it to `end`."""
        key = self.tree.inodes.key(h.ino)
        if key[0] == "vol" and self.tree.by_ns(key[1])["size"] >= end:
            return   # grown meanwhile by another write
        if key[0] == "gone":
            log.warning("write to a file removed before it became a volume: refused (ENOENT), nothing is stored")
            raise fail(errno.ENOENT)
        self._truncate(h.ino, key, end, why="write past the end")

    # ---- files --------------------------------------------------------------------------

    async def open(self, inode, flags, ctx):
        def run() -> pyfuse3.FileInfo:
            key = self.tree.inodes.key(inode)
            writable = (flags & os.O_ACCMODE) != os.O_RDONLY
            h = Handle(inode, writable=writable)
            if writable and flags & os.O_TRUNC:
                # libfuse asks for atomic O_TRUNC: the volume is emptied (truncate to 0).
                self._truncate(inode, key, 0, why="O_TRUNC")
            if key[0] == "vol":
                h.vol = self._open_handle(self.tree.by_ns(key[1])["name"])
            elif key[0] == "snap":
                if writable:
                    raise fail(errno.EROFS)
                vol = self.tree.by_ns(key[1])
                h.vol, h.snapshot = self._open_handle(f"{vol['name']}@{key[2]}", read_only=True), key[2]
            elif key[0] in ("pending", "gone"):
                self.tree.check(key)
            else:
                raise fail(errno.EISDIR)
            return pyfuse3.FileInfo(fh=self._new_fh(h), direct_io=True, keep_cache=False)
        return await self._call("open", run)

    async def read(self, fh, off, size):
        h = self._handle(fh)
        vol = h.vol
        if vol is None:
            return b""
        n = min(size, vol.size - off)     # a snapshot handle's size is the snapshot's
        if n <= 0:
            return b""
        ops = await self._run(f"read {vol.name} {off}+{n}", vol, [Op(READ, off, n)])
        return ops[0].result

    async def write(self, fh, off, buf):
        h = self._handle(fh)
        if h.snapshot is not None:
            raise fail(errno.EROFS)
        n = len(buf)
        if h.vol is None or off + n > h.vol.size:
            await self._call(f"write {off}+{n}", self._grow, h, off + n)
        if h.vol is None:
            raise fail(errno.ENOENT)
        if h.batcher is None:
            h.batcher = WriteBatcher(h.vol, self.io)
        await h.batcher.write(off, buf)
        self.mtimes[h.ino] = time.time_ns()
        return n

    async def fsync(self, fh, datasync):
        h = self._handle(fh)
        if h.vol is not None and h.snapshot is None:
            err = await self.io.run_flush(h.vol)
            if err is not None:
                log.error("fsync %s: %s", h.vol.name, err)
                raise fail(err.errno or errno.EIO)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        with self.hlock:
            h = self.handles.pop(fh, None)
        if h is not None and h.vol is not None:
            await self._call("release", h.vol.close)
