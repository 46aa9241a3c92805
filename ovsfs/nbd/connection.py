"""One NBD client: fixed-newstyle negotiation, then pipelined transmission.

Transmission is pipelined: every receive is parsed into as many complete requests as it
holds; the batch is split into order-preserving groups (transmission.groups) and each
group runs as its own task through the door's adapter (ovsfs.doors.adapter: one writev
for its writes, one readv for its reads, nowait in the event loop or a worker thread)
while the connection goes on receiving. A group waits only for the earlier groups it
conflicts with. Replies queue up as groups complete and a sender task writes them with
one send per wake-up. FLUSH starts at once (it covers the writes already replied to);
FUA replies follow a flush after their write.

Limits (limits.py): the socket is read only while the connection and the node are under
their bytes-in-flight bounds (request payloads, read data of running groups and unsent
replies count); writes that find no write-buffer room wait in trio (the adapter); worker
threads come from the door's own limiters. An engine error fails the request it belongs
to (an NBD error reply), never the connection.

The connection knows its door only as a context.DoorContext (never the server module);
the export is a VolumeHandle opened through the catalog, closed when the connection ends.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING, Any

import trio

from ovsfs.doors.adapter import EXTENTS, READ, TRIM, WRITE, ZEROES, Op
from ovsfs.errors import Fenced, NotOwner
from ovsfs.nbd import protocol as P
from ovsfs.nbd.limits import PART_OVERHEAD, RECV_CHUNK, ConnFlight
from ovsfs.nbd.negotiation import CONTEXT_ID, Closed, Negotiation
from ovsfs.nbd.transmission import (
    Parser, Request, block_status_reply, check_request, coalesce, groups,
    read_reply_structured, simple_reply, structured_error,
)

if TYPE_CHECKING:
    from ovsfs.nbd.context import DoorContext, Export

log = logging.getLogger("ovsfs.nbd")

BLOCK_STATUS_CAP = 1 << 30     # bytes described per BLOCK_STATUS request at most
GROUP_MAX_READ = 8 << 20       # read bytes per group (one bigger READ is a group of its own)


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class Connection(Negotiation):
    def __init__(self, ctx: "DoorContext", stream: Any, cid: int, peer: str, tcp: bool) -> None:
        self.ctx = ctx
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
        self.gone: str | None = None      # why the volume is not served here any more
        self.logged: set[tuple[int, int]] = set()
        self.running: list[_Running] = []     # groups under way, in the order received
        self.limits = ctx.limits
        self.flight = ConnFlight(ctx.limits.node, ctx.limits.connection_buffer)

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
            if self.export is not None and self.export.handle is not None:
                try:   # the hold on the volume (or snapshot) ends with the connection
                    self.export.handle.close()
                except Exception:
                    log.exception("nbd[%d]: closing the export failed", self.cid)
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
        buf = self.ctx.recv_buffer
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
        return f"the volume is served elsewhere now ({self.gone})" if self.gone else why

    def _leave(self, why: str) -> None:
        """Stop reading requests (the receive loop sees EOF); what is queued is still sent."""
        if self.gone is not None:
            return
        self.gone = why
        stream = getattr(self.stream, "transport_stream", self.stream)   # TLS wraps the socket
        sock = getattr(stream, "socket", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass

    def _error_reply(self, r: Request, code: int, msg: str) -> bytes:
        if self.structured:
            return structured_error(r.cookie, code, msg)
        return simple_reply(r.cookie, code)

    async def _batch(self, reqs: list[Request], bg: trio.Nursery) -> bool:
        """Start every group of a parsed batch as its own task, in order; True on DISC.

        Pipelining: the receive loop goes on reading while the groups run. A group waits
        only for the earlier groups it conflicts with (an overlap where one of them
        modifies), so the order the client gave holds wherever it matters; replies go out
        as groups complete. A FLUSH covers the writes completed (replied to) before it was
        received (NBD proto.md), so it waits for nothing before it starts."""
        ex = self.export
        assert ex is not None
        meta = self.meta_export is not None
        for r in reqs:
            check_request(r, ex.size, read_only=ex.read_only, structured=self.structured, meta=meta)
        gs = groups(reqs, max_read=min(self.flight.limit // 2, GROUP_MAX_READ))
        for k, g in enumerate(gs):
            head = g[0]
            if not head.error and head.type == P.CMD_DISC:
                # Requests after DISC are not served: what they hold is free.
                self.flight.release(sum(len(r.data) for h in gs[k:] for r in h if r.data is not None))
                return True
            if not head.error and head.type == P.CMD_FLUSH:
                bg.start_soon(self._flush, head)
                continue
            # The requests of a group commute: those that conflict with a running group
            # wait for it, the others start now.
            blocked: list[Request] = []
            if self.running:
                free = []
                for r in g:
                    (blocked if not r.error and r.length and any(
                        t.conflicts(r.offset, r.offset + r.length, r.type in P.MUTATING)
                        for t in self.running) else free).append(r)
                g = free
            for part in (g, blocked):
                if part:
                    await self._start(part, bg)
        return False

    async def _start(self, g: list[Request], bg: trio.Nursery) -> None:
        """Start one group as a task, after the running groups it conflicts with."""
        reads = sum(r.length for r in g if r.type in (P.CMD_READ, P.CMD_CACHE) and not r.error)
        if reads:
            # Charged from here on: other connections see it at once.
            await self._read_room(reads)
            self.flight.charge(reads)
        task = _Running([(r.offset, r.offset + r.length, r.type in P.MUTATING)
                         for r in g if not r.error and r.length])
        after = [t for t in self.running if t.conflicts_with(task)]
        if not after:
            # Fast path (queue depth 1, small requests): the engine's nowait calls right
            # here, in the receive loop; no task, no thread.
            out: list[bytes] = []
            ops = self._ops(g, out)
            ex = self.export
            assert ex is not None
            if not ops or self.ctx.io.try_now(ex.handle, ops):
                fua = self._replies(ops, out)
                self.flight.release(reads)
                self.flight.release(sum(len(r.data) for r in g if r.data is not None))
                for r in g:
                    r.data = None
                if fua:
                    bg.start_soon(self._fua, fua)
                return
        self.running.append(task)
        bg.start_soon(self._run_group, g, reads, after, task)

    async def _read_room(self, reads: int) -> None:
        """Before a group allocates `reads` bytes of read data: wait until they fit under
        the connection's bound (counting its unsent replies and its running groups) and
        the node's.

        Deadlock-free: a connection waits only while something of its own will free bytes
        (running groups finish; unsent replies are read by its client, or send_timeout),
        or for node room while it holds nothing of its own that others wait for. With
        nothing running and nothing queued, a connection that holds the rest of a batch,
        or asks for no more than one receive's worth, goes on at once: clients that read
        their replies are served even while others keep the node at its bound."""
        flight = self.flight
        node = flight.node
        while True:
            queued = self.out_bytes + self.sending
            mine = queued or self.running
            if mine and flight.used + reads > flight.limit:
                await node.wait_freed()     # our own releases wake the node's waiters too
                continue
            if node.used == 0 or node.used + reads <= node.limit:
                return
            holds = flight.used - queued > 0
            if not mine and (holds or reads <= RECV_CHUNK):
                return
            await node.wait_freed()

    async def _flush(self, r: Request) -> None:
        err = await self.ctx.io.run_flush(self.export.handle) if self.export else None
        if err is not None:
            code = P.nbd_errno(err)
            self._log_once((P.CMD_FLUSH, code), "flush failed: %s", err)
            self._queue([self._error_reply(r, code, str(err))])
        else:
            self._queue([simple_reply(r.cookie)])

    async def _run_group(self, g: list[Request], reads: int, after: list["_Running"],
                         task: "_Running") -> None:
        try:
            for t in after:
                await t.done.wait()
            await self._group(g)
        finally:
            self.flight.release(reads)     # the replies are charged as they queue
            self.flight.release(sum(len(r.data) for r in g if r.data is not None))
            for r in g:
                r.data = None
            self.running.remove(task)
            task.done.set()

    async def _group(self, g: list[Request]) -> None:
        ex = self.export
        assert ex is not None and ex.handle is not None
        out: list[bytes] = []
        ops = self._ops(g, out)
        if ops:
            await self.ctx.io.run(ex.handle, ops)
        fua = self._replies(ops, out)
        if fua:
            await self._fua(fua)

    def _ops(self, g: list[Request], out: list[bytes]) -> list[Op]:
        """The adapter's ops for a group; replies of refused requests go to `out`."""
        ops: list[Op] = []
        for r in g:
            if r.error:
                self._log_once((r.type, r.error), "%s refused (error %d): %s", r.name, r.error, r.reason)
                out.append(self._error_reply(r, r.error, r.reason))
            elif r.type == P.CMD_CACHE and r.length > P.MAX_PAYLOAD:
                out.append(simple_reply(r.cookie))
            else:
                ops.append(Op(_KIND[r.type], r.offset,
                              min(r.length, BLOCK_STATUS_CAP) if r.type == P.CMD_BLOCK_STATUS
                              else r.length, r.data, tag=r))
        return ops

    def _replies(self, ops: list[Op], out: list[bytes]) -> list[Request]:
        """Queue the replies of finished ops (with `out`); the FUA writes that still need
        a flush before their reply are returned."""
        fua: list[Request] = []
        for op in ops:
            r = op.tag
            if op.error is not None:
                code = P.nbd_errno(op.error, r.type)
                if isinstance(op.error, (Fenced, NotOwner)):
                    # Another node serves the volume now: say so (ESHUTDOWN, NBD spec
                    # "Error values") and end the connection, so that a client reconnects
                    # (to the new owner) instead of passing EIO after EIO to its guest.
                    code = P.ESHUTDOWN
                    self._leave(str(op.error))
                self._log_once((r.type, code), "%s %d+%d failed: %s", r.name, r.offset, r.length,
                               op.error)
                out.append(self._error_reply(r, code, str(op.error)))
            elif r.type == P.CMD_READ:
                if self.structured:
                    out.extend(read_reply_structured(r.cookie, r.offset, op.result))
                else:
                    out.append(simple_reply(r.cookie))
                    out.append(op.result)
            elif r.type == P.CMD_BLOCK_STATUS:
                out.append(block_status_reply(r.cookie, CONTEXT_ID, op.result,
                                              bool(r.flags & P.CMD_FLAG_REQ_ONE)))
            elif r.flags & P.CMD_FLAG_FUA:
                fua.append(r)
            else:
                out.append(simple_reply(r.cookie))
            op.result = op.data = None
        if out:
            self._queue(out)
        return fua

    async def _fua(self, fua: list[Request]) -> None:
        """Flush, then the replies of FUA writes (the other replies went out already)."""
        assert self.export is not None
        err = await self.ctx.io.run_flush(self.export.handle)
        if err is not None:
            code = P.nbd_errno(err)
            self._log_once((P.CMD_FLUSH, code), "flush (FUA) failed: %s", err)
            self._queue([self._error_reply(r, code, str(err)) for r in fua])
        else:
            self._queue([simple_reply(r.cookie) for r in fua])


_KIND = {P.CMD_READ: READ, P.CMD_CACHE: READ, P.CMD_WRITE: WRITE, P.CMD_TRIM: TRIM,
         P.CMD_WRITE_ZEROES: ZEROES, P.CMD_BLOCK_STATUS: EXTENTS}


class _Running:
    """A group under way: what it touches (start, end, modifies), and when it is done."""

    __slots__ = ("spans", "done", "lo", "hi", "mut")

    def __init__(self, spans: list[tuple[int, int, bool]]) -> None:
        self.spans = spans
        self.done = trio.Event()
        self.lo = min((a for a, _b, _m in spans), default=0)
        self.hi = max((b for _a, b, _m in spans), default=0)
        self.mut = any(m for _a, _b, m in spans)

    def conflicts(self, s: int, e: int, mut: bool) -> bool:
        """Does [s, e) overlap this group where one of the two modifies data?"""
        if not (mut or self.mut) or e <= self.lo or s >= self.hi:
            return False
        return any(s < b and a < e and (mut or m) for a, b, m in self.spans)

    def conflicts_with(self, other: "_Running") -> bool:
        if not (self.mut or other.mut) or other.hi <= self.lo or other.lo >= self.hi:
            return False
        return any(self.conflicts(s, e, m) for s, e, m in other.spans)
