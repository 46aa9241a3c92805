"""NBD listeners: a unix socket and (optionally) TCP, with an allow-list and TLS.

`serve(engine, cfg)` is what the daemon runs inside its nursery; the door uses only
`engine.catalog` (ovsfs.engine.api.VolumeCatalog): each connection opens its export as a
VolumeHandle for Holder("nbd", peer) and closes it when it ends. Export name = volume
name; `VOL@SNAP` is a read-only export of a snapshot; the empty name means the only
volume when exactly one exists.

nbd.tls applies to TCP clients: "off" offers no STARTTLS, "optional" offers it,
"required" refuses every option but STARTTLS/ABORT before TLS. The unix socket is guarded
by file permissions: it offers STARTTLS whenever certificates are configured but never
requires it. With nbd.tls_ca set, clients must present a certificate signed by that CA.

Connection count, negotiation time, memory and threads are bounded by the [nbd] limits
(limits.py, which gives the figures); the daemon log states them when the door starts.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import os
import time
import socket
import ssl
import stat
from pathlib import Path
from typing import Any

import trio

from ovsfs.engine.api import Holder, VolumeCatalog
from ovsfs.errors import ConfigError, NotFound
from ovsfs.nbd.connection import Connection
from ovsfs.nbd.context import Export
from ovsfs.nbd.limits import RECV_CHUNK, Limits

log = logging.getLogger("ovsfs.nbd")


def make_ssl_context(nbd: Any, cfg: Any) -> ssl.SSLContext | None:
    if nbd.tls == "off":
        return None
    if not nbd.tls_cert or not nbd.tls_key:
        raise ConfigError(f"nbd.tls = {nbd.tls!r} needs nbd.tls_cert and nbd.tls_key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cfg.path(nbd.tls_cert)), str(cfg.path(nbd.tls_key)))
        if nbd.tls_ca:
            ctx.load_verify_locations(str(cfg.path(nbd.tls_ca)))
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"nbd TLS certificates cannot be loaded: {e}") from None
    return ctx


class NbdServer:
    def __init__(self, engine: Any, cfg: Any) -> None:
        self.catalog: VolumeCatalog = engine.catalog     # the door uses only the contract
        self.cfg = cfg
        nbd = cfg.nbd
        self.tls_mode = nbd.tls
        self.ssl_ctx = make_ssl_context(nbd, cfg)
        try:
            self.allow = [ipaddress.ip_network(a, strict=False) for a in nbd.allow]
        except ValueError as e:
            raise ConfigError(f"nbd.allow: {e}") from None
        self.socket_path = Path(cfg.path(nbd.socket))
        self.tcp_addresses: list[tuple[str, int]] = []
        self.ids = itertools.count(1)
        self.connections: dict[int, Connection] = {}
        self.limits = Limits(nbd)
        self.io = self.limits.io
        self.recv_buffer = bytearray(RECV_CHUNK)   # shared by every connection (connection._receive)
        self.refused = 0                           # connections closed over max_connections
        self._refused_logged = 0.0

    # ---- exports ---------------------------------------------------------------------------

    def _default(self, name: str) -> str:
        if name == "":
            vols = self.catalog.list_volumes()
            if len(vols) != 1:
                raise NotFound(f"no default export: {len(vols)} volumes exist; name one")
            return vols[0]["name"]
        return name

    def resolve(self, name: str) -> Export:
        """Describe an export without opening it (blocking: run in a worker thread).
        NotFound."""
        name = self._default(name)
        base, at, snap = name.partition("@")
        info = self.catalog.info(base)
        cs = int(info.get("cluster_size", 4096))
        if not at:
            # A failed volume takes no writes: exported read-only.
            return Export(name, base, None, int(info["size"]), info.get("failed") is not None, cs)
        for s in self.catalog.list_snapshots(base):
            if s["name"] == snap:
                return Export(name, base, snap, int(s.get("size", info["size"])), True, cs)
        raise NotFound(f"snapshot {name} does not exist")

    def open(self, name: str, client: str) -> Export:
        """Open an export for `client` through the catalog: a hold, named in the Busy
        errors of delete/rename/rollback/snapshot delete while the connection lasts.
        Blocking. NotFound, VolumeFailed."""
        h = self.catalog.open(self._default(name), Holder("nbd", client))
        return Export(h.name, h.volume, h.snapshot, h.size, h.caps.read_only,
                      h.caps.preferred_block_size, h)

    def list_exports(self) -> list[tuple[str, str]]:
        out = []
        for v in self.catalog.list_volumes():
            out.append((v["name"], f"ovsfs volume, {v.get('size', 0)} bytes"))
        return out

    def tls_required(self, tcp: bool) -> bool:
        return tcp and self.tls_mode == "required"

    # ---- listening -------------------------------------------------------------------------

    def allowed(self, peer: Any) -> bool:
        try:
            addr = ipaddress.ip_address(peer[0].split("%")[0])
        except (ValueError, TypeError, IndexError):
            return False
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.allow)

    async def _unix_listener(self) -> trio.SocketListener:
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                path.unlink()
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(path))
        sock.listen(256)
        return trio.SocketListener(sock)

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        nbd = self.cfg.nbd
        listeners: list[tuple[trio.SocketListener, bool]] = []
        try:
            listeners.append((await self._unix_listener(), False))
            if nbd.tcp_port:
                for lst in await trio.open_tcp_listeners(nbd.tcp_port, host=nbd.tcp_host or None):
                    listeners.append((lst, True))
                    self.tcp_addresses.append(lst.socket.getsockname()[:2])
            log.info("nbd: listening on %s%s", self.socket_path,
                     "".join(f", tcp {h}:{p}" for h, p in self.tcp_addresses))
            log.info("nbd: limits: %s", self.limits.describe())
            async with trio.open_nursery() as nursery:
                for lst, tcp in listeners:
                    nursery.start_soon(self._accept_loop, lst, tcp, nursery)
                task_status.started(self)
        finally:
            with trio.CancelScope(shield=True):
                for lst, _tcp in listeners:
                    await lst.aclose()
            try:
                if stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                    self.socket_path.unlink()
            except FileNotFoundError:
                pass

    async def _accept_loop(self, listener: trio.SocketListener, tcp: bool,
                           nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as e:            # EMFILE and friends: back off, keep serving
                log.warning("nbd: accept failed: %s", e)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(self._handle, stream, tcp)

    async def _handle(self, stream: trio.SocketStream, tcp: bool) -> None:
        cid = next(self.ids)
        if len(self.connections) >= self.limits.max_connections:
            # Over the limit: close at once (the client sees EOF before the greeting), so
            # idle sockets cannot take the file descriptors engine writes need.
            self.refused += 1
            now = time.monotonic()
            if now - self._refused_logged >= 1.0:   # one line per second under a flood
                self._refused_logged = now
                log.warning("nbd[%d]: refused a connection: %d open = nbd.max_connections "
                            "(%d refused so far)", cid, len(self.connections), self.refused)
            await trio.aclose_forcefully(stream)
            return
        peer: Any = "unix"
        if tcp:
            try:
                peer = stream.socket.getpeername()
            except OSError:
                peer = None
            if peer is None or not self.allowed(peer):
                log.warning("nbd[%d]: refused TCP client %s: not in nbd.allow", cid, peer)
                await trio.aclose_forcefully(stream)
                return
            peer = f"{peer[0]}:{peer[1]}"
        conn = Connection(self, stream, cid, str(peer), tcp)
        self.connections[cid] = conn
        try:
            await conn.run()
        finally:
            del self.connections[cid]


async def serve(engine: Any, cfg: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve NBD until cancelled; task_status.started(server) once listening."""
    await NbdServer(engine, cfg).run(task_status)
