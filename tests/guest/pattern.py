"""The bytes the guest's /init writes (tests/guest/init.sh), made the same way on the host.

A pattern is 64-byte lines "ovsfs seed=S line=L" (L = byte offset / 64), space padded to 63
bytes plus a newline: every 512-byte sector is different and names its own place, so a
misplaced, stale or zeroed sector shows up in a byte comparison. Writeloop chunk n is 64 KiB
of lines "ovsfs seed=S chunk=n line=L" at slot n mod (16 * MiB).
"""

from __future__ import annotations

import hashlib

MIB = 1 << 20
CHUNK = 64 << 10
LINE = 64


def _line(text: str) -> bytes:
    return text.ljust(LINE - 1).encode() + b"\n"


def pattern(seed: int, mib: int) -> bytes:
    """The first `mib` MiB the guest's `write` job puts on /dev/vda."""
    return b"".join(_line(f"ovsfs seed={seed} line={i}") for i in range(mib * MIB // LINE))


def pattern_sha256(seed: int, mib: int) -> str:
    return hashlib.sha256(pattern(seed, mib)).hexdigest()


def trimmed(seed: int, mib: int) -> bytes:
    """The pattern after the guest's `trim` job discarded its second MiB (read as zeros)."""
    p = pattern(seed, mib)
    return p[:MIB] + bytes(MIB) + p[2 * MIB:]


def chunk(seed: int, n: int) -> bytes:
    """Writeloop chunk n (64 KiB)."""
    return b"".join(_line(f"ovsfs seed={seed} chunk={n} line={i}") for i in range(CHUNK // LINE))


def slot_of(n: int, mib: int) -> int:
    """Where writeloop chunk n goes: its 64 KiB slot (byte offset = slot * CHUNK)."""
    return n % (mib * MIB // CHUNK)


def check_writeloop(data: bytes, seed: int, mib: int, acked: list[int],
                    writing: list[int] | None = None) -> list[str]:
    """Problems found in `data` (the first `mib` MiB of the disk) after a writeloop whose
    acknowledged chunks are `acked` and started ones `writing` (the WRITING lines; default:
    a single writer, so only the chunk after the last ACK can have been started);
    an empty list means every acknowledged write is there.

    Each slot must hold its newest acknowledged chunk, unless a later chunk of that slot was
    in flight when the lights went out (started, never acknowledged): then the slot may hold
    that chunk, or a mix of the two at 512-byte sector granularity (a torn write) -- but
    nothing else.
    """
    problems: list[str] = []
    if not acked:
        return problems
    started = set(writing) if writing is not None else {max(acked) + 1}
    inflight: dict[int, int] = {}
    for n in started - set(acked):
        inflight[slot_of(n, mib)] = n
    newest: dict[int, int] = {}
    for n in sorted(acked):
        newest[slot_of(n, mib)] = n
    for slot, n in sorted(newest.items()):
        got = data[slot * CHUNK:(slot + 1) * CHUNK]
        want = chunk(seed, n)
        if got == want:
            continue
        if inflight.get(slot, -1) > n:
            alt = chunk(seed, inflight[slot])
            if all(got[o:o + 512] in (want[o:o + 512], alt[o:o + 512]) for o in range(0, CHUNK, 512)):
                continue
        first_bad = next(o for o in range(0, CHUNK, 512) if got[o:o + 512] != want[o:o + 512])
        problems.append(f"slot {slot}: acknowledged chunk {n} missing (first bad sector at +{first_bad}: "
                        f"{got[first_bad:first_bad + 40]!r})")
    return problems
