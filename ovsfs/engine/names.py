"""Names: volume, snapshot and vPool names, and backend object names of a volume."""

from __future__ import annotations

import re

from ovsfs.errors import InvalidArgument

MAX_VOLUME_SIZE = 1 << 50  # 1 PiB: far below what the map can address (2^48 clusters)

NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$")


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidArgument(
            f"bad {kind} name {name!r}: use 1-200 of A-Z a-z 0-9 . _ - (not starting with '.')")
    return name


def sco_name(n: int) -> str:
    return f"sco/{n:016x}"


def tlog_name(n: int) -> str:
    return f"tlog/{n:016x}"
