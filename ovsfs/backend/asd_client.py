"""Client side of one ASD: a small pool of TCP connections, typed errors, up/down state.

The proxy asks many ASDs in parallel from worker threads; each call borrows a
connection, so one slow ASD never blocks calls to the others. A connection that saw
an error is closed rather than reused (the stream may be out of step). Connection
failures mark the ASD down with a timestamp; maintenance uses that to decide when
a missing ASD's fragments must be rebuilt elsewhere.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import crc32c

from ovsfs.backend import wire
from ovsfs.errors import BackendError, DataError, Fenced, InvalidArgument, NotFound

Guard = tuple[str, int]   # (namespace, owner generation) carried by an owner write


class AsdUnavailable(BackendError):
    """The ASD did not answer (refused, reset, timed out)."""


class StaleRecord(BackendError):
    """A conditional put (`if_newer`) found a newer record under the key."""


class AsdClient:
    def __init__(self, host: str, port: int, timeout: float = 10.0, retry_after: float = 2.0) -> None:
        self.host, self.port = host, int(port)
        self.timeout = timeout
        self.retry_after = retry_after  # while down, calls fail fast for this long
        self.asd_id: str = ""
        self.node: str = ""
        self.down_since: float | None = None
        self._last_fail = 0.0
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def up(self) -> bool:
        return self.down_since is None

    def __repr__(self) -> str:
        return f"AsdClient({self.addr}, id={self.asd_id[:8]}, node={self.node}, up={self.up})"

    # -- connections -------------------------------------------------------------

    def _borrow(self, reuse: bool = True) -> socket.socket:
        with self._lock:
            if self._idle and reuse:
                return self._idle.pop()
        if self.down_since is not None and time.monotonic() - self._last_fail < self.retry_after:
            raise AsdUnavailable(f"ASD {self.addr} is down")
        try:
            s = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as e:
            self._mark_down()
            raise AsdUnavailable(f"ASD {self.addr} unreachable: {e}") from None
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def _mark_down(self) -> None:
        self._last_fail = time.monotonic()
        if self.down_since is None:
            self.down_since = time.time()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for s in idle:
            s.close()

    def call(self, header: dict[str, Any], payload: bytes | memoryview = b"") -> tuple[dict[str, Any], bytearray]:
        for attempt in (0, 1):
            s = self._borrow(reuse=attempt == 0)
            try:
                wire.send_frame(s, wire.REQUEST_MAGIC, header, payload)
                reply, data = wire.recv_frame(s, wire.REPLY_MAGIC)
                break
            except (OSError, wire.ProtocolError) as e:
                s.close()
                if attempt == 0 and isinstance(e, (ConnectionError, BrokenPipeError)):
                    # An idle connection may have died with an ASD restart: one fresh try.
                    with self._lock:
                        stale, self._idle = self._idle, []
                    for x in stale:
                        x.close()
                    continue
                self._mark_down()
                raise AsdUnavailable(f"ASD {self.addr} failed during {header.get('op')}: {e}") from None
        with self._lock:
            self._idle.append(s)
        self.down_since = None
        if not reply.get("ok"):
            code, msg = reply.get("error"), f"ASD {self.addr}: {reply.get('msg')}"
            if code == "notfound":
                raise NotFound(msg)
            if code == "corrupt":
                raise DataError(msg)
            if code == "invalid":
                raise InvalidArgument(msg)
            if code == "fenced":
                raise Fenced(msg)   # the ASD answered: it is up, the writer is stale
            if code == "stale":
                raise StaleRecord(msg)
            raise BackendError(msg)
        return reply, data

    # -- operations --------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        reply, _ = self.call({"op": "info"})
        self.asd_id, self.node = reply["asd_id"], reply["node"]
        return reply

    def put(self, key: str, data: bytes | memoryview, crc: int | None = None,
            guard: Guard | None = None, if_newer: int | None = None) -> None:
        """Store a value. `guard` (ns, gen): an owner write, Fenced when gen is below the
        ASD's fence for ns. `if_newer`: StaleRecord when the key holds a manifest or
        tombstone numbered above if_newer (repairs never overwrite a newer record)."""
        if crc is None:
            crc = crc32c.crc32c(data)
        h: dict[str, Any] = {"op": "put", "key": key, "crc": crc}
        if guard is not None:
            h["ns"], h["gen"] = guard
        if if_newer is not None:
            h["if_newer"] = if_newer
        self.call(h, data)

    def get(self, key: str, crc: int | None = None) -> bytearray:
        """The whole value, checked end to end against the CRC the caller expects."""
        reply, data = self.call({"op": "get", "key": key})
        if crc is not None and (reply.get("crc") != crc or crc32c.crc32c(data) != crc):
            raise DataError(f"ASD {self.addr}: {key} does not match its expected CRC32C")
        return data

    def get_range(self, key: str, offset: int, length: int, crc: int | None = None) -> bytearray:
        reply, data = self.call({"op": "get_range", "key": key, "offset": offset, "length": length})
        if crc is not None and reply.get("crc") != crc:
            # The ASD verified the blocks; a different whole-fragment CRC means it holds
            # another version of this fragment than the manifest names.
            raise DataError(f"ASD {self.addr}: {key} is not the expected version")
        if len(data) != length:
            raise DataError(f"ASD {self.addr}: short read of {key}")
        return data

    def verify(self, key: str) -> int:
        reply, _ = self.call({"op": "verify", "key": key})
        return int(reply["crc"])

    def delete(self, key: str, guard: Guard | None = None) -> None:
        h: dict[str, Any] = {"op": "delete", "key": key}
        if guard is not None:
            h["ns"], h["gen"] = guard
        self.call(h)

    def fence(self, ns: str, gen: int) -> int:
        """Raise the ASD's durable fence of ns to gen; returns the generation in force."""
        reply, _ = self.call({"op": "fence", "ns": ns, "gen": int(gen)})
        return int(reply["gen"])

    def fences(self) -> dict[str, int]:
        """Every namespace fence the ASD holds."""
        reply, _ = self.call({"op": "fences"})
        return {str(k): int(v) for k, v in reply["fences"].items()}

    def list(self, prefix: str) -> list[str]:
        reply, _ = self.call({"op": "list", "prefix": prefix})
        return list(reply["keys"])

    def ages(self, prefix: str) -> dict[str, float]:
        """Keys under a prefix -> seconds since written (by the ASD's clock)."""
        reply, _ = self.call({"op": "ages", "prefix": prefix})
        return dict(zip(reply["keys"], (float(a) for a in reply["ages"])))

    def scan(self, prefix: str) -> dict[str, bytes]:
        reply, data = self.call({"op": "scan", "prefix": prefix})
        out: dict[str, bytes] = {}
        pos = 0
        for key, size in zip(reply["keys"], reply["sizes"]):
            out[key] = bytes(data[pos:pos + size])
            pos += size
        return out

    def usage(self) -> dict[str, Any]:
        reply, _ = self.call({"op": "usage"})
        return {k: v for k, v in reply.items() if k != "ok"}

    def ping(self) -> bool:
        try:
            self.info()
            return True
        except BackendError:
            return False
