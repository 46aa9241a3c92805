"""`ovsfs qemu` really starts QEMU (it execs qemu-system-x86_64) with the translated
arguments, and QEMU's vhost-user-blk device connects and reads the device's config at
start (here from qemu-storage-daemon's export in place of the door; tests/guest boots
guests on the door itself)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.qsd import StorageDaemon
from tests.qmp import VIRTIO_BLK, VIRTIO_VENDOR, ovsfs_qemu

def test_ovsfs_qemu_execs_qemu_on_the_volume_socket(qsd_factory, tmp_path: Path) -> None:
    d: StorageDaemon = qsd_factory(size=12 << 20)
    state = tmp_path / "state"
    (state / "run" / "vhost").mkdir(parents=True)
    (state / "run" / "vhost" / "v.sock").symlink_to(d.socket)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs: list[subprocess.Popen[str]] = []
    with ovsfs_qemu(state, "file=openvstorage:v,if=virtio,cache=none,format=raw,id=d0", env, procs) as qmp:
        # ovsfs replaced itself with QEMU: same PID.
        assert os.readlink(f"/proc/{procs[0].pid}/exe").endswith("qemu-system-x86_64")
        devices = [dev for bus in qmp("query-pci")["return"] for dev in bus["devices"]]
        assert any(dev["id"]["vendor"] == VIRTIO_VENDOR and dev["id"]["device"] in VIRTIO_BLK and
                   dev.get("qdev_id") == "d0" for dev in devices)
        # The device negotiated with the back end when it was made.
        st = qmp("x-query-virtio-status", path="/machine/peripheral/d0/virtio-backend")["return"]
        offered = " ".join(st["host-features"]["dev-features"])
        assert "VHOST_USER_F_PROTOCOL_FEATURES" in offered and "VIRTIO_BLK_F_DISCARD" in offered
        assert st["num-vqs"] == 1           # num-queues=1, as translated
