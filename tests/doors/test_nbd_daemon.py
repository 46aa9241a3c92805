"""The NBD door inside the real node daemon: restarts, SIGKILL, TCP from the config."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from tests.doors.conftest import have, run

MiB = 1 << 20
pytestmark = pytest.mark.skipif(not (have("fio") and have("qemu-img")), reason="fio / qemu-utils missing")


def uri(d, export: str = "vol1") -> str:
    return f"nbd+unix:///{export}?socket={d.nbd_socket}"


def fio_job(u: str, *extra: str) -> list[str]:
    return ["fio", "--name=crash", "--ioengine=nbd", f"--uri={u}", "--rw=randwrite", "--bs=4k",
            "--iodepth=32", "--size=48M", "--verify=crc32c", "--randseed=42", *extra]


def test_fio_verify_across_clean_restart(daemon, tmp_path: Path) -> None:
    daemon.cli("volume", "create", "vol1", "--size", "64M")
    run(fio_job(uri(daemon), "--do_verify=1"), timeout=300, cwd=tmp_path)
    daemon.stop()
    daemon.start()
    run(fio_job(uri(daemon), "--verify_only=1"), timeout=300, cwd=tmp_path)


def test_acknowledged_writes_survive_sigkill(daemon, tmp_path: Path) -> None:
    """fio writes (no flush: the nbd engine sends none), kill -9, restart, verify all."""
    daemon.cli("volume", "create", "vol1", "--size", "64M")
    daemon.cli("volume", "create", "vol2", "--size", "16M")
    run(fio_job(uri(daemon), "--do_verify=0"), timeout=300, cwd=tmp_path)
    # a second volume written through qemu-io with a pattern, also without a flush request
    # from us (qemu-io may flush on close; fio above certainly does not)
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 3M", uri(daemon, "vol2")])
    daemon.kill()
    daemon.start()
    run(fio_job(uri(daemon), "--verify_only=1"), timeout=300, cwd=tmp_path)
    run(["qemu-io", "-f", "raw", "-c", "read -P 0x5a 1M 3M", "-c", "read -P 0 4M 1M",
         uri(daemon, "vol2")])


def test_sigkill_during_writes_keeps_the_volume_usable(daemon, tmp_path: Path) -> None:
    """Kill -9 in the middle of a write stream: the daemon restarts and serves the volume."""
    import subprocess
    import time

    daemon.cli("volume", "create", "vol1", "--size", "64M")
    p = subprocess.Popen(fio_job(uri(daemon), "--do_verify=0", "--time_based", "--runtime=30"),
                         cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        time.sleep(2)
        daemon.kill()
        p.wait(60)
    finally:
        if p.poll() is None:
            os.kill(p.pid, 9)
            p.wait()
    daemon.start()
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x77 0 1M", "-c", "read -P 0x77 0 1M", uri(daemon)])


def test_daemon_exports_list_map_convert_and_tcp(daemon_factory, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = daemon_factory({"nbd": {"tcp_port": port}})
    d.cli("volume", "create", "vol1", "--size", "32M")
    d.cli("volume", "create", "vol2", "--size", "8M")
    names = {e["export-name"] for e in json.loads(run(["nbdinfo", "--list", "--json", uri(d, "")]).stdout)["exports"]}
    assert names == {"vol1", "vol2"}
    img = tmp_path / "in.raw"
    data = bytearray(8 * MiB)
    data[2 * MiB:3 * MiB] = os.urandom(MiB)
    img.write_bytes(data)
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(img), f"nbd://127.0.0.1:{port}/vol2"])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(img), uri(d, "vol2")])
    m = json.loads(run(["nbdinfo", "--map", "--json", uri(d, "vol2")]).stdout)
    assert [(e["offset"], e["length"]) for e in m if e["type"] == 0] == [(2 * MiB, MiB)]
    d.stop()
    assert not d.nbd_socket.exists()
