"""The server on the wire: negotiation corner cases, bad input, ordering, concurrency."""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from ovsfs.nbd import protocol as P

MiB = 1 << 20


def test_unknown_option_and_bad_payloads(nbd, raw_client) -> None:
    c = raw_client(str(nbd.sock))
    c.greet()
    c.option(99)
    assert c.replies()[-1][0] == P.REP_ERR_UNSUP
    c.option(P.OPT_STRUCTURED_REPLY, b"junk")
    assert c.replies()[-1][0] == P.REP_ERR_INVALID
    c.option(P.OPT_GO, b"\xff\xff\xff\xff")
    assert c.replies()[-1][0] == P.REP_ERR_INVALID
    c.option(P.OPT_STARTTLS)                       # TLS is off
    assert c.replies()[-1][0] == P.REP_ERR_UNSUP
    with pytest.raises(LookupError):
        c.go("nosuchvolume")
    with pytest.raises(LookupError):
        c.go("vol1@nosuchsnap")
    size, flags = c.go("vol1")
    assert size == 64 * MiB and flags & P.TF_CAN_MULTI_CONN and not flags & P.TF_READ_ONLY
    assert c.call(P.CMD_READ, 0, 512) == (0, bytes(512))
    c.close()


def test_list_meta_context_and_export_name(nbd, raw_client) -> None:
    c = raw_client(str(nbd.sock))
    c.greet()
    body = struct.pack(">I", 4) + b"vol1" + struct.pack(">I", 0)
    c.option(P.OPT_LIST_META_CONTEXT, body)
    reps = c.replies()
    assert reps[0][0] == P.REP_META_CONTEXT and reps[0][1][4:] == b"base:allocation"
    c.option(P.OPT_LIST)
    reps = c.replies()
    assert any(d[4:4 + 4] == b"vol1" for t, d in reps if t == P.REP_SERVER)
    c.option(P.OPT_EXPORT_NAME, b"vol1")                      # oldest way in
    size, flags = struct.unpack(">QH", c.recv(10))            # NO_ZEROES was negotiated
    assert size == 64 * MiB
    c.request(P.CMD_WRITE, 0, 4, b"abcd")
    assert c.response()[1] == 0
    c.close()


def test_empty_export_name_means_the_only_volume(nbd, raw_client) -> None:
    c = raw_client(str(nbd.sock))
    c.greet()
    assert c.go("")[0] == 64 * MiB
    c.close()
    nbd.engine.create_volume("vol2", MiB)
    c = raw_client(str(nbd.sock))
    c.greet()
    with pytest.raises(LookupError, match="no default export"):
        c.go("")
    c.close()


def test_bad_requests_get_errors_and_the_connection_survives(nbd, raw_client) -> None:
    c = raw_client(str(nbd.sock))
    c.connect("vol1", structured=True, meta=False)
    end = 64 * MiB
    assert c.call(P.CMD_READ, end - 10, 20)[0] == P.EINVAL
    assert c.call(P.CMD_WRITE, end - 2, 4, b"abcd")[0] == P.ENOSPC
    assert c.call(P.CMD_WRITE_ZEROES, end, 4096)[0] == P.ENOSPC
    assert c.call(P.CMD_TRIM, end, 4096)[0] == P.EINVAL
    assert c.call(42, 0, 0)[0] == P.EINVAL
    assert c.call(P.CMD_READ, 0, 33 * MiB)[0] == P.EOVERFLOW
    assert c.call(P.CMD_BLOCK_STATUS, 0, 4096)[0] == P.EINVAL          # no meta context
    assert c.call(P.CMD_READ, 0, 8, flags=P.CMD_FLAG_FUA)[0] == P.EINVAL
    # an over-long write: the server skips its payload and answers EOVERFLOW
    big = 33 * MiB
    c.request(P.CMD_WRITE, 0, big, b"\x01" * big, cookie=5)
    assert c.response()[:2] == (5, P.EOVERFLOW)
    assert c.call(P.CMD_WRITE, 0, 4, b"wxyz")[0] == 0
    assert c.call(P.CMD_READ, 0, 4) == (0, b"wxyz")
    assert c.call(P.CMD_CACHE, 0, MiB)[0] == 0
    assert c.call(P.CMD_WRITE_ZEROES, 0, 4096, flags=P.CMD_FLAG_FAST_ZERO | P.CMD_FLAG_FUA)[0] == 0
    assert c.call(P.CMD_READ, 0, 4) == (0, bytes(4))
    c.close()


def test_simple_replies_without_structured(nbd, raw_client) -> None:
    c = raw_client(str(nbd.sock))
    c.connect("vol1", structured=False)
    assert c.call(P.CMD_WRITE, 4096, 3, b"xyz", flags=P.CMD_FLAG_FUA)[0] == 0
    assert c.call(P.CMD_READ, 4096, 3) == (0, b"xyz")
    assert c.call(P.CMD_READ, 0, 33 * MiB)[0] == P.EINVAL              # EOVERFLOW needs structured
    assert c.call(P.CMD_FLUSH)[0] == 0
    c.request(P.CMD_DISC)
    assert c.closed()


def test_block_status_and_sparse_reads(nbd, raw_client) -> None:
    c = raw_client(str(nbd.sock))
    c.connect("vol1", structured=True, meta=True)
    assert c.call(P.CMD_WRITE, MiB, 8192, b"q" * 8192)[0] == 0
    err, body = c.call(P.CMD_BLOCK_STATUS, 0, 4 * MiB)
    assert err == 0
    ctx, *pairs = struct.unpack(f">I{(len(body) - 4) // 4}I", body)
    assert list(zip(pairs[::2], pairs[1::2])) == [(MiB, 3), (8192, 0), (3 * MiB - 8192, 3)]
    # a 4 MiB read is mostly holes: far fewer bytes than 4 MiB on the wire
    c.request(P.CMD_READ, 0, 4 * MiB, cookie=3)
    cookie, err, data = c.response()
    assert (cookie, err) == (3, 0) and data == bytes(MiB) + b"q" * 8192 + bytes(3 * MiB - 8192)
    c.close()


def test_pipelined_requests_keep_write_order(nbd, raw_client) -> None:
    c = raw_client(str(nbd.sock))
    c.connect("vol1")
    wire = b""
    for i in range(200):                   # overlapping writes, each followed by a read
        wire += P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 2 * i, 0, 4096) + bytes([i]) * 4096
        wire += P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 2 * i + 1, 0, 4096)
    c.s.sendall(wire)
    got = {}
    for _ in range(400):
        cookie, err, data = c.response()
        assert err == 0
        got[cookie] = data
    for i in range(200):
        assert got[2 * i + 1] == bytes([i]) * 4096, i
    c.close()


class SlowFlushEngine:
    """Wraps the real engine: its catalog opens handles whose flush takes `delay` seconds."""

    def __init__(self, engine, delay: float) -> None:
        self.engine, self.delay = engine, delay
        self.catalog = self

    def __getattr__(self, name):
        return getattr(self.engine.catalog, name)

    def open(self, name, holder, **kw):
        handle = self.engine.catalog.open(name, holder, **kw)
        delay = self.delay

        class Slow:
            def __getattr__(self, attr):
                return getattr(handle, attr)

            def flush(self):
                time.sleep(delay)
                handle.flush()
        return Slow()


def test_reads_never_wait_behind_a_flush(engine, tmp_path: Path, raw_client, start_inproc) -> None:
    engine.create_volume("vol1", 16 * MiB)
    h = start_inproc(SlowFlushEngine(engine, 1.5), tmp_path / "slow")
    try:
        a, b = raw_client(str(h.sock)), raw_client(str(h.sock))
        a.connect("vol1")
        b.connect("vol1")
        t0 = time.monotonic()
        a.request(P.CMD_FLUSH, cookie=1)
        a.request(P.CMD_READ, 0, 4096, cookie=2)     # same connection, after the flush
        assert b.call(P.CMD_READ, 0, 4096)[0] == 0   # another connection
        assert time.monotonic() - t0 < 1.0
        assert a.response()[0] == 2                  # answered out of order
        assert time.monotonic() - t0 < 1.0
        assert a.response()[:2] == (1, 0)
        assert time.monotonic() - t0 >= 1.4
        a.close()
        b.close()
    finally:
        h.stop()


def test_bad_magic_and_vanishing_clients_do_not_disturb_others(nbd, raw_client) -> None:
    good = raw_client(str(nbd.sock))
    good.connect("vol1")
    bad = raw_client(str(nbd.sock))
    bad.connect("vol1")
    bad.s.sendall(b"\xde\xad\xbe\xef" * 7)
    assert bad.closed()
    half = raw_client(str(nbd.sock))
    half.connect("vol1")
    half.s.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, 4096) + b"x" * 100)
    half.close()                                      # vanishes mid-request
    early = raw_client(str(nbd.sock))
    early.s.sendall(b"\x00\x00")                      # vanishes mid-handshake
    early.close()
    assert good.call(P.CMD_WRITE, 0, 4, b"good")[0] == 0
    assert good.call(P.CMD_READ, 0, 4) == (0, b"good")
    good.close()


def test_garbage_clients_concurrent_with_a_good_client(nbd, raw_client) -> None:
    stop = threading.Event()
    errors: list[BaseException] = []

    def garbage(seed: int) -> None:
        rnd = random.Random(seed)
        while not stop.is_set():
            try:
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(2)
                s.connect(str(nbd.sock))
                s.recv(18)
                if rnd.random() < 0.5:      # handshake, then garbage in transmission
                    c = raw_client.__new__(raw_client)
                    c.s, c.structured = s, False
                    s.sendall(struct.pack(">I", 3))
                    c.go("vol1")
                    hdr = P.REQUEST.pack(P.REQUEST_MAGIC, rnd.getrandbits(16), rnd.choice([0, 1, 4, 6, 7, 9]),
                                         1, rnd.getrandbits(28), rnd.getrandbits(24))
                    s.sendall(hdr[:rnd.randint(0, 28)] + os.urandom(rnd.randint(0, 5000)))
                else:
                    s.sendall(os.urandom(rnd.randint(0, 3000)))
                s.close()
            except (OSError, EOFError, LookupError, AssertionError):
                pass
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

    threads = [threading.Thread(target=garbage, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        good = raw_client(str(nbd.sock))
        good.connect("vol1")
        for i in range(300):
            data = bytes([i % 256]) * 4096
            assert good.call(P.CMD_WRITE, (i % 64) * 4096, 4096, data)[0] == 0
            assert good.call(P.CMD_READ, (i % 64) * 4096, 4096) == (0, data)
        good.close()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors


def test_allow_list_refuses_tcp_clients(engine, tmp_path: Path, raw_client, start_inproc) -> None:
    engine.create_volume("vol1", MiB)
    h = start_inproc(engine, tmp_path / "acl", allow=["10.0.0.0/8"])
    try:
        c = raw_client(port=h.port)
        with pytest.raises((EOFError, ConnectionResetError)):
            c.greet()
        c.close()
        u = raw_client(str(h.sock))                   # the unix socket is not filtered
        u.connect("vol1")
        u.close()
    finally:
        h.stop()


def test_tcp_works_when_allowed(nbd, raw_client) -> None:
    c = raw_client(port=nbd.port)
    c.connect("vol1")
    assert c.call(P.CMD_READ, 0, 16) == (0, bytes(16))
    c.close()


def test_overlong_option_is_skipped(nbd, raw_client) -> None:
    c = raw_client(str(nbd.sock))
    c.greet()
    c.option(P.OPT_INFO, b"\x00" * (P.MAX_OPTION_LEN + 12345))
    assert c.replies()[-1][0] == P.REP_ERR_TOO_BIG
    assert c.go("vol1")[0] == 64 * MiB                  # the stream is still in step
    c.close()


def test_tls_required_gates_options_on_tcp(engine, tmp_path: Path, raw_client, start_inproc) -> None:
    import subprocess
    pki = tmp_path / "pki"
    pki.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-keyout", str(pki / "key.pem"), "-out", str(pki / "cert.pem")],
                   check=True, capture_output=True)
    engine.create_volume("vol1", MiB)
    h = start_inproc(engine, tmp_path / "t", tls="required", tls_cert=str(pki / "cert.pem"),
                     tls_key=str(pki / "key.pem"))
    try:
        c = raw_client(port=h.port)
        c.greet()
        for opt in (P.OPT_LIST, P.OPT_STRUCTURED_REPLY):
            c.option(opt)
            assert c.replies()[-1][0] == P.REP_ERR_TLS_REQD
        c.option(P.OPT_EXPORT_NAME, b"vol1")            # no way to refuse but closing
        assert c.closed()
        u = raw_client(str(h.sock))                      # unix: TLS offered, not required
        u.connect("vol1")
        u.close()
    finally:
        h.stop()
