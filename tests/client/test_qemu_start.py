"""`ovsfs qemu` really starts QEMU (it execs qemu-system-x86_64) with the translated
arguments, and QEMU's vhost-user-blk device connects and reads the device's config at
start (here from qemu-storage-daemon's export in place of the door; tests/guest boots
guests on the door itself)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.client.conftest import StorageDaemon
from tests.conftest import OVSFS

VIRTIO_VENDOR, VIRTIO_BLK = 0x1AF4, (0x1001, 0x1042)    # transitional, modern


def _qmp(proc: subprocess.Popen[str], cmd: str, **arguments: object) -> dict:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps({"execute": cmd, "arguments": arguments} if arguments else {"execute": cmd}) + "\n")
    proc.stdin.flush()
    while True:
        msg = json.loads(proc.stdout.readline())
        if "return" in msg or "error" in msg:
            return msg


def test_ovsfs_qemu_execs_qemu_on_the_volume_socket(qsd_factory, tmp_path: Path) -> None:
    d: StorageDaemon = qsd_factory(size=12 << 20)
    state = tmp_path / "state"
    (state / "run" / "vhost").mkdir(parents=True)
    (state / "run" / "vhost" / "v.sock").symlink_to(d.socket)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([OVSFS, "--state", str(state), "qemu", "--", "-machine", "q35", "-accel", "tcg",
                             "-m", "64", "-nodefaults", "-display", "none", "-S", "-qmp", "stdio",
                             "-drive", "file=openvstorage:v,if=virtio,cache=none,format=raw,id=d0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        greeting = proc.stdout.readline()
        assert "QMP" in greeting, proc.stderr.read() if proc.stderr else ""
        # ovsfs replaced itself with QEMU: same PID.
        assert os.readlink(f"/proc/{proc.pid}/exe").endswith("qemu-system-x86_64")
        assert "return" in _qmp(proc, "qmp_capabilities")
        devices = [dev for bus in _qmp(proc, "query-pci")["return"] for dev in bus["devices"]]
        assert any(dev["id"]["vendor"] == VIRTIO_VENDOR and dev["id"]["device"] in VIRTIO_BLK and
                   dev.get("qdev_id") == "d0" for dev in devices)
        # The device negotiated with the back end when it was made.
        st = _qmp(proc, "x-query-virtio-status", path="/machine/peripheral/d0/virtio-backend")["return"]
        offered = " ".join(st["host-features"]["dev-features"])
        assert "VHOST_USER_F_PROTOCOL_FEATURES" in offered and "VIRTIO_BLK_F_DISCARD" in offered
        assert st["num-vqs"] == 1           # num-queues=1, as translated
        _qmp(proc, "quit")
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
