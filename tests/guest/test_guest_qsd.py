"""The guest harness, validated against the reference vhost-user-blk server
(qemu-storage-daemon): a guest's writes are checked on the image file byte for byte, so a
harness bug cannot pass for an ovsfs bug (or hide one) in test_guest_ovsfs.py.
"""

from __future__ import annotations

from typing import Callable

from tests.guest.boot import QEMU, boot, memfd_args, tcg_args, vhost_args, writeloop_with_crash
from tests.qsd import StorageDaemon
from tests.guest.image import GuestImage
from tests.guest.pattern import MIB, check_writeloop, pattern, pattern_sha256

SIZE = 64 * MIB
PATTERN_MIB = 4
LOOP_MIB = 2       # 32 slots of 64 KiB: a loop of 40 chunks wraps around
WRITERS = 2        # two writes in flight at once in the writeloop


def _argv(exp: StorageDaemon, reconnect: int = 0) -> list[str]:
    return [QEMU, *tcg_args(), *memfd_args(), *vhost_args(exp.socket, reconnect=reconnect)]


def test_write_then_verify_across_two_boots(guest_image: GuestImage,
                                            qsd_factory: Callable[..., StorageDaemon]) -> None:
    exp = qsd_factory(size=SIZE)
    w = boot(_argv(exp), "write", seed=11, mib=PATTERN_MIB, image=guest_image)
    assert w.done, w.explain()
    # The config space the back end sent, as the guest's kernel saw it.
    assert int(w.dev["size"]) == SIZE and w.dev["lbs"] == "512" and w.dev["ro"] == "0", w.dev
    want = pattern_sha256(11, PATTERN_MIB)
    assert w.results["WRITE"]["sha256"] == want
    assert w.results["READBACK"]["sha256"] == want

    v = boot(_argv(exp), "verify", seed=11, mib=PATTERN_MIB, image=guest_image)
    assert v.done, v.explain()
    assert v.results["VERIFY"] == {"sha256": want, "want": want, "ok": "yes"}
    # A verify with another seed must fail: the guest's own comparison is not vacuous.
    other = boot(_argv(exp), "verify", seed=12, mib=PATTERN_MIB, image=guest_image)
    assert other.done and other.results["VERIFY"]["ok"] == "no", other.explain()
    assert other.results["VERIFY"]["want"] == pattern_sha256(12, PATTERN_MIB)

    exp.stop()
    data = exp.image.read_bytes()
    assert data[:PATTERN_MIB * MIB] == pattern(11, PATTERN_MIB)
    assert data[PATTERN_MIB * MIB:] == bytes(SIZE - PATTERN_MIB * MIB)   # nothing written past it


def test_writeloop_survives_a_sigkilled_back_end(guest_image: GuestImage,
                                                qsd_factory: Callable[..., StorageDaemon]) -> None:
    """The SIGKILL recipe of the ovsfs test, on the reference server: every chunk the guest
    saw acknowledged (fsync returned) is on the image after the server was killed mid-loop."""
    exp = qsd_factory(size=SIZE)
    # QEMU (reconnect=1) reconnects within ~1 s and the loop goes on: the request in flight
    # at the kill is replayed from the ring (last_avail_idx falls back to the used index).
    run = writeloop_with_crash(_argv(exp, reconnect=1), exp.kill, exp.start, seed=5, mib=LOOP_MIB,
                               image=guest_image, resume_to=40, resume_timeout=10, writers=WRITERS)
    exp.stop()
    res = run.result
    assert len(run.acked_before) >= 8, res.explain()
    assert run.clean, f"{run.summary()}\n{res.explain()}"
    data = exp.image.read_bytes()
    problems = check_writeloop(data[:LOOP_MIB * MIB], 5, LOOP_MIB, res.acked, res.writing)
    assert not problems, problems
    assert data[LOOP_MIB * MIB:] == bytes(SIZE - LOOP_MIB * MIB)   # nothing landed elsewhere
