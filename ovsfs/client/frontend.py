"""The vhost-user front end ("master"): what QEMU does for a vhost-user device, in Python.

`Frontend(socket_path)` connects to a vhost-user back end (the daemon's shm door, or
qemu-storage-daemon's vhost-user-blk export), shares one memfd with it, negotiates
features and sets queues up (QEMU docs/interop/vhost-user.rst, "Starting the device"):

    GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_OWNER,
    GET_CONFIG, SET_FEATURES, SET_MEM_TABLE (the memfd), and for each queue
    SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_CALL, SET_VRING_KICK,
    SET_VRING_ENABLE.

`start()` does all of it; each step is also a method, and `send()` / `recv()` move raw
messages with file descriptors, so tests can speak out of turn. It is synchronous (a
blocking socket with a timeout): a library for tools, tests and benchmarks.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ovsfs.client.virtqueue import UADDR_BASE, DriverQueue, SharedMemory
from ovsfs.errors import Busy, DaemonNotRunning, InvalidArgument, NotFound, OvsfsError
from ovsfs.vhost import protocol as vp

__all__ = ["Frontend", "DriverQueue", "Message", "VhostError", "WANTED_FEATURES", "WANTED_PROTOCOL"]

# Device features we can drive (virtio-blk + ring features). CONFIG_WCE is left out: the
# cache mode is the back end's business (always writeback + FLUSH).
WANTED_FEATURES = vp.bits(vp.F_VERSION_1, vp.F_PROTOCOL_FEATURES, vp.RING_F_INDIRECT_DESC,
                          vp.RING_F_EVENT_IDX, vp.BLK_F_SIZE_MAX, vp.BLK_F_SEG_MAX,
                          vp.BLK_F_BLK_SIZE, vp.BLK_F_TOPOLOGY, vp.BLK_F_FLUSH, vp.BLK_F_MQ,
                          vp.BLK_F_DISCARD, vp.BLK_F_WRITE_ZEROES, vp.BLK_F_RO)
WANTED_PROTOCOL = vp.bits(vp.PF_MQ, vp.PF_REPLY_ACK, vp.PF_CONFIG)


UNIX_PATH_MAX = 107     # bytes of a unix socket path (sun_path is 108 with its NUL)


class VhostError(OvsfsError):
    """The back end refused a message, answered out of protocol, or went away."""


@dataclass
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    def u64(self) -> int:
        if len(self.payload) < 8:
            raise VhostError(f"{vp.name(self.request)} reply of {len(self.payload)} bytes, expected 8")
        return vp.U64.unpack_from(self.payload)[0]


class Frontend:
    """One vhost-user connection and the memory shared over it.

    `memory_bytes`: size of the memfd (sparse: only what is touched costs memory).
    `timeout`: seconds to wait for the back end's replies (VhostError past it).
    `busy_wait`: seconds to keep trying while the back end still serves a previous front
    end (it closes a second connection at once).
    (a missing socket is waited for as long: the door makes a new volume's socket up to a
    second after `volume create`).
    `sealed_memory`: seal the memfd against shrinking and growing (the shm door refuses an
    unsealed one); False only for tests of back ends.
    Raises DaemonNotRunning when the daemon is not there, NotFound when it is but the
    socket is not (no such volume, or the shm door is off), InvalidArgument for a socket
    path too long for a unix socket, Busy when another front end holds the volume."""

    def __init__(self, socket_path: str | os.PathLike[str], *, memory_bytes: int = 64 << 20,
                 timeout: float = 10.0, busy_wait: float = 3.0, sealed_memory: bool = True) -> None:
        self.path = Path(socket_path)
        self.timeout = timeout
        self.busy_wait = busy_wait
        n = len(os.fsencode(self.path))
        if n > UNIX_PATH_MAX:
            raise InvalidArgument(f"socket path {self.path} is {n} bytes; a unix socket path has at most "
                                  f"{UNIX_PATH_MAX} (use a shorter volume name or [shm] socket_dir)")
        self.sock = self._connect()
        self.mem = SharedMemory(memory_bytes, sealed=sealed_memory)
        self.device_features = 0
        self.features = 0               # negotiated (what SET_FEATURES said)
        self.protocol_features = 0      # negotiated
        self.max_queues = 1             # GET_QUEUE_NUM (with PF_MQ)
        self.config = b""               # GET_CONFIG's bytes
        self.queues: dict[int, DriverQueue] = {}
        self._closed = False

    def _connect(self) -> socket.socket:
        """A connected socket. A socket file that is missing or refuses connections is tried
        again for `busy_wait` seconds (a volume just created, a back end between bind and
        listen, or re-making its socket); then DaemonNotRunning or NotFound (see the class)."""
        deadline = time.monotonic() + self.busy_wait
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(self.path))
                return sock
            except ConnectionRefusedError as e:
                sock.close()
                if time.monotonic() > deadline:
                    raise DaemonNotRunning(f"no vhost-user back end listens on {self.path}: {e.strerror}") from None
                time.sleep(0.02)
            except FileNotFoundError as e:
                sock.close()
                if time.monotonic() > deadline:
                    raise self._missing(e) from None
                time.sleep(0.02)
            except OSError:
                sock.close()
                raise

    def _missing(self, e: OSError) -> OvsfsError:
        """The error for a socket that never appeared: NotFound when the daemon answers (its
        management socket STATE/run/ovsfs.sock next to the socket directory, or another
        volume's socket), else DaemonNotRunning."""
        sock_dir = self.path.parent
        probes = [sock_dir.parent / "ovsfs.sock"]
        try:
            probes += sorted(sock_dir.glob("*.sock"))[:4]
        except OSError:
            pass
        for probe in probes:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                try:
                    s.connect(str(probe))
                except OSError:
                    continue
            name = self.path.name.removesuffix(".sock")
            return NotFound(f"no socket for volume {name} at {self.path}: no such volume on this node, "
                            "or the shm door is off")
        return DaemonNotRunning(f"no vhost-user back end listens on {self.path}: {e.strerror} "
                                "(is the daemon running?)")

    # -- raw messages ------------------------------------------------------------------

    def send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), flags: int = vp.VERSION) -> None:
        """One message as given (any request number, flags and fds)."""
        data = vp.encode(request, payload, flags)
        try:
            if fds:
                self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            else:
                self.sock.sendall(data)
        except OSError as e:
            raise VhostError(f"sending {vp.name(request)} to {self.path}: {e.strerror or e}") from None

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Bytes as given, no header added (for malformed messages)."""
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([data], anc)

    def _recv_exact(self, n: int, fds: list[int]) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(n - len(buf), socket.CMSG_SPACE(4 * vp.MAX_FDS))
            except socket.timeout:
                raise VhostError(f"no reply from {self.path} within {self.timeout} s") from None
            except OSError as e:
                raise VhostError(f"reading from {self.path}: {e.strerror or e}") from None
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(cdata[:len(cdata) - len(cdata) % a.itemsize])
                    fds.extend(a)
            if not data:
                raise VhostError(f"{self.path}: the back end closed the connection")
            buf += data
        return bytes(buf)

    def recv(self) -> Message:
        """The next message from the back end (VhostError on timeout or EOF)."""
        fds: list[int] = []
        header = self._recv_exact(vp.HEADER.size, fds)
        try:
            request, flags, size = vp.decode_header(header)
        except ValueError as e:
            raise VhostError(f"{self.path}: malformed reply header: {e}") from None
        payload = self._recv_exact(size, fds) if size else b""
        return Message(request, flags, payload, fds)

    def _reply_to(self, request: int) -> Message:
        msg = self.recv()
        if msg.request != request or not msg.flags & vp.FLAG_REPLY:
            for fd in msg.fds:
                os.close(fd)
            raise VhostError(f"{self.path}: expected the reply to {vp.name(request)}, "
                             f"got {vp.name(msg.request)} (flags {msg.flags:#x})")
        return msg

    def call(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *, ack: bool | None = None) -> Message | None:
        """Send a request and read its reply: always for the GET_* requests, and for the
        others when REPLY_ACK is negotiated (`ack` None) or asked (`ack` True); a non-zero
        ack raises VhostError."""
        if ack is None:
            ack = bool(self.protocol_features & vp.bits(vp.PF_REPLY_ACK))
        always = request in vp.ALWAYS_REPLY
        flags = vp.VERSION | (vp.FLAG_NEED_REPLY if ack and not always else 0)
        self.send(request, payload, fds, flags)
        if always:
            return self._reply_to(request)
        if ack:
            status = self._reply_to(request).u64()
            if status:
                raise VhostError(f"{self.path}: the back end refused {vp.name(request)} (status {status})")
        return None

    # -- negotiation -------------------------------------------------------------------

    def has(self, feature_bit: int) -> bool:
        return bool(self.features >> feature_bit & 1)

    def negotiate(self, features: int = WANTED_FEATURES, protocol_features: int = WANTED_PROTOCOL) -> None:
        """GET/SET features and protocol features, GET_QUEUE_NUM, SET_OWNER, GET_CONFIG.
        `features`: the device features we accept (those offered are kept).
        VhostError if the back end lacks VERSION_1."""
        self.device_features = self._first_features()
        if not self.device_features >> vp.F_VERSION_1 & 1:
            raise VhostError(f"{self.path}: the back end offers no VIRTIO_F_VERSION_1")
        if self.device_features >> vp.F_PROTOCOL_FEATURES & 1 and features >> vp.F_PROTOCOL_FEATURES & 1:
            offered = self.call(vp.GET_PROTOCOL_FEATURES).u64()  # type: ignore[union-attr]
            pf = offered & protocol_features
            self.call(vp.SET_PROTOCOL_FEATURES, vp.U64.pack(pf), ack=False)
            self.protocol_features = pf
            if pf & vp.bits(vp.PF_MQ):
                self.max_queues = self.call(vp.GET_QUEUE_NUM).u64()  # type: ignore[union-attr]
        self.call(vp.SET_OWNER)
        if self.protocol_features & vp.bits(vp.PF_CONFIG):
            self.config = self.get_config(0, vp.BLK_CONFIG.size)
        self.features = self.device_features & features
        self.call(vp.SET_FEATURES, vp.U64.pack(self.features))

    def _first_features(self) -> int:
        """GET_FEATURES, the first exchange. A back end serves one front end at a time and
        closes any other connection at once; the previous front end (ours, just closed,
        or a QEMU restarting) may still be going away, so for `busy_wait` seconds a
        connection closed before this answer is made again."""
        deadline = time.monotonic() + self.busy_wait
        while True:
            try:
                return self.call(vp.GET_FEATURES).u64()  # type: ignore[union-attr]
            except VhostError:
                if not self.connection_lost():
                    raise
                if time.monotonic() > deadline:
                    name = self.path.name.removesuffix(".sock")
                    raise Busy(f"{name} is in use by another front end (one at a time): {self.path} "
                               f"closed our connection for {self.busy_wait} s") from None
            time.sleep(0.02)
            self.sock.close()
            self.sock = self._connect()

    def get_config(self, offset: int, size: int) -> bytes:
        """GET_CONFIG: `size` bytes of the device config from `offset`."""
        reply = self.call(vp.GET_CONFIG, vp.CONFIG_HEADER.pack(offset, size, 0) + bytes(size))
        assert reply is not None
        if len(reply.payload) < vp.CONFIG_HEADER.size + size:
            raise VhostError(f"{self.path}: GET_CONFIG refused ({len(reply.payload)} bytes of reply)")
        return reply.payload[vp.CONFIG_HEADER.size:vp.CONFIG_HEADER.size + size]

    def set_mem_table(self) -> None:
        """SET_MEM_TABLE: our memfd as one region at gpa 0."""
        region = vp.Region(gpa=0, size=self.mem.size, uaddr=UADDR_BASE, offset=0)
        self.call(vp.SET_MEM_TABLE, vp.encode_mem_table([region]), [self.mem.fd])

    def setup_queue(self, index: int, num: int, *, enable: bool = True) -> DriverQueue:
        """Allocate queue `index` with `num` entries in shared memory and hand it to the
        back end (NUM, BASE 0, ADDR, CALL, KICK, ENABLE). InvalidArgument if num is not a
        power of two (use `send` to give the back end a bad size anyway)."""
        try:
            q = DriverQueue(self.mem, index, num, event_idx=self.has(vp.RING_F_EVENT_IDX))
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        self.queues[index] = q
        self.call(vp.SET_VRING_NUM, vp.VRING_STATE.pack(index, num))
        self.call(vp.SET_VRING_BASE, vp.VRING_STATE.pack(index, 0))
        desc, used, avail = q.addresses
        self.call(vp.SET_VRING_ADDR, vp.VRING_ADDR.pack(index, 0, desc, used, avail, 0))
        self.call(vp.SET_VRING_CALL, vp.U64.pack(index), [q.call_fd])
        self.call(vp.SET_VRING_KICK, vp.U64.pack(index), [q.kick_fd])
        if enable and self.has(vp.F_PROTOCOL_FEATURES):
            self.call(vp.SET_VRING_ENABLE, vp.VRING_STATE.pack(index, 1))
        return q

    def get_vring_base(self, index: int) -> int:
        """GET_VRING_BASE: stops queue `index` and returns the back end's next available
        index for it (how many entries it took off the ring, mod 65536)."""
        reply = self.call(vp.GET_VRING_BASE, vp.VRING_STATE.pack(index, 0))
        assert reply is not None
        if len(reply.payload) < vp.VRING_STATE.size:
            raise VhostError(f"{self.path}: GET_VRING_BASE reply of {len(reply.payload)} bytes")
        got_index, num = vp.VRING_STATE.unpack_from(reply.payload)
        if got_index != index:
            raise VhostError(f"{self.path}: GET_VRING_BASE answered for queue {got_index}, not {index}")
        return num

    def start(self, num_queues: int = 1, queue_size: int = 128, *, features: int = WANTED_FEATURES,
              protocol_features: int = WANTED_PROTOCOL) -> "Frontend":
        """Negotiate, share the memory and set up `num_queues` queues (fewer if the device
        has fewer) of `queue_size` entries. Returns self."""
        self.negotiate(features, protocol_features)
        self.set_mem_table()
        for i in range(max(1, min(num_queues, self.queue_limit()))):
            self.setup_queue(i, queue_size)
        return self

    def queue_limit(self) -> int:
        """How many queues the device has: GET_QUEUE_NUM, and the virtio-blk config's
        num_queues when BLK_F_MQ is negotiated (one queue without it)."""
        limit = self.max_queues
        if self.has(vp.BLK_F_MQ) and len(self.config) >= vp.BLK_CONFIG.size:
            limit = min(limit, max(1, vp.BlkConfig.decode(self.config).num_queues))
        else:
            limit = 1
        return limit

    # -- using it ----------------------------------------------------------------------

    def queue(self, index: int) -> DriverQueue:
        return self.queues[index]

    def buffer(self, nbytes: int, align: int = 64) -> tuple[int, memoryview]:
        """A block of shared memory: (gpa, a view of its nbytes)."""
        gpa = self.mem.alloc(nbytes, align)
        return gpa, self.mem.view[gpa:gpa + nbytes]

    def free(self, gpa: int) -> None:
        self.mem.free(gpa)

    def connection_lost(self) -> bool:
        """True when the back end closed the connection (checked without blocking)."""
        try:
            data = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError as e:
            return e.errno in (errno.ECONNRESET, errno.EPIPE, errno.EBADF)
        return data == b""

    def close(self) -> None:
        """Close the connection (the back end stops the queues) and free the memory."""
        if self._closed:
            return
        self._closed = True
        self.sock.close()
        for q in self.queues.values():
            q.close()
        self.mem.close()

    def __enter__(self) -> "Frontend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
