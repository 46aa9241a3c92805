"""One NBD client: fixed-newstyle negotiation, then pipelined transmission.

Transmission: every receive is parsed into as many complete requests as it holds; the
batch is split into order-preserving groups (protocol.groups) and each group runs as one
worker-thread call (one vol.writev for its writes, one vol.readv for its reads). Replies
queue up and a sender task writes them with one send per wake-up. FLUSH and FUA run in
the background after the writes before them, so later requests never wait behind a flush.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

import trio

from ovsfs.errors import OvsfsError
from ovsfs.nbd import protocol as P
from ovsfs.nbd.negotiation import CONTEXT_ID, Closed, Negotiation
from ovsfs.nbd.transmission import (
    Parser, Request, block_status_reply, check_request, groups, read_reply_structured,
    simple_reply, structured_error,
)

if TYPE_CHECKING:
    from ovsfs.nbd.server import Export, NbdServer

log = logging.getLogger("ovsfs.nbd")

RECV_SIZE = 1 << 20
RECV_MAX = P.MAX_PAYLOAD + 64  # one whole write request at most
OUT_LIMIT = 64 << 20           # queued reply bytes before the reader waits for the sender
BLOCK_STATUS_CAP = 1 << 30     # bytes described per BLOCK_STATUS request at most
INLINE_MAX = 256 << 10         # groups up to this many data bytes may run in the event loop


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
        self.out_bytes = 0
        self.wake = trio.Event()
        self.drained = trio.Event()
        self.closing = False
        self.logged: set[tuple[int, int]] = set()
        self.user = f"nbd:{cid}"
        self._rb: bytearray | None = None
        self.acquired = False

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
                if await self.negotiate():
                    why = await self.transmission()
            except BaseExceptionGroup as eg:
                # Nurseries wrap what their tasks raise; one client's failure is one leaf.
                leaf = _leaf(eg)
                if not isinstance(leaf, Exception):
                    raise
                raise leaf from None
        except Closed as e:
            why = str(e)
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
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)
        log.info("nbd[%d] %s: %s (export %r)", self.cid, self.peer, why,
                 self.export.name if self.export else None)

    # ---- transmission ----------------------------------------------------------------------

    def _queue(self, parts: list[bytes]) -> None:
        self.out.extend(parts)
        self.out_bytes += sum(len(p) for p in parts)
        self.wake.set()

    async def _sender(self) -> None:
        while True:
            if not self.out:
                if self.closing:
                    return
                self.wake = trio.Event()
                await self.wake.wait()
                continue
            parts, self.out, self.out_bytes = self.out, [], 0
            await self.stream.send_all(parts[0] if len(parts) == 1 else b"".join(parts))
            self.drained.set()

    async def _receive(self, n: int) -> bytes | memoryview:
        """receive_some, but into one reused buffer on plain sockets.

        receive_some allocates a fresh n-byte buffer per call; at 1 MiB that is an mmap
        and munmap per receive, which made the event loop spend most of its time in the
        kernel. The parser copies what it keeps, so reusing the buffer is safe."""
        sock = getattr(self.stream, "socket", None)
        if sock is None:  # TLS
            return await self.stream.receive_some(n)
        if self._rb is None or len(self._rb) < n:
            self._rb = bytearray(n)
        got = await sock.recv_into(self._rb, n)
        return memoryview(self._rb)[:got]

    async def transmission(self) -> str:
        ex = self.export
        assert ex is not None
        parser = Parser()
        why = "client closed the connection"
        async with trio.open_nursery() as outer:
            outer.start_soon(self._sender)
            try:
                async with trio.open_nursery() as bg:
                    pending = bytes(self.rbuf)
                    self.rbuf.clear()
                    while True:
                        if pending:
                            reqs = parser.feed(pending)
                        else:
                            # want() can be a garbage length being skipped: never size a buffer by it.
                            data = await self._receive(min(max(RECV_SIZE, parser.want()), RECV_MAX))
                            if not data:
                                if parser.buf or parser.skip:
                                    why = "client vanished in the middle of a request"
                                    log.warning("nbd[%d] %s: %s", self.cid, self.peer, why)
                                break
                            reqs = parser.feed(data)
                        pending = b""
                        if not reqs:
                            continue
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
        for g in groups(reqs):
            while self.out_bytes > OUT_LIMIT:   # a client that does not read its replies
                self.drained = trio.Event()
                await self.drained.wait()
            head = g[0]
            if not head.error and head.type == P.CMD_DISC:
                return True
            if not head.error and head.type == P.CMD_FLUSH:
                bg.start_soon(self._flush_then, [simple_reply(head.cookie)],
                              lambda code, msg, r=head: [self._error_reply(r, code, msg)])
                continue
            await self._group(g, bg)
        return False

    async def _flush_then(self, replies: list[bytes], errs: Callable[[int, str], list[bytes]]) -> None:
        """Flush the volume, then send `replies` (or errs(code, message) if it failed)."""
        ex = self.export
        assert ex is not None
        if not ex.read_only:
            try:
                await trio.to_thread.run_sync(ex.vol.flush)
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
            except OvsfsError:
                pass

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
            await trio.to_thread.run_sync(work)
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

    def _ok(self, r: Request) -> bytes:
        return simple_reply(r.cookie)
