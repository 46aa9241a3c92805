"""`ovsfs qemu` started paused (-S) with QMP on stdio, for tests that check what QEMU made of
the translated arguments: `with ovsfs_qemu(state, drive) as qmp: qmp("query-block")`.

The process is `ovsfs` until it execs qemu-system-x86_64 (same PID); it is stopped by
that PID: `quit` over QMP, then SIGKILL if it is still there."""

from __future__ import annotations

import json
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from tests.conftest import OVSFS

VIRTIO_VENDOR, VIRTIO_BLK = 0x1AF4, (0x1001, 0x1042)    # transitional, modern PCI ids

Qmp = Callable[..., dict[str, Any]]


def _command(proc: subprocess.Popen[str], cmd: str, **arguments: object) -> dict[str, Any]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps({"execute": cmd, "arguments": arguments} if arguments else {"execute": cmd}) + "\n")
    proc.stdin.flush()
    while True:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"QEMU exited: {proc.stderr.read() if proc.stderr else ''}")
        msg: dict[str, Any] = json.loads(line)
        if "return" in msg or "error" in msg:
            return msg


@contextmanager
def ovsfs_qemu(state: Path, drive: str, env: dict[str, str] | None = None,
               proc_out: list[subprocess.Popen[str]] | None = None) -> Iterator[Qmp]:
    """QEMU (q35, TCG, 64 MiB, no devices but the drive) from `ovsfs qemu` with `-drive
    DRIVE`; yields qmp(command, **arguments) -> the reply. On a clean exit of the block
    QEMU is asked to quit and must exit 0."""
    proc = subprocess.Popen([OVSFS, "--state", str(state), "qemu", "--", "-machine", "q35", "-accel", "tcg",
                             "-m", "64", "-nodefaults", "-display", "none", "-S", "-qmp", "stdio",
                             "-drive", drive],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if proc_out is not None:
        proc_out.append(proc)
    try:
        assert proc.stdout is not None
        assert "QMP" in proc.stdout.readline(), proc.stderr.read() if proc.stderr else ""
        assert "return" in _command(proc, "qmp_capabilities")
        yield lambda cmd, **args: _command(proc, cmd, **args)
        _command(proc, "quit")
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None:
                f.close()
