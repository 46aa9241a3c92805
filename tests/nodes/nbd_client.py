"""A small blocking NBD client for cluster tests that says exactly what happened to each
request (acknowledged, refused with an NBD error, or the connection gone)."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

from ovsfs.nbd import protocol as P
from tests.conftest import Daemon

KiB = 4096


class Nbd:
    """A blocking NBD client (simple replies): `write`/`read`/`flush` return the NBD error
    (0 = acknowledged); a closed connection counts as an error (EOF), never as success."""

    EOF = -1

    def __init__(self, socket_path: Path, export: str, timeout: float = 30.0) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(timeout)
        self.s.connect(str(socket_path))
        self.dead = False
        magic, opt, _flags = struct.unpack(">QQH", self._recv(18))
        assert magic == P.NBDMAGIC and opt == P.IHAVEOPT
        self.s.sendall(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES))
        e = export.encode()
        self.s.sendall(P.OPTION_HDR.pack(P.IHAVEOPT, P.OPT_GO, 4 + len(e) + 2)
                       + struct.pack(">I", len(e)) + e + struct.pack(">H", 0))
        while True:
            magic, _opt, rtype, n = P.OPTION_REPLY.unpack(self._recv(P.OPTION_REPLY.size))
            data = self._recv(n)
            if rtype & (1 << 31):
                self.close()
                raise LookupError(f"GO {export} refused: 0x{rtype:x} {data!r}")
            if rtype == P.REP_ACK:
                return

    def _recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            d = self.s.recv(n - len(out))
            if not d:
                raise EOFError(f"closed after {len(out)} of {n} bytes")
            out += d
        return out

    def _call(self, typ: int, offset: int, length: int, data: bytes = b"") -> tuple[int, bytes]:
        if self.dead:
            return self.EOF, b""
        try:
            self.s.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, typ, 7, offset, length) + data)
            magic, err, cookie = struct.unpack(">IIQ", self._recv(16))
            assert magic == P.SIMPLE_REPLY_MAGIC and cookie == 7
            return err, (self._recv(length) if typ == P.CMD_READ and not err else b"")
        except (EOFError, ConnectionError, socket.timeout):
            self.dead = True
            return self.EOF, b""

    def write(self, offset: int, data: bytes) -> int:
        return self._call(P.CMD_WRITE, offset, len(data), data)[0]

    def read(self, offset: int, length: int) -> tuple[int, bytes]:
        return self._call(P.CMD_READ, offset, length)

    def flush(self) -> int:
        return self._call(P.CMD_FLUSH, 0, 0)[0]

    def close(self) -> None:
        self.s.close()


def connect(node: Daemon, volume: str, timeout: float = 30.0) -> Nbd:
    """A new connection to `volume` on `node`, retried while the volume is being opened."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Nbd(node.nbd_socket, volume)
        except (LookupError, OSError, EOFError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def block(tag: int, i: int) -> bytes:
    """4 KiB nobody else writes: (tag, i) in every 16 bytes."""
    return struct.pack(">QQ", tag, i) * (KiB // 16)
