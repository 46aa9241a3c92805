"""Glue for the node daemon and CLI: start and stop local ASDs, open a proxy from the state dir.

`ovsfs run --asds N` calls spawn_asds(state/"asd", N, ports=...) then
open_proxy(state/"proxy", addrs), and stop_asds() on the way out.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from ovsfs.backend.policy import PresetStore
from ovsfs.backend.proxy import ProxyStore
from ovsfs.errors import BackendError

PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    # Runs in the child before exec: SIGTERM when the spawning daemon dies, even by
    # SIGKILL, so a crashed daemon leaves no ASD behind holding its ports.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def spawn_asd(path: Path, host: str, port: int, node: str) -> tuple[subprocess.Popen[str], str]:
    """Start one ASD with its disk at `path`; returns (process, "host:port").

    Raises BackendError (the process already stopped) when it does not come up, e.g.
    because its port is taken."""
    # Own session: a ^C at the terminal must not stop the ASDs before the daemon
    # has flushed its volumes to them; the daemon stops them itself.
    p = subprocess.Popen([sys.executable, "-m", "ovsfs.backend.asd", "--path", str(path),
                          "--listen", f"{host}:{port}", "--node", node],
                         stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                         start_new_session=True, preexec_fn=_child_setup)
    try:
        m = re.search(r"listening on (\S+)", p.stdout.readline() if p.stdout else "")
    except BaseException:
        stop_asds([p])
        raise
    if not m:
        stop_asds([p])
        raise BackendError(f"ASD {path} did not start (port {port} in use?)")
    return p, m.group(1)


def spawn_asds(base: Path, n: int, node: str = "node1", host: str = "127.0.0.1",
               ports: list[int] | None = None) -> list[tuple[subprocess.Popen[str], str]]:
    """Start n ASD processes with disks at base/0..n-1; returns (process, "host:port") pairs.

    Each ASD is its own storage node (`NODE-i`) for placement. `ports` fixes the ports
    (0 or None: any free one). The caller stops them by PID (stop_asds); if one fails to
    start, those already started are stopped here.
    """
    out: list[tuple[subprocess.Popen[str], str]] = []
    try:
        for i in range(n):
            out.append(spawn_asd(Path(base) / str(i), host, ports[i] if ports else 0, f"{node}-{i}"))
    except BaseException:
        stop_asds([p for p, _ in out])
        raise
    return out


def is_our_asd(pid: int, path: Path) -> bool:
    """True when process `pid` is an ASD serving the disk at `path` (from /proc/PID/cmdline):
    a recorded PID may since have been reused by an unrelated process."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    want = str(path).encode()
    return b"ovsfs.backend.asd" in argv and any(
        a == b"--path" and i + 1 < len(argv) and argv[i + 1] == want for i, a in enumerate(argv))


def reap_leftover(pid: int, path: Path, timeout: float = 5.0) -> bool:
    """Stop a leftover ASD of ours from an earlier daemon life, by its recorded PID: a
    stopped (SIGSTOP) one outlives its daemon (it does not act on the death signal) and
    holds its port. Continued, then SIGTERM, SIGKILL after `timeout` s. Only if the
    process really is the ASD of `path`; returns True when one was stopped."""
    if not is_our_asd(pid, path):
        return False
    for sig in (signal.SIGCONT, signal.SIGTERM):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
    for sig in (signal.SIGKILL, None):
        deadline = time.monotonic() + timeout
        while is_our_asd(pid, path):
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        else:
            return True
        if sig is not None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return True
    return True


def stop_asds(procs: list[subprocess.Popen[str]], timeout: float = 10.0) -> None:
    """SIGTERM each ASD by PID, wait, SIGKILL what is left."""
    for p in procs:
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
        if p.stdout is not None:
            p.stdout.close()


def open_proxy(state: Path, addrs: list[str] | None = None, preset: str = "default",
               **kw: object) -> ProxyStore:
    """A proxy keeping its ASD list, keys, manifest cache and fragment cache under state."""
    state = Path(state)
    p = PresetStore(state / "presets.json").get(preset)
    return ProxyStore(addrs or [], p, state_dir=state, **kw)  # type: ignore[arg-type]
