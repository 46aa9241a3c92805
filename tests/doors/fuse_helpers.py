"""Helpers for the FUSE door tests: an in-process mount over a real Engine, and a node
in a subprocess (the daemon when tests/conftest.py provides `daemon_factory`, else
`python -m ovsfs.fuse`) for kill / term / restart tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ovsfs.config import Config

SYSTEM_ENV = {**os.environ, "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
REPO = Path(__file__).resolve().parents[2]


def run(cmd: list[str], *, timeout: float = 300, check: bool = True,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a tool to completion; kill its process group by PID if it overstays."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                         env=SYSTEM_ENV, start_new_session=True, cwd=cwd)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise
    res = subprocess.CompletedProcess(cmd, p.returncode, out.decode(errors="replace"), err.decode(errors="replace"))
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd!r} exited {p.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}")
    return res


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below path, from /proc/mounts."""
    root = os.path.realpath(path)
    out = []
    with open("/proc/mounts") as f:
        for line in f:
            mnt = line.split()[1].encode().decode("unicode_escape")
            if mnt == root or mnt.startswith(root + "/"):
                out.append(mnt)
    return out


def wait_mounted(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not mounts_under(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} was not mounted within {timeout}s")
        time.sleep(0.05)


def make_config(state: Path) -> Config:
    cfg = Config()
    cfg.state_dir = state
    cfg.engine.write_buffer_size = 256 << 20
    cfg.nbd.tcp_port = 0
    return cfg


@dataclass
class InprocFuse:
    """serve() in a thread of the test process over a real Engine (reach it as .engine)."""

    state: Path
    engine: Any = None
    cfg: Config = None  # type: ignore[assignment]
    mnt: Path = None  # type: ignore[assignment]
    thread: threading.Thread | None = None
    token: Any = None
    scope: Any = None
    error: list[BaseException] = field(default_factory=list)

    @property
    def pool(self) -> Path:
        return self.mnt / "default"

    def start(self) -> "InprocFuse":
        from ovsfs.backend.local import LocalStore
        from ovsfs.engine.engine import Engine
        from ovsfs.errors import AlreadyExists
        from ovsfs.fuse.mount import serve

        self.cfg = make_config(self.state)
        self.engine = Engine(self.cfg, LocalStore(self.cfg.path(self.cfg.backend.path)))
        self.engine.open()
        try:
            self.engine.create_vpool("default")
        except AlreadyExists:
            pass
        ready = threading.Event()

        async def main() -> None:
            self.token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as self.scope:
                async with trio.open_nursery() as n:
                    self.mnt = await n.start(serve, self.engine, self.cfg)
                    ready.set()

        def target() -> None:
            try:
                trio.run(main)
            except BaseException as e:  # surfaced by stop()
                self.error.append(e)
            finally:
                ready.set()

        self.thread = threading.Thread(target=target, name="fuse-inproc", daemon=True)
        self.thread.start()
        ready.wait(30)
        if self.error or self.mnt is None:
            raise AssertionError(f"serve() did not start: {self.error}")
        return self

    def stop(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            trio.from_thread.run_sync(self.scope.cancel, trio_token=self.token)
            self.thread.join(60)
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        assert not mounts_under(self.state), "the FUSE mount outlived serve()"
        if self.error:
            raise self.error[0]


class FuseNode:
    """`python -m ovsfs.fuse STATE --nbd` in its own process: a stand-in for the daemon."""

    def __init__(self, state: Path, nbd: bool = True) -> None:
        self.state = state
        self.nbd = nbd
        self.proc: subprocess.Popen | None = None
        self.mnt = state / "mnt"
        self.nbd_socket = state / "run" / "nbd.sock"
        self.log = state / "node.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        cfg = self.state / "node.toml"
        cfg.write_text("[engine]\nwrite_buffer_size = 268435456\n[nbd]\ntcp_port = 0\n")
        cmd = [sys.executable, "-m", "ovsfs.fuse", str(self.state), "--config", str(cfg)]
        if self.nbd:
            cmd.append("--nbd")
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=logf, cwd=REPO, start_new_session=True)
        logf.close()
        line = self.proc.stdout.readline().decode()  # type: ignore[union-attr]
        if not line.startswith("READY"):
            self.proc.wait(10)
            raise AssertionError(f"node did not start: {line!r}\n{self.log.read_text()[-3000:]}")

    def stop(self) -> int:
        """SIGTERM by PID and wait."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(60)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        # A test that killed the node leaves a dead mount: clear it so nothing stays behind.
        if mounts_under(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)


class DaemonNode:
    """The node daemon from tests/conftest.py's daemon_factory, with the FuseNode interface."""

    def __init__(self, d: Any) -> None:
        self.d = d
        state = Path(getattr(d, "state_dir", None) or d.state)
        self.state = state
        self.mnt = state / "mnt"
        self.nbd_socket = Path(d.nbd_socket)

    @property
    def pid(self) -> int:
        return self.d.pid

    def start(self) -> None:
        self.d.start()
        wait_mounted(self.mnt)

    def stop(self) -> int:
        return self.d.stop()

    def kill(self) -> None:
        self.d.kill()

    def close(self) -> None:
        if mounts_under(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
