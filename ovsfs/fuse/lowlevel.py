"""fallocate and lseek for pyfuse3, which does not offer them (pyfuse3 3.5 on libfuse 3.14).

pyfuse3's `Operations` has no fallocate and no lseek, so without help the kernel gets
ENOSYS and answers fallocate(PUNCH_HOLE / ZERO_RANGE) with EOPNOTSUPP and SEEK_DATA /
SEEK_HOLE with "everything is data". libfuse copies the `fuse_lowlevel_ops` table into
the session at `fuse_session_new`, and pyfuse3 fills its own table and creates the
session inside one call (`pyfuse3.init`). After init we therefore:

1. find pyfuse3's static `fuse_ops` table and `session` pointer through the symbol table
   of its extension module (the module is built from source here and keeps .symtab);
2. find the session's copy of the table by content (a byte-for-byte match of pyfuse3's
   table inside the session struct, so no libfuse-private layout is assumed);
3. write two ctypes callbacks into the fallocate and lseek slots of that copy.

The callbacks run in the trio thread (pyfuse3 processes requests there, holding the
GIL). They start a task in the filesystem's nursery that awaits the async handler
(`ops.fallocate` / `ops.lseek`) and answers with `fuse_reply_err` / `fuse_reply_lseek`.
If anything does not match (stripped module, other table size, slot already set), the
hook is not installed, a warning is logged, and the kernel falls back as above.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import struct
from ctypes import CFUNCTYPE, c_int, c_int64, c_uint64, c_void_p
from typing import Any

import pyfuse3

log = logging.getLogger("ovsfs.fuse")

# struct fuse_lowlevel_ops of libfuse 3.14 (FUSE_USE_VERSION 3x): 44 function pointers.
OPS_FIELDS = (
    "init destroy lookup forget getattr setattr readlink mknod mkdir unlink rmdir symlink rename "
    "link open read write flush release fsync opendir readdir releasedir fsyncdir statfs setxattr "
    "getxattr listxattr removexattr access create getlk setlk bmap ioctl poll write_buf "
    "retrieve_reply forget_multi flock fallocate readdirplus copy_file_range lseek").split()
SLOT = {name: i * 8 for i, name in enumerate(OPS_FIELDS)}

FALLOCATE_FN = CFUNCTYPE(None, c_void_p, c_uint64, c_int, c_int64, c_int64, c_void_p)
LSEEK_FN = CFUNCTYPE(None, c_void_p, c_uint64, c_int64, c_int, c_void_p)

_keep: list[Any] = []  # the installed callbacks must outlive the session


def elf_symbols(path: str, wanted: set[str]) -> dict[str, tuple[int, int]]:
    """(value, size) of the named symbols from an ELF64 little-endian file's .symtab/.dynsym."""
    data = open(path, "rb").read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path} is not an ELF64 little-endian file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    found: dict[str, tuple[int, int]] = {}
    for sh in sections:
        if sh[1] not in (2, 11):  # SHT_SYMTAB, SHT_DYNSYM
            continue
        strtab = sections[sh[6]]
        str_off = strtab[4]
        off, size, entsize = sh[4], sh[5], sh[9] or 24
        for pos in range(off, off + size, entsize):
            st_name, _info, _other, _shndx, value, ssize = struct.unpack_from("<IBBHQQ", data, pos)
            if not st_name or not value:
                continue
            end = data.index(b"\0", str_off + st_name)
            name = data[str_off + st_name:end].decode("ascii", "replace")
            if name in wanted:
                found[name] = (value, ssize)
    return found


class LowLevel:
    """Loaded libfuse3 reply functions."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libfuse3.so.3")
        self.reply_err = lib.fuse_reply_err
        self.reply_err.argtypes = (c_void_p, c_int)
        self.reply_err.restype = c_int
        self.reply_lseek = lib.fuse_reply_lseek
        self.reply_lseek.argtypes = (c_void_p, c_int64)
        self.reply_lseek.restype = c_int


def install(ops: Any, nursery: Any) -> bool:
    """Give the current pyfuse3 session fallocate and lseek handlers; True when installed.

    `ops.fallocate(ino, mode, offset, length)` and `ops.lseek(ino, offset, whence)` are
    async and raise pyfuse3.FUSEError on failure; lseek returns the new offset.
    """
    try:
        return _install(ops, nursery)
    except Exception as e:  # never let the optional hook stop the mount
        log.warning("fallocate/lseek hook not installed (%s): the kernel falls back to "
                    "EOPNOTSUPP for fallocate and 'all data' for SEEK_DATA/SEEK_HOLE", e)
        return False


def _install(ops: Any, nursery: Any) -> bool:
    so = pyfuse3.__file__
    names = {"__pyx_v_7pyfuse3_fuse_ops", "__pyx_v_7pyfuse3_session", "PyInit_pyfuse3"}
    syms = elf_symbols(so, names)
    missing = names - syms.keys()
    if missing:
        raise RuntimeError(f"symbols {sorted(missing)} not in {so}")
    ops_off, ops_size = syms["__pyx_v_7pyfuse3_fuse_ops"]
    if ops_size != len(OPS_FIELDS) * 8:
        raise RuntimeError(f"pyfuse3's fuse_lowlevel_ops is {ops_size} bytes, expected {len(OPS_FIELDS) * 8}")
    mod = ctypes.CDLL(so)
    base = ctypes.cast(mod.PyInit_pyfuse3, c_void_p).value - syms["PyInit_pyfuse3"][0]
    table = ctypes.string_at(base + ops_off, ops_size)
    session = c_void_p.from_address(base + syms["__pyx_v_7pyfuse3_session"][0]).value
    if not session:
        raise RuntimeError("no pyfuse3 session (call after pyfuse3.init)")
    window = ctypes.string_at(session, 128 + ops_size)
    pos = window.find(table)
    if pos < 0 or pos % 8:
        raise RuntimeError("the session's copy of the operations table was not found")
    copy = session + pos
    for name in ("fallocate", "lseek"):
        if c_void_p.from_address(copy + SLOT[name]).value:
            raise RuntimeError(f"the {name} slot is already set")
    ll = LowLevel()

    def answer(req: int, coro_fn: Any, *args: Any) -> None:
        async def run() -> None:
            try:
                res = await coro_fn(*args)
            except pyfuse3.FUSEError as e:
                ll.reply_err(req, e.errno)
            except BaseException:
                ll.reply_err(req, errno.EINTR)
                raise
            else:
                if res is None:
                    ll.reply_err(req, 0)
                else:
                    ll.reply_lseek(req, res)
        try:
            nursery.start_soon(run)
        except Exception:
            log.exception("cannot start a low-level request")
            ll.reply_err(req, errno.EIO)

    def on_fallocate(req: int, ino: int, mode: int, offset: int, length: int, _fi: int) -> None:
        answer(req, ops.fallocate, ino, mode, offset, length)

    def on_lseek(req: int, ino: int, offset: int, whence: int, _fi: int) -> None:
        answer(req, ops.lseek, ino, offset, whence)

    cb_f, cb_l = FALLOCATE_FN(on_fallocate), LSEEK_FN(on_lseek)
    _keep.extend([cb_f, cb_l, ll])
    c_void_p.from_address(copy + SLOT["fallocate"]).value = ctypes.cast(cb_f, c_void_p).value
    c_void_p.from_address(copy + SLOT["lseek"]).value = ctypes.cast(cb_l, c_void_p).value
    log.debug("fallocate and lseek handlers installed")
    return True
