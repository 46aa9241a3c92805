"""Local ASDs that do not start must not stop the node (issue 9, fault review finding 1).

A stopped (SIGSTOP) ASD outlives a daemon killed with SIGKILL: it does not act on its death
signal and holds its port. The next start stops it by the PID the daemon recorded (after
checking /proc/PID/cmdline names that ASD's disk) and starts a new one. An ASD whose port
is taken by something else does not stop the start either: the node runs degraded, the ASD
is reported down with why in `backend status`, and it is started once the port is free.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any, Callable

from tests.conftest import Daemon, free_ports
from tests.daemon.test_backend_away import asd_pids

CONFIG = {"backend": {"asd_restart_interval": 0.5}}


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_up(d: Daemon, n: int, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = d.cli_json("backend", "status")
        if st["asds_up"] == n or time.monotonic() > deadline:
            return st
        time.sleep(0.2)


def test_stopped_leftover_asd_does_not_stop_the_restart(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(CONFIG, asds=4)
    stuck = asd_pids(d)[1]
    os.kill(stuck, signal.SIGSTOP)
    try:
        # Stopped for real before the daemon dies: a SIGTERM pending with the SIGSTOP would
        # be taken first (the lower signal number).
        deadline = time.monotonic() + 10
        while _state(stuck) != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        d.kill()
        assert _alive(stuck), Path(f"/proc/{stuck}/stat").read_text()  # the stopped ASD outlived its daemon, holding its port
        d.start()
        assert not _alive(stuck), "the leftover ASD was not stopped by its recorded PID"
        st = _wait_up(d, 4)
        assert st["asds_up"] == 4, st
        assert d.cli("volume", "create", "v1", "--size", "16M").returncode == 0
    finally:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(stuck, sig)
            except ProcessLookupError:
                pass


def test_asd_that_cannot_start_is_reported_and_started_later(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(CONFIG, asds=4)
    d.cli("volume", "create", "v1", "--size", "16M")
    d.stop()
    port = d.config["backend"]["local_asd_ports"][2]
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", port))
    blocker.listen(1)
    try:
        d.start()   # before the fix: exit 1, "ASD ... did not start (port ... in use?)"
        st = d.cli_json("backend", "status")
        row = next(a for a in st["asds"] if a["addr"] == f"127.0.0.1:{port}")
        assert not row["up"] and "did not start" in row["local"]["error"], row
        human = d.cli("backend", "status").stdout
        assert "DOWN (" in human and "did not start" in human, human
        assert st["asds_up"] == 3, st
        assert d.cli_json("volume", "list")[0]["name"] == "v1"
    finally:
        blocker.close()
    st = _wait_up(d, 4)
    assert st["asds_up"] == 4, st
    row = next(a for a in st["asds"] if a["addr"] == f"127.0.0.1:{port}")
    assert row["local"]["state"] == "running" and row["local"]["error"] == "", row
    # the PIDs are recorded for the next start
    pids = json.loads((d.run_dir / "asd-pids.json").read_text())
    assert sorted(pids) == ["0", "1", "2", "3"]


def test_backend_status_lists_configured_asds_that_never_answered(daemon_factory: Callable[..., Daemon]) -> None:
    """An ASD in backend.asds that does not answer at start is listed (down, never
    answered), and the manifest index says it is incomplete (finding 6)."""
    (dead,) = free_ports(1)
    d = daemon_factory({"backend": {"asds": [f"127.0.0.1:{dead}"]}}, asds=3)
    st = d.cli_json("backend", "status")
    row = next((a for a in st["asds"] if a["addr"] == f"127.0.0.1:{dead}"), None)
    assert row is not None and not row["up"] and row["never_answered"], st["asds"]
    assert st["asds_down"] == 1 and st["index_complete"] is False
    human = d.cli("backend", "status").stdout
    assert f"127.0.0.1:{dead}" in human and "DOWN (never answered)" in human, human
    assert "index:          INCOMPLETE" in human, human
