"""One vhost-user connection: the message loop, feature negotiation, memory and queue state.

vhost-user.rst: "Message specification" (12-byte header, payload, fds as SCM_RIGHTS),
"Front-end message types" (each handler below), "Ring states" (a ring starts with
SET_VRING_KICK and stops with GET_VRING_BASE), "Multiple queue support", "Protocol
features" (we offer MQ, REPLY_ACK, CONFIG, RESET_DEVICE). With REPLY_ACK a message with
FLAG_NEED_REPLY is answered with a u64: 0 done, 1 failed.

Anything malformed (a bad header or payload, a ring size that is not a power of two or is
larger than shm.queue_size, an index past shm.num_queues, addresses outside the memory
table, a malformed descriptor chain on a ring, fds missing or in excess, a message the
back end did not offer) ends the connection with one log line: the front end may connect
again (QEMU reconnects), nothing else on the node is touched.

The front end's fds are checked before any other call on them, as a call on a file of the
daemon's own FUSE mount would wait on the daemon itself: kick, call and err fds must be
eventfds (readlink of /proc/self/fd/N, which never reaches a filesystem), memory fds
sealed memfds (memory.check_memory_fd). Anything else drops the connection.

The volume is opened (its hold taken) at the front end's first message, not at connect:
a front end that connects and says nothing holds nothing. A front end must have asked for
the device's config (GET_CONFIG, which QEMU does when it attaches, even paused) or sent
its memory table within [shm] handshake_timeout seconds of connecting, else it is dropped:
it would keep the volume's socket (one front end at a time) busy for nothing.
"""

from __future__ import annotations

import array
import fcntl
import logging
import math
import os
import socket
import struct
import threading
from typing import Any, Callable

import trio

from ovsfs.doors.adapter import DoorIO
from ovsfs.errors import InvalidArgument, OvsfsError, first_leaf
from ovsfs.shm import blk
from ovsfs.shm.memory import GuestMemory
from ovsfs.shm.queues import QueueRunner
from ovsfs.shm.vring import Vring
from ovsfs.vhost import protocol as P
from ovsfs.vhost import virtq

log = logging.getLogger("ovsfs.shm")

FD_BYTES = array.array("i").itemsize


class ProtocolError(InvalidArgument):
    """The front end broke the vhost-user protocol: the connection is dropped."""


class Session:
    """A front end on one volume socket, with the volume handle opened for it."""

    def __init__(self, sock: trio.socket.SocketType, opener: Callable[[], Any], io: DoorIO,
                 limits: blk.Limits, queue_size: int, batches: int, label: str,
                 handshake_timeout: float = 10.0, allow_unsealed: bool = False) -> None:
        """`opener` opens the volume (blocking: run in a worker thread; OvsfsError when
        it cannot be opened), at the first message; run() closes it when the front end goes."""
        self.sock = sock
        self.opener = opener
        self.handle: Any = None
        self.handshake_timeout = handshake_timeout
        self.allow_unsealed = allow_unsealed
        self._handshake = trio.CancelScope()
        self.io = io
        self.limits = limits
        self.queue_size = queue_size
        self.batches = batches
        self.label = label
        self.read_only = False
        self.features = 0
        self.protocol_features = 0
        self.mem: GuestMemory | None = None
        self.rings = [Vring(i) for i in range(limits.num_queues)]
        self.runners: dict[int, QueueRunner] = {}
        self.serial = b""
        self._nursery: trio.Nursery | None = None

    # ---- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        """Serve messages until the front end goes or breaks the protocol (logged)."""
        self._handshake.deadline = trio.current_time() + self.handshake_timeout
        try:
            with self._handshake:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    try:
                        while True:
                            msg = await self._recv()
                            if msg is None:
                                log.info("%s: front end disconnected", self.label)
                                break
                            request, flags, payload, fds = msg
                            try:
                                if self.handle is None:
                                    await self._open()
                                await self._dispatch(request, flags, payload, fds)
                            finally:
                                _close_all(fds)
                    finally:
                        nursery.cancel_scope.cancel()
        except (InvalidArgument, OSError, ValueError) as e:   # ProtocolError, ChainError, ...
            reason = getattr(e, "message", None) or str(e)
            log.warning("%s: dropping the front end: %s", self.label, reason)
        except BaseExceptionGroup as eg:
            leaf = first_leaf(eg)
            if not isinstance(leaf, (InvalidArgument, OSError, ValueError)):
                raise
            log.warning("%s: dropping the front end: %s", self.label,
                        getattr(leaf, "message", None) or str(leaf))
        finally:
            self._reset_rings()
            if self.mem is not None:
                self.mem.close()
                self.mem = None
            if self.handle is not None:
                with trio.CancelScope(shield=True):
                    try:
                        await trio.to_thread.run_sync(self.handle.close)
                    except Exception as e:     # the volume failed meanwhile: nothing to keep
                        log.warning("%s: closing the volume: %s", self.label, e)
                self.handle = None
        if self._handshake.cancelled_caught:
            log.warning("%s: dropping the front end: no GET_CONFIG or SET_MEM_TABLE within %g s of "
                        "connecting (shm.handshake_timeout)", self.label, self.handshake_timeout)

    async def _open(self) -> None:
        """Open the volume for this front end (OvsfsError, an InvalidArgument or not, ends
        the connection with a log line: raised as ProtocolError)."""
        try:
            handle = await trio.to_thread.run_sync(self.opener)
        except OvsfsError as e:
            raise ProtocolError(f"cannot open the volume: {e.message}") from None
        self.handle = handle
        self.read_only = bool(handle.caps.read_only)
        self.serial = handle.name.encode()[:P.ID_BYTES]

    def _handshake_done(self) -> None:
        self._handshake.deadline = math.inf

    async def _recv(self) -> tuple[int, int, bytes, list[int]] | None:
        """One message (request, flags, payload, fds); None at a clean end of stream."""
        fds: list[int] = []
        try:
            raw = await self._recv_exact(P.HEADER.size, fds, eof_ok=True)
            if raw is None:
                return None
            try:
                request, flags, size = P.decode_header(raw)
            except (ValueError, struct.error) as e:
                raise ProtocolError(f"malformed message header: {e}") from None
            payload = await self._recv_exact(size, fds, eof_ok=False) if size else b""
            assert payload is not None
            return request, flags, payload, fds
        except BaseException:
            _close_all(fds)
            raise

    async def _recv_exact(self, n: int, fds: list[int], eof_ok: bool) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            data, anc, mflags, _addr = await self.sock.recvmsg(n - len(buf),
                                                               socket.CMSG_SPACE(P.MAX_FDS * FD_BYTES))
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(cdata[:len(cdata) - len(cdata) % FD_BYTES])
                    fds.extend(got)
            if mflags & socket.MSG_CTRUNC:
                raise ProtocolError(f"more than {P.MAX_FDS} fds with one message")
            if not data:
                if eof_ok and not buf:
                    return None
                raise ProtocolError("the front end went away in the middle of a message")
            buf += data
        return bytes(buf)

    async def _send(self, request: int, payload: bytes) -> None:
        out = memoryview(P.encode(request, payload, P.VERSION | P.FLAG_REPLY))
        while out:
            sent = await self.sock.send(out)
            out = out[sent:]

    # ---- dispatch ----------------------------------------------------------------------

    async def _dispatch(self, request: int, flags: int, payload: bytes, fds: list[int]) -> None:
        handler = _HANDLERS.get(request)
        if handler is None:
            raise ProtocolError(f"{P.name(request)} is not supported by this back end")
        ack = (flags & P.FLAG_NEED_REPLY and self.protocol_features & P.bits(P.PF_REPLY_ACK)
               and request not in P.ALWAYS_REPLY)
        try:
            reply = await handler(self, payload, fds)
        except (InvalidArgument, ValueError) as e:
            if ack:
                await self._send(request, P.U64.pack(1))
            if isinstance(e, InvalidArgument):
                raise
            raise ProtocolError(f"{P.name(request)}: {e}") from None
        if reply is not None:
            await self._send(request, reply)
        elif ack:
            await self._send(request, P.U64.pack(0))

    def _ring(self, index: int) -> Vring:
        if not 0 <= index < len(self.rings):
            raise ProtocolError(f"queue {index} past the {len(self.rings)} queues offered (shm.num_queues)")
        return self.rings[index]

    @staticmethod
    def _payload(payload: bytes, size: int, what: str) -> bytes:
        if len(payload) < size:
            raise ProtocolError(f"{what}: payload of {len(payload)} bytes, {size} expected")
        return payload

    # ---- rings -------------------------------------------------------------------------

    async def _stop(self, r: Vring) -> None:
        """Stop serving a ring; requests it abandoned (still not done after the drain) are
        given back: last_avail moves back over them, so that they are taken again."""
        runner = self.runners.pop(r.index, None)
        if runner is not None:
            abandoned = await runner.stop()
            r.last_avail = (r.last_avail - abandoned) & 0xFFFF

    def _start(self, r: Vring) -> None:
        """Serve a ring once it has everything (rings start with their kick fd)."""
        if r.index in self.runners or not r.ready or self._nursery is None:
            return
        runner = QueueRunner(r, self.io, self.handle, self.limits, self.serial, self.batches,
                             self.label)
        self.runners[r.index] = runner
        self._nursery.start_soon(runner.run)

    def _reset_rings(self) -> None:
        for runner in self.runners.values():
            runner.scope.cancel()
        self.runners.clear()
        for r in self.rings:
            r.unmap()
            r.close_fds()
        self.rings = [Vring(i) for i in range(len(self.rings))]

    async def _changing(self, r: Vring) -> None:
        """Before a ring's set-up changes: a running ring stops (its requests drain)."""
        await self._stop(r)

    # ---- handlers (vhost-user.rst "Front-end message types") ----------------------------

    async def get_features(self, payload: bytes, fds: list[int]) -> bytes:
        return P.U64.pack(blk.features(self.read_only))

    async def set_features(self, payload: bytes, fds: list[int]) -> None:
        want = P.U64.unpack_from(self._payload(payload, 8, "SET_FEATURES"))[0]
        extra = want & ~blk.features(self.read_only)
        if extra:
            raise ProtocolError(f"SET_FEATURES {want:#x} has bits not offered ({extra:#x})")
        self.features = want
        for r in self.rings:
            r.event_idx = bool(want & P.bits(P.RING_F_EVENT_IDX))
            if not want & P.bits(P.F_PROTOCOL_FEATURES):
                r.enabled = True     # without protocol features rings start enabled

    async def get_protocol_features(self, payload: bytes, fds: list[int]) -> bytes:
        return P.U64.pack(blk.PROTOCOL_FEATURES)

    async def set_protocol_features(self, payload: bytes, fds: list[int]) -> None:
        want = P.U64.unpack_from(self._payload(payload, 8, "SET_PROTOCOL_FEATURES"))[0]
        self.protocol_features = want & blk.PROTOCOL_FEATURES

    async def set_owner(self, payload: bytes, fds: list[int]) -> None:
        return None

    async def reset(self, payload: bytes, fds: list[int]) -> None:
        """RESET_OWNER / RESET_DEVICE: every ring stopped and forgotten."""
        for r in self.rings:
            await self._stop(r)
        self._reset_rings()
        for r in self.rings:
            r.event_idx = bool(self.features & P.bits(P.RING_F_EVENT_IDX))
            r.map(self.mem)

    async def get_queue_num(self, payload: bytes, fds: list[int]) -> bytes:
        return P.U64.pack(len(self.rings))

    async def set_mem_table(self, payload: bytes, fds: list[int]) -> None:
        try:
            regions = P.decode_mem_table(payload)
        except (ValueError, struct.error) as e:
            raise ProtocolError(f"SET_MEM_TABLE: {e}") from None
        if len(fds) != len(regions):
            raise ProtocolError(f"SET_MEM_TABLE: {len(regions)} regions with {len(fds)} fds")
        mem = GuestMemory(regions, fds, self.allow_unsealed)
        self._handshake_done()
        running = [r for r in self.rings if r.index in self.runners]
        for r in running:
            await self._stop(r)
        old, self.mem = self.mem, mem
        for r in self.rings:
            r.map(mem)
        if old is not None:
            old.close()
        for r in self.rings:
            self._start(r)

    async def set_vring_num(self, payload: bytes, fds: list[int]) -> None:
        index, num = P.VRING_STATE.unpack_from(self._payload(payload, 8, "SET_VRING_NUM"))
        r = self._ring(index)
        try:
            virtq.check_size(num)
        except ValueError as e:
            raise ProtocolError(f"SET_VRING_NUM: {e}") from None
        if num > self.queue_size:
            raise ProtocolError(f"SET_VRING_NUM: {num} entries, more than shm.queue_size = {self.queue_size}")
        await self._changing(r)
        r.num = num
        r.map(self.mem)

    async def set_vring_addr(self, payload: bytes, fds: list[int]) -> None:
        index, _flags, desc, used, avail, _log = P.VRING_ADDR.unpack_from(
            self._payload(payload, P.VRING_ADDR.size, "SET_VRING_ADDR"))
        r = self._ring(index)
        await self._changing(r)
        r.addrs = (desc, avail, used)
        r.map(self.mem)
        self._start(r)

    async def set_vring_base(self, payload: bytes, fds: list[int]) -> None:
        index, num = P.VRING_STATE.unpack_from(self._payload(payload, 8, "SET_VRING_BASE"))
        r = self._ring(index)
        await self._changing(r)
        r.last_avail = num & 0xFFFF

    async def get_vring_base(self, payload: bytes, fds: list[int]) -> bytes:
        index, _num = P.VRING_STATE.unpack_from(self._payload(payload, 8, "GET_VRING_BASE"))
        r = self._ring(index)
        await self._stop(r)
        base = r.last_avail
        # A stopped ring forgets its fds (libvhost-user does the same); QEMU sends them again.
        r.close_fds()
        r.enabled = not self.features & P.bits(P.F_PROTOCOL_FEATURES)
        return P.VRING_STATE.pack(index, base)

    async def _vring_fd(self, payload: bytes, fds: list[int], what: str) -> tuple[Vring, int | None]:
        u = P.U64.unpack_from(self._payload(payload, 8, what))[0]
        r = self._ring(u & P.VRING_FD_INDEX_MASK)
        if u & P.VRING_FD_NOFD:
            if fds:
                raise ProtocolError(f"{what}: an fd with the no-fd flag")
            return r, None
        if len(fds) != 1:
            raise ProtocolError(f"{what}: {len(fds)} fds, one expected")
        fd = fds.pop()
        try:
            _check_eventfd(fd, what)
        except BaseException:
            _close_all([fd])
            raise
        return r, fd

    async def set_vring_kick(self, payload: bytes, fds: list[int]) -> None:
        r, fd = await self._vring_fd(payload, fds, "SET_VRING_KICK")
        if fd is None:
            raise ProtocolError("SET_VRING_KICK without an fd: polling mode is not offered")
        await self._changing(r)
        if r.kick_fd is not None:
            os.close(r.kick_fd)
        os.set_blocking(fd, False)
        r.kick_fd = fd
        self._start(r)

    async def set_vring_call(self, payload: bytes, fds: list[int]) -> None:
        r, fd = await self._vring_fd(payload, fds, "SET_VRING_CALL")
        if r.call_fd is not None:
            os.close(r.call_fd)
        if fd is not None:
            os.set_blocking(fd, False)
        r.call_fd = fd        # a running ring signals the new fd from its next completion

    async def set_vring_err(self, payload: bytes, fds: list[int]) -> None:
        r, fd = await self._vring_fd(payload, fds, "SET_VRING_ERR")
        if r.err_fd is not None:
            os.close(r.err_fd)
        r.err_fd = fd

    async def set_vring_enable(self, payload: bytes, fds: list[int]) -> None:
        index, enable = P.VRING_STATE.unpack_from(self._payload(payload, 8, "SET_VRING_ENABLE"))
        self._ring(index).enabled = bool(enable)

    async def get_config(self, payload: bytes, fds: list[int]) -> bytes:
        offset, size, flags = P.CONFIG_HEADER.unpack_from(
            self._payload(payload, P.CONFIG_HEADER.size, "GET_CONFIG"))
        if offset + size > 256 or len(payload) < P.CONFIG_HEADER.size + size:
            raise ProtocolError(f"GET_CONFIG of {size} bytes at {offset}")
        cfg = await trio.to_thread.run_sync(lambda: blk.config(self.handle, self.limits).encode())
        data = cfg[offset:offset + size].ljust(size, b"\0")
        self._handshake_done()
        return P.CONFIG_HEADER.pack(offset, size, flags) + data

    async def set_config(self, payload: bytes, fds: list[int]) -> None:
        return None     # only `writeback` is writable, and CONFIG_WCE is not offered

    async def set_backend_req_fd(self, payload: bytes, fds: list[int]) -> None:
        return None     # not offered; the fd is closed with the message


def _check_eventfd(fd: int, what: str) -> None:
    """ProtocolError unless `fd` is an eventfd. Checked before any other call on it: a
    write to (or poll of) a file on the daemon's own FUSE mount would wait on the daemon.
    readlink of /proc/self/fd/N names the fd without calling into its filesystem."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        raise ProtocolError(f"{what}: fd {fd}: {e.strerror}") from None
    if target != "anon_inode:[eventfd]":
        raise ProtocolError(f"{what}: the fd is not an eventfd ({target})")


def _close_all(fds: list[int]) -> None:
    """Close the front end's fds. close(2) of a file on a FUSE mount waits for the FUSE
    server's FLUSH answer: on the daemon's own mount that is this very event loop, so
    anything but an eventfd, pipe, socket or memfd is closed in a thread of its own."""
    while fds:
        fd = fds.pop()
        if _closes_at_once(fd):
            try:
                os.close(fd)
            except OSError:
                pass
        else:
            threading.Thread(target=_close_quietly, args=(fd,), name="shm-close", daemon=True).start()


def _closes_at_once(fd: int) -> bool:
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return True
    if target.startswith(("anon_inode:", "pipe:", "socket:")):
        return True
    try:
        fcntl.fcntl(fd, fcntl.F_GET_SEALS)    # shmem / hugetlbfs: no FLUSH on close
        return True
    except OSError:
        return False


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


_HANDLERS: dict[int, Any] = {
    P.GET_FEATURES: Session.get_features,
    P.SET_FEATURES: Session.set_features,
    P.GET_PROTOCOL_FEATURES: Session.get_protocol_features,
    P.SET_PROTOCOL_FEATURES: Session.set_protocol_features,
    P.SET_OWNER: Session.set_owner,
    P.RESET_OWNER: Session.reset,
    P.RESET_DEVICE: Session.reset,
    P.GET_QUEUE_NUM: Session.get_queue_num,
    P.SET_MEM_TABLE: Session.set_mem_table,
    P.SET_VRING_NUM: Session.set_vring_num,
    P.SET_VRING_ADDR: Session.set_vring_addr,
    P.SET_VRING_BASE: Session.set_vring_base,
    P.GET_VRING_BASE: Session.get_vring_base,
    P.SET_VRING_KICK: Session.set_vring_kick,
    P.SET_VRING_CALL: Session.set_vring_call,
    P.SET_VRING_ERR: Session.set_vring_err,
    P.SET_VRING_ENABLE: Session.set_vring_enable,
    P.GET_CONFIG: Session.get_config,
    P.SET_CONFIG: Session.set_config,
    P.SET_BACKEND_REQ_FD: Session.set_backend_req_fd,
}
