"""The CLI against a real daemon: status, vPools, volumes, snapshots and every error case."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import OVSFS, Daemon
from tests.daemon.images import make_image, one_error_line, same

MiB = 1 << 20


def test_status(daemon: Daemon) -> None:
    st = daemon.cli_json("status")
    assert st["pid"] == daemon.pid
    assert st["node"] == "test"
    assert st["engine"]["vpools"] == 1 and st["engine"]["volumes"] == 0
    assert st["doors"]["fuse"] == "disabled"
    assert Path(st["mgmt_socket"]) == daemon.mgmt_socket
    out = daemon.cli("status").stdout
    assert f"pid {daemon.pid}" in out and "volumes:" in out
    assert (daemon.run_dir / "ovsfs.pid").read_text().strip() == str(daemon.pid)


def test_status_with_curl(daemon: Daemon) -> None:
    r = subprocess.run(["curl", "-sS", "--unix-socket", str(daemon.mgmt_socket), "http://x/status"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert f'"pid": {daemon.pid}' in r.stdout


def test_vpools(daemon: Daemon) -> None:
    assert [p["name"] for p in daemon.cli_json("vpool", "list")] == ["default"]
    assert "created vPool fast" in daemon.cli("vpool", "create", "fast", "--sco-clusters", "64").stdout
    pools = {p["name"]: p for p in daemon.cli_json("vpool", "list")}
    assert set(pools) == {"default", "fast"}
    assert pools["fast"]["sco_clusters"] == 64
    daemon.cli("volume", "create", "f1", "--size", "1M", "--vpool", "fast")
    pools = {p["name"]: p for p in daemon.cli_json("vpool", "list")}
    assert pools["fast"]["volumes"] == 1 and pools["default"]["volumes"] == 0
    assert "fast" in daemon.cli("vpool", "list").stdout


def test_volume_lifecycle(daemon: Daemon) -> None:
    info = daemon.cli_json("volume", "create", "v1", "--size", "10M")
    assert info["name"] == "v1" and info["size"] == 10 * MiB and info["vpool"] == "default"
    daemon.cli("volume", "create", "v0", "--size", "1G")
    assert [v["name"] for v in daemon.cli_json("volume", "list")] == ["v0", "v1"]
    assert "v1" in daemon.cli("volume", "list").stdout
    assert daemon.cli_json("volume", "info", "v1")["size"] == 10 * MiB
    assert "size:" in daemon.cli("volume", "info", "v1").stdout

    assert daemon.cli_json("volume", "resize", "v1", "20M")["size"] == 20 * MiB
    assert daemon.cli_json("volume", "resize", "v1", "4K")["size"] == 4096  # nothing written: may shrink
    assert daemon.cli_json("volume", "rename", "v1", "v2")["name"] == "v2"
    assert [v["name"] for v in daemon.cli_json("volume", "list")] == ["v0", "v2"]
    assert daemon.cli_json("volume", "delete", "v2") == {"deleted": "v2"}
    assert [v["name"] for v in daemon.cli_json("volume", "list")] == ["v0"]
    assert daemon.cli_json("volume", "list", "--vpool", "nosuch") == []


def test_sizes(daemon: Daemon) -> None:
    for text, size in [("4096", 4096), ("8K", 8192), ("3M", 3 * MiB), ("2G", 2 << 30), ("1T", 1 << 40),
                       ("1.5M", 3 * MiB // 2), ("16KiB", 16384)]:
        name = f"s{size}"
        assert daemon.cli_json("volume", "create", name, "--size", text)["size"] == size


def test_snapshots(daemon: Daemon, tmp_path: Path) -> None:
    a = make_image(tmp_path / "a.img", 8 * MiB, data=[(0, 3 * MiB)], seed=1)
    b = make_image(tmp_path / "b.img", 8 * MiB, data=[(2 * MiB, 4 * MiB)], seed=2)
    daemon.cli("volume", "import", "v", str(a))
    assert daemon.cli_json("snapshot", "create", "v", "s1")["name"] == "s1"
    daemon.cli("volume", "import", "v", str(b))
    daemon.cli("snapshot", "create", "v", "s2")
    assert [s["name"] for s in daemon.cli_json("snapshot", "list", "v")] == ["s1", "s2"]
    assert "s2" in daemon.cli("snapshot", "list", "v").stdout

    daemon.cli("snapshot", "delete", "v", "s2")
    assert [s["name"] for s in daemon.cli_json("snapshot", "list", "v")] == ["s1"]
    daemon.cli("volume", "export", "v", str(tmp_path / "now.img"))
    assert same(tmp_path / "now.img", b)

    daemon.cli("snapshot", "rollback", "v", "s1")
    daemon.cli("volume", "export", "v", str(tmp_path / "back.img"))
    assert same(tmp_path / "back.img", a)


def _err(daemon: Daemon, *args: str) -> str:
    r = daemon.cli(*args, check=False)
    assert r.returncode == 1, f"ovsfs {' '.join(args)}: exit {r.returncode}, {r.stderr!r}"
    return one_error_line(r.stderr)


def test_errors(daemon: Daemon, tmp_path: Path) -> None:
    daemon.cli("volume", "create", "v", "--size", "4M")
    daemon.cli("volume", "create", "w", "--size", "4M")
    img = make_image(tmp_path / "x.img", 2 * MiB, data=[(MiB, 4096)])
    daemon.cli("volume", "import", "v", str(img))
    daemon.cli("snapshot", "create", "v", "s")

    for args in [("volume", "info", "nope"), ("volume", "delete", "nope"), ("volume", "resize", "nope", "8M"),
                 ("volume", "rename", "nope", "x"), ("volume", "export", "nope", str(tmp_path / "o")),
                 ("snapshot", "create", "nope", "s"), ("snapshot", "list", "nope"), ("scrub", "nope")]:
        assert "volume nope does not exist" in _err(daemon, *args)
    assert "already exists" in _err(daemon, "volume", "create", "v", "--size", "4M")
    assert "already exists" in _err(daemon, "volume", "rename", "w", "v")
    assert "already exists" in _err(daemon, "vpool", "create", "default")
    assert "already exists" in _err(daemon, "snapshot", "create", "v", "s")
    assert "a size is a multiple of 512 bytes" in _err(daemon, "volume", "create", "odd", "--size", "1000")
    assert "a size is a multiple of 512 bytes" in _err(daemon, "volume", "resize", "v", "5000")
    assert "cannot shrink" in _err(daemon, "volume", "resize", "v", "512K")
    assert "bad size" in _err(daemon, "volume", "create", "x", "--size", "10X")
    assert "bad volume name" in _err(daemon, "volume", "create", ".hidden", "--size", "1M")
    assert "does not exist" in _err(daemon, "snapshot", "delete", "v", "nosnap")
    assert "does not exist" in _err(daemon, "snapshot", "rollback", "v", "nosnap")
    assert "does not exist" in _err(daemon, "volume", "export", "v", str(tmp_path / "o"), "--snapshot", "nosnap")
    assert "does not exist" in _err(daemon, "volume", "clone", "v@nosnap", "c")
    assert "VOLUME@SNAPSHOT" in _err(daemon, "volume", "clone", "v", "c")
    assert "vPool nope does not exist" in _err(daemon, "volume", "create", "y", "--size", "1M", "--vpool", "nope")
    # The volume is still whole after all that.
    assert daemon.cli_json("volume", "info", "v")["size"] == 4 * MiB


def test_daemon_not_running(tmp_path: Path) -> None:
    state = tmp_path / "empty"
    r = subprocess.run([OVSFS, "--state", str(state), "volume", "list"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert one_error_line(r.stderr) == f"ovsfs: error: daemon is not running (no socket at {state}/run/ovsfs.sock)"
    # The same through OVSFS_STATE, and a stale socket file that nobody listens on.
    (state / "run").mkdir(parents=True)
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.bind(str(state / "run" / "ovsfs.sock"))
    s.close()
    r = subprocess.run([OVSFS, "status"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "OVSFS_STATE": str(state)})
    assert r.returncode == 1
    assert "daemon is not running" in one_error_line(r.stderr)


@pytest.mark.parametrize("args", [["volume"], ["volume", "create", "x"], ["nosuchcommand"]])
def test_usage_errors(args: list[str], tmp_path: Path) -> None:
    r = subprocess.run([OVSFS, "--state", str(tmp_path), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "usage:" in r.stderr
