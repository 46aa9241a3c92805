"""The shm door: a vhost-user-blk back end (vhost-user.rst; virtio 1.1 section 5.2) per volume.

`serve(engine, cfg)` runs in the daemon's nursery. It keeps one listening unix socket per
volume of this node at `cfg.path(shm.socket_dir)/VOL.sock`, and a read-only one per
snapshot at `VOL@SNAP.sock`, made and removed by a reconcile pass every RECONCILE_SECONDS
as volumes come and go (created, deleted, renamed, moved to or from this node). Only
`engine.catalog` (ovsfs.engine.api) and `ovsfs.doors.adapter.DoorIO` are used.

vhost-user has one front end per device: a socket serves one connection at a time, and
another one is closed at once with a log line naming both pids. The volume is opened for
the front end with Holder("shm", "pid N") (its pid from SO_PEERCRED) at its first message
and closed when it goes; the socket then takes the next one (QEMU reconnecting, a guest
restarted). A front end that has not asked for the config nor sent its memory table within
shm.handshake_timeout seconds is dropped (session.py).

Limits ([shm], ovsfs/config.py): ring size (queue_size), queues (num_queues), one
request's size (seg_max, size_max, max_request_bytes), batches in flight per queue,
worker threads, and requests / bytes in flight per connection and per node (DoorIO's
bounds: a connection at its bound stops taking requests off its rings until some finish).
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ovsfs.doors.adapter import DoorIO
from ovsfs.engine.api import Holder, VolumeCatalog
from ovsfs.errors import OvsfsError
from ovsfs.shm import blk
from ovsfs.shm.session import Session

log = logging.getLogger("ovsfs.shm")

RECONCILE_SECONDS = 1.0      # how soon a new volume gets its socket
MAX_UNIX_PATH = 107          # bytes of a unix socket path (sun_path is 108 with the NUL)
SUFFIX = ".sock"
_PEERCRED = struct.Struct("3i")   # pid, uid, gid


@dataclass
class Listener:
    path: Path
    sock: trio.socket.SocketType
    scope: trio.CancelScope


class ShmServer:
    def __init__(self, engine: Any, cfg: Any) -> None:
        self.catalog: VolumeCatalog = engine.catalog
        self.cfg = cfg
        m = cfg.shm
        self.dir = Path(cfg.path(m.socket_dir))
        self.limits = blk.Limits(m.max_request_bytes, m.size_max, m.seg_max, m.num_queues)
        self.io = DoorIO("shm", threads=m.threads, flush_threads=m.flush_threads,
                         max_requests=m.node_requests, max_bytes=m.node_bytes,
                         handle_requests=m.connection_requests, handle_bytes=m.connection_bytes)
        self.listeners: dict[str, Listener] = {}
        self.active: dict[str, int] = {}          # volume name -> front end pid
        self.too_long: set[str] = set()           # names whose socket path cannot be bound (logged)
        self.refused = 0                          # second front ends closed at once
        self._refused_logged = 0.0
        self._nursery: trio.Nursery | None = None
        self.gid: int | None = None
        if m.socket_group:
            import grp
            self.gid = grp.getgrnam(m.socket_group).gr_gid

    def describe(self) -> str:
        m = self.cfg.shm
        return (f"{m.num_queues} queues of up to {m.queue_size} entries, requests up to "
                f"{m.max_request_bytes >> 10} KiB ({m.seg_max} segments of {m.size_max >> 10} KiB), "
                f"{m.batches} batches in flight per queue, {m.threads} threads + {m.flush_threads} "
                f"for flushes, in flight per connection {m.connection_requests} requests / "
                f"{m.connection_bytes >> 20} MiB, per node {m.node_requests} / {m.node_bytes >> 20} MiB")

    # ---- volumes -----------------------------------------------------------------------

    def names(self) -> set[str]:
        """Every volume and snapshot of this node (blocking: run in a worker thread)."""
        out: set[str] = set()
        for v in self.catalog.list_volumes():
            name = v["name"]
            out.add(name)
            if v.get("snapshots"):
                try:
                    for s in self.catalog.list_snapshots(name):
                        out.add(f"{name}@{s['name']}")
                except OvsfsError:
                    pass     # gone meanwhile: the next pass sees it
        return out

    async def reconcile(self) -> None:
        try:
            names = await trio.to_thread.run_sync(self.names)
        except Exception as e:     # the next pass tries again
            log.warning("shm: cannot list volumes: %s", getattr(e, "message", None) or e)
            return
        for name in sorted(set(self.listeners) - names):
            self._remove(name)
        for name in sorted(names - set(self.listeners) - self.too_long):
            await self._add(name)

    async def _add(self, name: str) -> None:
        path = self.dir / f"{name}{SUFFIX}"
        if len(os.fsencode(path)) > MAX_UNIX_PATH:
            self.too_long.add(name)
            log.warning("shm: no socket for %s: %s is longer than %d bytes (shorten shm.socket_dir)",
                        name, path, MAX_UNIX_PATH)
            return
        _unlink_socket(path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(str(path))
            self._permit(path)
            sock.listen(4)
        except OSError as e:
            sock.close()
            log.warning("shm: cannot listen on %s: %s", path, e.strerror or e)
            return
        lst = Listener(path, sock, trio.CancelScope())
        self.listeners[name] = lst
        assert self._nursery is not None
        self._nursery.start_soon(self._accept_loop, name, lst)

    def _permit(self, path: Path) -> None:
        """[shm] socket_mode / socket_group on a new socket (set before listen(): no front
        end connects through wider permissions first)."""
        os.chmod(path, self.cfg.shm.socket_mode)
        if self.gid is not None:
            os.chown(path, -1, self.gid)

    def _remove(self, name: str) -> None:
        lst = self.listeners.pop(name)
        lst.scope.cancel()
        _unlink_socket(lst.path)

    # ---- connections -------------------------------------------------------------------

    async def _accept_loop(self, name: str, lst: Listener) -> None:
        try:
            with lst.scope:
                while True:
                    try:
                        conn, _addr = await lst.sock.accept()
                    except OSError as e:       # EMFILE and friends: back off, keep serving
                        log.warning("shm[%s]: accept failed: %s", name, e)
                        await trio.sleep(0.1)
                        continue
                    pid = _peer_pid(conn)
                    if name in self.active:
                        self.refused += 1
                        now = time.monotonic()
                        if now - self._refused_logged >= 1.0:   # one line a second under a flood
                            self._refused_logged = now
                            log.warning("shm[%s]: refused a second front end (pid %s): pid %s is connected "
                                        "(vhost-user has one front end per device; %d refused so far)",
                                        name, pid, self.active[name], self.refused)
                        conn.close()
                        continue
                    self.active[name] = pid
                    assert self._nursery is not None
                    self._nursery.start_soon(self._session, name, conn, pid)
        finally:
            lst.sock.close()

    async def _session(self, name: str, conn: trio.socket.SocketType, pid: int) -> None:
        label = f"shm[{name}]"
        m = self.cfg.shm
        try:
            log.info("%s: front end pid %d connected", label, pid)
            # The volume is opened at the front end's first message (Session._open), not
            # here: a connection that says nothing holds nothing.
            opener = functools.partial(self.catalog.open, name, Holder("shm", f"pid {pid}"))
            try:
                await Session(conn, opener, self.io, self.limits, m.queue_size, m.batches, label,
                              handshake_timeout=m.handshake_timeout,
                              allow_unsealed=m.allow_unsealed_memory).run()
            except Exception:
                # A bug met by one front end ends its connection, not the door.
                log.exception("%s: the session failed; dropping the front end", label)
        finally:
            conn.close()
            self.active.pop(name, None)

    # ---- the door ----------------------------------------------------------------------

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.gid is not None:
            # the group must reach the sockets: search permission on their directory
            os.chown(self.dir, -1, self.gid)
            os.chmod(self.dir, os.stat(self.dir).st_mode & 0o7777 | 0o010)
        for p in self.dir.glob(f"*{SUFFIX}"):
            _unlink_socket(p)     # left by a daemon that was killed
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self.reconcile()
                log.info("shm: vhost-user-blk sockets in %s (%d volumes and snapshots)",
                         self.dir, len(self.listeners))
                log.info("shm: limits: %s", self.describe())
                task_status.started(self)
                while True:
                    await trio.sleep(RECONCILE_SECONDS)
                    await self.reconcile()
        finally:
            for lst in self.listeners.values():
                _unlink_socket(lst.path)
                lst.sock.close()
            self.listeners.clear()


def _peer_pid(conn: trio.socket.SocketType) -> int:
    try:
        return _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))[0]
    except OSError:
        return 0


def _unlink_socket(path: Path) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            path.unlink()
    except FileNotFoundError:
        pass


async def serve(engine: Any, cfg: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve vhost-user-blk until cancelled; task_status.started(server) once listening."""
    await ShmServer(engine, cfg).run(task_status)
