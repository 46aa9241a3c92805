"""A raw, pipelining NBD client for tests that count acknowledgements (shared by
tests/daemon/test_responsive.py and tests/nodes/).

`Client` negotiates with EXPORT_NAME (simple replies), then queues any number of requests and
`pump`s them without blocking: every reply is recorded by cookie (`acked`, cookie -> NBD error)
and in the order it arrived (`order`). `eof` says the server closed or reset the connection
(a daemon killed under its clients). `pump_all` drives several clients at once.
"""

from __future__ import annotations

import selectors
import socket
import struct
import time
from pathlib import Path

from ovsfs.nbd import protocol as P


class Client:
    """A raw NBD client in the transmission phase (EXPORT_NAME, simple replies)."""

    def __init__(self, path: Path, export: str, timeout: float = 30) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(timeout)
        self.s.connect(str(path))
        self._recv(18)
        self.s.sendall(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES))
        name = export.encode()
        self.s.sendall(P.OPTION_HDR.pack(P.IHAVEOPT, P.OPT_EXPORT_NAME, len(name)) + name)
        self._recv(10)
        self.out = b""
        self.inbuf = b""
        self.sent: dict[int, tuple[int, bytes]] = {}     # cookie -> (offset, data) of writes
        self.acked: dict[int, int] = {}                  # cookie -> error, of every request
        self.order: list[int] = []                       # cookies in the order replies came
        self.eof = False                                 # the server closed the connection

    def close(self) -> None:
        self.s.close()

    def _recv(self, n: int) -> bytes:
        got = b""
        while len(got) < n:
            d = self.s.recv(n - len(got))
            assert d, "server closed the connection"
            got += d
        return got

    def call(self, typ: int, offset: int = 0, length: int = 0, data: bytes = b"") -> tuple[int, bytes]:
        """One blocking request (nothing else in flight): (NBD error, data read)."""
        self.s.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, typ, 7, offset, length) + data)
        _magic, err, _cookie = struct.unpack(">IIQ", self._recv(16))
        return err, self._recv(length) if typ == P.CMD_READ and not err else b""

    def queue_write(self, cookie: int, offset: int, data: bytes) -> None:
        self.sent[cookie] = (offset, data)
        self.out += P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, cookie, offset, len(data)) + data

    def queue_flush(self, cookie: int) -> None:
        self.out += P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_FLUSH, cookie, 0, 0)

    def pump(self, readable: bool) -> None:
        """Send what is queued and take the replies that arrived (non-blocking)."""
        if self.out:
            try:
                self.out = self.out[self.s.send(self.out):]
            except BlockingIOError:
                pass
            except OSError:          # reset or broken pipe: the server is gone
                self.eof, self.out = True, b""
        if readable:
            try:
                got = self.s.recv(65536)
                self.eof = self.eof or not got
                self.inbuf += got
            except BlockingIOError:
                pass
            except OSError:
                self.eof = True
        while len(self.inbuf) >= 16:
            _magic, err, cookie = struct.unpack(">IIQ", self.inbuf[:16])
            self.inbuf = self.inbuf[16:]
            self.acked[cookie] = err
            self.order.append(cookie)


def pump_all(clients: list[Client], seconds: float, until_quiet: float) -> None:
    """Drive every client for `seconds`, until no reply came for `until_quiet` seconds,
    or until every write has its reply."""
    sel = selectors.DefaultSelector()
    for c in clients:
        c.s.setblocking(False)
        sel.register(c.s, selectors.EVENT_READ, c)
    end = time.monotonic() + seconds
    last, count = time.monotonic(), -1
    try:
        while time.monotonic() < end:
            ready = {key.data for key, _ in sel.select(0.05)}
            for c in clients:
                c.pump(c in ready)
            n = sum(len(c.acked) for c in clients)
            if n != count:
                last, count = time.monotonic(), n
            elif time.monotonic() - last > until_quiet:
                return
            if all(len(c.acked) == len(c.sent) for c in clients):
                return
    finally:
        sel.close()
        for c in clients:
            c.s.setblocking(True)
