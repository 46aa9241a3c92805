"""One real ASD process: protocol, CRC verification, damage and garbage input."""

from __future__ import annotations

import os
import random
import socket
import struct
from pathlib import Path

import crc32c
import pytest

from ovsfs.backend.asd_client import AsdClient, AsdUnavailable
from ovsfs.errors import DataError, InvalidArgument, NotFound

from .asd_helpers import AsdCluster


@pytest.fixture
def asd(tmp_path: Path):
    cl = AsdCluster(tmp_path)
    addr = cl.start(0)
    host, port = addr.rsplit(":", 1)
    c = AsdClient(host, int(port), timeout=5)
    c.info()
    yield cl, c
    c.close()
    cl.stop_all()


def test_put_get_range_list_delete_usage(asd) -> None:  # type: ignore[no-untyped-def]
    cl, c = asd
    data = os.urandom(300_000)
    c.put("f/abc/0/1", data)
    assert c.get("f/abc/0/1", crc=crc32c.crc32c(data)) == data
    for off, n in [(0, 1), (65535, 2), (131072, 65536), (299_999, 1), (5, 0)]:
        assert c.get_range("f/abc/0/1", off, n) == data[off:off + n]
    with pytest.raises(InvalidArgument):
        c.get_range("f/abc/0/1", 299_999, 2)
    c.put("m/ns/sco/1", b"manifest")
    assert c.list("f/") == ["f/abc/0/1"]
    assert c.list("m/ns/") == ["m/ns/sco/1"]
    assert c.scan("m/") == {"m/ns/sco/1": b"manifest"}
    assert c.verify("f/abc/0/1") == crc32c.crc32c(data)
    u = c.usage()
    assert u["fragments"] == 1 and u["capacity"] > 0
    c.delete("f/abc/0/1")
    with pytest.raises(NotFound):
        c.get("f/abc/0/1")
    c.delete("f/abc/0/1")  # idempotent


def test_crc_mismatch_on_put_is_refused(asd) -> None:  # type: ignore[no-untyped-def]
    _cl, c = asd
    with pytest.raises(DataError):
        c.put("f/x/0/0", b"data", crc=1234)
    with pytest.raises(NotFound):
        c.get("f/x/0/0")


def test_corrupt_and_wiped_files_give_errors_and_asd_keeps_running(asd) -> None:  # type: ignore[no-untyped-def]
    cl, c = asd
    data = os.urandom(200_000)
    c.put("f/v/0/0", data)
    c.put("f/v/0/1", data)
    cl.corrupt(0, random.Random(1))
    with pytest.raises(DataError):
        c.get("f/v/0/0")
    with pytest.raises(DataError):
        c.verify("f/v/0/1")
    # A partial read of an undamaged block still works; the damaged block does not.
    assert c.get_range("f/v/0/0", 0, 4096) == data[:4096]
    with pytest.raises(DataError):
        c.get_range("f/v/0/0", len(data) - 10, 10)
    # Truncated file.
    f = cl.fragments(0)[0]
    f.write_bytes(f.read_bytes()[:10])
    with pytest.raises(DataError):
        c.get("f/v/0/0")
    cl.wipe(0)
    with pytest.raises(NotFound):
        c.get("f/v/0/1")
    assert c.list("f/") == []
    c.put("f/v/0/1", data)  # the wiped disk is refilled in place
    assert c.get("f/v/0/1") == data
    assert c.info()["asd_id"]


def test_malformed_requests_never_crash_the_asd(asd) -> None:  # type: ignore[no-untyped-def]
    cl, c = asd
    host, port = c.host, c.port
    garbage = [
        b"GET / HTTP/1.1\r\n\r\n",
        struct.pack(">4sII", b"OVA1", 10, 0) + b"not json!!",
        struct.pack(">4sII", b"OVA1", 2, 0) + b"[]",
        struct.pack(">4sII", b"OVA1", 1 << 30, 0),
        struct.pack(">4sII", b"OVA1", 5, 1 << 31),
        struct.pack(">4sII", b"OVA1", 4, 0),  # then hang up mid-frame
        os.urandom(5000),
    ]
    for g in garbage:
        s = socket.create_connection((host, port), timeout=5)
        try:
            # The ASD may already have dropped the connection (that is the point): any of
            # these may then fail, and only the ASD's health below matters.
            s.sendall(g)
            s.shutdown(socket.SHUT_WR)
            s.recv(1000)
        except OSError:
            pass
        s.close()
    for header in [{"op": "nope"}, {"op": "get"}, {"op": "get", "key": "../../etc/passwd"},
                   {"op": "get", "key": "f/" + "a" * 600}, {"op": "get_range", "key": "f/a", "offset": "x"},
                   {"op": "put", "key": "f/a"}, {"op": "list", "prefix": "/"}]:
        with pytest.raises((InvalidArgument, NotFound)):
            c.call(header)
    assert cl.procs[0].poll() is None
    c.put("f/ok/0/0", b"still here")
    assert c.get("f/ok/0/0") == b"still here"


def test_dead_asd_is_reported_unavailable(asd) -> None:  # type: ignore[no-untyped-def]
    cl, c = asd
    cl.kill(0)
    with pytest.raises(AsdUnavailable):
        c.get("f/x/0/0")
    assert not c.up
    cl.start(0)
    c.retry_after = 0
    assert c.ping() and c.up
