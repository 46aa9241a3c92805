"""qemu-storage-daemon's vhost-user-blk export: the reference back end the client library
and the guest harness are tested against (started and stopped by PID in each test that
uses it). Fixtures `qsd_factory` and `qsd`: a conftest imports them to use them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

QSD = shutil.which("qemu-storage-daemon") or "/usr/bin/qemu-storage-daemon"


class StorageDaemon:
    """One qemu-storage-daemon exporting one image file over vhost-user-blk."""

    def __init__(self, base: Path, size: int, *, writable: bool = True, num_queues: int = 1,
                 inject: list[dict[str, Any]] | None = None) -> None:
        base.mkdir(parents=True, exist_ok=True)
        self.image = base / "disk.img"
        self.socket = base / "vhost.sock"
        self.log_path = base / "qsd.log"
        with open(self.image, "wb") as f:
            f.truncate(size)
        node: dict[str, Any] = {"driver": "file", "node-name": "f0", "filename": str(self.image)}
        if inject:
            # blkdebug: QEMU's own fault injection in its block layer (real error paths).
            node = {"driver": "blkdebug", "node-name": "d0", "image": node, "inject-error": inject}
        self.argv = [QSD, "--blockdev", json.dumps(node),
                     "--export", json.dumps({"type": "vhost-user-blk", "id": "e0", "node-name": node["node-name"],
                                             "addr": {"type": "unix", "path": str(self.socket)},
                                             "writable": writable, "num-queues": num_queues})]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> "StorageDaemon":
        """Start (or, after kill(), start again: the image stays) and wait for the socket."""
        self.socket.unlink(missing_ok=True)   # a killed daemon leaves its socket behind
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"qemu-storage-daemon exited {self.proc.returncode}: {self.log_path.read_text()}")
            if self.socket.exists():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError("qemu-storage-daemon made no socket in time")
            time.sleep(0.02)

    def wait_listening(self, timeout: float = 10.0) -> None:
        """Until the export accepts a new front end (it takes one at a time)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(self.socket))
                    return
                except OSError:
                    time.sleep(0.02)
        raise AssertionError("the export does not accept connections")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def image_bytes(self, offset: int, length: int) -> bytes:
        with open(self.image, "rb") as f:
            return os.pread(f.fileno(), length, offset)


@pytest.fixture
def qsd_factory(tmp_path: Path) -> Iterator[Callable[..., StorageDaemon]]:
    """qsd_factory(size=8 MiB, writable=True, num_queues=1, inject=None) -> a started export."""
    made: list[StorageDaemon] = []

    def make(size: int = 8 << 20, **kw: Any) -> StorageDaemon:
        d = StorageDaemon(tmp_path / f"qsd{len(made)}", size, **kw)
        made.append(d)
        return d.start()

    yield make
    for d in made:
        d.stop()


@pytest.fixture
def qsd(qsd_factory: Callable[..., StorageDaemon]) -> StorageDaemon:
    return qsd_factory()
