"""A FUSE passthrough that loses, on command, everything that was not made durable.

    python -m tests.harness.lazyfs SRC MNT --control SOCK

Model (strict, like ext4's worst case after a power cut; see also durable.py):
- The volatile view (what processes see through MNT) is a directory in a tmpfs (RAM): it plays
  the page cache. Every operation passes through to it at once, so reads, shared mmap (SQLite's
  -shm), O_APPEND, rename, hard links, unlink of open files... all behave as on a real file system.
- A file's data and size become durable only at fsync/fdatasync *of that file* (the bytes written
  since its last sync are copied to its durable inode in SRC). Truncations too.
- A directory's entries (create, unlink, rename in or out, link, mkdir, rmdir) become durable
  only at fsync *of that directory*: the durable directory then holds exactly the names it has
  now. A file that is named by a durable directory but was never fsynced is durable empty.
  A rename is durable on each side only when that side's directory is fsynced.
- Nothing else is ever durable: no close-to-open, no auto_da_alloc, no journal ordering.
- `cut`: from then on every operation fails with EIO; the volatile view is dropped. The test then
  SIGKILLs this process, unmounts MNT and starts it again on SRC: the new volatile view is built
  from what was durable. `sync`: make everything durable now. `stats`: bytes and directories
  waiting for a sync. `stall PREFIX` / `unstall`: looking up or creating a name in a directory
  under PREFIX (relative to the mount) waits until `unstall`: a backend that is away, so a test
  can cut while uploads hang.
Not modelled: torn sectors within a synced write (a sync copies whole ranges), reordering of
durable operations among themselves (they happen in the order they completed), xattrs, symlinks.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from tests.harness.durable import DurableStore

MERGE_AT = 512  # merge a file's dirty ranges when it has this many


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


class Dirty:
    """What a file inode has that its durable inode lacks."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []
        self.shrink_to: int | None = None
        self.resized = False


class LazyFS(pyfuse3.Operations):
    supports_dot_lookup = False

    def __init__(self, src: Path, work: Path) -> None:
        super().__init__()
        self.store = DurableStore(src)
        self.work = work
        self.keys: dict[int, str] = self.store.materialize(work)   # st_ino -> durable key
        self.root_ino = os.stat(work).st_ino
        self.pfd: dict[int, int] = {pyfuse3.ROOT_INODE: os.open(work, os.O_PATH)}  # O_PATH fd per inode
        self.nlookup: dict[int, int] = {}
        self.dirty: dict[int, Dirty] = {}   # by st_ino
        self.dirty_dirs: set[int] = set()   # st_ino of directories with entries not yet durable
        self.dir_fh: dict[int, list[tuple[bytes, int]]] = {}
        self.dir_ino: dict[int, int] = {}
        self.fh_ino: dict[int, int] = {}    # open file handle -> st_ino
        self.next_dir_fh = 1
        self.dead = False
        self.synced_bytes = 0
        self.stall_prefix: str | None = None    # new names under this path wait (a backend away)
        self.unstalled = trio.Event()

    # ---- inodes --------------------------------------------------------------------------------
    def _check(self) -> None:
        if self.dead:
            raise pyfuse3.FUSEError(errno.EIO)

    def _fuse_ino(self, st_ino: int) -> int:
        return pyfuse3.ROOT_INODE if st_ino == self.root_ino else st_ino

    def _st_ino(self, inode: int) -> int:
        return self.root_ino if inode == pyfuse3.ROOT_INODE else inode

    def _fd(self, inode: int) -> int:
        try:
            return self.pfd[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    @staticmethod
    def _proc(fd: int) -> str:
        return f"/proc/self/fd/{fd}"

    def _attr(self, st: os.stat_result) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        for f in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_blksize", "st_blocks",
                  "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(e, f, getattr(st, f))
        e.st_ino = self._fuse_ino(st.st_ino)
        e.generation = 0
        e.entry_timeout = 1.0
        e.attr_timeout = 1.0
        return e

    def _remember(self, parent_fd: int, name: bytes) -> pyfuse3.EntryAttributes:
        """Look name up under parent and count one kernel reference to its inode."""
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        ino = self._fuse_ino(st.st_ino)
        if ino != pyfuse3.ROOT_INODE:
            if ino not in self.pfd:
                self.pfd[ino] = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=parent_fd)
            self.nlookup[ino] = self.nlookup.get(ino, 0) + 1
        return self._attr(st)

    def _meta(self, *parents: int) -> None:
        for p in parents:
            self.dirty_dirs.add(self._st_ino(p))

    def _file_dirty(self, st_ino: int) -> Dirty:
        d = self.dirty.get(st_ino)
        if d is None:
            d = self.dirty[st_ino] = Dirty()
        return d

    async def _maybe_stall(self, parent_inode: int) -> None:
        """Looking up or creating a name under the stalled prefix waits until `unstall` (or fails at a cut).

        Only directory-level operations wait: the kernel holds a file's inode lock during link,
        rename and fsync, so stalling those would also block the engine's fsyncs of the same
        (hard-linked) SCO, a coupling a slow backend does not have. Waiting in lookup holds only
        the backend directory's lock.
        """
        if self.stall_prefix is None:
            return
        where = os.path.relpath(os.readlink(self._proc(self._fd(parent_inode))), self.work)
        if where == self.stall_prefix or where.startswith(self.stall_prefix + "/"):
            await self.unstalled.wait()
            self._check()

    def stall(self, prefix: str | None) -> None:
        if prefix is None:
            self.stall_prefix = None
            self.unstalled.set()
        else:
            self.stall_prefix = prefix.strip("/")
            self.unstalled = trio.Event()

    # ---- durability ------------------------------------------------------------------------------
    def sync_file(self, fd: int) -> None:
        """fsync: the file's data and size as they are now become its durable inode."""
        st = os.fstat(fd)
        key = self.keys.get(st.st_ino)
        d = self.dirty.pop(st.st_ino, None)
        if key is None:
            key = self.keys[st.st_ino] = self.store.new_key("f")
            ranges: list[tuple[int, int]] = [(0, st.st_size)]   # a new inode: all of it
        elif d is None:
            return
        else:
            ranges = _merge(d.ranges)
        rfd = os.open(self._proc(fd), os.O_RDONLY)
        try:
            self.synced_bytes += self.store.write_ranges(key, rfd, ranges, d.shrink_to if d else None, st.st_size)
        finally:
            os.close(rfd)

    def sync_dir(self, fd: int) -> None:
        """fsync of a directory: its entries as they are now become durable (not their data)."""
        st = os.fstat(fd)
        key = self.keys.get(st.st_ino)
        if key is None:
            key = self.keys[st.st_ino] = self.store.new_key("d")
        entries: dict[str, str] = {}
        rfd = os.open(self._proc(fd), os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in os.listdir(rfd):
                cst = os.stat(name, dir_fd=rfd, follow_symlinks=False)
                ckey = self.keys.get(cst.st_ino)
                if ckey is None:
                    # Named now, never synced: durable as an empty file / empty directory.
                    ckey = self.keys[cst.st_ino] = self.store.new_key("d" if stat.S_ISDIR(cst.st_mode) else "f")
                entries[name] = ckey
        finally:
            os.close(rfd)
        self.store.set_dir(key, entries)
        self.dirty_dirs.discard(st.st_ino)

    def sync_all(self) -> None:
        """Everything becomes durable: each file's data, then each directory's entries."""
        dirs: list[str] = []
        for top, dnames, fnames in os.walk(self.work):
            dirs.append(top)
            for n in fnames:
                fd = os.open(os.path.join(top, n), os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    self.sync_file(fd)
                finally:
                    os.close(fd)
        for top in dirs:
            fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
            try:
                self.sync_dir(fd)
            finally:
                os.close(fd)

    def stats(self) -> dict[str, Any]:
        pending = sum(b - a for d in self.dirty.values() for a, b in _merge(d.ranges))
        return {"pending_bytes": pending, "pending_files": len(self.dirty), "pending_dirs": len(self.dirty_dirs),
                "synced_bytes": self.synced_bytes, "dead": self.dead}

    def cut(self) -> dict[str, Any]:
        """Power cut: what is not durable is gone; every later operation fails with EIO."""
        s = self.stats()
        self.dead = True
        self.unstalled.set()   # stalled callers wake up to EIO
        return s

    # ---- FUSE operations ---------------------------------------------------------------------------
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        self._check()
        await self._maybe_stall(parent_inode)
        try:
            return self._remember(self._fd(parent_inode), name)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    def forget_one(self, inode: int, n: int) -> None:
        left = self.nlookup.get(inode, 0) - n
        if left > 0:
            self.nlookup[inode] = left
            return
        self.nlookup.pop(inode, None)
        fd = self.pfd.pop(inode, None)
        if fd is not None:
            os.close(fd)

    async def forget(self, inode_list: Any) -> None:
        for inode, n in inode_list:
            if inode != pyfuse3.ROOT_INODE:
                self.forget_one(inode, n)

    async def getattr(self, inode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        self._check()
        return self._attr(os.stat(self._fd(inode)))

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any) -> pyfuse3.EntryAttributes:
        self._check()
        path = self._proc(fh if fh is not None else self._fd(inode))
        try:
            if fields.update_size:
                st_ino = self._st_ino(inode)
                d = self._file_dirty(st_ino)
                d.shrink_to = attr.st_size if d.shrink_to is None else min(d.shrink_to, attr.st_size)
                d.resized = True
                os.truncate(path, attr.st_size)
            if fields.update_mode:
                os.chmod(path, stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                os.chown(path, attr.st_uid if fields.update_uid else -1, attr.st_gid if fields.update_gid else -1)
            if fields.update_atime or fields.update_mtime:
                st = os.stat(path)
                os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                                   attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
            return self._attr(os.stat(path))
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> pyfuse3.EntryAttributes:
        self._check()
        try:
            os.mknod(name, mode, rdev, dir_fd=self._fd(parent_inode))
            self._meta(parent_inode)
            return self._remember(self._fd(parent_inode), name)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        self._check()
        try:
            os.mkdir(name, mode, dir_fd=self._fd(parent_inode))
            self._meta(parent_inode)
            return self._remember(self._fd(parent_inode), name)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._check()
        try:
            os.unlink(name, dir_fd=self._fd(parent_inode))
            self._meta(parent_inode)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._check()
        try:
            os.rmdir(name, dir_fd=self._fd(parent_inode))
            self._meta(parent_inode)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: Any) -> None:
        self._check()
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)  # RENAME_EXCHANGE / NOREPLACE: nobody here needs them
        try:
            os.rename(name_old, name_new, src_dir_fd=self._fd(parent_inode_old), dst_dir_fd=self._fd(parent_inode_new))
            self._meta(parent_inode_old, parent_inode_new)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        self._check()
        try:
            os.link(self._proc(self._fd(inode)), new_name, dst_dir_fd=self._fd(new_parent_inode), follow_symlinks=True)
            self._meta(new_parent_inode)
            return self._remember(self._fd(new_parent_inode), new_name)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    @staticmethod
    def _open_flags(flags: int) -> int:
        # O_APPEND: the kernel already sends the end of file as the offset. O_DIRECT: tmpfs refuses it.
        return flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_APPEND | os.O_DIRECT | os.O_NOCTTY)

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        self._check()
        try:
            if flags & os.O_TRUNC:
                d = self._file_dirty(self._st_ino(inode))
                d.shrink_to, d.resized = 0, True
            fd = os.open(self._proc(self._fd(inode)), self._open_flags(flags))
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        self.fh_ino[fd] = self._st_ino(inode)
        return pyfuse3.FileInfo(fh=fd)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._check()
        await self._maybe_stall(parent_inode)
        try:
            fd = os.open(name, self._open_flags(flags) | os.O_CREAT | os.O_EXCL, mode, dir_fd=self._fd(parent_inode))
            self._meta(parent_inode)
            attr = self._remember(self._fd(parent_inode), name)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        self.fh_ino[fd] = self._st_ino(attr.st_ino)
        return pyfuse3.FileInfo(fh=fd), attr

    async def read(self, fh: int, off: int, size: int) -> bytes:
        self._check()
        return os.pread(fh, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self._check()
        try:
            n = os.pwrite(fh, buf, off)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        d = self._file_dirty(self.fh_ino[fh])
        d.ranges.append((off, off + n))
        if len(d.ranges) >= MERGE_AT:
            d.ranges = _merge(d.ranges)
        return n

    async def flush(self, fh: int) -> None:
        self._check()   # close() is not a sync: nothing becomes durable here

    async def release(self, fh: int) -> None:
        self.fh_ino.pop(fh, None)
        os.close(fh)

    async def fsync(self, fh: int, datasync: bool) -> None:
        self._check()
        self.sync_file(fh)

    async def opendir(self, inode: int, ctx: Any) -> int:
        self._check()
        pfd = self._fd(inode)
        rfd = os.open(self._proc(pfd), os.O_RDONLY | os.O_DIRECTORY)
        try:
            names = sorted(os.listdir(rfd))
        finally:
            os.close(rfd)
        fh = self.next_dir_fh
        self.next_dir_fh += 1
        self.dir_fh[fh] = [(os.fsencode(n), 0) for n in names]
        self.dir_ino[fh] = inode
        return fh

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        self._check()
        pfd = self._fd(self.dir_ino[fh])
        for i, (name, _) in enumerate(self.dir_fh[fh][start_id:], start_id):
            try:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attr(st), i + 1):
                return
            self._remember(pfd, name)   # readdirplus counts a lookup for each entry it returned

    async def releasedir(self, fh: int) -> None:
        self.dir_fh.pop(fh, None)
        self.dir_ino.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        self._check()
        rfd = os.open(self._proc(self._fd(self.dir_ino[fh])), os.O_RDONLY | os.O_DIRECTORY)
        try:
            self.sync_dir(rfd)
        finally:
            os.close(rfd)

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        self._check()
        sv = os.statvfs(self.store.src)
        s = pyfuse3.StatvfsData()
        for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
            setattr(s, f, getattr(sv, f))
        s.f_namemax = sv.f_namemax
        return s

    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        return True


async def _control(fs: LazyFS, sock_path: str) -> None:
    """Line commands on a unix socket: cut, sync, stats; each answered with one JSON line."""
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(sock_path)
    sock.listen(8)
    listener = trio.SocketListener(sock)

    async def serve(stream: trio.SocketStream) -> None:
        buf = b""
        async with stream:
            while True:
                data = await stream.receive_some(4096)
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    cmd = line.decode().strip()
                    try:
                        if cmd == "cut":
                            out: dict[str, Any] = fs.cut()
                        elif cmd == "sync":
                            fs.sync_all()
                            out = fs.stats()
                        elif cmd == "stats":
                            out = fs.stats()
                        elif cmd.startswith("stall "):
                            fs.stall(cmd.split(" ", 1)[1])
                            out = fs.stats()
                        elif cmd == "unstall":
                            fs.stall(None)
                            out = fs.stats()
                        else:
                            out = {"error": f"unknown command {cmd!r}"}
                    except OSError as e:
                        out = {"error": str(e)}
                    await stream.send_all(json.dumps(out).encode() + b"\n")

    await trio.serve_listeners(serve, [listener])


async def _run(fs: LazyFS, mnt: str, control: str) -> None:
    opts = set(pyfuse3.default_options)
    opts |= {"fsname=lazyfs"}
    pyfuse3.init(fs, mnt, opts)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_control, fs, control)
            print("ready", flush=True)
            await pyfuse3.main(min_tasks=2, max_tasks=16)
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", help="backing directory: the durable state")
    ap.add_argument("mnt", help="mount point")
    ap.add_argument("--control", required=True, help="unix socket for cut / sync / stats")
    ap.add_argument("--work", help="an empty directory in a tmpfs for the volatile view (default: one in /dev/shm)")
    args = ap.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lazyfs-", dir="/dev/shm"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        raise SystemExit(f"{work} is not empty")
    try:
        fs = LazyFS(Path(args.src), work)
        trio.run(_run, fs, args.mnt, args.control)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
