"""The client library against the daemon's shm door (issue 12: "client-library tests at
queue depth 1 to 64, with a byte model, against the daemon"): VhostVolume on
STATE/run/vhost/VOL.sock, batches of requests in flight together, checked against a byte
array, also across a reconnect and through the NBD door afterwards."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ovsfs.client.nbd import NbdVolume
from ovsfs.client.uri import open_volume
from ovsfs.client.frontend import VhostError
from ovsfs.client.volume import VhostVolume
from ovsfs.errors import Busy, NotFound, ReadOnly
from tests.client.model import Model, batches

# The door is helper "shm"'s part of issue 12: until it is merged there is nothing to test.
pytest.importorskip("ovsfs.shm.server")

MiB = 1 << 20


def _socket(daemon, name: str, timeout: float = 20.0) -> Path:
    """The volume's vhost-user socket, once the door's reconcile loop made it."""
    path = daemon.state / "run" / "vhost" / f"{name}.sock"
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"no {path}:\n{daemon.log()}"
        time.sleep(0.05)
    return path


@pytest.fixture(scope="module")
def shm_node(tmp_path_factory):
    """One daemon for the module's examples (a daemon start is the slow part)."""
    from tests.conftest import TEST_CONFIG, Daemon

    d = Daemon(tmp_path_factory.mktemp("shm"), TEST_CONFIG).start()
    try:
        assert d.api("POST", "/volumes", {"name": "m", "size": 2 * MiB, "vpool": "default"})[0] in (200, 201)
        _socket(d, "m")
        yield d
    finally:
        d.teardown()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_byte_model_against_the_daemon(shm_node, data) -> None:
    depth = data.draw(st.sampled_from([1, 3, 8, 32, 64]), "queue depth")
    queues = data.draw(st.sampled_from([1, 2, 4]), "queues")
    indirect = data.draw(st.booleans(), "indirect")
    event_idx = data.draw(st.booleans(), "event_idx")
    sock = _socket(shm_node, "m")
    with VhostVolume(sock, queue_depth=depth, num_queues=queues, indirect=indirect, event_idx=event_idx,
                     max_request_bytes=512 << 10) as vol:
        assert vol.size == 2 * MiB
        model = Model(vol.read(0, vol.size))
        for batch in data.draw(batches(vol.size, max_batch=2 * depth, max_sectors=1024), "batches"):
            model.run(vol, batch)
        vol.flush()
    # Another front end (the door takes one at a time: after the first has gone) and the
    # NBD door see the same bytes.
    with open_volume("openvstorage:m", state=shm_node.state) as again:
        assert again.read(0, 2 * MiB) == bytes(model.data)
    with NbdVolume(str(shm_node.nbd_socket), "m") as nbd:
        assert nbd.read(0, 2 * MiB) == bytes(model.data)


def test_snapshot_socket_is_read_only(shm_node) -> None:
    shm_node.api("POST", "/volumes", {"name": "sn", "size": MiB, "vpool": "default"})
    pattern = os.urandom(64 << 10)
    with VhostVolume(_socket(shm_node, "sn")) as vol:
        vol.write(4096, pattern)
        vol.flush()
        assert vol.get_id() == "sn"
    assert shm_node.api("POST", "/volumes/sn/snapshots", {"name": "s1"})[0] in (200, 201)
    with VhostVolume(_socket(shm_node, "sn@s1")) as snap:
        assert snap.read_only
        assert snap.read(4096, len(pattern)) == pattern
        with pytest.raises(ReadOnly):
            snap.write(0, bytes(512))


def test_ovsfs_qemu_device_negotiates_with_the_door(shm_node) -> None:
    """`ovsfs qemu` on openvstorage:VOL: QEMU's vhost-user-blk device connects to the door
    and takes its features and config when it is made (guests boot in tests/guest)."""
    import json

    from tests.qmp import VIRTIO_BLK, VIRTIO_VENDOR, ovsfs_qemu

    shm_node.api("POST", "/volumes", {"name": "q", "size": 16 * MiB, "vpool": "default"})
    _socket(shm_node, "q")
    with ovsfs_qemu(shm_node.state, "file=openvstorage:q,if=virtio,cache=none,format=raw,id=d0,queues=2") as qmp:
        devices = [d for bus in qmp("query-pci")["return"] for d in bus["devices"]]
        assert any(d["id"]["vendor"] == VIRTIO_VENDOR and d["id"]["device"] in VIRTIO_BLK and d["qdev_id"] == "d0"
                   for d in devices)
        st = qmp("x-query-virtio-status", path="/machine/peripheral/d0/virtio-backend")["return"]
        offered = " ".join(st["host-features"]["dev-features"] + st["host-features"]["transports"])
        for feature in ("VHOST_USER_F_PROTOCOL_FEATURES", "VIRTIO_BLK_F_FLUSH", "VIRTIO_BLK_F_DISCARD",
                        "VIRTIO_BLK_F_WRITE_ZEROES", "VIRTIO_RING_F_INDIRECT_DESC", "VIRTIO_RING_F_EVENT_IDX"):
            assert feature in offered, json.dumps(st)
        assert st["num-vqs"] == 2
    assert "pid" in shm_node.log(200)      # the door logged the front end (QEMU) connecting


# ---- what the breaker found (issue 12 follow-up) -------------------------------------------

def test_open_right_after_create_and_a_missing_volume(shm_node) -> None:
    """The door makes a new volume's socket up to a second after `volume create`: the client
    waits for it (busy_wait) instead of saying the daemon is not running; a volume that
    does not exist is NotFound (the daemon answers), not DaemonNotRunning."""
    assert shm_node.api("POST", "/volumes", {"name": "fresh", "size": MiB, "vpool": "default"})[0] in (200, 201)
    with open_volume("openvstorage:fresh", state=shm_node.state) as vol:
        assert vol.read(0, 4096) == bytes(4096)
    with pytest.raises(NotFound, match="no socket for volume nosuch at .*no such volume on this node"):
        open_volume("openvstorage:nosuch", state=shm_node.state, busy_wait=0.3)


def test_second_front_end_is_told_the_volume_is_busy(shm_node) -> None:
    shm_node.api("POST", "/volumes", {"name": "one", "size": MiB, "vpool": "default"})
    sock = _socket(shm_node, "one")
    with VhostVolume(sock) as first:
        with pytest.raises(Busy, match="one is in use by another front end"):
            VhostVolume(sock, busy_wait=0.5)
        assert first.read(0, 512) == bytes(512)       # the first is undisturbed


def test_stopped_daemon_times_out(shm_node) -> None:
    """The daemon SIGSTOPped (by PID) with requests in flight: after io_timeout seconds
    they fail with VhostError and the volume is broken; before, the client hung for ever."""
    shm_node.api("POST", "/volumes", {"name": "stop", "size": MiB, "vpool": "default"})
    vol = VhostVolume(_socket(shm_node, "stop"), queue_depth=4, io_timeout=1.0)
    try:
        vol.write(0, b"a" * 4096)
        os.kill(shm_node.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            reqs = [vol.submit("write", 4096 * (i + 1), data=b"b" * 4096) for i in range(4)]
            with pytest.raises(VhostError, match="io_timeout"):
                vol.drain()
            assert 0.9 <= time.monotonic() - start < 10     # generous upper bound: not hung
            assert all(isinstance(r.error, VhostError) for r in reqs)
            with pytest.raises(VhostError):
                vol.read(0, 512)
        finally:
            os.kill(shm_node.pid, signal.SIGCONT)
    finally:
        vol.close()
    # The daemon goes on: a new front end reads what was acknowledged (the unanswered
    # writes may or may not have landed: they were never acknowledged).
    with VhostVolume(_socket(shm_node, "stop")) as again:
        assert again.read(0, 4096) == b"a" * 4096
