"""A small blocking NBD client for cluster tests that says exactly what happened to each
request (acknowledged, refused with an NBD error, or the connection gone)."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

from ovsfs.nbd import protocol as P
from tests.conftest import Daemon
from tests.doors.conftest import RawClient

KiB = 4096


class Nbd(RawClient):
    """A blocking NBD client (simple replies): `write`/`read`/`flush` return the NBD error
    (0 = acknowledged); a closed connection counts as an error (EOF), never as success.
    Negotiation is the doors tests' RawClient's."""

    EOF = -1

    def __init__(self, socket_path: Path, export: str, timeout: float = 30.0) -> None:
        super().__init__(str(socket_path), timeout=timeout)
        self.dead = False
        self.greet()
        try:
            self.go(export, infos=())
        except LookupError:
            self.close()
            raise

    def _call(self, typ: int, offset: int, length: int, data: bytes = b"") -> tuple[int, bytes]:
        if self.dead:
            return self.EOF, b""
        try:
            return self.call(typ, offset, length, data)
        except (EOFError, ConnectionError, socket.timeout):
            self.dead = True
            return self.EOF, b""

    def write(self, offset: int, data: bytes) -> int:
        return self._call(P.CMD_WRITE, offset, len(data), data)[0]

    def read(self, offset: int, length: int) -> tuple[int, bytes]:
        return self._call(P.CMD_READ, offset, length)

    def flush(self) -> int:
        return self._call(P.CMD_FLUSH, 0, 0)[0]


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
