"""virtio-blk requests (virtio 1.1 section 5.2.6) as door ops, and the device config (5.2.4).

A request is one descriptor chain: a 16-byte device-readable header {type, reserved,
sector}, then data (device-readable for OUT, DISCARD and WRITE_ZEROES segments; device-
writable for IN and GET_ID), then one device-writable status byte, the chain's last
byte. `parse()` turns a chain into a `Request` holding `ovsfs.doors.adapter.Op`s that
point straight into guest memory: a WRITE op's data is a memoryview of the guest's
buffer (no copy on the way in); a READ op's result is copied into the guest's buffers by
`complete()`. One op per descriptor (segment), so a scattered request needs no joining.

What the driver may get wrong, and what it gets (5.2.6.1 / 5.2.6.2):
- a header shorter than 16 bytes, a range past the end of the volume, data not a whole
  number of 512-byte sectors, a request larger than shm.max_request_bytes, a write or
  discard on a read-only device, too many or too large discard / write-zeroes segments:
  status VIRTIO_BLK_S_IOERR, nothing done;
- an unknown type, unknown segment flags, the unmap flag on DISCARD: VIRTIO_BLK_S_UNSUPP;
- no writable byte for the status: nothing can be reported, `ChainError` (the session
  drops the connection).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ovsfs.doors.adapter import FLUSH, READ, TRIM, WRITE, ZEROES, Op
from ovsfs.shm.vring import Chain, ChainError
from ovsfs.vhost import protocol as P

# Hot-path globals (one lookup instead of two per use).
_T_IN, _T_OUT, _S_OK, _S_IOERR, _SECTOR = P.T_IN, P.T_OUT, P.S_OK, P.S_IOERR, P.SECTOR
_HEADER = P.REQ_HEADER
_HEADER_SIZE = P.REQ_HEADER.size

DISCARD_MAX_SEG = 16           # segments of one DISCARD / WRITE_ZEROES request


@dataclass(frozen=True)
class Limits:
    """What one request may be (shm config): bytes, and segments (descriptors)."""

    max_request_bytes: int
    size_max: int
    seg_max: int
    num_queues: int


@dataclass(slots=True)
class Request:
    chain: Chain
    queue: int
    kind: int
    status: int = P.S_OK
    ops: list[Op] = field(default_factory=list)
    dest: list[memoryview] = field(default_factory=list)   # where each READ op's data goes
    written: int = 0                                        # data bytes written (used len - 1)
    nbytes: int = 0                                         # data bytes read or written (IN / OUT)
    status_view: memoryview | None = None


def _split(views: list[memoryview], n: int) -> tuple[bytes, list[memoryview]]:
    """The first n bytes of a view list (copied), and views of the rest."""
    head: list[bytes] = []
    rest: list[memoryview] = []
    for v in views:
        if n > 0:
            take = min(n, len(v))
            head.append(bytes(v[:take]))
            n -= take
            if take < len(v):
                rest.append(v[take:])
        else:
            rest.append(v)
    return b"".join(head), rest


def _status_split(chain: Chain) -> tuple[list[memoryview], memoryview]:
    """(the writable data views, the status byte's view)."""
    into = chain.into
    if into and len(into[-1]) == 1:          # the usual layout: the status byte alone
        return into[:-1], into[-1]
    views = [v for v in into if len(v)]
    if not views:
        raise ChainError(f"request {chain.head} has no writable status byte (section 5.2.6)")
    last = views[-1]
    data = views[:-1] + ([last[:-1]] if len(last) > 1 else [])
    return data, last[-1:]


def parse(chain: Chain, queue: int, handle: Any, limits: Limits, serial: bytes) -> Request:
    """The request in `chain` for volume `handle` (its size, caps), with its ops, or with
    its failure status set (then it has no ops). ChainError when there is no status byte."""
    data_in, status_view = _status_split(chain)
    out = chain.out
    if out and len(out[0]) == _HEADER_SIZE:      # the usual layout: the header alone
        kind, _ioprio, sector = _HEADER.unpack_from(out[0])
        data_out = out[1:]
    else:
        header, data_out = _split(out, _HEADER_SIZE)
        if len(header) < _HEADER_SIZE:
            return Request(chain, queue, -1, _S_IOERR, status_view=status_view)
        kind, _ioprio, sector = _HEADER.unpack(header)
    req = Request(chain, queue, kind, _S_OK, [], [], 0, 0, status_view)
    if kind == _T_IN or kind == _T_OUT:
        is_in = kind == _T_IN
        views = data_in if is_in else data_out
        # Everything writable but the status byte, or readable after the 16-byte header.
        total = chain.in_len - 1 if is_in else chain.out_len - _HEADER_SIZE
        offset = sector * _SECTOR
        if (total % _SECTOR or total > limits.max_request_bytes or offset + total > handle.size
                or (not is_in and handle.caps.read_only)):
            req.status = _S_IOERR
            return req
        ops = req.ops
        pos = offset
        if is_in:
            dest = req.dest
            for v in views:
                n = len(v)
                if n:
                    ops.append(Op(READ, pos, n, None, False, req))
                    dest.append(v)
                    pos += n
            req.written = total
        else:
            for v in views:
                n = len(v)
                if n:
                    ops.append(Op(WRITE, pos, n, v, False, req))
                    pos += n
        req.nbytes = total
        return req
    read_only = bool(handle.caps.read_only)
    size = handle.size
    if kind == P.T_FLUSH:
        req.ops.append(Op(FLUSH, tag=req))
    elif kind == P.T_GET_ID:
        ident = serial[:P.ID_BYTES].ljust(P.ID_BYTES, b"\0")
        pos = 0
        for v in data_in:
            take = min(len(v), P.ID_BYTES - pos)
            v[:take] = ident[pos:pos + take]
            pos += take
            if pos == P.ID_BYTES:
                break
        req.written = pos
    elif kind in (P.T_DISCARD, P.T_WRITE_ZEROES):
        _segments(req, data_out, size, read_only, limits)
    else:
        req.status = P.S_UNSUPP
    return req


def _segments(req: Request, data: list[memoryview], size: int, read_only: bool, limits: Limits) -> None:
    raw, _rest = _split(data, DISCARD_MAX_SEG * P.SEGMENT.size + 1)
    if read_only or not raw or len(raw) > DISCARD_MAX_SEG * P.SEGMENT.size:
        req.status = P.S_IOERR
        return
    try:
        segs = list(P.segments(raw))
    except ValueError:
        req.status = P.S_IOERR
        return
    max_sectors = discard_max_sectors(limits)
    for sector, count, flags in segs:
        allowed = P.SEGMENT_F_UNMAP if req.kind == P.T_WRITE_ZEROES else 0
        if flags & ~allowed:
            req.status = P.S_UNSUPP
            req.ops.clear()
            return
        offset, length = sector * P.SECTOR, count * P.SECTOR
        if count > max_sectors or offset + length > size:
            req.status = P.S_IOERR
            req.ops.clear()
            return
        if length:
            req.ops.append(Op(TRIM if req.kind == P.T_DISCARD else ZEROES, offset, length, tag=req))


def discard_max_sectors(limits: Limits) -> int:
    """Sectors of one DISCARD / WRITE_ZEROES segment at most: 1 GiB (they move no data)."""
    return (1 << 30) // P.SECTOR


def complete(req: Request) -> int:
    """After the ops ran: copy read data into guest memory, write the status byte; the
    used length (bytes written into the chain, status included)."""
    if req.status == P.S_OK:
        for op in req.ops:
            if op.error is not None:
                req.status = P.S_IOERR
                break
    if req.status == P.S_OK and req.dest:
        reads = iter(req.dest)
        for op in req.ops:
            if op.kind == READ:
                view = next(reads)
                view[:] = op.result
    written = req.written if req.status == P.S_OK else 0
    assert req.status_view is not None
    req.status_view[0] = req.status
    return written + 1


def config(handle: Any, limits: Limits) -> P.BlkConfig:
    """The device config of a volume handle (section 5.2.4)."""
    caps = handle.caps
    logical = max(P.SECTOR, int(caps.logical_block_size or P.SECTOR))
    preferred = max(logical, int(caps.preferred_block_size or logical))
    ratio = preferred // logical
    return P.BlkConfig(
        capacity=handle.size // P.SECTOR, size_max=limits.size_max, seg_max=limits.seg_max,
        blk_size=logical, physical_block_exp=max(ratio.bit_length() - 1, 0),
        min_io_size=ratio, opt_io_size=ratio, num_queues=limits.num_queues,
        max_discard_sectors=discard_max_sectors(limits), max_discard_seg=DISCARD_MAX_SEG,
        discard_sector_alignment=preferred // P.SECTOR,
        max_write_zeroes_sectors=discard_max_sectors(limits), max_write_zeroes_seg=DISCARD_MAX_SEG,
        write_zeroes_may_unmap=1)


def features(read_only: bool) -> int:
    """The virtio features offered (no CONFIG_WCE: always writeback, with FLUSH)."""
    f = P.bits(P.F_VERSION_1, P.RING_F_INDIRECT_DESC, P.RING_F_EVENT_IDX, P.F_PROTOCOL_FEATURES,
               P.BLK_F_SIZE_MAX, P.BLK_F_SEG_MAX, P.BLK_F_BLK_SIZE, P.BLK_F_TOPOLOGY, P.BLK_F_FLUSH,
               P.BLK_F_MQ, P.BLK_F_DISCARD, P.BLK_F_WRITE_ZEROES)
    if read_only:
        f |= P.bits(P.BLK_F_RO)
    return f


PROTOCOL_FEATURES = P.bits(P.PF_MQ, P.PF_REPLY_ACK, P.PF_CONFIG, P.PF_RESET_DEVICE)
