"""NBD fixed-newstyle negotiation: options up to NBD_OPT_GO / NBD_OPT_EXPORT_NAME.

A mixin of Connection (connection.py): it uses self.stream, self.ctx (the door, a
context.DoorContext), self.rbuf,
recv_exact() and sets self.export, self.structured, self.meta_export, self.tls.
"""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING, Any

import trio

from ovsfs.errors import OvsfsError
from ovsfs.nbd import protocol as P

if TYPE_CHECKING:
    from ovsfs.nbd.context import DoorContext, Export

log = logging.getLogger("ovsfs.nbd")

MAX_OPTIONS = 4096             # options per negotiation before we give up on the client
CONTEXT_ID = 1                 # meta context id of base:allocation
WRITE_FLAGS = (P.TF_SEND_FUA | P.TF_SEND_TRIM | P.TF_SEND_WRITE_ZEROES | P.TF_SEND_FAST_ZERO)
BASE_FLAGS = P.TF_HAS_FLAGS | P.TF_SEND_FLUSH | P.TF_SEND_CACHE | P.TF_CAN_MULTI_CONN


class Closed(Exception):
    """The client ended the conversation (ABORT, DISC or a refused EXPORT_NAME)."""


class Negotiation:
    stream: Any
    ctx: "DoorContext"
    rbuf: bytearray
    cid: int
    peer: str
    tcp: bool
    tls: bool
    no_zeroes: bool
    structured: bool
    meta_export: str | None
    export: "Export | None"

    async def recv_exact(self, n: int) -> bytes:
        raise NotImplementedError

    def _tflags(self, ex: "Export") -> int:
        return BASE_FLAGS | (P.TF_READ_ONLY if ex.read_only else WRITE_FLAGS)

    async def _reply(self, opt: int, rtype: int, data: bytes = b"") -> None:
        await self.stream.send_all(P.option_reply(opt, rtype, data))

    async def _error(self, opt: int, rtype: int, msg: str) -> None:
        log.info("nbd[%d] %s: option %d refused: %s", self.cid, self.peer, opt, msg)
        await self.stream.send_all(P.option_error(opt, rtype, msg))

    async def _resolve(self, name: str) -> "Export":
        return await trio.to_thread.run_sync(self.ctx.resolve, name, limiter=self.ctx.io.flush)

    async def _open(self, name: str) -> "Export":
        """Open the export for this client (a hold on the volume or snapshot through the
        catalog, closed when the connection ends)."""
        ex = await trio.to_thread.run_sync(self.ctx.open, name, self.peer, limiter=self.ctx.io.flush)
        self.export = ex
        log.info("nbd[%d] %s: export %r (%d bytes%s%s)", self.cid, self.peer, ex.name, ex.size,
                 ", read-only" if ex.read_only else "", ", TLS" if self.tls else "")
        return ex

    async def negotiate(self) -> bool:
        await self.stream.send_all(P.server_greeting())
        (cflags,) = struct.unpack(">I", await self.recv_exact(4))
        if cflags & ~P.KNOWN_CLIENT_FLAGS:
            raise P.ProtocolError(f"unknown client flags 0x{cflags:x}")
        if not cflags & P.FLAG_C_FIXED_NEWSTYLE:
            raise P.ProtocolError("client does not speak fixed newstyle")
        self.no_zeroes = bool(cflags & P.FLAG_C_NO_ZEROES)
        for _ in range(MAX_OPTIONS):
            magic, opt, length = P.OPTION_HDR.unpack(await self.recv_exact(P.OPTION_HDR.size))
            if magic != P.IHAVEOPT:
                raise P.ProtocolError(f"bad option magic 0x{magic:x}")
            if length > P.MAX_OPTION_LEN:
                if length > 16 << 20:
                    raise P.ProtocolError(f"option {opt} of {length} bytes")
                while length:                       # skip the payload without keeping it
                    if not self.rbuf:
                        data = await self.stream.receive_some(min(length, 1 << 16))
                        if not data:
                            raise trio.BrokenResourceError("client closed during an option")
                        self.rbuf += data
                    n = min(length, len(self.rbuf))
                    del self.rbuf[:n]
                    length -= n
                await self._error(opt, P.REP_ERR_TOO_BIG, "option too long")
                continue
            data = await self.recv_exact(length)
            if await self.option(opt, data):
                return True
        raise P.ProtocolError(f"more than {MAX_OPTIONS} options")

    async def option(self, opt: int, data: bytes) -> bool:
        """Handle one option; True when transmission starts."""
        gated = self.ctx.tls_required(self.tcp) and not self.tls
        if opt == P.OPT_ABORT:
            try:
                await self._reply(opt, P.REP_ACK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            raise Closed("client aborted the negotiation")
        if opt == P.OPT_STARTTLS:
            await self._starttls(data)
            return False
        if gated and opt in (P.OPT_EXPORT_NAME, P.OPT_LIST, P.OPT_INFO, P.OPT_GO,
                             P.OPT_STRUCTURED_REPLY, P.OPT_LIST_META_CONTEXT,
                             P.OPT_SET_META_CONTEXT):
            if opt == P.OPT_EXPORT_NAME:
                log.warning("nbd[%d] %s: EXPORT_NAME before STARTTLS; closing", self.cid, self.peer)
                raise Closed("TLS required")
            await self._error(opt, P.REP_ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS")
            return False
        if opt == P.OPT_EXPORT_NAME:
            name = data.decode(errors="replace")
            try:
                ex = await self._open(name)
            except OvsfsError as e:
                log.warning("nbd[%d] %s: export %r: %s; closing", self.cid, self.peer, name, e)
                raise Closed(f"export {name!r} refused") from None
            await self.stream.send_all(P.export_name_reply(ex.size, self._tflags(ex), self.no_zeroes))
            return True
        if opt == P.OPT_LIST:
            if data:
                await self._error(opt, P.REP_ERR_INVALID, "LIST takes no data")
                return False
            exports = await trio.to_thread.run_sync(self.ctx.list_exports,
                                                    limiter=self.ctx.io.flush)
            await self.stream.send_all(b"".join(
                P.option_reply(opt, P.REP_SERVER, P.rep_server(n, d)) for n, d in exports)
                + P.option_reply(opt, P.REP_ACK))
            return False
        if opt in (P.OPT_INFO, P.OPT_GO):
            return await self._info(opt, data)
        if opt == P.OPT_STRUCTURED_REPLY:
            if data:
                await self._error(opt, P.REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
                return False
            self.structured = True
            await self._reply(opt, P.REP_ACK)
            return False
        if opt in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
            await self._meta(opt, data)
            return False
        await self._error(opt, P.REP_ERR_UNSUP, f"option {opt} is not supported")
        return False

    async def _starttls(self, data: bytes) -> None:
        opt = P.OPT_STARTTLS
        ctx = self.ctx.ssl_ctx
        if data:
            return await self._error(opt, P.REP_ERR_INVALID, "STARTTLS takes no data")
        if ctx is None:
            return await self._error(opt, P.REP_ERR_UNSUP, "TLS is not configured")
        if self.tls:
            return await self._error(opt, P.REP_ERR_INVALID, "TLS is already on")
        if self.rbuf:
            raise P.ProtocolError("data pipelined after STARTTLS")
        await self._reply(opt, P.REP_ACK)
        tls = trio.SSLStream(self.stream, ctx, server_side=True)
        with trio.fail_after(30):
            await tls.do_handshake()
        self.stream, self.tls = tls, True
        self.structured, self.meta_export = False, None   # forget what was said in clear
        log.info("nbd[%d] %s: TLS on (%s)", self.cid, self.peer, tls.version())

    async def _info(self, opt: int, data: bytes) -> bool:
        try:
            name, wanted = P.parse_info_request(data)
        except ValueError as e:
            await self._error(opt, P.REP_ERR_INVALID, str(e))
            return False
        try:
            ex = await (self._open(name) if opt == P.OPT_GO else self._resolve(name))
        except OvsfsError as e:
            await self._error(opt, P.REP_ERR_UNKNOWN, e.message)
            return False
        cs = ex.block_size
        out = [P.option_reply(opt, P.REP_INFO, P.info_export(ex.size, self._tflags(ex))),
               P.option_reply(opt, P.REP_INFO, P.info_block_size(1, cs, P.MAX_PAYLOAD))]
        if P.INFO_NAME in wanted:
            out.append(P.option_reply(opt, P.REP_INFO, P.info_string(P.INFO_NAME, ex.name)))
        if P.INFO_DESCRIPTION in wanted:
            what = f"snapshot {ex.snapshot} of volume {ex.volume}" if ex.snapshot else \
                f"volume {ex.volume}"
            out.append(P.option_reply(opt, P.REP_INFO, P.info_string(P.INFO_DESCRIPTION, what)))
        out.append(P.option_reply(opt, P.REP_ACK))
        await self.stream.send_all(b"".join(out))
        if opt == P.OPT_GO and self.meta_export is not None and self.meta_export != name:
            self.meta_export = None
        return opt == P.OPT_GO

    async def _meta(self, opt: int, data: bytes) -> None:
        if opt == P.OPT_SET_META_CONTEXT and not self.structured:
            return await self._error(opt, P.REP_ERR_INVALID, "negotiate STRUCTURED_REPLY first")
        try:
            name, queries = P.parse_meta_request(data)
        except ValueError as e:
            return await self._error(opt, P.REP_ERR_INVALID, str(e))
        try:
            await self._resolve(name)
        except OvsfsError as e:
            return await self._error(opt, P.REP_ERR_UNKNOWN, e.message)
        found = P.match_meta(queries, opt == P.OPT_LIST_META_CONTEXT)
        if opt == P.OPT_SET_META_CONTEXT:
            self.meta_export = name if found else None
        await self.stream.send_all(b"".join(
            P.option_reply(opt, P.REP_META_CONTEXT, P.meta_context_reply(CONTEXT_ID, c))
            for c in found) + P.option_reply(opt, P.REP_ACK))
