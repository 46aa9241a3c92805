"""vhost-user messages and virtio-blk structures: constants, layouts, encode and decode.

Shared by both ends so they cannot disagree: the back end (the daemon's shm door,
`ovsfs.shm`) and the front end (the client library, `ovsfs.client`). No I/O here.

Sources: the vhost-user protocol, QEMU docs/interop/vhost-user.rst ("Message
specification", "Front-end message types", "Protocol features"); virtio 1.1
(OASIS, 2019) section 5.2 "Block Device" for the device config and requests.
All fields are little-endian.

A message is a 12-byte header (u32 request, u32 flags, u32 size) followed by `size`
bytes of payload; file descriptors travel beside it as SCM_RIGHTS ancillary data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator

# -- header ---------------------------------------------------------------------------

HEADER = struct.Struct("<III")        # request, flags, size
VERSION = 0x1                         # flags bits 0-1
FLAG_REPLY = 0x4                      # bit 2: this is a reply
FLAG_NEED_REPLY = 0x8                 # bit 3: REPLY_ACK asked for (protocol feature REPLY_ACK)
MAX_PAYLOAD = 4096                    # bytes: larger messages are malformed (the biggest is SET_CONFIG)
MAX_FDS = 8                           # a SET_MEM_TABLE carries one fd per region (at most 8)

# -- front-end requests (vhost-user.rst "Front-end message types") ----------------------

GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
RESET_OWNER = 4
SET_MEM_TABLE = 5
SET_LOG_BASE = 6
SET_LOG_FD = 7
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
SET_VRING_ERR = 14
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18
SET_BACKEND_REQ_FD = 21
GET_CONFIG = 24
SET_CONFIG = 25
GET_INFLIGHT_FD = 31
SET_INFLIGHT_FD = 32
RESET_DEVICE = 34
GET_MAX_MEM_SLOTS = 36
ADD_MEM_REG = 37
REM_MEM_REG = 38
SET_STATUS = 39
GET_STATUS = 40

NAMES = {v: k for k, v in dict(globals()).items()
         if k.isupper() and isinstance(v, int) and k.startswith(("GET_", "SET_", "RESET_", "ADD_", "REM_"))}

# Requests whose reply the back end always sends (the others reply only with REPLY_ACK).
ALWAYS_REPLY = frozenset({GET_FEATURES, GET_PROTOCOL_FEATURES, GET_VRING_BASE, GET_QUEUE_NUM,
                          GET_CONFIG, GET_INFLIGHT_FD, GET_MAX_MEM_SLOTS, GET_STATUS})

# -- feature bits ---------------------------------------------------------------------

# virtio device features (virtio 1.1 sections 5.2.3 and 6)
BLK_F_SIZE_MAX = 1
BLK_F_SEG_MAX = 2
BLK_F_GEOMETRY = 4
BLK_F_RO = 5
BLK_F_BLK_SIZE = 6
BLK_F_FLUSH = 9
BLK_F_TOPOLOGY = 10
BLK_F_CONFIG_WCE = 11
BLK_F_MQ = 12
BLK_F_DISCARD = 13
BLK_F_WRITE_ZEROES = 14
F_NOTIFY_ON_EMPTY = 24
F_ANY_LAYOUT = 27
RING_F_INDIRECT_DESC = 28
RING_F_EVENT_IDX = 29
F_PROTOCOL_FEATURES = 30              # vhost-user: GET/SET_PROTOCOL_FEATURES may be used
F_VERSION_1 = 32

# vhost-user protocol features (vhost-user.rst "Protocol features")
PF_MQ = 0
PF_REPLY_ACK = 3
PF_CONFIG = 9
PF_INFLIGHT_SHMFD = 12
PF_RESET_DEVICE = 13
PF_CONFIGURE_MEM_SLOTS = 15
PF_STATUS = 16


def bits(*numbers: int) -> int:
    """A feature mask with the given bit numbers set."""
    mask = 0
    for n in numbers:
        mask |= 1 << n
    return mask


# -- payloads -------------------------------------------------------------------------

U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")           # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")        # index, flags, desc, used, avail (user addrs), log
MEM_HEADER = struct.Struct("<II")            # nregions, padding
MEM_REGION = struct.Struct("<QQQQ")          # guest_phys_addr, memory_size, userspace_addr, mmap_offset
CONFIG_HEADER = struct.Struct("<III")        # offset, size, flags
VRING_FD_INDEX_MASK = 0xFF                   # SET_VRING_KICK/CALL/ERR payload: bits 0-7 the ring
VRING_FD_NOFD = 0x100                        # bit 8: no fd passed (polling; we refuse it)
MAX_REGIONS = 8


@dataclass(frozen=True)
class Region:
    """One region of the front end's memory: guest physical addresses (what descriptors
    hold) [gpa, gpa + size) are user addresses (what SET_VRING_ADDR holds) [uaddr, uaddr +
    size) of the front end, and bytes [offset, offset + size) of the fd sent with it."""

    gpa: int
    size: int
    uaddr: int
    offset: int


def encode(request: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    return HEADER.pack(request, flags, len(payload)) + payload


def decode_header(raw: bytes) -> tuple[int, int, int]:
    """(request, flags, size) of a 12-byte header; ValueError when malformed."""
    request, flags, size = HEADER.unpack(raw)
    if flags & 0x3 != VERSION:
        raise ValueError(f"vhost-user version {flags & 0x3}, expected {VERSION}")
    if size > MAX_PAYLOAD:
        raise ValueError(f"payload of {size} bytes (at most {MAX_PAYLOAD})")
    return request, flags, size


def encode_mem_table(regions: list[Region]) -> bytes:
    out = MEM_HEADER.pack(len(regions), 0)
    for r in regions:
        out += MEM_REGION.pack(r.gpa, r.size, r.uaddr, r.offset)
    return out


def decode_mem_table(payload: bytes) -> list[Region]:
    """ValueError when the count and the payload disagree, or there are too many regions."""
    n, _pad = MEM_HEADER.unpack_from(payload)
    if n > MAX_REGIONS or len(payload) < MEM_HEADER.size + n * MEM_REGION.size:
        raise ValueError(f"memory table of {n} regions in {len(payload)} bytes")
    return [Region(*MEM_REGION.unpack_from(payload, MEM_HEADER.size + i * MEM_REGION.size))
            for i in range(n)]


def name(request: int) -> str:
    return NAMES.get(request, f"request {request}")


# -- virtio-blk (virtio 1.1 section 5.2) ----------------------------------------------

SECTOR = 512                                  # bytes: sector numbers and capacity count these

T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2

REQ_HEADER = struct.Struct("<IIQ")            # type, reserved (ioprio), sector
SEGMENT = struct.Struct("<QII")               # DISCARD / WRITE_ZEROES: sector, num_sectors, flags
SEGMENT_F_UNMAP = 0x1
ID_BYTES = 20                                 # GET_ID: the serial, NUL-padded

# struct virtio_blk_config, as far as QEMU 7.2 reads it (60 bytes).
BLK_CONFIG = struct.Struct(
    "<Q"      # capacity (512-byte sectors)
    "I"       # size_max
    "I"       # seg_max
    "HBB"     # geometry: cylinders, heads, sectors
    "I"       # blk_size (logical block size, bytes)
    "BBHI"    # topology: physical_block_exp, alignment_offset, min_io_size, opt_io_size (in blocks)
    "BBH"     # writeback, unused0, num_queues
    "III"     # max_discard_sectors, max_discard_seg, discard_sector_alignment
    "IIB3x"   # max_write_zeroes_sectors, max_write_zeroes_seg, write_zeroes_may_unmap
)


@dataclass(frozen=True)
class BlkConfig:
    capacity: int            # 512-byte sectors
    size_max: int            # bytes of one segment
    seg_max: int             # segments of one request
    blk_size: int            # logical block size, bytes
    physical_block_exp: int  # physical block = blk_size << exp
    min_io_size: int         # blocks
    opt_io_size: int         # blocks
    num_queues: int
    max_discard_sectors: int
    max_discard_seg: int
    discard_sector_alignment: int
    max_write_zeroes_sectors: int
    max_write_zeroes_seg: int
    write_zeroes_may_unmap: int
    writeback: int = 1

    def encode(self) -> bytes:
        return BLK_CONFIG.pack(self.capacity, self.size_max, self.seg_max, 0, 0, 0, self.blk_size,
                               self.physical_block_exp, 0, self.min_io_size, self.opt_io_size,
                               self.writeback, 0, self.num_queues, self.max_discard_sectors,
                               self.max_discard_seg, self.discard_sector_alignment,
                               self.max_write_zeroes_sectors, self.max_write_zeroes_seg,
                               self.write_zeroes_may_unmap)

    @classmethod
    def decode(cls, raw: bytes) -> "BlkConfig":
        raw = bytes(raw[:BLK_CONFIG.size]).ljust(BLK_CONFIG.size, b"\0")
        (cap, size_max, seg_max, _c, _h, _s, blk, pexp, _align, min_io, opt_io, wb, _u, nq,
         mds, mdseg, dalign, mwz, mwzseg, wzunmap) = BLK_CONFIG.unpack(raw)
        return cls(cap, size_max, seg_max, blk, pexp, min_io, opt_io, nq, mds, mdseg, dalign,
                   mwz, mwzseg, wzunmap, wb)


def segments(raw: bytes) -> Iterator[tuple[int, int, int]]:
    """(sector, num_sectors, flags) of each DISCARD / WRITE_ZEROES segment; ValueError
    when raw is not a whole number of segments."""
    if len(raw) % SEGMENT.size:
        raise ValueError(f"{len(raw)} bytes of discard segments (16 each)")
    for off in range(0, len(raw), SEGMENT.size):
        yield SEGMENT.unpack_from(raw, off)
