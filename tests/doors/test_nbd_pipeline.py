"""Pipelined NBD transmission, and exports held through the catalog (issue 10).

Pipelining runs on the in-memory catalog (ovsfs.engine.memory) with one volume whose
backend is slow on demand: a write to its first MiB waits until the test lets it go (the
backend away), so the test can see what the connection does meanwhile. The lifecycle
cases run on the real engine.
"""

from __future__ import annotations

import ast
import threading
from pathlib import Path
from typing import Any

import pytest

from ovsfs.engine.memory import MemoryCatalog
from ovsfs.errors import Busy, WouldBlock
from ovsfs.nbd import protocol as P

MiB = 1 << 20


class SlowHandle:
    """A MemoryHandle whose writes below 1 MiB wait for `gate` (a backend that is away)."""

    def __init__(self, inner: Any, gate: threading.Event, started: threading.Event) -> None:
        self._inner, self._gate, self._started = inner, gate, started

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def writev(self, reqs: Any, nowait: bool = False) -> None:
        if any(o < MiB for o, _d in reqs) and not self._gate.is_set():
            if nowait:
                raise WouldBlock("the backend is away")
            self._started.set()
            self._gate.wait(30)
        self._inner.writev(reqs, nowait=nowait)


class SlowCatalog(MemoryCatalog):
    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.started = threading.Event()

    def open(self, name: str, holder: Any, *, read_only: bool = False) -> Any:
        return SlowHandle(super().open(name, holder, read_only=read_only), self.gate, self.started)


class MemEngine:
    def __init__(self, catalog: Any) -> None:
        self.catalog = catalog


@pytest.fixture
def slow(start_inproc, tmp_path: Path):
    cat = SlowCatalog()
    cat.create_volume("v", 8 * MiB)
    h = start_inproc(MemEngine(cat), tmp_path / "state")
    yield h, cat
    cat.gate.set()
    h.stop()


def test_requests_behind_a_stalled_write_are_served(slow, raw_client) -> None:
    """Before issue 10 the connection stopped reading while a group ran in a worker
    thread: the READ below waited for the stalled WRITE. Now it is answered at once,
    while a READ of the range being written waits for the write (order kept there)."""
    h, cat = slow
    c = raw_client(str(h.sock))
    c.connect("v")
    c.request(P.CMD_WRITE, 0, 4096, b"W" * 4096, cookie=1)
    assert cat.started.wait(10)
    c.request(P.CMD_READ, 0, 4096, cookie=2)            # overlaps the write: must wait
    c.request(P.CMD_WRITE, 2 * MiB, 4096, b"x" * 4096, cookie=3)
    c.request(P.CMD_READ, 2 * MiB, 4096, cookie=4)      # after 3 (overlap): sees its data
    got = {}
    for _ in range(2):
        cookie, err, data = c.response()
        got[cookie] = (err, data)
    assert set(got) == {3, 4} and got[4] == (0, b"x" * 4096)
    cat.gate.set()
    for _ in range(2):
        cookie, err, data = c.response()
        got[cookie] = (err, data)
    assert got[1] == (0, b"") and got[2] == (0, b"W" * 4096)
    c.request(P.CMD_DISC)
    assert c.closed()


def test_flush_does_not_wait_for_a_stalled_write_and_disc_waits_for_it(slow, raw_client) -> None:
    """FLUSH covers the writes completed before it was received (NBD proto.md), so it
    is answered while an earlier write still runs; DISC lets running requests finish."""
    h, cat = slow
    c = raw_client(str(h.sock))
    c.connect("v")
    c.request(P.CMD_WRITE, 0, 512, b"a" * 512, cookie=1)
    assert cat.started.wait(10)
    c.request(P.CMD_FLUSH, cookie=2)
    assert c.response() == (2, 0, b"")
    c.request(P.CMD_DISC)
    cat.gate.set()
    assert c.response() == (1, 0, b"")
    assert c.closed()
    with cat.hold("v", _holder()):
        pass
    handle = MemoryCatalog.open(cat, "v", _holder())
    assert handle.readv([(0, 512)]) == [b"a" * 512]


def _holder() -> Any:
    from ovsfs.engine.api import Holder

    return Holder("test", "pytest")


def test_an_export_is_a_hold_named_in_busy_errors(nbd, raw_client) -> None:
    """A snapshot exported over NBD cannot be deleted under the client, and the volume
    cannot be rolled back while a client has it: Busy names the NBD client. When the
    connection ends the holds are gone."""
    cat = nbd.engine.catalog
    c = raw_client(str(nbd.sock))
    c.connect("vol1")
    c.call(P.CMD_WRITE, 0, 4096, b"1" * 4096)
    cat.create_snapshot("vol1", "s1")
    s = raw_client(str(nbd.sock))
    s.connect("vol1@s1")
    with pytest.raises(Busy, match="nbd"):
        cat.delete_snapshot("vol1", "s1")
    with pytest.raises(Busy, match="nbd"):
        cat.rollback("vol1", "s1")
    assert sorted(str(x) for x in cat.holders("vol1@s1")) and all(
        x.door == "nbd" for x in cat.holders("vol1"))
    c.request(P.CMD_DISC)
    assert c.closed()
    s.request(P.CMD_DISC)
    assert s.closed()
    for _ in range(100):                 # the door closes its handles as connections end
        if not cat.holders("vol1"):
            break
        threading.Event().wait(0.05)
    assert cat.holders("vol1") == []
    cat.delete_snapshot("vol1", "s1")


def test_connection_knows_the_door_only_as_a_context() -> None:
    """nbd/connection.py and nbd/negotiation.py import nothing of nbd/server.py (not even
    under TYPE_CHECKING): the server passes a DoorContext down."""
    import ovsfs.nbd

    root = Path(ovsfs.nbd.__file__).parent
    for name in ("connection.py", "negotiation.py", "context.py"):
        tree = ast.parse((root / name).read_text())
        mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        mods |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "ovsfs.nbd.server" not in mods, name
