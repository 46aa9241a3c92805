"""NBD transmission phase: request parsing, validation, grouping and reply encoding.

Pure functions over bytes and numbers; the connection (connection.py) drives them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from ovsfs.nbd.protocol import (
    CHUNK, CMD_ALLOWED_FLAGS, CMD_BLOCK_STATUS, CMD_DISC, CMD_FLUSH, CMD_NAMES, CMD_READ,
    CMD_WRITE, CMD_WRITE_ZEROES, ENOSPC, EINVAL, EOVERFLOW, EPERM, MAX_PAYLOAD, MAX_STRING,
    MUTATING, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR, REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE, REQUEST, REQUEST_MAGIC, REQUEST_SIZE,
    SIMPLE_REPLY, SIMPLE_REPLY_MAGIC, STATE_HOLE, STATE_ZERO, STRUCTURED_REPLY_MAGIC,
    ProtocolError,
)


@dataclass(slots=True)
class Request:
    flags: int
    type: int
    cookie: int
    offset: int
    length: int
    data: bytes | None = None        # WRITE payload
    error: int = 0                   # set when the request is refused before running
    reason: str = ""

    @property
    def name(self) -> str:
        return CMD_NAMES.get(self.type, f"CMD{self.type}")


@dataclass
class Parser:
    """Incremental request parser: feed() bytes, get complete requests.

    A WRITE longer than max_payload is answered with an error and its payload is skipped
    as it arrives (never buffered). A bad magic raises ProtocolError: the stream cannot be
    resynchronised, so the connection closes.
    """

    max_payload: int = MAX_PAYLOAD
    buf: bytearray = field(default_factory=bytearray)
    skip: int = 0

    def feed(self, data: bytes | bytearray | memoryview) -> list[Request]:
        if self.skip:
            n = min(self.skip, len(data))
            self.skip -= n
            data = memoryview(data)[n:]
        self.buf += data
        return self._parse()

    def want(self) -> int:
        """Bytes still missing to finish the request at the head of the buffer (>= 1)."""
        if self.skip:
            return self.skip
        if len(self.buf) < REQUEST_SIZE:
            return REQUEST_SIZE - len(self.buf)
        _m, _f, typ, _c, _o, length = REQUEST.unpack_from(self.buf, 0)
        return max(1, REQUEST_SIZE + length - len(self.buf)) if typ == CMD_WRITE else 1

    def head_write(self) -> int:
        """Whole size (header + payload) of a WRITE at the head whose payload is still
        arriving, else 0: the connection reserves it before taking the rest off the socket."""
        if self.skip or len(self.buf) < REQUEST_SIZE:
            return 0
        _m, _f, typ, _c, _o, length = REQUEST.unpack_from(self.buf, 0)
        if typ != CMD_WRITE or length > self.max_payload:
            return 0
        return REQUEST_SIZE + length

    def _parse(self) -> list[Request]:
        out: list[Request] = []
        buf = self.buf
        pos, end = 0, len(buf)
        unpack = REQUEST.unpack_from
        while end - pos >= REQUEST_SIZE:
            magic, flags, typ, cookie, offset, length = unpack(buf, pos)
            if magic != REQUEST_MAGIC:
                del buf[:pos]
                raise ProtocolError(f"bad request magic 0x{magic:08x}")
            if typ == CMD_WRITE:
                if length > self.max_payload:
                    req = Request(flags, typ, cookie, offset, length, None, EOVERFLOW,
                                  f"write of {length} bytes is over the maximum {self.max_payload}")
                    out.append(req)
                    pos += REQUEST_SIZE
                    avail = min(end - pos, length)
                    pos += avail
                    if avail < length:
                        self.skip = length - avail
                        break
                    continue
                if end - pos - REQUEST_SIZE < length:
                    break
                start = pos + REQUEST_SIZE
                out.append(Request(flags, typ, cookie, offset, length, bytes(buf[start:start + length])))
                pos = start + length
            else:
                out.append(Request(flags, typ, cookie, offset, length))
                pos += REQUEST_SIZE
        del buf[:pos]
        return out


def check_request(req: Request, size: int, *, read_only: bool, structured: bool,
                  meta: bool, max_payload: int = MAX_PAYLOAD) -> Request:
    """Validate a request against the export; sets req.error/req.reason when refused."""
    if req.error:
        if req.error == EOVERFLOW and not structured:
            req.error = EINVAL
        return req
    typ, flags, off, n = req.type, req.flags, req.offset, req.length

    def refuse(code: int, why: str) -> Request:
        req.error, req.reason = code, why
        return req

    allowed = CMD_ALLOWED_FLAGS.get(typ)
    if allowed is None:
        return refuse(EINVAL, f"unknown command {typ}")
    if flags & ~allowed:
        return refuse(EINVAL, f"flags 0x{flags:x} not valid for {req.name}")
    if typ in (CMD_FLUSH, CMD_DISC):
        return req
    if read_only and typ in MUTATING:
        return refuse(EPERM, f"{req.name} on a read-only export")
    if typ == CMD_BLOCK_STATUS and not (structured and meta):
        return refuse(EINVAL, "BLOCK_STATUS without a negotiated meta context")
    if typ == CMD_READ and n > max_payload:
        return refuse(EOVERFLOW if structured else EINVAL,
                      f"read of {n} bytes is over the maximum {max_payload}")
    if off + n > size:
        code = ENOSPC if typ in (CMD_WRITE, CMD_WRITE_ZEROES) else EINVAL
        return refuse(code, f"{req.name} {off}+{n} is past the end ({size})")
    if typ == CMD_BLOCK_STATUS and n == 0:
        return refuse(EINVAL, "BLOCK_STATUS of length 0")
    return req


GROUP_MAX_READ = 64 << 20
GROUP_MAX_REQUESTS = 1024


def groups(reqs: Sequence[Request], max_read: int = GROUP_MAX_READ) -> list[list[Request]]:
    """Split a batch into order-preserving groups that may each run as one engine call.

    Inside a group no two requests overlap where one of them modifies data, so the
    requests of a group commute. FLUSH and DISC end a group (and form one of their own).
    """
    out: list[list[Request]] = []
    cur: list[Request] = []
    spans: list[tuple[int, int, bool]] = []     # (start, end, mutating) of cur
    read_bytes = 0
    for r in reqs:
        if r.error:
            cur.append(r)
            continue
        if r.type in (CMD_FLUSH, CMD_DISC):
            if cur:
                out.append(cur)
            out.append([r])
            cur, spans, read_bytes = [], [], 0
            continue
        s, e, mut = r.offset, r.offset + r.length, r.type in MUTATING
        reads = r.length if r.type == CMD_READ else 0
        # A group's reads are allocated at once: bound them, so a client cannot make one
        # engine call hold gigabytes (the reply queue limit applies between groups).
        full = len(cur) >= GROUP_MAX_REQUESTS or (reads and read_bytes + reads > max_read)
        if cur and (full or (e > s and any(a < e and s < b and (mut or m) for a, b, m in spans))):
            out.append(cur)
            cur, spans, read_bytes = [], [], 0
        cur.append(r)
        spans.append((s, e, mut))
        read_bytes += reads
    if cur:
        out.append(cur)
    return out


# ---- replies -------------------------------------------------------------------------------

COALESCE_MAX = 256 << 10       # reply parts from this size on are sent without joining


def coalesce(parts: list[bytes]) -> list[bytes]:
    """Join runs of small reply parts into one send each; big parts (read data) go as
    they are, so a reply is never copied into a second buffer of its size."""
    out: list[bytes] = []
    run: list[bytes] = []
    size = 0
    for p in parts:
        if len(p) >= COALESCE_MAX:
            if run:
                out.append(run[0] if len(run) == 1 else b"".join(run))
                run, size = [], 0
            out.append(p)
            continue
        run.append(p)
        size += len(p)
        if size >= COALESCE_MAX:
            out.append(b"".join(run))
            run, size = [], 0
    if run:
        out.append(run[0] if len(run) == 1 else b"".join(run))
    return out


def simple_reply(cookie: int, error: int = 0, data: bytes = b"") -> bytes:
    head = SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)
    return head + data if data else head


def chunk(cookie: int, typ: int, payload: bytes, done: bool) -> bytes:
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, typ, cookie,
                      len(payload)) + payload


def structured_error(cookie: int, error: int, message: str = "") -> bytes:
    msg = message.encode()[:MAX_STRING]
    return chunk(cookie, REPLY_TYPE_ERROR, struct.pack(">IH", error, len(msg)) + msg, True)


def structured_done(cookie: int) -> bytes:
    return chunk(cookie, REPLY_TYPE_NONE, b"", True)


def zero_runs(data: bytes, offset: int, block: int = 4096) -> list[tuple[int, int, bool]]:
    """Split a read result into (offset, length, is_zero) runs on block boundaries.

    Runs of zeros shorter than a block are reported as data.
    """
    import numpy as np

    n = len(data)
    if n == 0:
        return []
    if n < 2 * block:
        return [(offset, n, data.count(0) == n)]
    nblk = n // block
    words = np.frombuffer(data, dtype=np.uint8, count=nblk * block).view(np.uint64)
    nz = words.reshape(nblk, block // 8).any(axis=1)
    tail = n - nblk * block
    if tail:
        nz = np.append(nz, data.count(0, nblk * block) != tail)
    cuts = (np.flatnonzero(np.diff(nz)) + 1).tolist()
    out = []
    prev = 0
    for c in cuts + [len(nz)]:
        lo, hi = prev * block, min(c * block, n)
        out.append((offset + lo, hi - lo, not bool(nz[prev])))
        prev = c
    return out


def read_reply_structured(cookie: int, offset: int, data: bytes) -> list[bytes]:
    """A successful structured READ reply: data and hole chunks, the last one DONE."""
    if not data:
        return [structured_done(cookie)]
    runs = zero_runs(data, offset) if len(data) >= 65536 else [(offset, len(data), False)]
    out = []
    last = len(runs) - 1
    for i, (off, n, zero) in enumerate(runs):
        if zero:
            out.append(chunk(cookie, REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", off, n), i == last))
        else:
            lo = off - offset
            head = CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if i == last else 0,
                              REPLY_TYPE_OFFSET_DATA, cookie, n + 8) + struct.pack(">Q", off)
            out.append(head)
            out.append(data if (lo == 0 and n == len(data)) else data[lo:lo + n])
    return out


def block_status_reply(cookie: int, context_id: int, extents: Iterable[tuple[int, int, bool]],
                       req_one: bool = False) -> bytes:
    """BLOCK_STATUS chunk for base:allocation from engine extents (merged, non-empty)."""
    merged: list[list[int]] = []
    for _off, n, alloc in extents:
        if n <= 0:
            continue
        flags = 0 if alloc else STATE_HOLE | STATE_ZERO
        if merged and merged[-1][1] == flags:
            merged[-1][0] += n
        elif req_one and merged:
            break
        else:
            merged.append([n, flags])
    body = struct.pack(">I", context_id) + b"".join(
        struct.pack(">II", n, f) for n, f in merged)
    return chunk(cookie, REPLY_TYPE_BLOCK_STATUS, body, True)
