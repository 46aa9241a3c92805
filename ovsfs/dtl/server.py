"""The DTL server: holds, per volume, the tail of another node's log until it reaches the
backend (CONTRACT11.md section 2).

trio, one task per connection; every disk operation runs in a worker thread (storage.py).
Requests on one connection are answered in order (they may be pipelined); a malformed frame
closes that connection with a logged reason and nothing else. A client that stops reading
its replies blocks only its own task (the server reads its next request only after the
previous reply went out), so memory per connection stays bounded by one frame.

The server has an incarnation, a random id new at every start (also when it reloads old
state), so a client reconnecting to the same address learns that it restarted and catches it
up in full instead of taking it as in sync.

Run alone (tests, demos): python -m ovsfs.dtl.server --path DIR [--host H] [--port N] ...
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import ssl
import sys
from pathlib import Path
from typing import Callable

import trio

from ovsfs.config import Config
from ovsfs.dtl import wire
from ovsfs.dtl.storage import DtlStore
from ovsfs.errors import DtlError, Fenced, OvsfsError

log = logging.getLogger("ovsfs.dtl")

RECV_CHUNK = 1 << 20
HANDSHAKE_TIMEOUT = 10.0
FETCH_REPLY_BYTES = 16 << 20    # a fetch answers at most this much; the client asks again
# An owner already connected when ownership moves elsewhere is refused at hello by nobody: its
# appends are checked against the cluster generation again at most this often (seconds), so a
# peer the new owner never contacted fences the old one too, within about this delay.
CLUSTER_RECHECK = 1.0
# How long an append waits for that recheck: the cluster store being slow or away must not
# hold appends up to the owner's dtl.timeout (it would degrade for nothing). Seconds.
CLUSTER_RECHECK_WAIT = 0.2
RECHECK_THREADS = 4


def _no_cluster(volume: str) -> int:
    return 0


class DtlServer:
    """`cluster_gen(volume) -> int` is the owner generation the cluster store records for a
    volume (0 when unknown); hello refuses an owner older than it or than any generation this
    server has seen, so a server that never saw a volume still refuses an old owner. It is
    called in a worker thread and may block (etcd)."""

    def __init__(self, path: Path, host: str = "127.0.0.1", port: int = 0,
                 max_bytes: int = 4 << 30, cluster_gen: Callable[[str], int] = _no_cluster,
                 ssl_ctx: ssl.SSLContext | None = None) -> None:
        self.store = DtlStore(Path(path), max_bytes)
        self.host, self.port = host, port
        self.cluster_gen = cluster_gen
        self._recheck_limiter: trio.CapacityLimiter | None = None
        self.ssl_ctx = ssl_ctx
        self.incarnation = secrets.token_hex(8)
        self.malformed = 0            # connections closed for a malformed frame
        self._floors: dict[str, tuple[float, int]] = {}   # volume -> (checked at, cluster gen)

    @classmethod
    def from_config(cls, cfg: Config, cluster_gen: Callable[[str], int] = _no_cluster
                    ) -> "DtlServer":
        d = cfg.dtl
        ctx = None
        if d.tls == "required":
            ctx = wire.server_ssl_context(cfg.path(d.tls_cert), cfg.path(d.tls_key),
                                          cfg.path(d.tls_ca))
        return cls(cfg.path(d.path), d.host, d.port, d.max_bytes, cluster_gen, ctx)

    async def serve(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Reload state, listen, and serve until cancelled. task_status gets the port."""
        await trio.to_thread.run_sync(self.store.load)
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        log.info("dtl: serving on %s:%d, incarnation %s, path %s, max_bytes %d, "
                 "%d volumes (%d bytes) reloaded, tls %s", self.host, self.port,
                 self.incarnation, self.store.root, self.store.max_bytes,
                 len(self.store.volumes), self.store.held, "on" if self.ssl_ctx else "off")
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self.port)
                await trio.serve_listeners(self._connection, listeners, handler_nursery=nursery)
        finally:
            self.store.close()

    # ---- one connection --------------------------------------------------------------------

    async def _connection(self, stream: trio.abc.Stream) -> None:
        try:
            peer = "%s:%d" % stream.socket.getpeername()[:2]  # type: ignore[attr-defined]
        except OSError:
            peer = "?"
        try:
            if self.ssl_ctx is not None:
                stream = trio.SSLStream(stream, self.ssl_ctx, server_side=True)
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    await stream.do_handshake()
            reader = _Reader(stream)
            while True:
                head = await reader.read(wire.HEADER_SIZE, eof_ok=True)
                if head is None:
                    return
                op, _status, vlen, rid, gen, plen = wire.decode_header(head)
                if op & wire.REPLY:
                    raise wire.Malformed("a reply sent to the server")
                try:
                    volume = (await reader.read(vlen)).decode()  # type: ignore[union-attr]
                except UnicodeDecodeError:
                    raise wire.Malformed("volume name is not UTF-8") from None
                payload = await reader.read(plen) if plen else b""
                reply = await self._request(op, rid, volume, gen, payload)  # type: ignore[arg-type]
                await stream.send_all(reply)
        except wire.Malformed as e:
            self.malformed += 1
            log.warning("dtl: closing connection from %s: malformed frame: %s", peer, e)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
                ssl.SSLError, OSError) as e:
            log.info("dtl: connection from %s ended: %s", peer, e or type(e).__name__)
        except Exception:   # a bug must cost this connection, never the server
            log.exception("dtl: connection from %s failed", peer)
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _request(self, op: int, rid: int, volume: str, gen: int, payload: bytes) -> bytes:
        """Run one request; the reply frame. Malformed propagates (closes the connection)."""
        try:
            if op in (wire.APPEND, wire.HELLO):
                # An owner already known to be stale here is refused at once: asking the
                # cluster store first would make it wait for an etcd that may be away, time
                # out, and take the peer for unreachable (degrade and acknowledge alone).
                known = self.store.volumes.get(volume)
                newest = max(known.gen_seen if known else 0, self._floors.get(volume, (0, 0))[1])
                if gen < newest:
                    raise Fenced(f"volume {volume}: owner generation {gen} is older than {newest}")
            if op == wire.APPEND:
                entries = wire.decode_entries(payload)
                floor = await self._recheck(volume)
                body = await trio.to_thread.run_sync(self._append, volume, gen, entries, floor)
            elif op == wire.HELLO and known is not None and known.gen_seen == gen:
                # This owner has been here before (a reconnect, or an idle client asking
                # whether this server restarted): as lenient as an append about etcd.
                floor = await self._recheck(volume)
                body = await trio.to_thread.run_sync(self._hello, volume, gen, floor)
            elif op == wire.HELLO:
                floor = await trio.to_thread.run_sync(self.cluster_gen, volume)
                self._floors[volume] = (trio.current_time(), floor)
                body = await trio.to_thread.run_sync(self._hello, volume, gen, floor)
            elif op == wire.SYNC:
                body = await trio.to_thread.run_sync(self._sync, volume, gen)
            elif op == wire.TRIM:
                pos = wire.decode_pos(payload)
                body = await trio.to_thread.run_sync(self._trim, volume, gen, pos)
            elif op == wire.FETCH:
                start = wire.decode_pos(payload) if payload else (0, 0)
                body = await trio.to_thread.run_sync(self._fetch, volume, gen, start)
            else:   # DROP
                body = await trio.to_thread.run_sync(self._drop, volume, gen)
            return wire.encode_frame(op | wire.REPLY, rid, volume, gen, body)
        except Fenced as e:
            return wire.encode_frame(op | wire.REPLY, rid, volume, gen, e.message.encode(),
                                     wire.FENCED)
        except (OvsfsError, OSError) as e:
            msg = e.message if isinstance(e, OvsfsError) else f"{type(e).__name__}: {e}"
            log.warning("dtl: %s %s (gen %d) refused: %s", wire.OPS[op], volume, gen, msg)
            return wire.encode_frame(op | wire.REPLY, rid, volume, gen, msg.encode(),
                                     wire.ERROR)

    async def _recheck(self, volume: str) -> int:
        """The cluster generation of volume, asked again when the last answer is older than
        CLUSTER_RECHECK. A cluster store that does not answer keeps the last answer (a DTL
        must not stop protecting writes because etcd is slow; hello is where it is strict)."""
        at, floor = self._floors.get(volume, (-1e9, 0))
        now = trio.current_time()
        if now - at < CLUSTER_RECHECK:
            return floor
        self._floors[volume] = (now, floor)       # one recheck at a time
        try:
            if self._recheck_limiter is None:
                # Its own threads: rechecks left behind on a dead etcd must not take the
                # worker threads appends run on.
                self._recheck_limiter = trio.CapacityLimiter(RECHECK_THREADS)
            with trio.move_on_after(CLUSTER_RECHECK_WAIT):
                floor = max(floor, await trio.to_thread.run_sync(
                    self.cluster_gen, volume, abandon_on_cancel=True, limiter=self._recheck_limiter))
        except Exception as e:
            log.warning("dtl: cluster generation of %s not rechecked: %s", volume, e)
        self._floors[volume] = (now, floor)
        return floor

    # ---- the operations (worker threads) ---------------------------------------------------

    def _hello(self, volume: str, gen: int, floor: int) -> bytes:
        v = self.store.volume(volume)
        with v.lock:
            v.check_gen(gen, floor)
            return wire.encode_json({"incarnation": self.incarnation, **v.info()})

    def _append(self, volume: str, gen: int, entries: list[wire.Entry], floor: int) -> bytes:
        v = self.store.volume(volume)
        with v.lock:
            v.check_gen(gen, floor)
            v.append(entries, self.store.reserve)
            return wire.encode_json({"last_pos": list(v.last_pos) if v.last_pos else None})

    def _sync(self, volume: str, gen: int) -> bytes:
        v = self.store.volume(volume)
        with v.lock:
            v.check_gen(gen)
            v.sync()
        return b""

    def _trim(self, volume: str, gen: int, pos: wire.Pos) -> bytes:
        v = self.store.volume(volume)
        with v.lock:
            v.check_gen(gen)
            self.store.release(v.trim(pos))
        return b""

    def _fetch(self, volume: str, gen: int, start: wire.Pos) -> bytes:
        v = self.store.volume(volume)
        with v.lock:
            v.check_gen(gen)
            entries = v.fetch(start, FETCH_REPLY_BYTES)
        return wire.encode_entries(entries)

    def _drop(self, volume: str, gen: int) -> bytes:
        v = self.store.volume(volume)
        with v.lock:
            v.check_gen(gen)
            held = v.held_bytes
            v.drop()
            self.store.release(held)
        return b""


class _Reader:
    """Exact reads over a trio stream, with one buffer per connection."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def read(self, n: int, eof_ok: bool = False) -> bytes | None:
        while len(self.buf) < n:
            chunk = await self.stream.receive_some(RECV_CHUNK)
            if not chunk:
                if eof_ok and not self.buf:
                    return None
                raise wire.Malformed(f"connection closed inside a frame ({len(self.buf)} of "
                                     f"{n} bytes)")
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


# ---- standalone process (tests, demos) ----------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ovsfs.dtl.server")
    ap.add_argument("--path", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--max-bytes", type=int, default=4 << 30)
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ap.add_argument("--tls-ca")
    ap.add_argument("--cluster-gen-file", help="JSON {volume: gen}, read at every hello")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ctx = wire.server_ssl_context(Path(a.tls_cert), Path(a.tls_key), Path(a.tls_ca)) \
        if a.tls_cert else None

    def cluster_gen(volume: str) -> int:
        if not a.cluster_gen_file:
            return 0
        try:
            return int(json.loads(Path(a.cluster_gen_file).read_text()).get(volume, 0))
        except (OSError, ValueError) as e:
            raise DtlError(f"cluster generation unknown: {e}") from None

    server = DtlServer(Path(a.path), a.host, a.port, a.max_bytes, cluster_gen, ctx)

    async def run() -> None:
        async with trio.open_nursery() as n:
            port = await n.start(server.serve)
            print(f"DTL READY {a.host} {port} {server.incarnation}", flush=True)

    trio.run(run)


if __name__ == "__main__":
    sys.exit(main())
