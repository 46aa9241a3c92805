"""One NBD client: fixed-newstyle negotiation, then pipelined transmission.

Transmission: every receive is parsed into as many complete requests as it holds; the
batch is split into order-preserving groups (protocol.groups) and each group runs as one
worker-thread call (one vol.writev for its writes, one vol.readv for its reads). Replies
queue up and a sender task writes them with one send per wake-up. FLUSH and FUA run in
the background after the writes before them, so later requests never wait behind a flush.

Limits (limits.py): the socket is read only while the connection and the node are under
their bytes-in-flight bounds; writes that find no write-buffer room wait here, in trio,
not in a worker thread; worker threads come from the door's own limiters. An engine
error fails the request it belongs to (an NBD error reply), never the connection.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Callable

import trio

from ovsfs.nbd import protocol as P
from ovsfs.nbd.limits import PART_OVERHEAD, RECV_CHUNK, ConnFlight
from ovsfs.nbd.negotiation import CONTEXT_ID, Closed, Negotiation
from ovsfs.nbd.transmission import (
    Parser, Request, block_status_reply, check_request, coalesce, groups,
    read_reply_structured, simple_reply, structured_error,
)

if TYPE_CHECKING:
    from ovsfs.nbd.server import Export, NbdServer

log = logging.getLogger("ovsfs.nbd")

BLOCK_STATUS_CAP = 1 << 30     # bytes described per BLOCK_STATUS request at most
INLINE_MAX = 256 << 10         # groups up to this many data bytes may run in the event loop
ROOM_POLL = (0.002, 0.1)       # seconds: first and longest pause between write-buffer room checks
ROOM_PROBE = 1.0               # seconds without room before one writer tries the blocking path
GROUP_MAX_READ = 8 << 20       # read bytes per group (one bigger READ is a group of its own)


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class Connection(Negotiation):
    def __init__(self, server: "NbdServer", stream: Any, cid: int, peer: str, tcp: bool) -> None:
        self.server = server
        self.stream = stream
        self.cid = cid
        self.peer = peer
        self.tcp = tcp
        self.rbuf = bytearray()
        self.tls = False
        self.no_zeroes = False
        self.structured = False
        self.meta_export: str | None = None     # export named in SET_META_CONTEXT
        self.export: "Export | None" = None
        self.out: list[bytes] = []
        self.out_bytes = 0          # reply bytes queued, not yet handed to the socket
        self.sending = 0            # reply bytes in the send under way
        self.wake = trio.Event()
        self.drained = trio.Event()
        self.closing = False
        self.logged: set[tuple[int, int]] = set()
        self.user = f"nbd:{cid}"
        self.acquired = False
        self._probing = False
        self.limits = server.limits
        self.flight = ConnFlight(server.limits.node, server.limits.connection_buffer)

    # ---- plumbing --------------------------------------------------------------------------

    def _log_once(self, key: tuple[int, int], msg: str, *args: Any) -> None:
        if key not in self.logged:
            self.logged.add(key)
            log.warning("nbd[%d] %s: " + msg, self.cid, self.peer, *args)

    async def recv_exact(self, n: int) -> bytes:
        while len(self.rbuf) < n:
            data = await self.stream.receive_some(max(65536, n - len(self.rbuf)))
            if not data:
                raise trio.BrokenResourceError("client closed the connection during negotiation")
            self.rbuf += data
        out = bytes(self.rbuf[:n])
        del self.rbuf[:n]
        return out

    async def run(self) -> None:
        why = "closed"
        try:
            try:
                with trio.move_on_after(self.limits.handshake_timeout) as hs:
                    started = await self.negotiate()
                if hs.cancelled_caught:
                    raise Closed(f"no export chosen within {self.limits.handshake_timeout:g} s "
                                 "(nbd.handshake_timeout)")
                if started:
                    why = await self.transmission()
            except BaseExceptionGroup as eg:
                # Nurseries wrap what their tasks raise; one client's failure is one leaf.
                leaf = _leaf(eg)
                if not isinstance(leaf, Exception):
                    raise
                raise leaf from None
        except Closed as e:
            why = str(e)
        except trio.TooSlowError:
            why = f"replies left unread for {self.limits.send_timeout:g} s (nbd.send_timeout)"
            log.warning("nbd[%d] %s: %s; closing", self.cid, self.peer, why)
        except P.ProtocolError as e:
            why = f"protocol error: {e}"
            log.warning("nbd[%d] %s: %s; closing", self.cid, self.peer, e)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError) as e:
            why = f"client vanished ({e or type(e).__name__})"
        except OSError as e:   # ssl.SSLError is an OSError
            why = f"I/O error: {e}"
            log.warning("nbd[%d] %s: %s", self.cid, self.peer, e)
        except Exception:
            why = "internal error"
            log.exception("nbd[%d] %s: internal error; closing the connection", self.cid, self.peer)
        finally:
            if self.acquired and self.export is not None:
                try:
                    self.export.vol.release(self.user)
                except Exception:
                    log.exception("nbd[%d]: release failed", self.cid)
            self.flight.release_all()
            self.out.clear()
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)
        log.info("nbd[%d] %s: %s (export %r, peak %d bytes in flight; node peak %d)", self.cid,
                 self.peer, why, self.export.name if self.export else None, self.flight.peak,
                 self.flight.node.peak)

    # ---- transmission ----------------------------------------------------------------------

    def _queue(self, parts: list[bytes]) -> None:
        n = sum(len(p) for p in parts) + PART_OVERHEAD * len(parts)
        self.out.extend(parts)
        self.out_bytes += n
        self.flight.charge(n)
        self.wake.set()

    async def _sender(self) -> None:
        while True:
            if not self.out:
                if self.closing:
                    return
                self.wake = trio.Event()
                await self.wake.wait()
                continue
            parts, self.out = self.out, []
            sent, self.out_bytes = self.out_bytes, 0
            self.sending = sent
            # A client that never reads would keep its replies (and its share of the node
            # bound) for ever: it gets send_timeout seconds, then the connection closes.
            with trio.fail_after(self.limits.send_timeout):
                for data in coalesce(parts):
                    await self.stream.send_all(data)
            del parts, data
            self.sending = 0
            self.flight.release(sent)
            self.drained.set()

    async def _receive(self, n: int) -> bytes | memoryview:
        """Up to n bytes (n <= RECV_CHUNK) from the client.

        Plain sockets receive into the server's one shared buffer: an idle connection
        holds no receive buffer at all, and there is no mmap/munmap per receive. The
        caller parses (and the parser copies what it keeps) before its next await, so
        no other connection can overwrite the shared buffer in between."""
        sock = getattr(self.stream, "socket", None)
        if sock is None:  # TLS
            return await self.stream.receive_some(n)
        fd = sock.fileno()
        buf = self.server.recv_buffer
        # Yield first (a busy client must not starve the others), then read at once when
        # data is there: waiting for readiness first would cost an epoll round per receive.
        await trio.lowlevel.checkpoint()
        while True:
            try:
                got = os.readv(fd, [memoryview(buf)[:n]])
            except (BlockingIOError, InterruptedError):
                await trio.lowlevel.wait_readable(fd)
                continue
            return memoryview(buf)[:got]

    async def transmission(self) -> str:
        ex = self.export
        assert ex is not None
        parser = Parser()
        why = "client closed the connection"
        flight = self.flight
        reserved = 0      # bytes charged for a WRITE whose payload is still arriving
        async with trio.open_nursery() as outer:
            outer.start_soon(self._sender)
            try:
                async with trio.open_nursery() as bg:
                    pending = bytes(self.rbuf)
                    self.rbuf.clear()
                    while True:
                        if pending:
                            reqs = parser.feed(pending)
                            pending = b""
                        else:
                            # Backpressure: read only while this connection and the node are
                            # under their bounds. A WRITE under way reserves its whole size
                            # first; otherwise the gate waits for room for one receive (which
                            # is not charged: at most RECV_CHUNK per connection sits in the
                            # parser between receives). A connection with nothing in flight
                            # always takes one receive: clients that read their replies are
                            # served while others leave the node at its bound.
                            head = parser.head_write()
                            if head > reserved:
                                await flight.room(head - reserved)
                                flight.charge(head - reserved)
                                reserved = head
                            elif not head:
                                await flight.room(RECV_CHUNK, idle_may=True)
                            # Take what the client has sent, up to one chunk: several requests
                            # per receive make one batch (one engine call for their writes).
                            data = await self._receive(RECV_CHUNK)
                            if not data:
                                if parser.buf or parser.skip:
                                    why = "client vanished in the middle of a request"
                                    log.warning("nbd[%d] %s: %s", self.cid, self.peer, why)
                                break
                            reqs = parser.feed(data)
                            del data
                        if not reqs:
                            continue
                        # What the parsed requests hold is charged; a reservation made for a
                        # write still arriving is handed back (its bytes are now in a request).
                        flight.charge(sum(len(r.data) for r in reqs if r.data is not None))
                        flight.release(reserved)
                        reserved = 0
                        if await self._batch(reqs, bg):
                            why = "client disconnected (DISC)"
                            break
            finally:
                self.closing = True
                self.wake.set()
        return why

    def _error_reply(self, r: Request, code: int, msg: str) -> bytes:
        if self.structured:
            return structured_error(r.cookie, code, msg)
        return simple_reply(r.cookie, code)

    async def _batch(self, reqs: list[Request], bg: trio.Nursery) -> bool:
        ex = self.export
        assert ex is not None
        meta = self.meta_export is not None
        for r in reqs:
            check_request(r, ex.size, read_only=ex.read_only, structured=self.structured, meta=meta)
        gs = groups(reqs, max_read=min(self.flight.limit // 2, GROUP_MAX_READ))
        try:
            for g in gs:
                reads = sum(r.length for r in g if r.type in (P.CMD_READ, P.CMD_CACHE) and not r.error)
                head = g[0]
                if not head.error and head.type == P.CMD_DISC:
                    return True
                if not head.error and head.type == P.CMD_FLUSH:
                    bg.start_soon(self._flush_then, [simple_reply(head.cookie)],
                                  lambda code, msg, r=head: [self._error_reply(r, code, msg)])
                else:
                    if reads:
                        # Charged from the check on: other connections see it at once.
                        await self._read_room(reads)
                        self.flight.charge(reads)
                    try:
                        await self._group(g, bg)
                    finally:
                        self.flight.release(reads)   # the replies are charged as they queue
                self.flight.release(sum(len(r.data) for r in g if r.data is not None))
                for r in g:
                    r.data = None
        finally:
            # DISC, or the connection is going: what the rest of the batch held is free.
            self.flight.release(sum(len(r.data) for r in reqs if r.data is not None))
        return False

    async def _read_room(self, reads: int) -> None:
        """Before a group allocates `reads` bytes of read data: wait until they fit under
        the connection's bound (counting its unsent replies) and the node's.

        Deadlock-free: a connection waits for node room only while it holds no request
        data of its own (or while it has unsent replies, which its own client frees, or
        send_timeout). So when its replies are all sent, a connection that holds the rest
        of a batch, or asks for no more than one receive's worth, goes on at once: clients
        that read their replies are served even while others keep the node at its bound."""
        flight = self.flight
        node = flight.node
        while True:
            queued = self.out_bytes + self.sending
            if queued and queued + reads > flight.limit:
                self.drained = trio.Event()
                await self.drained.wait()
                continue
            if node.used == 0 or node.used + reads <= node.limit:
                return
            holds = flight.used - queued > 0
            if not queued and (holds or reads <= RECV_CHUNK):
                return
            await node.wait_freed()

    async def _flush_then(self, replies: list[bytes], errs: Callable[[int, str], list[bytes]]) -> None:
        """Flush the volume, then send `replies` (or errs(code, message) if it failed)."""
        ex = self.export
        assert ex is not None
        if not ex.read_only:
            try:
                await trio.to_thread.run_sync(ex.vol.flush, limiter=self.limits.flush)
            except Exception as e:
                code = P.nbd_errno(e)
                self._log_once((P.CMD_FLUSH, code), "flush failed: %s", e)
                replies = errs(code, str(e))
        self._queue(replies)

    async def _group(self, g: list[Request], bg: trio.Nursery) -> None:
        ex = self.export
        assert ex is not None
        vol, snap = ex.vol, ex.snapshot
        writes, trims, zeroes, reads, bstat = [], [], [], [], []
        out: list[bytes] = []
        for r in g:
            if r.error:
                self._log_once((r.type, r.error), "%s refused (error %d): %s", r.name, r.error, r.reason)
                out.append(self._error_reply(r, r.error, r.reason))
            elif r.type == P.CMD_WRITE:
                writes.append(r)
            elif r.type == P.CMD_READ:
                reads.append(r)
            elif r.type == P.CMD_TRIM:
                trims.append(r)
            elif r.type == P.CMD_WRITE_ZEROES:
                zeroes.append(r)
            elif r.type == P.CMD_CACHE:
                if r.length <= P.MAX_PAYLOAD:
                    reads.append(r)
                else:
                    out.append(self._ok(r))
            elif r.type == P.CMD_BLOCK_STATUS:
                bstat.append(r)
        failed: dict[int, BaseException] = {}
        results: dict[int, Any] = {}
        kw = {"snapshot": snap} if snap else {}
        # Small groups first try the engine's nowait calls from the event loop: at queue
        # depth 1 the thread hop costs more than the engine work. Anything that would wait
        # (or fail) goes to the worker thread below, which sorts out errors per request.
        small = sum(r.length for r in writes) + sum(r.length for r in reads) <= INLINE_MAX
        if small and (writes or reads) and not (trims or zeroes or bstat):
            try:
                if writes:
                    vol.writev([(r.offset, r.data) for r in writes], nowait=True)
                    writes = []
                if reads:
                    for r, d in zip(reads, vol.readv([(r.offset, r.length) for r in reads], nowait=True, **kw)):
                        results[id(r)] = d
                    reads = []
            except Exception:  # noqa: BLE001 - WouldBlock, or an error the thread sorts out per request
                pass
        if writes or trims or zeroes:
            # What the engine will reserve: whole clusters (two per trim or zeroing for its
            # partial edges), so a waiting writer does not go on a little too early.
            cs = int(getattr(vol, "cluster_size", 4096))
            need = sum(((r.offset + r.length - 1) // cs - r.offset // cs + 1) * cs
                       for r in writes if r.length) + 2 * cs * (len(trims) + len(zeroes))
            await self._write_room(vol, need)

        def work() -> None:
            if writes:
                try:
                    vol.writev([(r.offset, r.data) for r in writes])
                except Exception:
                    for r in writes:   # find out which ones fail
                        try:
                            vol.write(r.offset, r.data)
                        except Exception as e:
                            failed[id(r)] = e
            for r in trims:
                try:
                    vol.trim(r.offset, r.length)
                except Exception as e:
                    failed[id(r)] = e
            for r in zeroes:
                try:
                    vol.write_zeroes(r.offset, r.length)
                except Exception as e:
                    failed[id(r)] = e
            if reads:
                try:
                    for r, d in zip(reads, vol.readv([(r.offset, r.length) for r in reads], **kw)):
                        results[id(r)] = d
                except Exception:
                    for r in reads:
                        try:
                            results[id(r)] = vol.read(r.offset, r.length, **kw)
                        except Exception as e:
                            failed[id(r)] = e
            for r in bstat:
                try:
                    n = min(r.length, BLOCK_STATUS_CAP)
                    results[id(r)] = vol.extents(r.offset, n, snapshot=snap) if snap else \
                        vol.extents(r.offset, n)
                except Exception as e:
                    failed[id(r)] = e

        if writes or trims or zeroes or reads or bstat:
            limiter = self.limits.data
            if self._probing:
                limiter, self._probing = self.limits.probe, False
            # Abandoned on cancel (shutdown, the client gone): a thread stuck waiting for a
            # backend that is away must not hold up the door; nothing of it is acknowledged.
            await trio.to_thread.run_sync(work, limiter=limiter, abandon_on_cancel=True)
        fua: list[Request] = []
        for r in g:
            if r.error:
                continue
            e = failed.get(id(r))
            if e is not None:
                code = P.nbd_errno(e, r.type)
                self._log_once((r.type, code), "%s %d+%d failed: %s", r.name, r.offset, r.length, e)
                out.append(self._error_reply(r, code, str(e)))
            elif r.type == P.CMD_READ:
                data = results[id(r)]
                if self.structured:
                    out.extend(read_reply_structured(r.cookie, r.offset, data))
                else:
                    out.append(simple_reply(r.cookie))
                    out.append(data)
            elif r.type == P.CMD_BLOCK_STATUS:
                out.append(block_status_reply(r.cookie, CONTEXT_ID, results[id(r)],
                                                bool(r.flags & P.CMD_FLAG_REQ_ONE)))
            elif r.flags & P.CMD_FLAG_FUA:
                fua.append(r)
            else:
                out.append(self._ok(r))
        if out:
            self._queue(out)
        if fua:
            bg.start_soon(self._flush_then, [self._ok(r) for r in fua],
                          lambda code, msg: [self._error_reply(r, code, msg) for r in fua])

    async def _write_room(self, vol: Any, nbytes: int) -> None:
        """Wait here, in trio, until the write buffer has room for `nbytes`.

        With the backend away the buffer stays full; writers waiting in worker threads
        would take every thread the node has. After ROOM_PROBE seconds one writer per
        node (the probe limiter) goes on into the engine's blocking reserve anyway: the
        engine seals idle volumes' open SCOs when writers wait there."""
        room = getattr(vol, "write_room", None)
        if room is None or room(nbytes):
            return
        pause, waited = ROOM_POLL[0], 0.0
        while not room(nbytes):
            if waited >= ROOM_PROBE and self.limits.probe.available_tokens:
                self._probing = True
                return
            await trio.sleep(pause)
            waited += pause
            pause = min(pause * 2, ROOM_POLL[1])

    def _ok(self, r: Request) -> bytes:
        return simple_reply(r.cookie)
