"""The DTL wire format: length-prefixed frames, entries with CRC32C, and TLS contexts.

A frame is a fixed header followed by the volume name (UTF-8) and a payload:

    magic "DTL1" | op u8 | status u8 | volume length u16 | request id u64 | gen u64 |
    payload length u32

Requests carry status 0; a reply has the request's op with REPLY set, the request's id, and a
status: OK, FENCED (payload = message) or ERROR (payload = message). Requests may be pipelined
on one connection; the server answers them in order, each reply naming its request id.

Entries (append payloads, fetch replies, and the server's files) are records

    tlog_no u64 | tlog_off u64 | blob length u32 | crc32c u32 | blob

where the CRC32C covers the first three fields and the blob, so a damaged position is caught
as surely as damaged data.
"""

from __future__ import annotations

import json
import ssl
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import crc32c

from ovsfs.errors import ConfigError

MAGIC = b"DTL1"
HEADER = struct.Struct("!4sBBHQQI")
HEADER_SIZE = HEADER.size
RECORD = struct.Struct("!QQII")
RECORD_SIZE = RECORD.size
POS = struct.Struct("!QQ")

# A frame larger than this is malformed (a batch is at most a few MiB; the bound keeps a
# broken or hostile peer from making the other side allocate gigabytes).
MAX_PAYLOAD = 256 << 20
MAX_BATCH_BYTES = 4 << 20      # what a client ships in one append

HELLO, APPEND, SYNC, TRIM, FETCH, DROP = 1, 2, 3, 4, 5, 6
OPS = {HELLO: "hello", APPEND: "append", SYNC: "sync", TRIM: "trim", FETCH: "fetch", DROP: "drop"}
REPLY = 0x80
OK, FENCED, ERROR = 0, 1, 2

Pos = tuple[int, int]
Entry = tuple[Pos, bytes]


class Malformed(Exception):
    """A frame or record that does not parse: the connection it came on is closed."""


@dataclass
class Frame:
    op: int
    status: int
    rid: int
    volume: str
    gen: int
    payload: bytes


def encode_frame(op: int, rid: int, volume: str, gen: int, payload: bytes = b"",
                 status: int = OK) -> bytes:
    vol = volume.encode()
    if len(vol) > 0xFFFF:
        raise ValueError("volume name too long")
    return HEADER.pack(MAGIC, op, status, len(vol), rid, gen, len(payload)) + vol + payload


def decode_header(head: bytes) -> tuple[int, int, int, int, int, int]:
    """(op, status, volume length, rid, gen, payload length). Malformed."""
    magic, op, status, vlen, rid, gen, plen = HEADER.unpack(head)
    if magic != MAGIC:
        raise Malformed(f"bad magic {magic!r}")
    if (op & ~REPLY) not in OPS:
        raise Malformed(f"unknown op {op}")
    if plen > MAX_PAYLOAD:
        raise Malformed(f"payload of {plen} bytes is over the {MAX_PAYLOAD} limit")
    return op, status, vlen, rid, gen, plen


def record_crc(no: int, off: int, blob: bytes | memoryview) -> int:
    return crc32c.crc32c(blob, crc32c.crc32c(POS.pack(no, off) + struct.pack("!I", len(blob))))


def encode_record(pos: Pos, blob: bytes) -> bytes:
    no, off = pos
    return RECORD.pack(no, off, len(blob), record_crc(no, off, blob)) + blob


def encode_entries(entries: list[Entry]) -> bytes:
    return b"".join(encode_record(p, b) for p, b in entries)


def iter_records(buf: bytes | memoryview) -> Iterator[tuple[int, Pos, bytes]]:
    """Yield (offset, pos, blob) of each record in buf. Malformed on a short or damaged
    record (its offset is in the message; storage uses parse_record to cut a torn tail)."""
    view = memoryview(buf)
    at = 0
    while at < len(view):
        rec = parse_record(view, at)
        if rec is None:
            raise Malformed(f"damaged or short entry record at offset {at}")
        pos, blob, size = rec
        yield at, pos, blob
        at += size


def parse_record(view: memoryview, at: int) -> tuple[Pos, bytes, int] | None:
    """The record at `at`: (pos, blob, record size), or None when short or its CRC fails."""
    if len(view) - at < RECORD_SIZE:
        return None
    no, off, n, crc = RECORD.unpack_from(view, at)
    end = at + RECORD_SIZE + n
    if end > len(view):
        return None
    blob = bytes(view[at + RECORD_SIZE:end])
    if record_crc(no, off, blob) != crc:
        return None
    return (no, off), blob, RECORD_SIZE + n


def decode_entries(payload: bytes) -> list[Entry]:
    """Malformed when a record is short or fails its CRC, or positions do not increase."""
    out: list[Entry] = []
    for _at, pos, blob in iter_records(payload):
        if out and pos <= out[-1][0]:
            raise Malformed(f"entry {pos} not after {out[-1][0]}")
        out.append((pos, blob))
    return out


def encode_pos(pos: Pos) -> bytes:
    return POS.pack(*pos)


def decode_pos(payload: bytes) -> Pos:
    if len(payload) != POS.size:
        raise Malformed(f"a position is {POS.size} bytes, not {len(payload)}")
    no, off = POS.unpack(payload)
    return (no, off)


def encode_json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def decode_json(payload: bytes) -> dict:
    try:
        obj = json.loads(payload)
    except ValueError as e:
        raise Malformed(f"bad JSON payload: {e}") from None
    if not isinstance(obj, dict):
        raise Malformed("JSON payload is not an object")
    return obj


# ---- TLS -------------------------------------------------------------------------------------
# Mutual TLS as NBD does it (ovsfs/nbd/server.py make_ssl_context): TLS 1.2 or later, the
# node's certificate and key, and the cluster's CA, which both sides require of the other.
# Peers are addressed by IP and node certificates need not name them, so the client checks the
# chain against the CA but not the host name: the CA is the cluster's own, and only nodes hold
# certificates it signed.

def _ssl_context(purpose: ssl.Purpose, cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """Mutual TLS: our certificate, and the peer's checked against `ca`. ConfigError when a
    file cannot be loaded."""
    ctx = ssl.create_default_context(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if purpose is ssl.Purpose.SERVER_AUTH:
        ctx.check_hostname = False   # peers are addressed by IP; the chain is still checked
    try:
        ctx.load_cert_chain(str(cert), str(key))
        ctx.load_verify_locations(str(ca))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"dtl TLS: {e}") from None
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_ssl_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    return _ssl_context(ssl.Purpose.CLIENT_AUTH, cert, key, ca)


def client_ssl_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    return _ssl_context(ssl.Purpose.SERVER_AUTH, cert, key, ca)
