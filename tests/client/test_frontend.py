"""The vhost-user front end (ovsfs/client/frontend.py, virtqueue.py) against
qemu-storage-daemon's vhost-user-blk export: negotiation, shared memory, raw chains
(direct and indirect), raw messages. Issue 12, item 3 (the client library's base, which the
malformed-ring tests of the shm door also drive)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ovsfs.client.frontend import Frontend, VhostError
from ovsfs.client.virtqueue import UADDR_BASE, DriverQueue, SharedMemory
from ovsfs.errors import DaemonNotRunning, InvalidArgument
from ovsfs.vhost import protocol as vp
from ovsfs.vhost import virtq
from tests.qsd import StorageDaemon


def test_negotiation_config_and_queues(qsd_factory) -> None:
    d: StorageDaemon = qsd_factory(size=12 << 20, num_queues=3)
    with Frontend(d.socket) as fe:
        fe.start(num_queues=8, queue_size=64)
        assert fe.has(vp.F_VERSION_1) and fe.has(vp.F_PROTOCOL_FEATURES)
        assert fe.features & ~fe.device_features == 0
        assert fe.protocol_features & vp.bits(vp.PF_CONFIG, vp.PF_REPLY_ACK) == vp.bits(vp.PF_CONFIG, vp.PF_REPLY_ACK)
        cfg = vp.BlkConfig.decode(fe.config)
        assert cfg.capacity * vp.SECTOR == 12 << 20
        assert cfg.num_queues == 3
        assert sorted(fe.queues) == [0, 1, 2]       # no more than the device has
        # The first bytes again (qemu-storage-daemon ignores GET_CONFIG's offset).
        assert fe.get_config(0, 8) == fe.config[:8]


def test_raw_direct_chain_writes_the_image(qsd: StorageDaemon) -> None:
    with Frontend(qsd.socket) as fe:
        fe.start()
        q = fe.queue(0)
        hdr, hv = fe.buffer(16)
        data, dv = fe.buffer(8192)
        st, sv = fe.buffer(1)
        vp.REQ_HEADER.pack_into(hv, 0, vp.T_OUT, 0, 24)       # sector 24 = byte 12288
        pattern = os.urandom(8192)
        dv[:] = pattern
        sv[0] = 0xFF
        # The data in two descriptors: any layout is allowed (VERSION_1).
        head = q.add_chain([(hdr, 16, 0), (data, 4096, 0), (data + 4096, 4096, 0), (st, 1, virtq.F_WRITE)])
        assert q.free_descriptors == q.num - 4
        q.kick(force=True)
        assert q.wait(10)
        assert q.reap() == [(head, 1)]                       # the status byte was written
        assert sv[0] == vp.S_OK
        assert q.free_descriptors == q.num
        assert qsd.image_bytes(12288, 8192) == pattern
        # Stopping the queue: the back end took one entry off it.
        assert fe.get_vring_base(0) == 1


def test_raw_indirect_chain_reads_the_image(qsd: StorageDaemon) -> None:
    pattern = os.urandom(4096)
    with open(qsd.image, "r+b") as f:
        os.pwrite(f.fileno(), pattern, 1 << 20)
    with Frontend(qsd.socket) as fe:
        fe.start()
        assert fe.has(vp.RING_F_INDIRECT_DESC)
        q = fe.queue(0)
        hdr, hv = fe.buffer(16)
        data, dv = fe.buffer(4096)
        st, sv = fe.buffer(1)
        vp.REQ_HEADER.pack_into(hv, 0, vp.T_IN, 0, (1 << 20) // vp.SECTOR)
        head = q.add_chain([(hdr, 16, 0), (data, 4096, virtq.F_WRITE), (st, 1, virtq.F_WRITE)], indirect=True)
        # The ring holds one descriptor: an indirect table of three.
        addr, length, flags, _ = q.read_desc(head)
        assert flags == virtq.F_INDIRECT and length == 3 * virtq.DESC.size
        assert virtq.DESC.unpack_from(fe.mem.view, addr + 16) == (data, 4096, virtq.F_WRITE | virtq.F_NEXT, 2)
        q.kick()
        assert q.wait(10)
        assert q.reap() == [(head, 4097)]
        assert sv[0] == vp.S_OK and bytes(dv) == pattern


def test_ring_layout_as_the_device_reads_it(qsd: StorageDaemon) -> None:
    """What the back end is told (SET_VRING_ADDR's user addresses) and what a chain looks
    like in shared memory, byte for byte, including a malformed one (a loop)."""
    with Frontend(qsd.socket) as fe:
        fe.negotiate()
        fe.set_mem_table()
        q = fe.setup_queue(0, 8)
        desc, used, avail = q.addresses
        d, a, u, _ = virtq.layout(8)
        assert (desc - UADDR_BASE, avail - UADDR_BASE, used - UADDR_BASE) == (q.desc, q.desc - d + a, q.desc - d + u)
        # A loop: 0 -> 1 -> 0, made available twice and published once.
        q.write_desc(0, 1 << 40, 16, virtq.F_NEXT, 1)
        q.write_desc(1, 4096, 1, virtq.F_NEXT | virtq.F_WRITE, 0)
        q.make_available(0)
        q.make_available(1)
        assert virtq.U16.unpack_from(fe.mem.view, q.avail + virtq.AVAIL_IDX)[0] == 0
        q.publish()
        view = fe.mem.view
        assert virtq.U16.unpack_from(view, q.avail + virtq.AVAIL_IDX)[0] == 2
        assert [virtq.U16.unpack_from(view, q.avail + virtq.AVAIL_RING + 2 * i)[0] for i in range(2)] == [0, 1]
        assert q.read_desc(0) == (1 << 40, 16, virtq.F_NEXT, 1)
        q.set_avail_idx(1000)
        assert virtq.U16.unpack_from(view, q.avail + virtq.AVAIL_IDX)[0] == 1000


def test_raw_messages(qsd: StorageDaemon) -> None:
    with Frontend(qsd.socket) as fe:
        fe.send(vp.GET_FEATURES)
        reply = fe.recv()
        assert reply.request == vp.GET_FEATURES and reply.flags & vp.FLAG_REPLY
        assert reply.u64() >> vp.F_VERSION_1 & 1
        fe.negotiate()
        assert fe.device_features == reply.u64()
        # With REPLY_ACK negotiated the back end acknowledges each set-up message.
        fe.send(vp.SET_VRING_NUM, vp.VRING_STATE.pack(0, 32), flags=vp.VERSION | vp.FLAG_NEED_REPLY)
        ack = fe.recv()
        assert ack.request == vp.SET_VRING_NUM and ack.u64() == 0


def test_bad_queue_size_is_refused_before_sending(qsd: StorageDaemon) -> None:
    with Frontend(qsd.socket) as fe:
        fe.negotiate()
        fe.set_mem_table()
        with pytest.raises(InvalidArgument):
            fe.setup_queue(0, 100)


def test_no_back_end(tmp_path: Path) -> None:
    with pytest.raises(DaemonNotRunning):
        Frontend(tmp_path / "nothing.sock", busy_wait=0.2)   # a missing socket is waited for that long


def test_back_end_gone_is_a_vhost_error(qsd: StorageDaemon) -> None:
    with Frontend(qsd.socket, timeout=5) as fe:
        fe.negotiate()
        qsd.kill()
        assert fe.connection_lost()
        with pytest.raises(VhostError):
            fe.set_mem_table()


def test_published_index_is_never_seen_half_written() -> None:
    """avail->idx as another process sees it while we publish: only values we wrote. With
    struct.pack_into (which zeroes the field before writing it) a few reads in 100,000
    saw 0 here, and the device took the ring for corrupt (N entries in a ring of 32)."""
    mem = SharedMemory(1 << 20)
    q = DriverQueue(mem, 0, 32, event_idx=True)
    values = (0x00FF, 0x0100)             # a carry into the high byte
    q.set_avail_idx(values[0])
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                           # the reader (a device): any other value is a failure
        bad = 0
        cells = virtq.u16_cells(mem.view[q.avail:q.avail + 4])
        os.read(r, 1)
        for _ in range(2_000_000):
            if cells[virtq.AVAIL_IDX_CELL] not in values:
                bad += 1
        os._exit(min(bad, 255))
    os.write(w, b"x")
    try:
        while True:
            for v in values * 1000:
                q.avail_idx = v
                q.publish()
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
    finally:
        os.close(r)
        os.close(w)
        q.close()
        mem.close()
    assert os.waitstatus_to_exitcode(status) == 0, f"{os.waitstatus_to_exitcode(status)} torn reads"
