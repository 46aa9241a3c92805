"""VhostVolume (ovsfs/client/volume.py) against qemu-storage-daemon's vhost-user-blk
export: a byte model at queue depth 1 to 64 over one or several queues, with and without
indirect descriptors and event index; the typed errors; a back end that dies with
requests in flight. Issue 12, item 3 ("read / write / flush / trim / write-zeroes with a
queue depth"). The same model runs against the daemon's shm door in tests/doors."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ovsfs.client.frontend import Frontend, VhostError
from ovsfs.client.volume import VhostVolume
from ovsfs.errors import DaemonNotRunning, InvalidArgument, NotFound, OutOfRange, OvsfsError, ReadOnly
from tests.qsd import StorageDaemon
from tests.client.model import Model, batches

MiB = 1 << 20


@pytest.fixture(scope="module")
def model_export(tmp_path_factory) -> Iterator[StorageDaemon]:
    """One export for every example of the model test: each example starts from what is on it."""
    d = StorageDaemon(tmp_path_factory.mktemp("model"), 1 * MiB, num_queues=2).start()
    yield d
    d.stop()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_byte_model_at_queue_depth(model_export: StorageDaemon, data) -> None:
    d = model_export
    depth = data.draw(st.sampled_from([1, 2, 5, 16, 32, 64]), "queue depth")
    indirect = data.draw(st.booleans(), "indirect")
    event_idx = data.draw(st.booleans(), "event_idx")
    with VhostVolume(d.socket, queue_depth=depth, indirect=indirect, event_idx=event_idx,
                     max_request_bytes=64 << 10) as vol:
        assert vol.size == 1 * MiB and vol.queue_depth == depth
        model = Model(vol.read(0, vol.size))
        for batch in data.draw(batches(vol.size, max_batch=2 * depth), "batches"):
            model.run(vol, batch)
        model.check(vol)
    assert d.image_bytes(0, MiB) == bytes(model.data)


def test_many_in_flight_over_several_queues(qsd_factory) -> None:
    d = qsd_factory(size=8 * MiB, num_queues=4)
    with VhostVolume(d.socket, queue_depth=64, num_queues=4) as vol:
        assert vol.num_queues == 4
        rng = random.Random(12)
        blocks = rng.sample(range(vol.size // 4096), 512)
        payload = {b: rng.randbytes(4096) for b in blocks}
        reqs = []
        for b in blocks:
            reqs.append(vol.submit("write", b * 4096, data=payload[b]))
            assert vol.in_flight <= 64
        got = vol.drain()
        assert sorted(id(r) for r in got) == sorted(id(r) for r in reqs)
        assert all(r.done and r.error is None for r in reqs)
        assert all(q.last_used > 0 for q in vol.queues)       # every queue carried requests
        vol.flush()
        back = vol.readv([(b * 4096, 4096) for b in blocks])
        assert back == [payload[b] for b in blocks]
    assert all(d.image_bytes(b * 4096, 4096) == payload[b] for b in blocks[:50])


def test_large_requests_are_split(qsd: StorageDaemon) -> None:
    with VhostVolume(qsd.socket, queue_depth=4, max_request_bytes=64 << 10) as vol:
        big = os.urandom(3 * MiB + 512)
        vol.write(512, big)
        assert vol.read(512, len(big)) == big
        vol.write_zeroes(4096, 2 * MiB)
        assert vol.read(4096, 2 * MiB) == bytes(2 * MiB)
        vol.trim(0, 8 * MiB)        # whatever it leaves, the export still serves
        assert vol.get_id()


def test_typed_errors(qsd_factory) -> None:
    d = qsd_factory(size=4 * MiB)
    with VhostVolume(d.socket) as vol:
        with pytest.raises(OutOfRange):
            vol.read(4 * MiB - 512, 1024)
        with pytest.raises(InvalidArgument):
            vol.write(100, b"x" * 512)
        with pytest.raises(InvalidArgument):
            vol.read(0, 1000)
        # A request type the device does not know: VIRTIO_BLK_S_UNSUPP from the device.
        with pytest.raises(InvalidArgument, match="UNSUPP"):
            vol.submit(99).result()
        assert vol.read(0, 512) == bytes(512)      # and the connection still serves


def test_read_only_export(qsd_factory) -> None:
    d = qsd_factory(size=1 * MiB, writable=False)
    with VhostVolume(d.socket) as vol:
        assert vol.read_only
        with pytest.raises(ReadOnly):
            vol.write(0, bytes(512))
        with pytest.raises(ReadOnly):
            vol.trim(0, 4096)
        assert vol.read(0, 4096) == bytes(4096)


def test_io_error_from_the_device(qsd_factory) -> None:
    """qemu's blkdebug fails reads of sector 2048 with EIO in the real block layer."""
    d = qsd_factory(size=4 * MiB, inject=[{"event": "none", "iotype": "read", "errno": 5, "sector": 2048}])
    with VhostVolume(d.socket, queue_depth=8) as vol:
        good = vol.submit("read", 0, 4096)
        bad = vol.submit("read", 2048 * 512, 4096)
        with pytest.raises(OvsfsError, match="IOERR") as e:
            bad.result()
        assert e.value.errno == 5
        assert good.result() == bytes(4096)
        assert vol.read(8192, 512) == bytes(512)


def test_back_end_killed_with_requests_in_flight(qsd_factory) -> None:
    d = qsd_factory(size=64 * MiB)
    vol = VhostVolume(d.socket, queue_depth=32)
    try:
        vol.write(0, b"a" * 4096)
        d.kill()          # SIGKILL by PID
        start = time.monotonic()
        with pytest.raises(VhostError):
            for i in range(10_000):
                vol.submit("write", (i % 16384) * 4096, data=b"b" * 4096)
            vol.drain()
        assert time.monotonic() - start < 10     # generous: noticed, not hung
        assert vol.in_flight == 0
        with pytest.raises(VhostError):
            vol.read(0, 512)
    finally:
        vol.close()


# ---- what the breaker found (issue 12 follow-up) -------------------------------------------

def test_memory_is_sealed_against_resizing(qsd: StorageDaemon) -> None:
    """A front end that truncated its memory under the back end's mapping made the back end
    SIGBUS: the memfd handed over is sealed against shrinking and growing (the door requires
    it); `sealed_memory=False` keeps an unsealed one for tests of back ends."""
    import fcntl

    with VhostVolume(qsd.socket) as vol:
        fd = vol.fe.mem.fd
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SEAL
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 4096)
        assert vol.read(0, 512) == bytes(512)
    qsd.wait_listening()
    fe = Frontend(qsd.socket, memory_bytes=1 << 20, sealed_memory=False)
    try:
        assert not fcntl.fcntl(fe.mem.fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
    finally:
        fe.close()


def test_socket_path_too_long(tmp_path: Path) -> None:
    """A 90-character volume name makes a socket path past sun_path's 108 bytes."""
    with pytest.raises(InvalidArgument, match="at most 107"):
        VhostVolume(tmp_path / ("v" * 120 + ".sock"))


def test_socket_that_appears_late_is_waited_for(qsd: StorageDaemon, tmp_path: Path) -> None:
    """The door makes a new volume's socket up to a second after `volume create`: a missing
    socket is tried again for busy_wait seconds (here: the export's socket moved into place
    0.5 s after we start to connect)."""
    late = tmp_path / "late.sock"
    t = threading.Timer(0.5, os.rename, (qsd.socket, late))
    t.start()
    try:
        with VhostVolume(late, busy_wait=10) as vol:
            assert vol.read(0, 512) == bytes(512)
    finally:
        t.join()
    # Nothing answers in that directory: no daemon. A socket that does answer there (the
    # export's, like another volume's of a running daemon): no such volume.
    (tmp_path / "empty").mkdir()
    with pytest.raises(DaemonNotRunning, match="is the daemon running"):
        VhostVolume(tmp_path / "empty" / "never.sock", busy_wait=0.2)
    with pytest.raises(NotFound, match="no socket for volume never at .*no such volume on this node"):
        VhostVolume(tmp_path / "never.sock", busy_wait=0.2)


def test_stopped_back_end_times_out(qsd_factory) -> None:
    """A back end that is SIGSTOPped answers nothing and closes nothing: after io_timeout
    seconds without an answer every request in flight fails with VhostError and the volume
    is broken (before: the client waited for ever)."""
    d = qsd_factory(size=4 * MiB)
    vol = VhostVolume(d.socket, queue_depth=8, io_timeout=1.0)
    assert d.proc is not None
    try:
        vol.write(0, b"a" * 4096)
        os.kill(d.proc.pid, signal.SIGSTOP)
        start = time.monotonic()
        reqs = [vol.submit("write", i * 4096, data=b"b" * 4096) for i in range(4)]
        with pytest.raises(VhostError, match="io_timeout"):
            reqs[0].result()
        assert 0.9 <= time.monotonic() - start < 10      # generous upper bound: not hung
        assert vol.in_flight == 0 and all(r.done and isinstance(r.error, VhostError) for r in reqs)
        with pytest.raises(VhostError):
            vol.read(0, 512)
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
        vol.close()


def test_io_timeout_counts_from_the_kick(qsd: StorageDaemon) -> None:
    """Requests queued long before they are kicked are not timed out for it: the clock
    starts when the device can see them."""
    with VhostVolume(qsd.socket, queue_depth=4, io_timeout=0.5) as vol:
        reqs = [vol.submit("write", i * 4096, data=b"c" * 4096) for i in range(4)]
        time.sleep(1.0)         # longer than io_timeout, but the device has seen nothing yet
        vol.drain()
        assert all(r.done and r.error is None for r in reqs)
        assert vol.read(0, 4096) == b"c" * 4096
