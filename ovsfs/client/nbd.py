"""A small synchronous NBD client: `openvstorage+tcp:` volumes of other nodes (issue 12,
item 4, until the node-to-node path exists). python3-libnbd is Debian's and not importable
from a venv, hence this. The client library may not import the NBD door (`ovsfs.nbd`, a
higher layer), so the few wire constants it needs are written out here, from the NBD
protocol document (doc/proto.md): fixed newstyle handshake, NBD_OPT_GO, simple replies.

`NbdVolume` has the methods of `VhostVolume` that `open_volume` promises: read / write /
flush / trim / write_zeroes / readv / writev, size, block_size, read_only, close; requests
of readv / writev are pipelined up to `queue_depth`.
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Sequence

from ovsfs.errors import DaemonNotRunning, InvalidArgument, NoSpace, OutOfRange, OvsfsError, ReadOnly

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_GO = 7
REP_ACK, REP_INFO = 1, 3
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3
TF_READ_ONLY, TF_SEND_FLUSH, TF_SEND_TRIM, TF_SEND_WRITE_ZEROES = 1 << 1, 1 << 2, 1 << 5, 1 << 6
REQUEST_MAGIC, SIMPLE_REPLY_MAGIC = 0x25609513, 0x67446698
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6
CMD_FLAG_NO_HOLE = 1 << 1

REQUEST = struct.Struct(">IHHQQI")     # magic, flags, type, handle, offset, length
REPLY = struct.Struct(">IIQ")          # magic, error, handle
OPT_REPLY = struct.Struct(">QIII")     # magic, option, reply type, length


class NbdError(OvsfsError):
    """The NBD server refused the connection or answered out of protocol."""


def _error(code: int, what: str) -> OvsfsError:
    if code == errno.EINVAL:
        return InvalidArgument(f"{what}: invalid argument (NBD EINVAL)")
    if code == errno.ENOSPC:
        return NoSpace(f"{what}: no space (NBD ENOSPC)")
    if code == errno.EPERM:
        return ReadOnly(f"{what}: not permitted (NBD EPERM)")
    e = OvsfsError(f"{what}: {errno.errorcode.get(code, code)} from the NBD server")
    e.errno = code if code else errno.EIO
    return e


class NbdVolume:
    """The export `name` of an NBD server at `address`: (host, port) or a unix socket path.
    Raises DaemonNotRunning when nothing listens, NbdError when the export is refused."""

    def __init__(self, address: tuple[str, int] | str, name: str, *, queue_depth: int = 16,
                 timeout: float = 30.0, max_request_bytes: int = 4 << 20) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.where = f"{address if isinstance(address, str) else f'{address[0]}:{address[1]}'} export {name!r}"
        try:
            self.sock.connect(address)
        except (ConnectionRefusedError, FileNotFoundError) as e:
            self.sock.close()
            raise DaemonNotRunning(f"no NBD server at {self.where}: {e.strerror}") from None
        if family != socket.AF_UNIX:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.queue_depth = max(1, queue_depth)
        self._handle = 0
        try:
            self._handshake(name)
        except BaseException:
            self.sock.close()
            raise
        self.max_request_bytes = min(max_request_bytes, self._max_payload)

    # -- wire --------------------------------------------------------------------------

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except socket.timeout:
                raise NbdError(f"{self.where}: no answer in time") from None
            if not chunk:
                raise NbdError(f"{self.where}: the server closed the connection")
            buf += chunk
        return bytes(buf)

    def _handshake(self, name: str) -> None:
        magic, opt, flags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or opt != IHAVEOPT or not flags & FLAG_FIXED_NEWSTYLE:
            raise NbdError(f"{self.where}: not a fixed-newstyle NBD server")
        self.sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES)))
        raw = name.encode()
        data = struct.pack(">I", len(raw)) + raw + struct.pack(">HH", 1, INFO_BLOCK_SIZE)
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        self.size = -1
        self.block_size = 512
        self._max_payload = 32 << 20
        while True:
            magic, _opt, rtype, length = OPT_REPLY.unpack(self._recv(OPT_REPLY.size))
            body = self._recv(length) if length else b""
            if magic != OPT_REPLY_MAGIC:
                raise NbdError(f"{self.where}: bad option reply")
            if rtype == REP_ACK:
                break
            if rtype & (1 << 31):
                raise NbdError(f"{self.where}: refused: {body[4:].decode(errors='replace') if len(body) > 4 else body.decode(errors='replace')}"
                               if body else f"{self.where}: refused (reply type {rtype:#x})")
            if rtype == REP_INFO and len(body) >= 2:
                info = struct.unpack_from(">H", body)[0]
                if info == INFO_EXPORT:
                    self.size, self.flags = struct.unpack_from(">QH", body, 2)
                elif info == INFO_BLOCK_SIZE:
                    minimum, _pref, maximum = struct.unpack_from(">III", body, 2)
                    self.block_size = max(minimum, 512)
                    self._max_payload = maximum
        if self.size < 0:
            raise NbdError(f"{self.where}: no export information")
        self.read_only = bool(self.flags & TF_READ_ONLY)

    def _send(self, cmd: int, offset: int, length: int, data: bytes | memoryview | None = None, flags: int = 0) -> int:
        self._handle += 1
        head = REQUEST.pack(REQUEST_MAGIC, flags, cmd, self._handle, offset, length)
        if data is not None:
            self.sock.sendall(head)
            self.sock.sendall(data)
        else:
            self.sock.sendall(head)
        return self._handle

    def _reply(self, lengths: dict[int, tuple[int, int, str]], out: dict[int, bytes | OvsfsError]) -> None:
        """Read one reply; its data (reads) or error goes to out[handle]."""
        magic, err, handle = REPLY.unpack(self._recv(REPLY.size))
        if magic != SIMPLE_REPLY_MAGIC or handle not in lengths:
            raise NbdError(f"{self.where}: unexpected reply (magic {magic:#x}, handle {handle})")
        cmd, length, what = lengths.pop(handle)
        if err:
            out[handle] = _error(err, what)
        else:
            out[handle] = self._recv(length) if cmd == CMD_READ else b""

    def _pipeline(self, reqs: Sequence[tuple[int, int, int, bytes | memoryview | None, int]]) -> list[bytes]:
        """Send requests keeping `queue_depth` in flight; their results in order; the
        first error is raised after every reply is in (the connection stays usable)."""
        handles: list[int] = []
        waiting: dict[int, tuple[int, int, str]] = {}
        out: dict[int, bytes | OvsfsError] = {}
        for cmd, offset, length, data, flags in reqs:
            while len(waiting) >= self.queue_depth:
                self._reply(waiting, out)
            h = self._send(cmd, offset, length, data, flags)
            handles.append(h)
            waiting[h] = (cmd, length, f"NBD {cmd} {offset}+{length} on {self.where}")
        while waiting:
            self._reply(waiting, out)
        results = [out[h] for h in handles]
        for r in results:
            if isinstance(r, OvsfsError):
                raise r
        return results  # type: ignore[return-value]

    # -- the volume API ----------------------------------------------------------------

    def _check(self, offset: int, length: int, write: bool) -> None:
        if offset < 0 or length < 0 or offset % 512 or length % 512:
            raise InvalidArgument(f"offset {offset} and length {length} must be multiples of 512")
        if offset + length > self.size:
            raise OutOfRange(f"{offset}+{length} is past the end of the volume ({self.size} bytes)")
        if write and self.read_only:
            raise ReadOnly(f"{self.where} is read-only")

    def _chunks(self, offset: int, length: int) -> list[tuple[int, int]]:
        step = self.max_request_bytes
        return [(offset + o, min(step, length - o)) for o in range(0, length, step)]

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length, False)
        return b"".join(self._pipeline([(CMD_READ, o, n, None, 0) for o, n in self._chunks(offset, length)]))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.writev([(offset, data)])

    def readv(self, extents: Sequence[tuple[int, int]]) -> list[bytes]:
        for o, n in extents:
            self._check(o, n, False)
        return [self.read(o, n) for o, n in extents] if any(n > self.max_request_bytes for _, n in extents) \
            else self._pipeline([(CMD_READ, o, n, None, 0) for o, n in extents])

    def writev(self, writes: Sequence[tuple[int, bytes | bytearray | memoryview]]) -> None:
        reqs = []
        for offset, data in writes:
            mv = memoryview(data).cast("B")
            self._check(offset, len(mv), True)
            reqs += [(CMD_WRITE, o, n, mv[o - offset:o - offset + n], 0) for o, n in self._chunks(offset, len(mv))]
        self._pipeline(reqs)

    def flush(self) -> None:
        if self.flags & TF_SEND_FLUSH:
            self._pipeline([(CMD_FLUSH, 0, 0, None, 0)])

    def trim(self, offset: int, length: int) -> None:
        self._check(offset, length, True)
        if not self.flags & TF_SEND_TRIM:
            raise InvalidArgument(f"{self.where} does not support trim")
        self._pipeline([(CMD_TRIM, o, n, None, 0) for o, n in self._chunks(offset, length)])

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self._check(offset, length, True)
        if not self.flags & TF_SEND_WRITE_ZEROES:
            self.write(offset, bytes(length))
            return
        flags = 0 if unmap else CMD_FLAG_NO_HOLE
        self._pipeline([(CMD_WRITE_ZEROES, o, n, None, flags) for o, n in self._chunks(offset, length)])

    def close(self) -> None:
        try:
            self.sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> "NbdVolume":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
