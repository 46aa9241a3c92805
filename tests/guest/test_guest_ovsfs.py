"""Issue 12, "what it must show": a Linux guest under QEMU (TCG) on `openvstorage:VOL`,
served by the shm door (vhost-user-blk over shared memory) of a real daemon.

- write a pattern in the guest, power off, boot again to verify it, and check the same bytes
  through NBD (nbdcopy on the daemon's NBD socket) and FUSE (the volume's file in the mount);
  a snapshot taken after the write boots read-only (`openvstorage:VOL@SNAP`) with its bytes;
- the same with the daemon restarted between the two boots, then a DISCARD from the guest;
- the daemon SIGKILLed while the guest writes: QEMU reconnects or fails cleanly, the daemon
  restarts, and every chunk the guest saw acknowledged (fsync returned) is on the volume
  (read through NBD; FUSE sees the same bytes).
Guests boot through `ovsfs qemu` (one boot through stock QEMU on `ovsfs qemu-args`).
The harness itself is validated on qemu-storage-daemon in test_guest_qsd.py.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path
from typing import Callable

from tests.conftest import OVSFS, Daemon
from tests.guest.boot import QEMU, BootResult, boot, tcg_args, writeloop_with_crash
from tests.guest.image import GuestImage
from tests.guest.pattern import MIB, check_writeloop, pattern, pattern_sha256, trimmed

VOL = "gvol"
SIZE = 32 * MIB
PATTERN_MIB = 4
LOOP_MIB = 2       # 32 slots of 64 KiB: a loop of 60 chunks wraps around
# Two writers: up to two requests in flight when the daemon dies. QEMU restarts each ring
# at the used index; every writer must go on (none of its requests lost in the reconnect).
WRITERS = 2


def _socket(d: Daemon, vol: str = VOL) -> Path:
    return d.state / "run" / "vhost" / f"{vol}.sock"


def _wait_socket(d: Daemon, vol: str = VOL, timeout: float = 15.0) -> Path:
    """The door makes a volume's socket from its reconcile loop: wait for it."""
    sock = _socket(d, vol)
    deadline = time.monotonic() + timeout
    while not sock.exists():
        assert time.monotonic() < deadline, f"no vhost-user socket {sock} after {timeout} s:\n{d.log()}"
        time.sleep(0.05)
    return sock


def _ovsfs_qemu(d: Daemon, target: str = VOL, cpus: int = 1) -> list[str]:
    """`ovsfs qemu -- ... -drive file=openvstorage:VOL,...`: the CLI adds the shared memfd
    RAM (merged into -machine), and the vhost-user-blk device on the volume's socket with
    `reconnect=1`; it execs QEMU, so the PID we hold is QEMU's. `cpus` > 1 also asks for
    as many virtqueues (the guest uses one per CPU)."""
    queues = f",queues={cpus}" if cpus > 1 else ""
    return [OVSFS, "--state", str(d.state), "qemu", "--", *tcg_args(cpus=cpus), "-machine", "q35",
            "-drive", f"file=openvstorage:{target},if=virtio,cache=none,format=raw{queues}"]


def _qemu_args(d: Daemon) -> list[str]:
    """Stock QEMU with what `ovsfs qemu-args openvstorage:VOL` prints."""
    printed = json.loads(d.cli("qemu-args", f"openvstorage:{VOL}", "--memory", "256M", "--json").stdout)
    return [QEMU, *tcg_args(mem_mib=None), "-machine", "q35", *printed]


def _make_volume(d: Daemon) -> None:
    d.cli("volume", "create", VOL, "--size", str(SIZE))
    _wait_socket(d)


def _nbd_bytes(d: Daemon) -> bytes:
    """The whole volume read through the NBD door with nbdcopy."""
    r = subprocess.run(["nbdcopy", f"nbd+unix:///{VOL}?socket={d.nbd_socket}", "-"],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert len(r.stdout) == SIZE
    return r.stdout


def _fuse_bytes(d: Daemon) -> bytes:
    with open(d.state / "mnt" / "default" / f"{VOL}.raw", "rb") as f:
        return f.read()


def _check_write(res: BootResult, seed: int) -> None:
    assert res.done, res.explain()
    # The config the shm door sent (GET_CONFIG) and its GET_ID serial, as the guest saw them.
    assert int(res.dev["size"]) == SIZE and res.dev["ro"] == "0", res.dev
    assert res.dev["serial"] == VOL, res.dev                       # GET_ID
    assert int(res.dev["discard_max"]) > 0 and int(res.dev["wz_max"]) > 0, res.dev   # DISCARD, WRITE_ZEROES
    want = pattern_sha256(seed, PATTERN_MIB)
    assert res.results["WRITE"]["sha256"] == want
    assert res.results["READBACK"]["sha256"] == want


def _check_verify(res: BootResult, seed: int) -> None:
    assert res.done, res.explain()
    want = pattern_sha256(seed, PATTERN_MIB)
    assert res.results["VERIFY"] == {"sha256": want, "want": want, "ok": "yes"}, res.explain()


def _check_doors(d: Daemon, seed: int, head: bytes | None = None) -> None:
    """The guest's bytes (`head`, else the pattern), seen through the other doors; nothing
    past them was touched."""
    want = (head or pattern(seed, PATTERN_MIB)) + bytes(SIZE - PATTERN_MIB * MIB)
    assert _nbd_bytes(d) == want, "NBD sees other bytes than the guest wrote"
    assert _fuse_bytes(d) == want, "FUSE sees other bytes than the guest wrote"


def test_guest_writes_powers_off_verifies_and_reads_its_snapshot(
        guest_image: GuestImage, daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory({"fuse": {"enabled": True}})
    _make_volume(d)
    # Two vCPUs and two virtqueues: the guest writes with one writer per CPU at once.
    w = boot(_ovsfs_qemu(d, cpus=2), "write", seed=21, mib=PATTERN_MIB, image=guest_image)
    _check_write(w, 21)
    assert w.dev["queues"] == "2" and w.results["WRITE"]["writers"] == "2", w.results
    # blk-mq ran both hardware queues (its debugfs "run" counters), so both rings carried I/O.
    assert len(w.results["QUEUES"]) == 2 and all(int(n) > 0 for n in w.results["QUEUES"].values()), w.results
    d.cli("snapshot", "create", VOL, "s1")
    _check_verify(boot(_ovsfs_qemu(d), "verify", seed=21, mib=PATTERN_MIB, image=guest_image), 21)
    _check_doors(d, 21)

    # The snapshot's socket (VOL@SNAP) serves the bytes of the snapshot, read-only, after
    # the volume was overwritten through NBD.
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 0 1M",
                        f"nbd+unix:///{VOL}?socket={d.nbd_socket}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    _wait_socket(d, f"{VOL}@s1")
    snap = boot(_ovsfs_qemu(d, f"{VOL}@s1"), "verify", seed=21, mib=PATTERN_MIB, image=guest_image)
    _check_verify(snap, 21)
    assert snap.dev["ro"] == "1" and int(snap.dev["size"]) == SIZE, snap.dev
    assert _nbd_bytes(d)[:MIB] == b"\xab" * MIB


def test_guest_verifies_and_discards_after_a_daemon_restart(
        guest_image: GuestImage, daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory({"fuse": {"enabled": True}})
    _make_volume(d)
    _check_write(boot(_ovsfs_qemu(d), "write", seed=22, mib=PATTERN_MIB, image=guest_image), 22)
    d.stop()
    d.start()
    _wait_socket(d)
    # The second boot runs stock QEMU on what `ovsfs qemu-args` prints (no ovsfs in between).
    _check_verify(boot(_qemu_args(d), "verify", seed=22, mib=PATTERN_MIB, image=guest_image), 22)
    _check_doors(d, 22)
    # A DISCARD from the guest's own driver (BLKDISCARD of the second MiB) reads back as zeros.
    t = boot(_ovsfs_qemu(d), "trim", seed=22, mib=PATTERN_MIB, image=guest_image)
    assert t.done, t.explain()
    assert t.results["TRIM"]["sha256"] == hashlib.sha256(trimmed(22, PATTERN_MIB)).hexdigest()
    _check_doors(d, 22, trimmed(22, PATTERN_MIB))


def _clear_stale_mount(d: Daemon) -> None:
    """A SIGKILLed daemon that did not come back leaves its FUSE mount: unmount it (lazily)."""
    mnt = str(d.state / "mnt")
    with open("/proc/mounts") as f:
        mounted = any(line.split()[1] == mnt for line in f)
    if mounted and not d.running():
        subprocess.run(["fusermount3", "-u", "-z", mnt], check=False)


def test_guest_acked_writes_survive_a_sigkilled_daemon(
        guest_image: GuestImage, daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory({"fuse": {"enabled": True}})
    _make_volume(d)

    def restart() -> None:
        d.start()       # clears the stale FUSE mount the killed daemon left
        _wait_socket(d)

    try:
        # `ovsfs qemu` sets reconnect=1: QEMU reconnects to the restarted door and the loop
        # goes on (requests in flight at the kill are replayed from the ring), or it fails
        # visibly (an I/O error in the guest, QEMU exiting with an error).
        run = writeloop_with_crash(_ovsfs_qemu(d), d.kill, restart, seed=23, mib=LOOP_MIB, image=guest_image,
                                   writers=WRITERS)
    finally:
        _clear_stale_mount(d)
    res = run.result
    print(run.summary())
    assert len(run.acked_before) >= 8, res.explain()
    assert run.clean, f"{run.summary()}\n{res.explain()}"
    # The loop wraps around its slots (32 here), so later chunks overwrite earlier ones.
    data = _nbd_bytes(d)
    problems = check_writeloop(data[:LOOP_MIB * MIB], 23, LOOP_MIB, res.acked, res.writing)
    assert not problems, problems
    assert data[LOOP_MIB * MIB:] == bytes(SIZE - LOOP_MIB * MIB)   # nothing landed elsewhere
    assert _fuse_bytes(d) == data, "FUSE sees other bytes than NBD"
