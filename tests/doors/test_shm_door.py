"""The shm door (vhost-user-blk) against a real daemon, driven by the client library.

I/O with a byte model checked again through the NBD door, the config space, snapshot
sockets (read-only), sockets following volumes, holders, reconnects and ring restarts
(what QEMU does on a guest reset), two volumes at once, and restarts of the daemon
(clean, and SIGKILL after acknowledged writes).
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ovsfs.config import load
from ovsfs.errors import ConfigError
from ovsfs.vhost import protocol as P
from tests.doors.conftest import SYSTEM_ENV, run
from tests.doors.shm_helpers import connect, frontend, request, run_chain, segment, sock_path, wait_socket

MiB = 1 << 20


def nbd_image(daemon: Any, name: str, out: Path) -> bytes:
    """The volume's bytes as the NBD door serves them."""
    run(["nbdcopy", f"nbd+unix:///{name}?socket={daemon.nbd_socket}", str(out)], env=SYSTEM_ENV)
    return out.read_bytes()


def holders(daemon: Any, name: str) -> list[str]:
    status, info = daemon.api("GET", f"/volumes/{name}")
    assert status == 200, info
    return [h for h in info["holders"] if h.startswith("shm")]


def wait_holders(daemon: Any, name: str, want: int, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        got = holders(daemon, name)
        if len(got) == want or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_io_with_a_byte_model_matches_nbd(daemon: Any, tmp_path: Path) -> None:
    daemon.cli("volume", "create", "v1", "--size", "8M")
    wait_socket(sock_path(daemon, "v1"))
    model = bytearray(8 * MiB)
    rnd = random.Random(12)
    with connect(sock_path(daemon, "v1"), queue_depth=16, max_request_bytes=MiB) as vol:
        assert (vol.size, vol.block_size, vol.read_only) == (8 * MiB, 512, False)
        assert vol.get_id() == "v1"
        for _ in range(300):
            kind = rnd.choice(["write", "write", "write", "trim", "zeroes", "read"])
            off = rnd.randrange(0, 8 * MiB // 512) * 512
            n = min(rnd.choice([512, 4096, 12288, 65536, 3 * MiB]), 8 * MiB - off)
            if kind == "write":
                data = rnd.randbytes(n)
                vol.write(off, data)
                model[off:off + n] = data
            elif kind == "trim":
                vol.trim(off, n)
                model[off:off + n] = bytes(n)
            elif kind == "zeroes":
                vol.write_zeroes(off, n)
                model[off:off + n] = bytes(n)
            else:
                assert vol.read(off, n) == model[off:off + n]
        vol.flush()
        assert vol.read(0, 8 * MiB) == model
    assert nbd_image(daemon, "v1", tmp_path / "v1.raw") == model


def test_queue_depth_and_ring_features(daemon: Any) -> None:
    """QD 64 over several queues, with and without indirect tables and event index (the
    NO_INTERRUPT path), 4 KiB random writes then reads of every block."""
    daemon.cli("volume", "create", "v1", "--size", "4M")
    wait_socket(sock_path(daemon, "v1"))
    for indirect, event_idx in ((True, True), (False, False)):
        rnd = random.Random(int(indirect))
        blocks = {}
        with connect(sock_path(daemon, "v1"), queue_depth=64, num_queues=4, max_request_bytes=64 << 10,
                     indirect=indirect, event_idx=event_idx) as vol:
            assert vol.num_queues == 4
            for _ in range(32):
                for b in rnd.sample(range(1024), 64):   # no two writes of one block in flight
                    blocks[b] = rnd.randbytes(4096)
                    vol.submit("write", b * 4096, 4096, data=blocks[b])
                vol.drain()
            reqs = {b: vol.submit("read", b * 4096, 4096) for b in blocks}
            vol.drain()
            for b, r in reqs.items():
                assert r.result() == blocks[b]


def test_config_space(daemon: Any) -> None:
    daemon.cli("volume", "create", "v1", "--size", "10M")
    wait_socket(sock_path(daemon, "v1"))
    fe = frontend(sock_path(daemon, "v1"))
    try:
        cfg = P.BlkConfig.decode(fe.config)
        offered = fe.device_features
        assert offered & P.bits(P.F_VERSION_1, P.RING_F_INDIRECT_DESC, P.RING_F_EVENT_IDX, P.BLK_F_FLUSH,
                                P.BLK_F_DISCARD, P.BLK_F_WRITE_ZEROES, P.BLK_F_MQ, P.BLK_F_TOPOLOGY)
        assert not offered & P.bits(P.BLK_F_RO, P.BLK_F_CONFIG_WCE)
        assert fe.protocol_features & P.bits(P.PF_CONFIG)
        assert cfg.capacity == 10 * MiB // 512
        assert (cfg.blk_size, cfg.physical_block_exp, cfg.min_io_size) == (512, 3, 8)
        assert (cfg.num_queues, cfg.seg_max, cfg.size_max) == (4, 126, 256 << 10)
        assert cfg.max_discard_sectors and cfg.max_write_zeroes_sectors and cfg.max_discard_seg
        assert fe.max_queues == 4
        # Part of the config only (QEMU reads fields at offsets): the same bytes.
        assert fe.get_config(8, 8) == cfg.encode()[8:16]
    finally:
        fe.close()


def test_snapshot_socket_is_read_only(daemon: Any) -> None:
    daemon.cli("volume", "create", "v1", "--size", "4M")
    wait_socket(sock_path(daemon, "v1"))
    first = os.urandom(64 << 10)
    with connect(sock_path(daemon, "v1")) as vol:
        vol.write(0, first)
    daemon.cli("snapshot", "create", "v1", "s1")
    snap = sock_path(daemon, "v1@s1")
    wait_socket(snap)
    with connect(sock_path(daemon, "v1")) as vol:
        vol.write(0, os.urandom(64 << 10))            # after the snapshot: not in it
    with connect(snap) as ro:
        assert ro.read_only and ro.get_id() == "v1@s1"
        assert ro.read(0, 64 << 10) == first
    fe = frontend(snap)
    try:
        assert fe.features & P.bits(P.BLK_F_RO)
        q = fe.queue(0)
        w = request(fe, q, P.T_OUT, 0, payload=bytes(4096))
        t = request(fe, q, P.T_DISCARD, payload=segment(0, 8))
        z = request(fe, q, P.T_WRITE_ZEROES, payload=segment(0, 8))
        f = request(fe, q, P.T_FLUSH)
        got: dict[int, int] = {}
        deadline = time.monotonic() + 10
        while len(got) < 4 and time.monotonic() < deadline:
            got.update(run_chain(q, timeout=1))
        assert [w.status[0], t.status[0], z.status[0], f.status[0]] == [P.S_IOERR] * 3 + [P.S_OK]
    finally:
        fe.close()
    with connect(snap) as ro:
        assert ro.read(0, 64 << 10) == first
    daemon.cli("snapshot", "delete", "v1", "s1")
    wait_socket(snap, present=False)


def test_sockets_follow_volumes(daemon: Any) -> None:
    daemon.cli("volume", "create", "a", "--size", "1M")
    wait_socket(sock_path(daemon, "a"))
    daemon.cli("volume", "rename", "a", "b")
    wait_socket(sock_path(daemon, "a"), present=False)
    wait_socket(sock_path(daemon, "b"))
    with connect(sock_path(daemon, "b")) as vol:
        assert vol.get_id() == "b"
        assert "refused" not in daemon.log(5)
    daemon.cli("volume", "delete", "b")
    wait_socket(sock_path(daemon, "b"), present=False)
    assert "shm: limits:" in daemon.log(200)


def test_holder_reconnect_and_ring_restart(daemon: Any) -> None:
    daemon.cli("volume", "create", "v1", "--size", "4M")
    path = sock_path(daemon, "v1")
    wait_socket(path)
    data = os.urandom(8192)
    with connect(path) as vol:
        assert wait_holders(daemon, "v1", 1) == [f"shm client pid {os.getpid()}"]
        vol.write(4096, data)
        # The volume is held: it cannot be deleted under the front end.
        assert daemon.cli("volume", "delete", "v1", check=False).returncode != 0
    assert wait_holders(daemon, "v1", 0) == []
    # Reconnect: the same socket takes the next front end.
    fe = frontend(path)
    try:
        q = fe.queue(0)
        for _ in range(3):
            r = request(fe, q, P.T_IN, 8, 8192)
            assert run_chain(q) and r.status[0] == P.S_OK and bytes(r.data) == data
        # A guest reset: QEMU stops the ring (GET_VRING_BASE: 3 taken) and starts it again.
        reply = fe.call(P.GET_VRING_BASE, P.VRING_STATE.pack(0, 0))
        assert reply is not None and P.VRING_STATE.unpack(reply.payload) == (0, 3)
        fe.call(P.SET_VRING_NUM, P.VRING_STATE.pack(0, q.num))
        fe.call(P.SET_VRING_BASE, P.VRING_STATE.pack(0, 3))
        desc, used, avail = q.addresses
        fe.call(P.SET_VRING_ADDR, P.VRING_ADDR.pack(0, 0, desc, used, avail, 0))
        fe.call(P.SET_VRING_CALL, P.U64.pack(0), [q.call_fd])
        fe.call(P.SET_VRING_KICK, P.U64.pack(0), [q.kick_fd])
        fe.call(P.SET_VRING_ENABLE, P.VRING_STATE.pack(0, 1))
        r = request(fe, q, P.T_IN, 8, 8192)
        assert run_chain(q) and r.status[0] == P.S_OK and bytes(r.data) == data
        # RESET_DEVICE forgets the rings; they are set up again.
        fe.call(P.RESET_DEVICE)
        fe.queues.clear()
        q2 = fe.setup_queue(0, 32)
        r = request(fe, q2, P.T_IN, 8, 8192)
        assert run_chain(q2) and r.status[0] == P.S_OK and bytes(r.data) == data
    finally:
        fe.close()


def test_two_volumes_at_once(daemon: Any, tmp_path: Path) -> None:
    for name in ("v1", "v2"):
        daemon.cli("volume", "create", name, "--size", "4M")
        wait_socket(sock_path(daemon, name))
    images: dict[str, bytes] = {}
    errors: list[BaseException] = []

    def fill(name: str, seed: int) -> None:
        try:
            rnd = random.Random(seed)
            image = bytearray(4 * MiB)
            with connect(sock_path(daemon, name), queue_depth=32, num_queues=2) as vol:
                for rounds in range(8):
                    for b in rnd.sample(range(1024), 32):       # distinct blocks in flight
                        image[b * 4096:(b + 1) * 4096] = rnd.randbytes(4096)
                        vol.submit("write", b * 4096, 4096, data=bytes(image[b * 4096:(b + 1) * 4096]))
                    vol.drain()
                assert vol.read(0, 4 * MiB) == image
            images[name] = bytes(image)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            errors.append(e)

    threads = [threading.Thread(target=fill, args=(n, i)) for i, n in enumerate(("v1", "v2"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for name, image in images.items():
        assert nbd_image(daemon, name, tmp_path / f"{name}.raw") == image


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_daemon_restart(daemon: Any, how: str) -> None:
    """Acknowledged writes survive a clean stop and a SIGKILL; QEMU-style reconnect to the
    new daemon's socket works."""
    daemon.cli("volume", "create", "v1", "--size", "4M")
    path = sock_path(daemon, "v1")
    wait_socket(path)
    data = os.urandom(MiB)
    vol = connect(path, queue_depth=8)
    vol.write(MiB, data)          # acknowledged: no flush
    if how == "kill":
        daemon.kill()
    else:
        vol.close()
        daemon.stop()
        assert not path.exists()
    vol.close()
    daemon.start()
    wait_socket(path)
    with connect(path) as vol:
        assert vol.read(MiB, MiB) == data


def test_config_section_validated(tmp_path: Path) -> None:
    cfg = load(None, tmp_path)
    assert cfg.shm.enabled and cfg.path(cfg.shm.socket_dir) == tmp_path.absolute() / "run/vhost"
    for bad in ("queue_size = 100", "seg_max = 0", "num_queues = 0", "max_request_bytes = 4096",
                "batches = 0", "node_bytes = 1", "socket_mode = 0o1777",
                'socket_group = "no-such-group-here"', "handshake_timeout = 0"):
        f = tmp_path / "c.toml"
        f.write_text(f"[shm]\n{bad}\n")
        with pytest.raises(ConfigError):
            load(f, tmp_path)


def test_socket_mode_and_group(daemon_factory: Any) -> None:
    """[shm] socket_mode / socket_group: libvirt's QEMU (another user) must be able to connect."""
    import grp
    import stat

    group = "nogroup"
    gid = grp.getgrnam(group).gr_gid
    d = daemon_factory({"shm": {"socket_mode": 0o660, "socket_group": group}})
    d.cli("volume", "create", "v1", "--size", "1M")
    path = sock_path(d, "v1")
    wait_socket(path)
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid
    st = os.stat(path.parent)
    assert st.st_gid == gid and st.st_mode & 0o010, "the group can reach the sockets"


def test_door_can_be_disabled(daemon_factory: Any) -> None:
    d = daemon_factory({"shm": {"enabled": False}})
    d.cli("volume", "create", "v1", "--size", "1M")
    status, st = d.api("GET", "/status")
    assert st["doors"]["shm"] == "disabled"
    time.sleep(1.2)
    assert not sock_path(d, "v1").exists()


def test_used_ring_in_available_order(daemon: Any) -> None:
    """A batch that finishes early waits for the one before it: the used index then says
    exactly which requests are done, so a front end restarting the ring at used->idx
    (QEMU, after the back end died) takes again only those in flight."""
    daemon.cli("volume", "create", "v1", "--size", "16M")
    wait_socket(sock_path(daemon, "v1"))
    fe = frontend(sock_path(daemon, "v1"))
    try:
        q = fe.queue(0)
        for _ in range(3):
            # 8 MiB: a batch of its own, in a worker thread; then small reads the event loop
            # finishes at once (DoorIO.try_now).
            heads = [request(fe, q, P.T_IN, 0, 8 * MiB).head]
            heads += [request(fe, q, P.T_IN, 8 * i, 4096).head for i in range(20)]
            got: list[int] = []
            deadline = time.monotonic() + 20
            while len(got) < len(heads) and time.monotonic() < deadline:
                got += [h for h, _n in run_chain(q, timeout=1)]
            assert got == heads
    finally:
        fe.close()
