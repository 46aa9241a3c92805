"""A door that cannot start stops the daemon at start (issue 10, item 7).

Case: a second node on the same machine with the default config logged "nbd door failed:
Address already in use" (TCP 10809), dropped its whole NBD door, unix socket included,
and still reported ready. Now the start stops with one line naming the door, the address
and the config key to change; exit 1; no READY=1 to systemd; nothing left running.

Bound: each refused start must end within START_BOUND seconds (the issue says "a few
seconds"; the check runs before the backend and engine open, it takes well under 1 s).
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import trio

from tests.conftest import OVSFS, TEST_CONFIG, _merge, to_toml
from tests.daemon.images import one_error_line

START_BOUND = 10.0   # seconds


def _listen_tcp(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(1)
    return s


def _listen_unix(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    return s


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        try:
            c.connect(str(path))
            return True
        except OSError:
            return False


def _run(state: Path, tmp_path: Path,
         config: dict[str, Any] | None) -> tuple[subprocess.CompletedProcess[str], list[str], float]:
    """`ovsfs run --state STATE` (with `config` written as STATE/ovsfs.toml, else the default
    config of a first start) under a NOTIFY_SOCKET; (result, sd_notify messages, seconds)."""
    state.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (state / "ovsfs.toml").write_text(to_toml(config))
    notify = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as n:
        n.bind(str(notify))
        t0 = time.monotonic()
        try:
            r = subprocess.run([OVSFS, "run", "--state", str(state)], capture_output=True, text=True,
                               timeout=30, stdin=subprocess.DEVNULL,
                               env={**os.environ, "NOTIFY_SOCKET": str(notify)})
        finally:
            # A start that was wrongly let through and then killed by the timeout must not
            # leave its mount behind (a refused start never mounts).
            mnt = str((state / "mnt").absolute())
            with open("/proc/self/mounts") as f:
                if any(line.split()[1] == mnt and line.split()[2].startswith("fuse") for line in f):
                    subprocess.run(["fusermount3", "-u", "-z", mnt], check=False)
        took = time.monotonic() - t0
        n.setblocking(False)
        msgs = []
        try:
            while True:
                msgs.append(n.recv(4096).decode())
        except BlockingIOError:
            pass
    return r, msgs, took


def _assert_refused(r: subprocess.CompletedProcess[str], msgs: list[str], took: float, state: Path,
                    *parts: str) -> str:
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert took < START_BOUND, f"the refused start took {took:.1f} s"
    line = one_error_line(r.stderr)
    for p in parts:
        assert p in line, f"{p!r} not in {line!r}"
    assert not any("READY=1" in m for m in msgs), msgs
    # Nothing left behind: no API socket, no pid file, no NBD socket of this node, no mount.
    run = state / "run"
    assert not (run / "ovsfs.sock").exists() and not (run / "ovsfs.pid").exists()
    assert not (run / "nbd.sock").exists()
    assert not os.path.ismount(state / "mnt")
    return line


@pytest.fixture
def default_port() -> Iterator[socket.socket | None]:
    """Hold the default NBD port (10809) for the test; None if something else holds it already."""
    try:
        s = _listen_tcp(10809)
    except OSError as e:
        assert e.errno == errno.EADDRINUSE, e
        yield None
        return
    try:
        yield s
    finally:
        s.close()


def test_default_port_taken_stops_ovsfs_run(tmp_path: Path, default_port: socket.socket | None) -> None:
    # A second node with the default config: `ovsfs run` on a fresh state directory.
    state = tmp_path / "var"
    r, msgs, took = _run(state, tmp_path, None)
    line = _assert_refused(r, msgs, took, state, "nbd door cannot start", "TCP 127.0.0.1:10809",
                           "in use", "nbd.tcp_port", str(state.absolute() / "ovsfs.toml"),
                           "tcp_port = a free port, or 0 to disable")
    assert "nbd door failed" not in r.stderr
    print(line)


def test_taken_tcp_port_stops_the_start(tmp_path: Path) -> None:
    holder = _listen_tcp(0)
    port = holder.getsockname()[1]
    try:
        state = tmp_path / "var"
        r, msgs, took = _run(state, tmp_path, _merge(TEST_CONFIG, {"nbd": {"tcp_port": port}}))
        _assert_refused(r, msgs, took, state, "nbd door cannot start", f"TCP 127.0.0.1:{port}", "nbd.tcp_port")
    finally:
        holder.close()


@pytest.mark.parametrize("door,section,key", [("nbd", "nbd", "nbd.socket"),
                                              ("management API", "mgmt", "mgmt.socket")])
def test_live_unix_socket_stops_the_start(tmp_path: Path, door: str, section: str, key: str) -> None:
    # Another node's socket at the configured (absolute) path: it must not be taken over.
    path = tmp_path / "shared.sock"
    holder = _listen_unix(path)
    try:
        state = tmp_path / "var"
        r, msgs, took = _run(state, tmp_path, _merge(TEST_CONFIG, {section: {"socket": str(path)}}))
        _assert_refused(r, msgs, took, state, f"{door} door cannot start", f"unix socket {path}",
                        "listening", key)
        assert _answers(path), "the other process's socket was removed"
    finally:
        holder.close()


def test_stale_unix_socket_is_replaced(daemon_factory: Any, tmp_path: Path) -> None:
    # A socket file nobody listens on (a killed daemon's) does not stop the start.
    path = tmp_path / "stale.sock"
    _listen_unix(path).close()
    d = daemon_factory({"nbd": {"socket": str(path)}})
    assert _answers(path)
    d.stop()


def test_mountpoint_not_a_directory_stops_the_start(tmp_path: Path) -> None:
    state = tmp_path / "var"
    state.mkdir()
    (state / "mnt").write_text("not a directory")
    r, msgs, took = _run(state, tmp_path, _merge(TEST_CONFIG, {"fuse": {"enabled": True}}))
    assert r.returncode == 1 and took < START_BOUND
    line = one_error_line(r.stderr)
    for p in ("fuse door cannot start", f"mount point {state.absolute() / 'mnt'}", "not a directory",
              "fuse.mountpoint"):
        assert p in line, (p, line)
    assert not any("READY=1" in m for m in msgs), msgs


def test_busy_mountpoint_stops_the_start(tmp_path: Path) -> None:
    state = tmp_path / "var"
    mnt = state / "mnt"
    mnt.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        r, msgs, took = _run(state, tmp_path, _merge(TEST_CONFIG, {"fuse": {"enabled": True}}))
        assert r.returncode == 1 and took < START_BOUND
        line = one_error_line(r.stderr)
        for p in ("fuse door cannot start", f"mount point {mnt.absolute()}", "already mounted", "fuse.mountpoint"):
            assert p in line, (p, line)
        assert not any("READY=1" in m for m in msgs), msgs
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_door_failing_at_start_raises_with_door_address_and_key(tmp_path: Path) -> None:
    # What the start-up check cannot see (a port taken between the check and the bind): the
    # door's own failure before it is serving stops the start the same way.
    from ovsfs.config import load
    from ovsfs.daemon import _door
    from ovsfs.preflight import DoorUnavailable

    cfg = load(None, tmp_path)
    cfg.nbd.tcp_port = 4242

    async def serve(engine: Any, cfg: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        raise OSError(errno.EADDRINUSE, "Address already in use")

    doors: dict[str, str] = {}
    got: list[BaseException] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(_door, "nbd", serve, None, cfg, doors, "/etc/ovsfs.toml")
            except DoorUnavailable as e:
                got.append(e)

    trio.run(main)
    assert got, "the door's failure did not come out of nursery.start"
    msg = got[0].message  # type: ignore[attr-defined]
    for p in ("nbd door cannot start", "TCP 127.0.0.1:4242", "Address already in use", "nbd.tcp_port",
              "/etc/ovsfs.toml"):
        assert p in msg, (p, msg)
    assert doors["nbd"].startswith("failed")
