"""Names: volume, snapshot and vPool names, and backend object names of a volume."""

from __future__ import annotations

import re

from ovsfs.errors import InvalidArgument

MAX_VOLUME_SIZE = 1 << 50  # 1 PiB: far below what the map can address (2^48 clusters)

SECTOR = 512               # bytes: every volume size is a multiple of this, kept to the byte

NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$")


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidArgument(
            f"bad {kind} name {name!r}: use 1-200 of A-Z a-z 0-9 . _ - (not starting with '.')")
    return name


def check_size(size: object) -> int:
    """The one size rule (create, resize, import, clone, FUSE truncate and growth): any
    multiple of SECTOR (512) bytes from 0 to MAX_VOLUME_SIZE, kept to the byte (never
    rounded to the cluster size: the last cluster of a volume may be partial).

    Returns the size (an int); raises InvalidArgument with the same message everywhere."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 0 or size % SECTOR or size > MAX_VOLUME_SIZE:
        raise InvalidArgument(f"bad volume size {size!r}: a size is a multiple of {SECTOR} bytes, "
                              f"from 0 to {MAX_VOLUME_SIZE} bytes")
    return size


def sco_name(n: int) -> str:
    return f"sco/{n:016x}"


def tlog_name(n: int) -> str:
    return f"tlog/{n:016x}"
