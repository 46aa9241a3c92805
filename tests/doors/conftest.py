"""Fixtures for the NBD door tests.

`nbd_inproc` runs ovsfs.nbd.server.serve() in a thread of the test process over the real
Engine (in a tmp state directory), so protocol tests do not need the daemon. The daemon
fixtures (tests/conftest.py) drive the full node for restart and kill tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from ovsfs.config import Config
from ovsfs.nbd import protocol as P

SYSTEM_ENV = {**os.environ, "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], *, timeout: float = 120, check: bool = True, env: dict | None = None,
        input: bytes | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a client to completion; kill it by PID if it overstays."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
                         stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                         env=env or SYSTEM_ENV, start_new_session=True)
    try:
        out, err = p.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise
    res = subprocess.CompletedProcess(cmd, p.returncode, out.decode(errors="replace"),
                                      err.decode(errors="replace"))
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd!r} exited {p.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}")
    return res


def make_engine(state: Path) -> Any:
    from ovsfs.backend.local import LocalStore
    from ovsfs.engine.engine import Engine

    cfg = Config()
    cfg.state_dir = state
    cfg.engine.write_buffer_size = 256 << 20
    eng = Engine(cfg, LocalStore(cfg.path(cfg.backend.path)))
    eng.open()
    from ovsfs.errors import AlreadyExists
    try:
        eng.create_vpool("default")
    except AlreadyExists:
        pass
    return eng


@dataclass
class InprocServer:
    engine: Any
    cfg: Config
    sock: Path
    port: int
    thread: threading.Thread
    token: Any = None
    scope: Any = None
    server: Any = None

    def uri(self, export: str = "") -> str:
        return f"nbd+unix:///{export}?socket={self.sock}"

    def tcp_uri(self, export: str = "") -> str:
        return f"nbd://127.0.0.1:{self.port}/{export}"

    def stop(self) -> None:
        if self.thread.is_alive():
            trio.from_thread.run_sync(self.scope.cancel, trio_token=self.token)
            self.thread.join(30)


def start_inproc(engine: Any, state: Path, **nbd: Any) -> InprocServer:
    from ovsfs.nbd.server import serve

    cfg = Config()
    cfg.state_dir = state
    cfg.nbd.socket = str(state / "run" / "nbd.sock")
    cfg.nbd.tcp_port = nbd.pop("tcp_port", free_port())
    for k, v in nbd.items():
        setattr(cfg.nbd, k, v)
    ready = threading.Event()
    h = InprocServer(engine, cfg, Path(cfg.nbd.socket), cfg.nbd.tcp_port, None)  # type: ignore
    errors: list[BaseException] = []

    async def main() -> None:
        h.token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            h.scope = scope
            async with trio.open_nursery() as n:
                h.server = await n.start(serve, engine, cfg)
                ready.set()

    def target() -> None:
        try:
            trio.run(main)
        except BaseException as e:  # noqa: BLE001 - surfaced by the fixture
            errors.append(e)
            ready.set()

    h.thread = threading.Thread(target=target, daemon=True, name="nbd-server")
    h.thread.start()
    ready.wait(30)
    if errors:
        raise errors[0]
    return h


@pytest.fixture(name="start_inproc")
def start_inproc_fixture():
    """start_inproc(engine, state_dir, **nbd_settings) -> InprocServer; stop() it yourself."""
    return start_inproc


@pytest.fixture
def engine(tmp_path: Path):
    eng = make_engine(tmp_path / "state")
    yield eng
    eng.close()


@pytest.fixture
def nbd(engine, tmp_path: Path):
    """An in-process NBD server over a real engine with one 64 MiB volume 'vol1'."""
    engine.create_volume("vol1", 64 << 20)
    h = start_inproc(engine, tmp_path / "state")
    yield h
    h.stop()
    assert not h.sock.exists(), "serve() left its socket file behind"


def have(tool: str) -> bool:
    return shutil.which(tool, path=SYSTEM_ENV["PATH"]) is not None


@pytest.fixture
def raw_client():
    """The RawClient class: a blocking NBD client that says exactly what a test tells it."""
    return RawClient



class RawClient:
    """A tiny blocking NBD client for protocol tests."""

    def __init__(self, path: str | None = None, port: int | None = None, timeout: float = 10) -> None:
        if path:
            self.s = socket.socket(socket.AF_UNIX)
            self.s.settimeout(timeout)
            self.s.connect(path)
        else:
            self.s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.structured = False

    def close(self) -> None:
        self.s.close()

    def recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            d = self.s.recv(n - len(out))
            if not d:
                raise EOFError(f"closed after {len(out)} of {n} bytes")
            out += d
        return out

    def closed(self) -> bool:
        """True once the server has closed the connection (waits up to the timeout)."""
        try:
            return self.s.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

    # ---- negotiation -----------------------------------------------------------------------

    def greet(self, flags: int = P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES) -> None:
        magic, opt, hflags = struct.unpack(">QQH", self.recv(18))
        assert magic == P.NBDMAGIC and opt == P.IHAVEOPT
        assert hflags & P.FLAG_FIXED_NEWSTYLE
        self.s.sendall(struct.pack(">I", flags))

    def option(self, opt: int, data: bytes = b"") -> None:
        self.s.sendall(P.OPTION_HDR.pack(P.IHAVEOPT, opt, len(data)) + data)

    def reply(self) -> tuple[int, int, bytes]:
        magic, opt, rtype, n = P.OPTION_REPLY.unpack(self.recv(P.OPTION_REPLY.size))
        assert magic == P.REPLY_MAGIC_OPT
        return opt, rtype, self.recv(n)

    def replies(self) -> list[tuple[int, bytes]]:
        out = []
        while True:
            _opt, rtype, data = self.reply()
            out.append((rtype, data))
            if rtype == P.REP_ACK or rtype & (1 << 31):
                return out

    def structured_reply(self) -> None:
        self.option(P.OPT_STRUCTURED_REPLY)
        assert self.replies()[-1][0] == P.REP_ACK
        self.structured = True

    def set_meta(self, export: str, *queries: str) -> list[tuple[int, bytes]]:
        e = export.encode()
        body = struct.pack(">I", len(e)) + e + struct.pack(">I", len(queries))
        for q in queries:
            body += struct.pack(">I", len(q)) + q.encode()
        self.option(P.OPT_SET_META_CONTEXT, body)
        return self.replies()

    def go(self, export: str, infos: tuple[int, ...] = (P.INFO_BLOCK_SIZE,)) -> tuple[int, int]:
        e = export.encode()
        self.option(P.OPT_GO, struct.pack(">I", len(e)) + e + struct.pack(f">H{len(infos)}H", len(infos), *infos))
        size = flags = -1
        for rtype, data in self.replies():
            if rtype & (1 << 31):
                raise LookupError(f"GO refused: 0x{rtype:x} {data!r}")
            if rtype == P.REP_INFO and struct.unpack_from(">H", data)[0] == P.INFO_EXPORT:
                _t, size, flags = struct.unpack(">HQH", data)
        return size, flags

    def connect(self, export: str, structured: bool = True, meta: bool = False) -> tuple[int, int]:
        self.greet()
        if structured:
            self.structured_reply()
        if meta:
            self.set_meta(export, P.META_BASE_ALLOCATION)
        return self.go(export)

    # ---- transmission ----------------------------------------------------------------------

    def request(self, typ: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0,
                cookie: int = 1) -> None:
        self.s.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, flags, typ, cookie, offset, length) + data)

    def response(self) -> tuple[int, int, bytes]:
        """(cookie, error, data) of one complete reply (structured chunks reassembled)."""
        (magic,) = struct.unpack(">I", self.recv(4))
        if magic == P.SIMPLE_REPLY_MAGIC:
            err, cookie = struct.unpack(">IQ", self.recv(12))
            return cookie, err, b""
        assert magic == P.STRUCTURED_REPLY_MAGIC, hex(magic)
        data = bytearray()
        err = 0
        while True:
            flags, typ, cookie, n = struct.unpack(">HHQI", self.recv(16))
            body = self.recv(n)
            if typ == P.REPLY_TYPE_OFFSET_DATA:
                data += body[8:]
            elif typ == P.REPLY_TYPE_OFFSET_HOLE:
                data += bytes(struct.unpack(">QI", body)[1])
            elif typ == P.REPLY_TYPE_BLOCK_STATUS:
                data += body
            elif typ & (1 << 15):
                err = struct.unpack_from(">I", body)[0]
            if flags & P.REPLY_FLAG_DONE:
                return cookie, err, bytes(data)
            (magic,) = struct.unpack(">I", self.recv(4))
            assert magic == P.STRUCTURED_REPLY_MAGIC

    def call(self, typ: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0) -> tuple[int, bytes]:
        self.request(typ, offset, length, data, flags, cookie=0xC0FFEE)
        cookie, err, out = self.response()
        assert cookie == 0xC0FFEE
        if typ == P.CMD_READ and not self.structured and not err:
            out = self.recv(length)
        return err, out
