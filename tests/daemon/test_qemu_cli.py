"""`ovsfs qemu-img create|info|convert` on `openvstorage:` URIs, and `openvstorage+tcp:`
volumes through the client library's NBD client, against a real daemon (issue 12, item 4)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ovsfs.client.nbd import NbdVolume
from ovsfs.client.uri import open_volume
from ovsfs.errors import InvalidArgument, OutOfRange, ReadOnly
from tests.conftest import free_ports

MiB = 1 << 20


def test_qemu_img_create_info_convert(daemon, tmp_path: Path) -> None:
    r = daemon.cli("qemu-img", "create", "-f", "raw", "openvstorage:made", "64M")
    assert "openvstorage:made" in r.stdout
    status, info = daemon.api("GET", "/volumes/made")
    assert status == 200 and info["size"] == 64 * MiB
    info = json.loads(daemon.cli("qemu-img", "info", "--output=json", "openvstorage:made").stdout)
    assert info["virtual-size"] == 64 * MiB and info["format"] == "raw"

    # convert a raw file into a volume that does not exist yet: created with its size
    src = tmp_path / "in.raw"
    pattern = os.urandom(MiB)
    with open(src, "wb") as f:
        f.truncate(24 * MiB)
        f.seek(3 * MiB)
        f.write(pattern)
    daemon.cli("qemu-img", "convert", str(src), "openvstorage:copy")
    status, info = daemon.api("GET", "/volumes/copy")
    assert status == 200 and info["size"] == 24 * MiB
    with NbdVolume(str(daemon.nbd_socket), "copy") as vol:
        assert vol.read(3 * MiB, MiB) == pattern
        assert vol.read(0, MiB) == bytes(MiB)
    # ... and back out of it, from a snapshot
    daemon.api("POST", "/volumes/copy/snapshots", {"name": "s1"})
    out = tmp_path / "out.raw"
    daemon.cli("qemu-img", "convert", "-O", "raw", "openvstorage:copy@s1", str(out))
    assert out.read_bytes() == src.read_bytes()

    with pytest.raises(AssertionError, match="create a volume on its own node"):
        daemon.cli("qemu-img", "create", "openvstorage+tcp:127.0.0.1/x", "1G")
    with pytest.raises(AssertionError, match="not qcow2"):
        daemon.cli("qemu-img", "create", "-f", "qcow2", "openvstorage:y", "1G")


def test_tcp_uri_through_the_nbd_client(daemon_factory) -> None:
    (port,) = free_ports(1)
    d = daemon_factory({"nbd": {"tcp_port": port}})
    d.api("POST", "/volumes", {"name": "far", "size": 16 * MiB, "vpool": "default"})
    with open_volume(f"openvstorage+tcp:127.0.0.1:{port}/far", queue_depth=8) as vol:
        assert vol.size == 16 * MiB and not vol.read_only
        blocks = {b: os.urandom(4096) for b in range(0, 4096, 37)}
        vol.writev([(b * 4096, data) for b, data in blocks.items()])
        vol.flush()
        assert vol.readv([(b * 4096, 4096) for b in blocks]) == list(blocks.values())
        vol.write(5 * MiB + 512, b"z" * (3 * MiB))
        assert vol.read(5 * MiB, 4096) == bytes(512) + b"z" * 3584
        vol.write_zeroes(5 * MiB, MiB)
        assert vol.read(5 * MiB, MiB) == bytes(MiB)
        vol.trim(8 * MiB, MiB)
        with pytest.raises(OutOfRange):
            vol.read(16 * MiB - 512, 1024)
        with pytest.raises(InvalidArgument):
            vol.read(100, 512)
    d.api("POST", "/volumes/far/snapshots", {"name": "s"})
    with open_volume(f"openvstorage+tcp://127.0.0.1:{port}/far@s") as snap:
        assert snap.read_only
        assert snap.read(37 * 4096, 4096) == blocks[37]
        with pytest.raises(ReadOnly):
            snap.write(0, bytes(512))


def test_remote_uri_in_qemu_img_and_qemu(daemon_factory) -> None:
    """openvstorage+tcp: as an NBD drive: qemu-img reads it, and QEMU opens it at start."""

    from tests.qmp import ovsfs_qemu

    (port,) = free_ports(1)
    d = daemon_factory({"nbd": {"tcp_port": port}})
    d.api("POST", "/volumes", {"name": "r", "size": 8 * MiB, "vpool": "default"})
    uri = f"openvstorage+tcp:127.0.0.1:{port}/r"
    info = json.loads(d.cli("qemu-img", "info", "--output=json", uri).stdout)
    assert info["virtual-size"] == 8 * MiB
    with ovsfs_qemu(d.state, f"file={uri},if=virtio,cache=none,id=d0") as qmp:
        [blk] = [b for b in qmp("query-block")["return"] if b["device"] == "d0"]
        assert blk["inserted"]["image"]["virtual-size"] == 8 * MiB
        assert blk["inserted"]["drv"] == "raw" and not blk["inserted"]["ro"]


# ---- what the breaker found (issue 12 follow-up) -------------------------------------------

def _volumes(daemon) -> set[str]:
    status, vols = daemon.api("GET", "/volumes")
    assert status == 200
    return {v["name"] for v in vols}


def test_qemu_img_print_is_a_dry_run_and_a_failed_convert_leaves_nothing(daemon, tmp_path: Path) -> None:
    src = tmp_path / "in.raw"
    with open(src, "wb") as f:
        f.truncate(8 * MiB)
    # --print before or after the subcommand: nothing created, and never passed to qemu-img.
    r = daemon.cli("qemu-img", "--print", "create", "openvstorage:dry1", "16M")
    assert "would create volume dry1" in r.stdout
    r = daemon.cli("qemu-img", "--print", "--json", "convert", str(src), "openvstorage:dry2")
    assert json.loads(r.stdout)[:2] == ["qemu-img", "convert"]
    r = daemon.cli("qemu-img", "convert", str(src), "openvstorage:dry3", "--print")
    assert "--print" not in r.stdout and r.stdout.startswith("qemu-img convert")
    assert not _volumes(daemon) & {"dry1", "dry2", "dry3"}
    # A convert that fails (a source qemu-img cannot read as the format given) deletes the
    # volume it made for itself.
    r = daemon.cli("qemu-img", "convert", "-f", "qcow2", str(src), "openvstorage:half", check=False)
    assert r.returncode != 0 and "deleted" in r.stderr
    assert "half" not in _volumes(daemon)


def test_qemu_img_clear_errors(daemon, tmp_path: Path) -> None:
    r = daemon.cli("qemu-img", "create", "openvstorage:new1", "-5M", check=False)
    assert r.returncode != 0 and "size -5M" in r.stderr and "positive" in r.stderr
    r = daemon.cli("qemu-img", "create", "openvstorage:new1", "0", check=False)
    assert r.returncode != 0 and "positive" in r.stderr
    daemon.cli("qemu-img", "create", "openvstorage:base", "4M")
    assert daemon.api("POST", "/volumes/base/snapshots", {"name": "s1"})[0] in (200, 201)
    src = tmp_path / "in.raw"
    with open(src, "wb") as f:
        f.truncate(4 * MiB)
    r = daemon.cli("qemu-img", "convert", str(src), "openvstorage:base@s1", check=False)
    assert r.returncode != 0 and "is a snapshot, which is read-only" in r.stderr
    # `ovsfs qemu` with a volume name too long for a unix socket path says so.
    r = daemon.cli("qemu", "--print", "--", "-drive", "file=openvstorage:" + "v" * 90, check=False)
    assert r.returncode != 0 and "more than a unix socket takes" in r.stderr
