"""The daemon's life: clean stops, bad configs, bad clients, restarts and kill -9."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import OVSFS, Daemon
from tests.daemon.images import make_image, one_error_line, same, start_import

MiB = 1 << 20


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly(daemon: Daemon, sig: signal.Signals) -> None:
    daemon.cli("volume", "create", "v", "--size", "1M")
    os.kill(daemon.pid, sig)
    assert daemon.proc is not None and daemon.proc.wait(60) == 0, daemon.log()
    assert not daemon.mgmt_socket.exists()
    assert not (daemon.run_dir / "ovsfs.pid").exists()
    assert "engine closed" in daemon.log()


def test_stop_and_start_keeps_volumes_and_data(daemon: Daemon, tmp_path: Path) -> None:
    src = make_image(tmp_path / "src.img", 12 * MiB, data=[(0, 5 * MiB), (9 * MiB + 7, 3000)])
    daemon.cli("volume", "import", "keep", str(src))
    daemon.cli("snapshot", "create", "keep", "s1")
    daemon.cli("volume", "create", "other", "--size", "3M")
    daemon.cli("vpool", "create", "p2")
    daemon.stop()
    assert not daemon.mgmt_socket.exists()
    daemon.start()
    assert [v["name"] for v in daemon.cli_json("volume", "list")] == ["keep", "other"]
    assert {p["name"] for p in daemon.cli_json("vpool", "list")} == {"default", "p2"}
    assert [s["name"] for s in daemon.cli_json("snapshot", "list", "keep")] == ["s1"]
    daemon.cli("volume", "export", "keep", str(tmp_path / "out.img"))
    assert same(src, tmp_path / "out.img")


def test_second_daemon_on_same_state_is_refused(daemon: Daemon) -> None:
    r = subprocess.run([OVSFS, "run", "--state", str(daemon.state)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"another ovsfs daemon (pid {daemon.pid})" in one_error_line(r.stderr)
    assert daemon.api("GET", "/status")[0] == 200


@pytest.mark.parametrize("text,expect", [
    ("this is [not toml\n", "is not valid TOML"),
    ("[engine]\nno_such_key = 1\n", "unknown config key engine.no_such_key"),
    ("[nbd]\ntcp_port = 'ten'\n", "config key nbd.tcp_port must be int"),
    ("[engine]\ncluster_size = 1000\n", "engine.cluster_size must be a power of two"),
])
def test_bad_config(tmp_path: Path, text: str, expect: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    r = subprocess.run([OVSFS, "daemon", "--config", str(cfg), "--state", str(tmp_path / "var")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert expect in one_error_line(r.stderr)
    assert not (tmp_path / "var" / "run" / "ovsfs.sock").exists()


def test_missing_config(tmp_path: Path) -> None:
    r = subprocess.run([OVSFS, "daemon", "--config", str(tmp_path / "nope.toml"), "--state", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "does not exist" in one_error_line(r.stderr)


def _raw(path: Path, data: bytes) -> bytes:
    """Send raw bytes to the socket and read the reply until the server closes."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


@pytest.mark.parametrize("garbage", [
    b"GARBAGE\r\n\r\n",
    b"\x00\xff\x16\x03\x01 binary \r\n\r\n",
    b"GET /status HTTP/9.9 extra\r\n\r\n",
    b"GET /status HTTP/1.1\r\nno colon here\r\n\r\n",
    b"POST /volumes HTTP/1.1\r\nContent-Length: lots\r\n\r\n",
    b"POST /volumes HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n",
    b"GET /status HTTP/1.1\r\nHost: x\r\n",             # head cut off by the client
    b"POST /volumes HTTP/1.1\r\nContent-Length: 50\r\n\r\n{",  # body cut off
    b"X" * 100000,
])
def test_malformed_request_gets_400_and_server_goes_on(daemon: Daemon, garbage: bytes) -> None:
    reply = _raw(daemon.mgmt_socket, garbage)
    assert re.match(rb"HTTP/1\.1 4\d\d ", reply), reply[:200]
    assert b'"error"' in reply
    assert daemon.api("GET", "/status")[0] == 200


def test_api_errors_keep_the_connection(daemon: Daemon) -> None:
    reqs = (b"POST /volumes HTTP/1.1\r\nContent-Length: 5\r\n\r\n{nope"
            b"GET /nowhere HTTP/1.1\r\n\r\n"
            b"DELETE /status HTTP/1.1\r\n\r\n"
            b"POST /volumes HTTP/1.1\r\nContent-Length: 13\r\n\r\n{\"name\": \"x\"}"
            b"GET /status HTTP/1.1\r\nConnection: close\r\n\r\n")
    reply = _raw(daemon.mgmt_socket, reqs)
    statuses = re.findall(rb"^HTTP/1\.1 (\d+) ", reply, re.M)
    assert statuses == [b"400", b"404", b"405", b"400", b"200"], reply
    assert b"missing field 'size'" in reply


def test_api_routes(daemon: Daemon) -> None:
    assert daemon.api("POST", "/volumes", {"name": "a", "size": "8M"}) [0] == 201
    assert daemon.api("GET", "/volumes/a")[1]["size"] == 8 * MiB
    assert daemon.api("PATCH", "/volumes/a", {"size": 16 * MiB, "name": "b"})[1]["name"] == "b"
    assert daemon.api("GET", "/volumes/a") == (404, {"error": "volume a does not exist"})
    assert daemon.api("POST", "/volumes/b/snapshots", {"name": "s"})[0] == 201
    assert daemon.api("GET", "/volumes/b/snapshots/s")[1]["name"] == "s"
    assert daemon.api("POST", "/volumes/b/snapshots/s/clone", {"name": "c"})[1]["parent"] == "b@s"
    assert daemon.api("POST", "/volumes/b/snapshots/s/rollback")[0] == 200
    assert daemon.api("POST", "/volumes", {"name": "b", "size": 4096})[0] == 409
    assert daemon.api("POST", "/volumes", {"name": "z", "size": True})[0] == 400
    assert daemon.api("POST", "/volumes/b/import", {"path": "relative.img"})[0] == 400
    assert daemon.api("GET", "/vpools/default")[1]["name"] == "default"
    assert daemon.api("POST", "/scrub", {"volume": "c"})[0] == 200
    assert daemon.api("DELETE", "/volumes/c") == (200, {"deleted": "c"})


def test_kill9_after_import_keeps_data(daemon: Daemon, tmp_path: Path) -> None:
    src = make_image(tmp_path / "src.img", 20 * MiB, data=[(0, 7 * MiB), (11 * MiB, 9 * MiB)])
    daemon.cli("volume", "import", "v", str(src))
    daemon.cli("snapshot", "create", "v", "s")
    daemon.kill()
    daemon.start()  # a stale socket and pid file are left behind: the restart must cope
    daemon.cli("volume", "export", "v", str(tmp_path / "out.img"))
    assert same(src, tmp_path / "out.img")
    assert [s["name"] for s in daemon.cli_json("snapshot", "list", "v")] == ["s"]


def test_kill9_during_import(daemon: Daemon, tmp_path: Path) -> None:
    size = 256 * MiB
    src = tmp_path / "big.img"
    with open(src, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    cli = subprocess.Popen([OVSFS, "--state", str(daemon.state), "volume", "import", "big", str(src)],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        acked = 0
        assert cli.stderr is not None
        lines = []
        for line in cli.stderr:
            lines.append(line)
            m = re.search(r"\((\d+) of (\d+) bytes\)", line)
            if m and 0 < int(m.group(1)) < size:
                acked = int(m.group(1))
                break
        assert acked, f"no progress seen before the import ended (make the file bigger): {lines}"
        daemon.kill()
        rest = cli.stderr.read()
        assert cli.wait(60) == 1
        assert "ovsfs: error:" in rest and len(rest.strip().splitlines()) == 1, rest
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()

    daemon.start()
    info = daemon.cli_json("volume", "info", "big")
    assert info["size"] == size
    out = tmp_path / "out.img"
    daemon.cli("volume", "export", "big", str(out))
    cs = info["cluster_size"]
    with open(src, "rb") as a, open(out, "rb") as b:
        # Everything the daemon reported done was acknowledged by the engine: it must be there.
        for off in range(0, acked, 4 * MiB):
            n = min(4 * MiB, acked - off)
            assert a.read(n) == b.read(n), f"acknowledged data lost at offset {off}"
        # After that, each cluster is either the new data or never written, nothing else.
        while chunk := b.read(cs):
            want = a.read(cs)
            assert chunk == want or chunk == bytes(cs), "a torn cluster after the crash"
    # The volume still takes writes and a new import completes.
    daemon.cli("volume", "import", "big", str(src))
    daemon.cli("volume", "export", "big", str(out))
    assert same(src, out)


def test_sdnotify_ready_and_watchdog(daemon_factory, tmp_path: Path) -> None:
    d: Daemon = daemon_factory(start=False)
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(10)
        d.env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"}
        d.start()
        got: list[str] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum("WATCHDOG=1" in m for m in got) < 3:
            got.append(s.recv(4096).decode())
        assert any("READY=1" in m for m in got), got
        assert any("STATUS=serving" in m for m in got), got
        assert sum("WATCHDOG=1" in m for m in got) >= 3, got
        d.stop()
        rest = []
        try:
            while True:
                rest.append(s.recv(4096).decode())
        except TimeoutError:
            pass
        assert any("STOPPING=1" in m for m in rest), rest


def test_progress_bar_on_a_terminal(daemon: Daemon, tmp_path: Path) -> None:
    import pty

    src = make_image(tmp_path / "src.img", 64 * MiB, data=[(0, 64 * MiB)])
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen([OVSFS, "--state", str(daemon.state), "volume", "import", "v", str(src)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the other side closed
                break
            if not chunk:
                break
            out += chunk
        assert p.wait(120) == 0
    finally:
        os.close(master)
    text = out.decode(errors="replace")
    assert "import v" in text and "%|" in text, text  # tqdm's bar, not the plain lines
    assert "bytes)" not in text


def test_sigterm_during_import(daemon: Daemon, tmp_path: Path) -> None:
    src = tmp_path / "big.img"
    cli = start_import(OVSFS, daemon.state, "big", src)
    try:
        t0 = time.monotonic()
        daemon.stop()  # asserts exit 0
        assert time.monotonic() - t0 < 30
        rest = cli.stderr.read()
        assert cli.wait(60) == 1
        assert "before the job finished" in one_error_line(rest) or "lost the connection" in rest
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    daemon.start()
    assert daemon.cli_json("volume", "info", "big")["users"] == {}


def test_service_form_with_config_file(tmp_path: Path) -> None:
    from tests.conftest import TEST_CONFIG, _merge, to_toml

    cfg = tmp_path / "etc" / "ovsfs.toml"
    cfg.parent.mkdir()
    cfg.write_text(to_toml(_merge(TEST_CONFIG, {"mgmt": {"socket": "run/api.sock"}})))
    state = tmp_path / "lib"
    with open(tmp_path / "log", "wb") as logf:
        p = subprocess.Popen([OVSFS, "daemon", "--config", str(cfg), "--state", str(state)],
                             stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (state / "run" / "api.sock").exists():
            assert p.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.05)
        # The service keeps its config in /etc: a moved socket is named with --socket or OVSFS_SOCKET.
        r = subprocess.run([OVSFS, "--socket", str(state / "run" / "api.sock"), "status", "--json"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert '"node": "test"' in r.stdout
        r = subprocess.run([OVSFS, "volume", "list"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "OVSFS_SOCKET": str(state / "run" / "api.sock")})
        assert r.returncode == 0, r.stderr
        assert (state / "run" / "ovsfs.pid").read_text().strip() == str(p.pid)
        os.kill(p.pid, signal.SIGTERM)
        assert p.wait(60) == 0
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
