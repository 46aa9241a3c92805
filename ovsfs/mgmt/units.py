"""Sizes as people write them: 4096, 512K, 10G, 1.5T (binary multiples)."""

from __future__ import annotations

import re

from ovsfs.errors import InvalidArgument

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    if isinstance(text, bool):
        raise InvalidArgument(f"bad size {text!r}")
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise InvalidArgument(f"bad size {text!r}: use a number with an optional K, M, G or T suffix")
    number, unit = m.groups()
    value = float(number) * _UNITS[unit.upper()] if "." in number else int(number) * _UNITS[unit.upper()]
    if value != int(value):
        raise InvalidArgument(f"bad size {text!r}: not a whole number of bytes")
    return int(value)


def format_size(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        mult = _UNITS[unit]
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit]:
            return f"{n / _UNITS[unit]:.1f}{unit}"
    return str(n)
