"""Start, cut, sync and stop the power-cut filesystem (lazyfs.py) from a test or a tool.

    with PowerCutFS(base) as fs:       # mounts base/mnt over base/src
        ... run something on fs.mnt ...
        fs.power_cut(kill=[pid])       # cut, SIGKILL those pids, SIGKILL lazyfs, unmount
        fs.start()                     # back, on what was durable

Every process is stopped by PID and the mount is unmounted at exit, also on failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parents[2]


def is_mounted(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


def unmount(path: Path) -> None:
    """Unmount path, lazily if busy; quiet when it is not mounted."""
    for cmd in (["fusermount3", "-u", "-z", str(path)], ["umount", "-l", str(path)]):
        if not is_mounted(path):
            return
        subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if is_mounted(path):
        raise RuntimeError(f"cannot unmount {path}")


class PowerCutFS:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.src = base / "src"
        self.mnt = base / "mnt"
        self.control = base / "lazyfs.sock"
        self.work = Path("/dev/shm") / f"lazyfs-{os.getpid()}-{abs(hash(str(base))) % 10**9}"
        self.log = base / "lazyfs.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.cuts = 0

    def start(self, timeout: float = 20.0) -> "PowerCutFS":
        assert self.proc is None, "already running"
        for p in (self.src, self.mnt):
            p.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.work, ignore_errors=True)
        # A killed lazyfs leaves its socket file behind: only a fresh one means "listening".
        self.control.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.harness.lazyfs", str(self.src), str(self.mnt),
                 "--control", str(self.control), "--work", str(self.work)],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while not (is_mounted(self.mnt) and self._answers()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"lazyfs did not start:\n{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.02)
        return self

    def _answers(self) -> bool:
        if not self.control.exists():
            return False
        try:
            self.command("stats", timeout=5.0)
        except OSError:
            return False   # bound but not accepting yet
        return True

    def command(self, cmd: str, timeout: float = 60.0) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.control))
            s.sendall(cmd.encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                data = s.recv(65536)
                if not data:
                    raise RuntimeError(f"lazyfs closed the control socket on {cmd!r}")
                buf += data
        out: dict[str, Any] = json.loads(buf)
        if "error" in out:
            raise RuntimeError(f"lazyfs {cmd}: {out['error']}")
        return out

    def sync(self) -> dict[str, Any]:
        return self.command("sync")

    def stall(self, prefix: str | None) -> dict[str, Any]:
        """New names under prefix (relative to the mount) wait until stall(None)."""
        return self.command("unstall" if prefix is None else f"stall {prefix}")

    def stats(self) -> dict[str, Any]:
        return self.command("stats")

    def power_cut(self, kill: Iterable[int] = ()) -> dict[str, Any]:
        """Pull the plug: drop what is not durable, SIGKILL the given processes, then lazyfs; unmount.

        The processes are killed after the cut, so nothing they do afterwards reaches the disk.
        Returns what was dropped (the stats at the cut).
        """
        dropped = self.command("cut")
        for pid in kill:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.kill()
        self.cuts += 1
        return dropped

    def kill(self) -> None:
        """SIGKILL lazyfs (by PID), unmount, and drop the volatile view."""
        if self.proc is not None:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
            self.proc = None
        unmount(self.mnt)
        shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> "PowerCutFS":
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.kill()
