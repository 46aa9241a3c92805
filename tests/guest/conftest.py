"""Fixtures of the guest tests: the cached guest image and qemu-storage-daemon exports.

qemu-storage-daemon's vhost-user-blk export is the reference back end: the harness (image,
/init, boot helper, pattern checks) is validated against it before it judges ovsfs.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.guest.image import GuestImage, GuestImageError, ensure_image


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The guest kernel + initramfs (built once per machine; tools/setup.sh pre-builds it)."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is not installed (tools/setup.sh installs qemu-system-x86)")
    try:
        return ensure_image()
    except GuestImageError as e:
        pytest.fail(f"cannot build the test guest: {e}")


class QsdExport:
    """qemu-storage-daemon serving one raw image file as a writable vhost-user-blk export."""

    def __init__(self, image: Path, socket_path: Path, log: Path) -> None:
        self.image = image
        self.socket = socket_path
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> "QsdExport":
        self.socket.unlink(missing_ok=True)
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                ["qemu-storage-daemon",
                 "--blockdev", f"driver=file,node-name=f0,filename={self.image}",
                 "--export", f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,"
                             f"addr.path={self.socket},writable=on"],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"qemu-storage-daemon did not listen on {self.socket}: {self.log.read_text()}")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        """SIGKILL by PID, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def qsd_export(tmp_path: Path) -> Iterator[Callable[[int], QsdExport]]:
    """qsd_export(size_bytes) -> a started QsdExport on a fresh zeroed image; stopped by PID."""
    made: list[QsdExport] = []

    def make(size: int) -> QsdExport:
        n = len(made)
        image = tmp_path / f"qsd{n}.raw"
        with open(image, "wb") as f:
            f.truncate(size)
        exp = QsdExport(image, tmp_path / f"qsd{n}.sock", tmp_path / f"qsd{n}.log")
        made.append(exp)
        return exp.start()

    yield make
    for exp in made:
        exp.stop()
