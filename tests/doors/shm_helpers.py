"""Helpers for the shm door tests: raw virtio-blk requests over the client library's
front end (ovsfs.client.frontend), socket waits, and background traffic on another volume.

A raw request is built by hand in the front end's shared memory (header, data, status
byte) so that tests can also build what a well-behaved driver never would.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ovsfs.client.frontend import DriverQueue, Frontend
from ovsfs.client.volume import VhostVolume
from ovsfs.vhost import protocol as P
from ovsfs.vhost import virtq

UNSET = 0xFF      # the status byte before the device writes it


def sock_path(daemon: Any, name: str) -> Path:
    return daemon.run_dir / "vhost" / f"{name}.sock"


def wait_socket(path: Path, timeout: float = 10.0, present: bool = True) -> None:
    """Wait until the door made (or removed) a socket (its reconcile pass runs every second)."""
    deadline = time.monotonic() + timeout
    while path.exists() != present:
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} {'never appeared' if present else 'is still there'} after {timeout} s")
        time.sleep(0.05)


def connect(path: Path, timeout: float = 10.0, **kw: Any) -> VhostVolume:
    """A VhostVolume, retried while the socket still serves the previous front end (the door
    takes a moment to close its volume handle after a disconnect)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return VhostVolume(path, timeout=5.0, **kw)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def frontend(path: Path, queue_size: int = 64, start: bool = True, timeout: float = 10.0) -> Frontend:
    deadline = time.monotonic() + timeout
    while True:
        fe = Frontend(path, memory_bytes=48 << 20, timeout=5.0)
        try:
            return fe.start(1, queue_size) if start else fe
        except Exception:
            fe.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def lost(fe: Frontend) -> bool:
    """Has the back end closed the connection? (Never blocks: Frontend.connection_lost
    waits for the socket's timeout when the connection is alive.)"""
    r, _, _ = select.select([fe.sock], [], [], 0)
    if not r:
        return False
    try:
        return fe.sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def dropped(fe: Frontend, timeout: float = 5.0) -> bool:
    """True once the back end closed the connection (within `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while not lost(fe):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@dataclass
class Raw:
    """One hand-made request: its head, header/data/status gpas and views."""

    head: int
    status_gpa: int
    status: memoryview
    data: memoryview | None


def header(fe: Frontend, kind: int, sector: int) -> int:
    gpa, view = fe.buffer(P.REQ_HEADER.size)
    P.REQ_HEADER.pack_into(view, 0, kind, 0, sector)
    return gpa


def request(fe: Frontend, q: DriverQueue, kind: int, sector: int = 0, nbytes: int = 0,
            payload: bytes | None = None, indirect: bool = False) -> Raw:
    """A well-formed request: IN reads nbytes; OUT writes payload; others carry payload
    (DISCARD / WRITE_ZEROES segments) as device-readable data."""
    hdr = header(fe, kind, sector)
    segs = [(hdr, P.REQ_HEADER.size, 0)]
    data: memoryview | None = None
    if kind == P.T_IN or kind == P.T_GET_ID:
        gpa, data = fe.buffer(nbytes)
        segs.append((gpa, nbytes, virtq.F_WRITE))
    elif payload is not None:
        gpa, data = fe.buffer(len(payload))
        data[:] = payload
        segs.append((gpa, len(payload), 0))
    st_gpa, st = fe.buffer(1)
    st[0] = UNSET
    segs.append((st_gpa, 1, virtq.F_WRITE))
    head = q.add_chain(segs, indirect=indirect)
    return Raw(head, st_gpa, st, data)


def run_chain(q: DriverQueue, timeout: float = 10.0) -> list[tuple[int, int]]:
    """Kick and wait for used elements; [(head, len)] (empty when nothing came back)."""
    q.kick(force=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if q.wait(0.05):
            return q.reap()
    return []


def segment(sector: int, count: int, flags: int = 0) -> bytes:
    return P.SEGMENT.pack(sector, count, flags)


@dataclass
class Traffic:
    """Writes and reads on another volume in a thread while a test misbehaves on its own
    socket: every read must return what was written there (a byte model of 64 slots)."""

    path: Path
    ops: int = 0
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> "Traffic":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        model: dict[int, bytes] = {}
        try:
            vol = connect(self.path, queue_depth=8)
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.errors.append(f"connect: {e!r}")
            return
        try:
            i = 0
            while not self._stop.is_set():
                slot = i % 64
                data = os.urandom(4096)
                vol.write(slot * 4096, data)
                model[slot] = data
                check = (i * 7) % 64 if (i * 7) % 64 in model else slot   # slots this run wrote
                if vol.read(check * 4096, 4096) != model[check]:
                    self.errors.append(f"slot {check} read back wrong")
                self.ops += 2
                i += 1
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.errors.append(repr(e))
        finally:
            vol.close()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
