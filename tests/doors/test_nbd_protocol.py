"""Pure protocol layer: parser, validation, grouping, reply encoding (with hypothesis)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ovsfs import errors as E
from ovsfs.nbd import protocol as P
from ovsfs.nbd.transmission import (
    Parser, Request, block_status_reply, check_request, groups, read_reply_structured,
    zero_runs,
)


def req(typ: int, off: int = 0, n: int = 0, data: bytes = b"", flags: int = 0, cookie: int = 7) -> bytes:
    return P.REQUEST.pack(P.REQUEST_MAGIC, flags, typ, cookie, off, n) + data


def test_parse_pipelined_batch() -> None:
    wire = req(P.CMD_WRITE, 0, 4, b"abcd", cookie=1) + req(P.CMD_READ, 0, 4, cookie=2) + req(P.CMD_FLUSH, cookie=3)
    p = Parser()
    reqs = p.feed(wire)
    assert [(r.type, r.cookie) for r in reqs] == [(P.CMD_WRITE, 1), (P.CMD_READ, 2), (P.CMD_FLUSH, 3)]
    assert reqs[0].data == b"abcd" and not p.buf


def test_parse_partial_then_rest() -> None:
    wire = req(P.CMD_WRITE, 8, 10, b"0123456789")
    p = Parser()
    assert p.feed(wire[:5]) == [] and p.want() == P.REQUEST_SIZE - 5
    assert p.feed(wire[5:30]) == [] and p.want() == len(wire) - 30
    (r,) = p.feed(wire[30:])
    assert (r.offset, r.data) == (8, b"0123456789")


def test_bad_magic_raises() -> None:
    with pytest.raises(P.ProtocolError):
        Parser().feed(b"\x00" * 28)


def test_oversized_write_is_skipped_not_buffered() -> None:
    p = Parser(max_payload=16)
    big = 100
    (r,) = p.feed(req(P.CMD_WRITE, 0, big, b"x" * 10, cookie=5))
    assert r.error == P.EOVERFLOW and p.skip == big - 10 and not p.buf
    reqs = p.feed(b"y" * (big - 10) + req(P.CMD_READ, 0, 4, cookie=6))
    assert [x.cookie for x in reqs] == [6] and p.skip == 0


def test_check_request_errors() -> None:
    size = 1 << 20

    def chk(typ: int, off: int, n: int, flags: int = 0, ro: bool = False, structured: bool = True,
            meta: bool = True) -> int:
        return check_request(Request(flags, typ, 1, off, n), size, read_only=ro, structured=structured,
                             meta=meta).error

    assert chk(P.CMD_READ, 0, 4096) == 0
    assert chk(P.CMD_READ, size - 1, 2) == P.EINVAL
    assert chk(P.CMD_WRITE, size - 1, 2) == P.ENOSPC
    assert chk(P.CMD_WRITE_ZEROES, size, 1) == P.ENOSPC
    assert chk(P.CMD_TRIM, size, 1) == P.EINVAL
    assert chk(P.CMD_READ, 0, P.MAX_PAYLOAD + 1) == P.EOVERFLOW
    assert chk(P.CMD_READ, 0, P.MAX_PAYLOAD + 1, structured=False) == P.EINVAL
    assert chk(P.CMD_WRITE, 0, 1, ro=True) == P.EPERM
    assert chk(P.CMD_TRIM, 0, 1, ro=True) == P.EPERM
    assert chk(P.CMD_READ, 0, 1, ro=True) == 0
    assert chk(99, 0, 0) == P.EINVAL
    assert chk(P.CMD_READ, 0, 1, flags=P.CMD_FLAG_FUA) == P.EINVAL
    assert chk(P.CMD_READ, 0, 1, flags=P.CMD_FLAG_DF) == P.EINVAL      # DF is not advertised
    assert chk(P.CMD_WRITE_ZEROES, 0, 1, flags=P.CMD_FLAG_FAST_ZERO | P.CMD_FLAG_NO_HOLE) == 0
    assert chk(P.CMD_BLOCK_STATUS, 0, 1, meta=False) == P.EINVAL
    assert chk(P.CMD_BLOCK_STATUS, 0, 0) == P.EINVAL
    assert chk(P.CMD_FLUSH, 0, 0) == 0
    # offset + length overflowing 64 bits is simply past the end
    assert chk(P.CMD_READ, (1 << 64) - 1, 10) == P.EINVAL


def test_errno_mapping() -> None:
    assert P.nbd_errno(E.OutOfRange("x"), P.CMD_WRITE) == P.ENOSPC
    assert P.nbd_errno(E.OutOfRange("x"), P.CMD_READ) == P.EINVAL
    assert P.nbd_errno(E.ReadOnly("x")) == P.EPERM
    assert P.nbd_errno(E.NoSpace("x")) == P.ENOSPC
    assert P.nbd_errno(E.DataError("x")) == P.EIO
    assert P.nbd_errno(E.InvalidArgument("x")) == P.EINVAL
    assert P.nbd_errno(MemoryError()) == P.ENOMEM
    assert P.nbd_errno(RuntimeError("x")) == P.EIO
    assert P.nbd_errno(OSError(95, "x")) == P.ENOTSUP


def test_groups_respect_overlap() -> None:
    W, R = P.CMD_WRITE, P.CMD_READ
    rs = [Request(0, W, 1, 0, 10, b"x" * 10), Request(0, R, 2, 100, 10), Request(0, R, 3, 5, 10),
          Request(0, W, 4, 200, 10, b"y" * 10), Request(0, P.CMD_FLUSH, 5, 0, 0), Request(0, R, 6, 0, 4)]
    g = groups(rs)
    assert [[r.cookie for r in x] for x in g] == [[1, 2], [3, 4], [5], [6]]


def test_zero_runs_and_read_reply() -> None:
    data = b"a" * 4096 + bytes(8192) + b"b" * 10
    runs = zero_runs(data, 1000)
    assert runs == [(1000, 4096, False), (5096, 8192, True), (13288, 10, False)]
    chunks = b"".join(read_reply_structured(9, 0, bytes(1 << 17)))
    assert len(chunks) < 100      # one hole chunk, no data


def test_block_status_merge_and_req_one() -> None:
    ext = [(0, 4096, True), (4096, 4096, True), (8192, 100, False)]
    body = block_status_reply(1, 1, ext)[20:]
    assert struct.unpack(">IIIII", body) == (1, 8192, 0, 100, 3)
    body = block_status_reply(1, 1, ext, req_one=True)[20:]
    assert struct.unpack(">III", body) == (1, 8192, 0)


# ---- property tests ----------------------------------------------------------------------

request_st = st.builds(
    lambda typ, flags, off, n, cookie: (typ, flags, off, n, cookie),
    st.sampled_from([P.CMD_READ, P.CMD_WRITE, P.CMD_FLUSH, P.CMD_TRIM, P.CMD_CACHE,
                     P.CMD_WRITE_ZEROES, P.CMD_BLOCK_STATUS, 200]),
    st.integers(0, 0xFFFF), st.integers(0, 1 << 30), st.integers(0, 300), st.integers(0, 2**64 - 1))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(request_st, max_size=20), st.lists(st.integers(1, 200), max_size=30))
def test_parser_chunking_is_invisible(reqs: list, cuts: list[int]) -> None:
    wire = b"".join(req(t, o, n, bytes([c % 256]) * n if t == P.CMD_WRITE else b"", f, c)
                    for t, f, o, n, c in reqs)
    whole = Parser(max_payload=128).feed(wire)
    p = Parser(max_payload=128)
    got: list[Request] = []
    pos = 0
    for c in cuts:
        got += p.feed(wire[pos:pos + c])
        pos += c
    got += p.feed(wire[pos:])
    key = lambda r: (r.type, r.flags, r.cookie, r.offset, r.length, r.data, r.error)  # noqa: E731
    assert [key(r) for r in got] == [key(r) for r in whole]
    assert len(whole) == len(reqs) and not p.buf and not p.skip


@settings(max_examples=500)
@given(st.binary(max_size=400), st.lists(st.integers(1, 64), max_size=10))
def test_parser_garbage_only_protocol_errors(blob: bytes, cuts: list[int]) -> None:
    p = Parser(max_payload=64)
    pos = 0
    try:
        for c in cuts + [len(blob)]:
            for r in p.feed(blob[pos:pos + c]):
                check_request(r, 1 << 20, read_only=False, structured=bool(c & 1), meta=True)
            pos += c
    except P.ProtocolError:
        pass


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_option_parsers_garbage(blob: bytes) -> None:
    for fn in (P.parse_info_request, P.parse_meta_request):
        try:
            fn(blob)
        except ValueError:
            pass


@given(st.text(max_size=50), st.lists(st.integers(0, 10), max_size=5))
def test_info_request_roundtrip(name: str, infos: list[int]) -> None:
    if "\0" in name:
        return
    e = name.encode()
    blob = struct.pack(">I", len(e)) + e + struct.pack(f">H{len(infos)}H", len(infos), *infos)
    assert P.parse_info_request(blob) == (name, infos)


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from([P.CMD_READ, P.CMD_WRITE, P.CMD_TRIM, P.CMD_FLUSH]),
                          st.integers(0, 64), st.integers(0, 16)), max_size=30))
def test_groups_never_reorder_conflicts(spec: list) -> None:
    rs = [Request(0, t, i, o, n, bytes(n) if t == P.CMD_WRITE else None) for i, (t, o, n) in enumerate(spec)]
    gs = groups(rs)
    assert [r.cookie for g in gs for r in g] == list(range(len(rs)))     # order preserved
    for g in gs:
        if any(r.type == P.CMD_FLUSH for r in g):
            assert len(g) == 1
        for i, a in enumerate(g):
            for b in g[i + 1:]:
                overlap = a.offset < b.offset + b.length and b.offset < a.offset + a.length
                if overlap and a.length and b.length:
                    assert a.type not in P.MUTATING and b.type not in P.MUTATING


@given(st.binary(max_size=20000), st.integers(0, 1 << 40))
def test_zero_runs_cover_exactly(data: bytes, off: int) -> None:
    runs = zero_runs(data, off, block=512)
    pos = off
    for o, n, z in runs:
        assert o == pos and n > 0
        if z:
            assert data[o - off:o - off + n] == bytes(n)
        pos += n
    assert pos == off + len(data)
