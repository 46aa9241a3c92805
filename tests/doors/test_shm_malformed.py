"""Issue 12 item 2: bad input from the front end never hurts the daemon.

Each case misbehaves on volume `bad`'s socket while a second front end keeps writing and
reading volume `good` (Traffic, a byte model) on its own socket. After each case: the
daemon runs, `good` saw no error, and `bad`'s socket takes a new front end that reads and
writes correctly. The request fails with VIRTIO_BLK_S_IOERR / S_UNSUPP when the device
can still report it, else the connection is dropped (and the daemon logs a line).

One daemon serves the whole module (a start costs about a second), with its FUSE door on
(a file of its own mount passed as a front end's fd must not block it) and a short
shm.handshake_timeout.
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ovsfs.client.frontend import Frontend, VhostError
from ovsfs.vhost import protocol as P
from ovsfs.vhost import virtq
from tests.conftest import TEST_CONFIG, Daemon, _merge
from tests.doors.shm_helpers import (UNSET, Traffic, connect, dropped, frontend, header, lost, request,
                                     run_chain, segment, sock_path, wait_socket)

SIZE = 16 << 20
HANDSHAKE = 2.0     # shm.handshake_timeout of the module's daemon (seconds)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("shm-malformed"),
               _merge(TEST_CONFIG, {"fuse": {"enabled": True}, "shm": {"handshake_timeout": HANDSHAKE}}))
    try:
        d.start()
        d.cli("volume", "create", "bad", "--size", str(SIZE))
        d.cli("volume", "create", "good", "--size", str(SIZE))
        d.cli("volume", "create", "onfuse", "--size", "1M")
        wait_socket(sock_path(d, "bad"))
        wait_socket(sock_path(d, "good"))
        yield d
    finally:
        d.teardown()
        # a daemon that had to be killed leaves its mount behind
        if os.path.ismount(d.state / "mnt"):
            subprocess.run(["fusermount3", "-u", "-z", str(d.state / "mnt")], capture_output=True)


@pytest.fixture
def traffic(node: Daemon) -> Iterator[Traffic]:
    with Traffic(sock_path(node, "good")) as t:
        deadline = time.monotonic() + 10
        while t.ops < 4 and not t.errors and time.monotonic() < deadline:
            time.sleep(0.01)
        yield t
    assert not t.errors, t.errors
    assert t.ops >= 4


def still_serving(node: Daemon, traffic: Traffic) -> None:
    """The daemon lives, the other volume served meanwhile, and `bad` takes a new front end."""
    assert node.running(), node.log()
    before = traffic.ops
    vol = connect(sock_path(node, "bad"))
    try:
        data = os.urandom(8192)
        vol.write(40960, data)
        assert vol.read(40960, 8192) == data
    finally:
        vol.close()
    deadline = time.monotonic() + 10
    while traffic.ops == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert traffic.ops > before, "the other volume stopped serving"


def must_drop(node: Daemon, fe: Frontend, what: str) -> None:
    try:
        assert dropped(fe), f"{what}: the connection was not dropped"
    finally:
        fe.close()
    assert "dropping the front end" in node.log(200), node.log()


@pytest.fixture
def fe(node: Daemon) -> Iterator[Frontend]:
    f = frontend(sock_path(node, "bad"))
    yield f
    f.close()


# ---- descriptors ---------------------------------------------------------------------


def test_descriptor_outside_memory_table(node: Daemon, traffic: Traffic, fe: Frontend) -> None:
    q = fe.queue(0)
    hdr = header(fe, P.T_IN, 0)
    st, _ = fe.buffer(1)
    q.add_chain([(hdr, 16, 0), (fe.mem.size + (1 << 20), 4096, virtq.F_WRITE), (st, 1, virtq.F_WRITE)])
    q.kick(force=True)
    must_drop(node, fe, "data descriptor past the memory table")
    still_serving(node, traffic)


def test_descriptor_crossing_end_of_memory(node: Daemon, traffic: Traffic, fe: Frontend) -> None:
    q = fe.queue(0)
    hdr = header(fe, P.T_IN, 0)
    st, _ = fe.buffer(1)
    q.add_chain([(hdr, 16, 0), (fe.mem.size - 4096, 0xFFFFF000, virtq.F_WRITE), (st, 1, virtq.F_WRITE)])
    q.kick(force=True)
    must_drop(node, fe, "a 4 GiB descriptor running off the end of memory")
    still_serving(node, traffic)


def test_length_past_end_of_volume(node: Daemon, traffic: Traffic, fe: Frontend) -> None:
    q = fe.queue(0)
    last = SIZE // 512 - 4       # 2 KiB before the end, 8 KiB asked
    reqs = [request(fe, q, P.T_IN, last, 8192), request(fe, q, P.T_OUT, last, payload=bytes(8192)),
            request(fe, q, P.T_DISCARD, payload=segment(last, 16)),
            request(fe, q, P.T_WRITE_ZEROES, payload=segment(1 << 40, 8)),
            request(fe, q, P.T_IN, (1 << 64) // 512 - 1, 512)]
    used = {}
    deadline = time.monotonic() + 10
    while len(used) < len(reqs) and time.monotonic() < deadline:
        used.update(run_chain(q, timeout=1))
    assert set(used) == {r.head for r in reqs}
    assert [r.status[0] for r in reqs] == [P.S_IOERR] * len(reqs)
    # Then the same connection still serves a good request.
    ok = request(fe, q, P.T_IN, 0, 4096)
    assert run_chain(q) and ok.status[0] == P.S_OK
    fe.close()
    still_serving(node, traffic)


def test_bad_requests_get_a_status(node: Daemon, traffic: Traffic, fe: Frontend) -> None:
    q = fe.queue(0)
    cases = {
        "unknown type": (request(fe, q, 99, 0, 0), P.S_UNSUPP),
        "data not whole sectors": (request(fe, q, P.T_IN, 0, 1000), P.S_IOERR),
        "discard with unmap": (request(fe, q, P.T_DISCARD, payload=segment(0, 8, P.SEGMENT_F_UNMAP)), P.S_UNSUPP),
        "zeroes with unknown flags": (request(fe, q, P.T_WRITE_ZEROES, payload=segment(0, 8, 0x80)), P.S_UNSUPP),
        "half a segment": (request(fe, q, P.T_DISCARD, payload=segment(0, 8)[:10]), P.S_IOERR),
        "too many segments": (request(fe, q, P.T_DISCARD, payload=segment(0, 8) * 100), P.S_IOERR),
        "request too large": (request(fe, q, P.T_IN, 0, (32 << 20) + 512), P.S_IOERR),
    }
    short = fe.buffer(8)[0]
    st, stv = fe.buffer(1)
    stv[0] = UNSET
    short_head = q.add_chain([(short, 8, 0), (st, 1, virtq.F_WRITE)])
    got: dict[int, int] = {}
    deadline = time.monotonic() + 10
    while len(got) < len(cases) + 1 and time.monotonic() < deadline:
        got.update(run_chain(q, timeout=1))
    for what, (raw, status) in cases.items():
        assert raw.head in got, what
        assert raw.status[0] == status, what
    assert short_head in got and stv[0] == P.S_IOERR, "a header shorter than 16 bytes"
    fe.close()
    still_serving(node, traffic)


def test_no_status_byte(node: Daemon, traffic: Traffic, fe: Frontend) -> None:
    q = fe.queue(0)
    hdr = header(fe, P.T_FLUSH, 0)
    q.add_chain([(hdr, 16, 0)])          # nothing writable: no place for the status
    q.kick(force=True)
    must_drop(node, fe, "a chain without a status byte")
    still_serving(node, traffic)


def test_readable_after_writable(node: Daemon, traffic: Traffic, fe: Frontend) -> None:
    q = fe.queue(0)
    hdr = header(fe, P.T_IN, 0)
    buf, _ = fe.buffer(4096)
    st, _ = fe.buffer(1)
    q.add_chain([(buf, 4096, virtq.F_WRITE), (hdr, 16, 0), (st, 1, virtq.F_WRITE)])
    q.kick(force=True)
    must_drop(node, fe, "a readable descriptor after a writable one")
    still_serving(node, traffic)


def test_loop_in_descriptor_chain(node: Daemon, traffic: Traffic, fe: Frontend) -> None:
    q = fe.queue(0)
    hdr = header(fe, P.T_IN, 0)
    buf, _ = fe.buffer(512)
    [a, b] = q.alloc_desc(2)
    q.write_desc(a, hdr, 16, virtq.F_NEXT, b)
    q.write_desc(b, buf, 512, virtq.F_NEXT, a)     # b -> a -> b ...
    q.make_available(a)
    q.kick(force=True)
    must_drop(node, fe, "a loop in a descriptor chain")
    still_serving(node, traffic)


def test_loop_in_indirect_table(node: Daemon, traffic: Traffic, fe: Frontend) -> None:
    q = fe.queue(0)
    hdr = header(fe, P.T_IN, 0)
    table, tv = fe.buffer(3 * 16, align=16)
    virtq.DESC.pack_into(tv, 0, hdr, 16, virtq.F_NEXT, 1)
    virtq.DESC.pack_into(tv, 16, hdr, 16, virtq.F_NEXT, 2)
    virtq.DESC.pack_into(tv, 32, hdr, 16, virtq.F_NEXT, 0)       # back to the start
    [d] = q.alloc_desc(1)
    q.write_desc(d, table, 48, virtq.F_INDIRECT)
    q.make_available(d)
    q.kick(force=True)
    must_drop(node, fe, "a loop in an indirect table")
    still_serving(node, traffic)


def test_indirect_inside_indirect(node: Daemon, traffic: Traffic, fe: Frontend) -> None:
    q = fe.queue(0)
    inner, iv = fe.buffer(16, align=16)
    outer, ov = fe.buffer(16, align=16)
    virtq.DESC.pack_into(iv, 0, outer, 16, virtq.F_INDIRECT, 0)
    virtq.DESC.pack_into(ov, 0, inner, 16, virtq.F_INDIRECT, 0)
    [d] = q.alloc_desc(1)
    q.write_desc(d, outer, 16, virtq.F_INDIRECT)
    q.make_available(d)
    q.kick(force=True)
    must_drop(node, fe, "an indirect table inside an indirect table")
    still_serving(node, traffic)


def test_head_and_next_past_the_ring(node: Daemon, traffic: Traffic) -> None:
    for case in ("head", "next", "avail"):
        f = frontend(sock_path(node, "bad"))
        q = f.queue(0)
        if case == "head":
            q.make_available(q.num + 3)
        elif case == "next":
            [d] = q.alloc_desc(1)
            q.write_desc(d, header(f, P.T_IN, 0), 16, virtq.F_NEXT, q.num + 1)
            q.make_available(d)
        else:
            q.set_avail_idx(q.num + 5)   # more entries available than the ring holds
        q.kick(force=True)
        must_drop(node, f, f"{case} index past the ring")
    still_serving(node, traffic)


# ---- messages ------------------------------------------------------------------------


@pytest.mark.parametrize("num", [100, 0, 2048, 65535])
def test_ring_size_not_accepted(node: Daemon, traffic: Traffic, num: int) -> None:
    f = frontend(sock_path(node, "bad"), start=False)
    f.negotiate()
    f.set_mem_table()
    with pytest.raises(VhostError):
        f.call(P.SET_VRING_NUM, P.VRING_STATE.pack(0, num))
        f.call(P.GET_FEATURES)       # without an ack the refusal shows as a closed connection
    must_drop(node, f, f"ring size {num}")
    still_serving(node, traffic)


def _raw_cases(mem_fd: int, pipe_r: int) -> dict[str, tuple[bytes, list[int]]]:
    region = P.Region(gpa=0, size=8 << 20, uaddr=0x7F0000000000, offset=0)
    return {
        "bad version": (P.HEADER.pack(P.GET_FEATURES, 0x2, 0), []),
        "oversized payload": (P.HEADER.pack(P.SET_MEM_TABLE, 1, 1 << 20) + bytes(4096), []),
        "unknown request": (P.encode(200, bytes(8)), []),
        "short payload": (P.encode(P.SET_VRING_NUM, b"\0\0"), []),
        "regions without fds": (P.encode(P.SET_MEM_TABLE, P.encode_mem_table([region, region])), [mem_fd]),
        "region past its file": (P.encode(P.SET_MEM_TABLE, P.encode_mem_table(
            [P.Region(0, 1 << 30, 0x7F0000000000, 0)])), [mem_fd]),
        "region fd not a file": (P.encode(P.SET_MEM_TABLE, P.encode_mem_table([region])), [pipe_r]),
        "queue index past num_queues": (P.encode(P.SET_VRING_NUM, P.VRING_STATE.pack(200, 16)), []),
        "log base (not offered)": (P.encode(P.SET_LOG_BASE, bytes(16)), []),
        "kick without fd": (P.encode(P.SET_VRING_KICK, P.U64.pack(0)), []),
    }


@pytest.mark.parametrize("case", list(_raw_cases(-1, -1)))
def test_malformed_message(node: Daemon, traffic: Traffic, case: str) -> None:
    f = frontend(sock_path(node, "bad"), start=False)
    r, w = os.pipe()
    try:
        data, fds = _raw_cases(f.mem.fd, r)[case]
        f.send_raw(data, fds)
        must_drop(node, f, case)
    finally:
        os.close(r)
        os.close(w)
    still_serving(node, traffic)


def test_kick_fd_not_an_eventfd(node: Daemon, traffic: Traffic) -> None:
    f = frontend(sock_path(node, "bad"), start=False)
    f.negotiate()
    f.set_mem_table()
    q = f.setup_queue(0, 16)
    r, w = os.pipe()
    os.close(w)          # read end at EOF: always readable, never 8 bytes
    with pytest.raises(VhostError):      # refused (REPLY_ACK 1), then dropped
        f.call(P.SET_VRING_KICK, P.U64.pack(0), [r])
    os.close(r)
    assert q is not None
    must_drop(node, f, "a kick fd at end of file")
    still_serving(node, traffic)


# ---- fds that could hurt the daemon: memory that shrinks, files on its own FUSE mount ---


def test_memory_that_can_shrink_is_refused(node: Daemon, traffic: Traffic) -> None:
    """A memfd shrunk after SET_MEM_TABLE faulted the daemon (SIGBUS: every volume down):
    memory must be a memfd sealed with F_SEAL_SHRINK."""
    # an unsealed memfd: what the client library had, and any front end may send
    f = Frontend(sock_path(node, "bad"), memory_bytes=8 << 20, timeout=5.0, sealed_memory=False)
    assert not fcntl.fcntl(f.mem.fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
    try:
        try:
            f.start(1, 64)
        except (VhostError, OSError):
            pass                       # refused at SET_MEM_TABLE
        else:
            # accepted: what the breaker did next (the front end never touches its memory
            # again: it would fault itself)
            q = f.queue(0)
            request(f, q, P.T_IN, 0, 4096)
            os.ftruncate(f.mem.fd, 0)
            os.eventfd_write(q.kick_fd, 1)
        assert dropped(f), "the connection was not dropped"
    finally:
        f.sock.close()
    assert node.running(), node.log()
    assert "not sealed with F_SEAL_SHRINK" in node.log(200)
    still_serving(node, traffic)


def _fuse_file(node: Daemon, flags: int) -> int:
    deadline = time.monotonic() + 10
    while True:      # the volume's file in its vPool's directory, e.g. mnt/default/onfuse.raw
        found = list((node.state / "mnt").glob("*/onfuse*"))
        if found:
            return os.open(found[0], flags)
        assert time.monotonic() < deadline, f"onfuse never appeared under {node.state / 'mnt'}"
        time.sleep(0.05)


def _close_bounded(fd: int) -> None:
    """Close a file of the daemon's FUSE mount without hanging the test when the daemon is
    stuck (close sends FLUSH): in a thread, given up after 10 s (the module's teardown kills
    the daemon, which ends the call)."""
    t = threading.Thread(target=os.close, args=(fd,), daemon=True)
    t.start()
    t.join(10)


@pytest.mark.parametrize("as_what", ["memory", "call", "kick"])
def test_file_on_own_fuse_mount(node: Daemon, traffic: Traffic, as_what: str) -> None:
    """A file of the daemon's own FUSE mount as guest memory (fstat waits in FUSE getattr)
    or as a call fd (write waits in FUSE write) deadlocked the daemon: fds are checked
    (sealed memfd, eventfd) before any other call on them."""
    fd = _fuse_file(node, os.O_RDWR)
    f = frontend(sock_path(node, "bad"), start=False)
    try:
        f.negotiate()
        with pytest.raises((VhostError, OSError)):      # refused (or the connection dropped)
            if as_what == "memory":
                f.call(P.SET_MEM_TABLE, P.encode_mem_table([P.Region(gpa=0, size=1 << 20, uaddr=1 << 30,
                                                                     offset=0)]), [fd])
            else:
                f.set_mem_table()
                f.setup_queue(0, 16)
                f.call(P.SET_VRING_CALL if as_what == "call" else P.SET_VRING_KICK, P.U64.pack(0), [fd])
        assert dropped(f), "the connection was not dropped"
    finally:
        f.sock.close()
        _close_bounded(fd)
    assert node.running(), node.log()
    assert "is not a memfd" in node.log(200) if as_what == "memory" else "not an eventfd" in node.log(200)
    still_serving(node, traffic)


# ---- front ends that hold the volume for nothing ---------------------------------------


def test_idle_connection_holds_nothing(node: Daemon, traffic: Traffic) -> None:
    """A front end that connects and sends nothing held the volume (delete, rename and other
    doors blocked) and its socket forever: no hold before its first message, and dropped
    after shm.handshake_timeout."""
    path = sock_path(node, "bad")

    def shm_holders() -> list[str]:
        st, info = node.api("GET", "/volumes/bad")
        assert st == 200, info
        return [h for h in info["holders"] if h.startswith("shm")]

    # The previous test's front end must be gone first, or ours is refused as a second one
    # (a refusal that is not always logged: one line a second).
    deadline = time.monotonic() + 30
    while shm_holders():
        assert time.monotonic() < deadline, f"the previous front end still holds it:\n{node.log(20)}"
        time.sleep(0.1)
    for _attempt in range(5):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(HANDSHAKE + 10)
        try:
            s.connect(str(path))
            t0 = time.monotonic()
            time.sleep(0.3)
            assert not shm_holders(), node.log(20)
            assert s.recv(1) == b"", "the idle connection was not dropped"
            if time.monotonic() - t0 >= HANDSHAKE / 2:
                break          # dropped by the handshake timeout, not refused at once
        finally:
            s.close()
        time.sleep(0.5)        # refused: the previous front end's session was still ending
    deadline = time.monotonic() + 5
    while "shm.handshake_timeout" not in node.log(200) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "shm.handshake_timeout" in node.log(200)
    still_serving(node, traffic)


def test_negotiation_without_config_is_dropped(node: Daemon, traffic: Traffic) -> None:
    """A front end that stops after GET_FEATURES (it holds the volume from its first
    message) is dropped after shm.handshake_timeout, and its hold goes with it."""
    f = frontend(sock_path(node, "bad"), start=False)
    try:
        f.call(P.GET_FEATURES)
        st, info = node.api("GET", "/volumes/bad")
        assert [h for h in info["holders"] if h.startswith("shm")], info
        assert dropped(f, timeout=HANDSHAKE + 8), "not dropped after shm.handshake_timeout"
    finally:
        f.close()
    assert wait_no_holders(node, "bad"), node.api("GET", "/volumes/bad")[1]
    still_serving(node, traffic)


def test_attached_front_end_is_kept(node: Daemon) -> None:
    """A front end that got its config (QEMU attached, even paused, its rings not started)
    keeps its connection and hold past shm.handshake_timeout."""
    f = frontend(sock_path(node, "bad"), start=False)
    try:
        f.negotiate()                # GET_CONFIG among it
        time.sleep(HANDSHAKE + 1)
        assert not lost(f), "an attached front end was dropped"
        st, info = node.api("GET", "/volumes/bad")
        assert [h for h in info["holders"] if h.startswith("shm")], info
    finally:
        f.close()


# ---- the front end vanishing ---------------------------------------------------------


def test_front_end_vanishes_mid_request(node: Daemon, traffic: Traffic) -> None:
    path = sock_path(node, "bad")
    vol = connect(path, queue_depth=32, max_request_bytes=1 << 20)
    data = os.urandom(1 << 20)
    for i in range(32):
        vol.submit("write", i * (1 << 20) % SIZE, len(data), data=data)
    vol.kick()
    vol.close()               # gone with every request in flight
    # Half a message, then gone.
    s = socket.socket(socket.AF_UNIX)
    deadline = time.monotonic() + 10
    while True:
        try:
            s.connect(str(path))
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    s.sendall(P.HEADER.pack(P.SET_VRING_NUM, 1, 8)[:7])
    s.close()
    still_serving(node, traffic)
    # The holds went with the connections.
    assert wait_no_holders(node, "bad"), node.api("GET", "/volumes/bad")[1]


def wait_no_holders(node: Daemon, name: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st, info = node.api("GET", f"/volumes/{name}")
        if st == 200 and not [h for h in info["holders"] if h.startswith("shm")]:
            return True
        time.sleep(0.05)
    return False


def test_second_front_end_refused(node: Daemon, traffic: Traffic) -> None:
    path = sock_path(node, "bad")
    first = connect(path)
    try:
        with pytest.raises(Exception):
            Frontend(path, timeout=3.0).start(1, 16)
        data = os.urandom(4096)
        first.write(0, data)       # the first one is not disturbed
        assert first.read(0, 4096) == data
    finally:
        first.close()
    # which front end holds the socket: both pids are in the line
    assert f"refused a second front end (pid {os.getpid()}): pid {os.getpid()} is connected" in node.log(200)
    still_serving(node, traffic)


# ---- the whole class: random rings ---------------------------------------------------

_desc = st.tuples(
    st.one_of(st.integers(0, (48 << 20) - 1), st.integers(0, 2**64 - 1)),     # addr: in memory or anywhere
    st.one_of(st.sampled_from([0, 1, 16, 512, 4096]), st.integers(0, 2**32 - 1)),
    st.integers(0, 7),                                                    # NEXT | WRITE | INDIRECT
    st.integers(0, 80),                                                   # next (ring of 64)
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(descs=st.lists(_desc, min_size=1, max_size=8), heads=st.lists(st.integers(0, 70), min_size=1, max_size=4),
       kind=st.sampled_from([P.T_IN, P.T_OUT, P.T_FLUSH, P.T_DISCARD, P.T_GET_ID, 77]))
def test_random_rings(node: Daemon, traffic: Traffic, descs: list[tuple[int, int, int, int]],
                      heads: list[int], kind: int) -> None:
    """Whatever the descriptors say, the door answers or drops this front end only."""
    f = frontend(sock_path(node, "bad"))
    try:
        q = f.queue(0)
        hdr = header(f, kind, 0)
        for i, (addr, length, flags, nxt) in enumerate(descs):
            # The first descriptor is the header when its address lands in memory: the
            # request gets parsed further.
            q.write_desc(i, hdr if i == 0 and addr < (48 << 20) else addr, length, flags, nxt)
        for h in heads:
            q.make_available(h)
        q.kick(force=True)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not lost(f) and q.pending_used() < len(heads):
            time.sleep(0.01)
        gone = lost(f)
        event("dropped" if gone else "answered")
        assert gone or q.pending_used() == len(heads)
    finally:
        f.close()
    assert node.running(), node.log()


def test_nothing_left_behind(node: Daemon) -> None:
    """After every front end above went (cleanly, dropped, or with requests in flight):
    no mapping of their memory and no fd of theirs is left in the daemon (the rings are
    unmapped, kick / call fds closed)."""
    def leftovers() -> list[str]:
        maps = [ln for ln in Path(f"/proc/{node.pid}/maps").read_text().splitlines() if "memfd:" in ln]
        fds = []
        for fd in Path(f"/proc/{node.pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if "memfd:" in target or "eventfd" in target:
                fds.append(target)
        return maps + fds

    deadline = time.monotonic() + 10
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers() == []
