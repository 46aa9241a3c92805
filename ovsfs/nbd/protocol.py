"""NBD wire format: constants, error numbers and the handshake messages (pure functions).

Everything here works on bytes and numbers only, so it can be tested without a socket
or an engine. The server (server.py) drives it. Reference: the NBD protocol document
(NetworkBlockDevice/nbd doc/proto.md), "fixed newstyle" negotiation only.
"""

from __future__ import annotations

import errno as _errno
import struct
from typing import Sequence

# ---- handshake -----------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943            # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054            # "IHAVEOPT"
REPLY_MAGIC_OPT = 0x3E889045565A9

FLAG_FIXED_NEWSTYLE = 1 << 0             # server handshake flags
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0           # client flags
FLAG_C_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
_ERR = 1 << 31
REP_ERR_UNSUP = _ERR | 1
REP_ERR_POLICY = _ERR | 2
REP_ERR_INVALID = _ERR | 3
REP_ERR_PLATFORM = _ERR | 4
REP_ERR_TLS_REQD = _ERR | 5
REP_ERR_UNKNOWN = _ERR | 6
REP_ERR_SHUTDOWN = _ERR | 7
REP_ERR_BLOCK_SIZE_REQD = _ERR | 8
REP_ERR_TOO_BIG = _ERR | 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_RESIZE = 1 << 9
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

# ---- transmission --------------------------------------------------------------------------

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_NAMES = {0: "READ", 1: "WRITE", 2: "DISC", 3: "FLUSH", 4: "TRIM", 5: "CACHE",
             6: "WRITE_ZEROES", 7: "BLOCK_STATUS"}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# flags each command accepts (DF is not advertised, so it is refused)
CMD_ALLOWED_FLAGS = {
    CMD_READ: 0,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_DISC: 0,
    CMD_FLUSH: 0,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_CACHE: 0,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    CMD_BLOCK_STATUS: CMD_FLAG_REQ_ONE,
}
MUTATING = frozenset((CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES))

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

STATE_HOLE = 1 << 0                      # base:allocation
STATE_ZERO = 1 << 1
META_BASE_ALLOCATION = "base:allocation"

# NBD error numbers (the protocol's own values, equal to Linux errnos)
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

MAX_PAYLOAD = 32 << 20                   # advertised maximum block size
MAX_OPTION_LEN = 64 << 10                # option payloads above this are refused
MAX_STRING = 4096

REQUEST = struct.Struct(">IHHQQI")       # magic, flags, type, cookie, offset, length
REQUEST_SIZE = REQUEST.size              # 28
SIMPLE_REPLY = struct.Struct(">IIQ")     # magic, error, cookie
CHUNK = struct.Struct(">IHHQI")          # magic, flags, type, cookie, length
OPTION_HDR = struct.Struct(">QII")       # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")    # magic, option, reply type, length


class ProtocolError(Exception):
    """The peer broke the protocol badly enough that the connection must close."""


def nbd_errno(exc: BaseException, cmd: int | None = None) -> int:
    """Map an exception (ovsfs.errors or OSError) to an NBD error number."""
    from ovsfs import errors as E

    if isinstance(exc, E.OutOfRange):
        return ENOSPC if cmd in (CMD_WRITE, CMD_WRITE_ZEROES) else EINVAL
    if isinstance(exc, E.ReadOnly):
        return EPERM
    if isinstance(exc, MemoryError):
        return ENOMEM
    code = getattr(exc, "errno", None)
    table = {
        _errno.EPERM: EPERM, _errno.EACCES: EPERM, _errno.EROFS: EPERM,
        _errno.EIO: EIO, _errno.ENOMEM: ENOMEM, _errno.EINVAL: EINVAL,
        _errno.ENOSPC: ENOSPC, _errno.EDQUOT: ENOSPC, _errno.EFBIG: ENOSPC,
        _errno.EOVERFLOW: EOVERFLOW, _errno.ENOTSUP: ENOTSUP, _errno.ESHUTDOWN: ESHUTDOWN,
        _errno.ENOENT: EINVAL, _errno.EBUSY: EIO,
    }
    return table.get(code, EIO) if isinstance(code, int) else EIO


# ---- handshake encoding / decoding ---------------------------------------------------------

def server_greeting() -> bytes:
    return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)


def option_reply(opt: int, rtype: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(REPLY_MAGIC_OPT, opt, rtype, len(data)) + data


def option_error(opt: int, rtype: int, message: str = "") -> bytes:
    return option_reply(opt, rtype, message.encode()[:MAX_STRING])


def rep_server(name: str, description: str = "") -> bytes:
    n = name.encode()
    return struct.pack(">I", len(n)) + n + description.encode()


def info_export(size: int, tflags: int) -> bytes:
    return struct.pack(">HQH", INFO_EXPORT, size, tflags)


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return struct.pack(">HIII", INFO_BLOCK_SIZE, minimum, preferred, maximum)


def info_string(kind: int, text: str) -> bytes:
    return struct.pack(">H", kind) + text.encode()[:MAX_STRING]


def meta_context_reply(context_id: int, name: str) -> bytes:
    return struct.pack(">I", context_id) + name.encode()


def export_name_reply(size: int, tflags: int, no_zeroes: bool) -> bytes:
    return struct.pack(">QH", size, tflags) + (b"" if no_zeroes else bytes(124))


def _string(data: bytes, pos: int, what: str) -> tuple[str, int]:
    if len(data) - pos < 4:
        raise ValueError(f"{what}: truncated length")
    (n,) = struct.unpack_from(">I", data, pos)
    pos += 4
    if n > MAX_STRING or len(data) - pos < n:
        raise ValueError(f"{what}: bad length {n}")
    try:
        s = bytes(data[pos:pos + n]).decode()
    except UnicodeDecodeError:
        raise ValueError(f"{what}: not UTF-8") from None
    if "\0" in s:
        raise ValueError(f"{what}: contains NUL")
    return s, pos + n


def parse_info_request(data: bytes) -> tuple[str, list[int]]:
    """NBD_OPT_INFO / NBD_OPT_GO payload -> (export name, requested info types)."""
    name, pos = _string(data, 0, "export name")
    if len(data) - pos < 2:
        raise ValueError("info request: truncated count")
    (count,) = struct.unpack_from(">H", data, pos)
    pos += 2
    if len(data) - pos != 2 * count:
        raise ValueError(f"info request: {count} items do not match {len(data) - pos} bytes")
    return name, list(struct.unpack_from(f">{count}H", data, pos))


def parse_meta_request(data: bytes) -> tuple[str, list[str]]:
    """NBD_OPT_{LIST,SET}_META_CONTEXT payload -> (export name, queries)."""
    name, pos = _string(data, 0, "export name")
    if len(data) - pos < 4:
        raise ValueError("meta context request: truncated count")
    (count,) = struct.unpack_from(">I", data, pos)
    pos += 4
    queries = []
    for _ in range(count):
        q, pos = _string(data, pos, "meta context query")
        queries.append(q)
    if pos != len(data):
        raise ValueError("meta context request: trailing bytes")
    return name, queries


def match_meta(queries: Sequence[str], listing: bool) -> list[str]:
    """Which of our contexts (only base:allocation) the queries select."""
    if not queries:
        return [META_BASE_ALLOCATION] if listing else []
    for q in queries:
        if q == META_BASE_ALLOCATION or (listing and q == "base:"):
            return [META_BASE_ALLOCATION]
    return []
