"""The DTL server over real sockets on 127.0.0.1: ordering, dedupe, trim, reload, fencing,
bounds, and connections that misbehave (CONTRACT11.md section 2)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from ovsfs.dtl import wire
from ovsfs.dtl.client import Connection, fetch_tail
from ovsfs.errors import DtlError, Fenced
from tests.dtl.helpers import ThreadServer, blob, pos, wait_for


@pytest.fixture
def srv(tmp_path: Path):
    s = ThreadServer(tmp_path / "dtl")
    yield s
    s.stop()


def append(conn: Connection, idx: range, volume: str = "vol", gen: int = 1) -> None:
    conn.call(wire.APPEND, volume, gen, wire.encode_entries([(pos(i), blob(i)) for i in idx]))


def test_append_fetch_round_trip_in_order(srv: ThreadServer) -> None:
    c = Connection(srv.peer, 5)
    hello = wire.decode_json(c.call(wire.HELLO, "vol", 1))
    assert hello["incarnation"] == srv.server.incarnation and hello["last_pos"] is None
    for lo in (0, 40, 150):              # batches crossing tlog_no boundaries
        append(c, range(lo, lo + 40 if lo < 150 else 230))
    append(c, range(0, 3), volume="other")
    got = fetch_tail(srv.peer, "vol", 1)
    want = [(pos(i), blob(i)) for i in [*range(0, 80), *range(150, 230)]]
    assert got == want
    assert fetch_tail(srv.peer, "other", 1) == [(pos(i), blob(i)) for i in range(3)]
    hello = wire.decode_json(c.call(wire.HELLO, "vol", 1))
    assert tuple(hello["first_pos"]) == pos(0) and tuple(hello["last_pos"]) == pos(229)
    c.close()


def test_resent_entries_are_deduplicated(srv: ThreadServer) -> None:
    c = Connection(srv.peer, 5)
    append(c, range(0, 10))
    append(c, range(5, 15))            # a catch-up re-sends what the peer may have
    append(c, range(0, 3))
    assert fetch_tail(srv.peer, "vol", 1) == [(pos(i), blob(i)) for i in range(15)]
    c.close()


def test_trim_then_reload_keeps_trim_and_cuts_torn_tail(tmp_path: Path) -> None:
    s = ThreadServer(tmp_path / "dtl")
    c = Connection(s.peer, 5)
    append(c, range(0, 50))
    c.call(wire.TRIM, "vol", 1, wire.encode_pos(pos(20)))
    assert fetch_tail(s.peer, "vol", 1) == [(pos(i), blob(i)) for i in range(20, 50)]
    c.close()
    s.stop()
    # A torn tail: half a record after the last whole one (a crash inside a write()).
    logf = next((tmp_path / "dtl").glob("v-*.log"))
    logf.write_bytes(logf.read_bytes() + wire.encode_record(pos(50), blob(50))[:1000])
    s2 = ThreadServer(tmp_path / "dtl")
    try:
        assert s2.server.incarnation != s.server.incarnation
        assert fetch_tail(s2.peer, "vol", 1) == [(pos(i), blob(i)) for i in range(20, 50)]
        c = Connection(s2.peer, 5)
        append(c, range(50, 60))         # appends after the cut parse again at the next reload
        c.close()
    finally:
        s2.stop()
    s3 = ThreadServer(tmp_path / "dtl")
    try:
        assert fetch_tail(s3.peer, "vol", 1) == [(pos(i), blob(i)) for i in range(20, 60)]
    finally:
        s3.stop()


def test_fetch_fences_the_old_generation_also_after_restart(tmp_path: Path) -> None:
    s = ThreadServer(tmp_path / "dtl")
    c = Connection(s.peer, 5)
    append(c, range(0, 5), gen=1)
    assert len(fetch_tail(s.peer, "vol", 2)) == 5       # the new owner (gen 2) takes over
    with pytest.raises(Fenced):
        append(c, range(5, 6), gen=1)
    for op in (wire.HELLO, wire.SYNC, wire.DROP):
        with pytest.raises(Fenced):
            c.call(op, "vol", 1)
    c.close()
    s.stop()
    s2 = ThreadServer(tmp_path / "dtl")                   # gen_seen was persisted
    try:
        c = Connection(s2.peer, 5)
        with pytest.raises(Fenced):
            c.call(wire.HELLO, "vol", 1)
        wire.decode_json(c.call(wire.HELLO, "vol", 2))
        c.close()
    finally:
        s2.stop()


def test_fresh_server_refuses_an_owner_older_than_the_cluster_generation(tmp_path: Path) -> None:
    asked: list[str] = []

    def cluster_gen(volume: str) -> int:
        asked.append(volume)
        return 3 if volume == "vol" else 0

    s = ThreadServer(tmp_path / "dtl", cluster_gen=cluster_gen)
    try:
        c = Connection(s.peer, 5)
        with pytest.raises(Fenced, match="older than 3"):
            c.call(wire.HELLO, "vol", 2)
        assert wire.decode_json(c.call(wire.HELLO, "vol", 3))["gen_seen"] == 3
        assert wire.decode_json(c.call(wire.HELLO, "unrelated", 0))["gen_seen"] == 0
        assert asked == ["vol", "vol", "unrelated"]
        c.close()
    finally:
        s.stop()


def test_max_bytes_refuses_with_a_clear_error(tmp_path: Path) -> None:
    s = ThreadServer(tmp_path / "dtl", max_bytes=20 * 4200)
    try:
        c = Connection(s.peer, 5)
        append(c, range(0, 10))
        with pytest.raises(DtlError, match="max_bytes"):
            append(c, range(10, 30))
        c.call(wire.TRIM, "vol", 1, wire.encode_pos(pos(10)))    # trimming frees room
        append(c, range(10, 25))
        assert [p for p, _ in fetch_tail(s.peer, "vol", 1)] == [pos(i) for i in range(10, 25)]
        c.close()
    finally:
        s.stop()


def test_malformed_frames_and_a_client_that_never_reads_do_not_stop_the_server(
        srv: ThreadServer) -> None:
    good = Connection(srv.peer, 5)
    append(good, range(0, 200))          # ~800 KiB to fetch, many times over
    # 1. garbage, an unknown op, an oversized payload, a damaged entry: each closes its own
    #    connection, with a logged reason and no reply.
    bad_crc = bytearray(wire.encode_record(pos(900), blob(900)))
    bad_crc[-1] ^= 0xFF
    junks = [b"GET / HTTP/1.0\r\n\r\n" + b"x" * 40,
             wire.encode_frame(wire.APPEND, 1, "vol", 1)[:4] + b"\x63" + b"\0" * 23,
             wire.HEADER.pack(wire.MAGIC, wire.APPEND, 0, 3, 1, 1, 1 << 30) + b"vol",
             wire.encode_frame(wire.APPEND, 1, "vol", 1, bytes(bad_crc))]
    for junk in junks:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        s.sendall(junk)
        assert s.recv(100) == b""        # closed by the server, no reply
        s.close()
    wait_for(lambda: srv.server.malformed == len(junks), what="malformed count")
    # 2. a client that pipelines fetches and never reads the replies.
    hog = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    frames = b"".join(wire.encode_frame(wire.FETCH, i, "vol", 1) for i in range(200))
    hog.setblocking(False)
    try:
        hog.sendall(frames)
    except BlockingIOError:
        pass                                # its send buffer filled: the server stopped reading
    time.sleep(0.2)
    # 3. the well-behaved client is still served, promptly.
    t0 = time.monotonic()
    append(good, range(200, 210))
    assert [p for p, _ in fetch_tail(srv.peer, "vol", 1)][-1] == pos(209)
    assert time.monotonic() - t0 < 5      # generous: normally milliseconds
    hog.close()
    good.close()


def test_pipelined_requests_are_answered_in_order_with_their_ids(srv: ThreadServer) -> None:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    reqs = [(wire.HELLO, 7, b""),
            (wire.APPEND, 8, wire.encode_entries([(pos(i), blob(i)) for i in range(3)])),
            (wire.SYNC, 9, b""),
            (wire.FETCH, 10, b""),
            (wire.APPEND, 11, wire.encode_entries([(pos(0), blob(0))]))]   # a dupe: no-op
    s.sendall(b"".join(wire.encode_frame(op, rid, "vol", 1, p) for op, rid, p in reqs))
    buf = b""
    for op, rid, _p in reqs:
        while len(buf) < wire.HEADER_SIZE:
            buf += s.recv(65536)
        rop, status, vlen, rrid, gen, plen = wire.decode_header(buf[:wire.HEADER_SIZE])
        while len(buf) < wire.HEADER_SIZE + vlen + plen:
            buf += s.recv(65536)
        body = buf[wire.HEADER_SIZE + vlen:wire.HEADER_SIZE + vlen + plen]
        buf = buf[wire.HEADER_SIZE + vlen + plen:]
        assert (rop, rrid, status, gen) == (op | wire.REPLY, rid, wire.OK, 1)
        if op == wire.FETCH:
            assert wire.decode_entries(body) == [(pos(i), blob(i)) for i in range(3)]
    s.close()


def test_trim_compacts_the_file_and_reload_reads_it(tmp_path: Path) -> None:
    s = ThreadServer(tmp_path / "dtl")
    c = Connection(s.peer, 5)
    for lo in range(0, 600, 100):
        append(c, range(lo, lo + 100))
    logf = next((tmp_path / "dtl").glob("v-*.log"))
    before = logf.stat().st_size
    c.call(wire.TRIM, "vol", 1, wire.encode_pos(pos(500)))   # 2 MiB dead > 0.4 MiB live
    assert logf.stat().st_size < before // 5
    append(c, range(600, 610))
    want = [(pos(i), blob(i)) for i in range(500, 610)]
    assert fetch_tail(s.peer, "vol", 1) == want
    c.close()
    s.stop()
    s2 = ThreadServer(tmp_path / "dtl")
    try:
        assert fetch_tail(s2.peer, "vol", 1) == want
        assert s2.server.store.held == sum(len(wire.encode_record(p, b)) for p, b in want)
    finally:
        s2.stop()
