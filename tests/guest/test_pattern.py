"""The host-side checks the guest tests rely on catch what they must (no QEMU needed)."""

from __future__ import annotations

from tests.guest.pattern import CHUNK, MIB, check_writeloop, chunk, pattern, slot_of


def _disk_after(seed: int, mib: int, written: list[int]) -> bytearray:
    disk = bytearray(mib * MIB)
    for n in written:
        s = slot_of(n, mib)
        disk[s * CHUNK:(s + 1) * CHUNK] = chunk(seed, n)
    return disk


def test_pattern_names_every_sector() -> None:
    p = pattern(3, 1)
    sectors = [p[o:o + 512] for o in range(0, len(p), 512)]
    assert len(p) == MIB and len(set(sectors)) == len(sectors)
    assert pattern(4, 1) != p


def test_writeloop_check_accepts_acked_and_torn_inflight() -> None:
    seed, mib = 7, 1                        # 16 slots: chunks 0..19 wrap around
    acked = list(range(20))
    assert check_writeloop(bytes(_disk_after(seed, mib, acked)), seed, mib, acked) == []
    # Chunk 20 was in flight: fully written, or torn at a sector boundary, is fine.
    disk = _disk_after(seed, mib, acked + [20])
    assert check_writeloop(bytes(disk), seed, mib, acked) == []
    s = slot_of(20, mib)
    disk[s * CHUNK + 4096:(s + 1) * CHUNK] = chunk(seed, 4)[4096:]   # old half: chunk 4 was there
    assert check_writeloop(bytes(disk), seed, mib, acked) == []


def test_writeloop_check_finds_lost_and_stale_chunks() -> None:
    seed, mib = 7, 1
    acked = list(range(20))
    lost = _disk_after(seed, mib, acked[:-1])          # the last ACKED chunk never landed
    assert len(check_writeloop(bytes(lost), seed, mib, acked)) == 1
    zeroed = _disk_after(seed, mib, acked)
    zeroed[3 * CHUNK + 512:3 * CHUNK + 1024] = bytes(512)   # one sector of an old chunk lost
    assert check_writeloop(bytes(zeroed), seed, mib, acked)[0].startswith("slot 3:")
    other_seed = _disk_after(seed + 1, mib, acked)
    assert len(check_writeloop(bytes(other_seed), seed, mib, acked)) == 16


def test_writeloop_check_with_two_writers_in_flight() -> None:
    seed, mib = 7, 1                        # 16 slots; writer 0: even chunks, writer 1: odd
    acked = [0, 1, 3, 2, 5, 4, 6, 8, 7, 10, 9, 12, 11, 13, 15, 14, 16]
    writing = acked + [17, 18]              # both writers had a chunk in flight
    disk = _disk_after(seed, mib, sorted(acked) + [18])     # 18 landed, 17 did not
    assert check_writeloop(bytes(disk), seed, mib, acked, writing) == []
    # Without the WRITING lines 18 is not known to be in flight: its slot looks overwritten.
    assert len(check_writeloop(bytes(disk), seed, mib, acked, [])) == 1
    lost = _disk_after(seed, mib, [n for n in sorted(acked) if n != 13])
    assert check_writeloop(bytes(lost), seed, mib, acked, writing)[0].startswith("slot 13:")
