"""What one node's NBD door may hold: connections, time to negotiate, memory, threads.

Config keys ([nbd], defaults in ovsfs/config.py):

- max_connections (256): connections per node (unix and TCP together). One more is
  accepted, logged and closed at once; the clients already connected go on.
- handshake_timeout (10 s): a client must finish negotiation (NBD_OPT_GO /
  EXPORT_NAME) this long after it connected, or it is dropped.
- connection_buffer (32 MiB) and node_buffer (256 MiB): bytes in flight, i.e. request
  payloads received but not yet written, read data being produced, and reply bytes
  queued but not yet sent (plus 64 bytes per queued part for Python's object overhead).
  A connection stops reading its socket (backpressure) while its own figure is at its
  bound or the node's figure is at the node bound; a request whose payload has started
  to arrive reserves its whole length first, so waiting connections never hold more than
  one receive (RECV_CHUNK, 1 MiB) each.
- send_timeout (120 s): a client that leaves replies unread this long is dropped, which
  gives back what it pinned of the node bound.
- threads (16) and flush_threads (4): trio.CapacityLimiters for the door's blocking
  engine calls; data calls cannot take the threads that FLUSH needs, and neither takes
  the threads of other doors or of the management API (each has its own limiter).

Memory figures (what the bounds give, measured in tests/doors/test_nbd_limits.py):
- An idle connection holds no receive buffer (receives go through one per-node 1 MiB
  buffer, copied out by the parser): a few KiB of Python objects and trio tasks.
- One connection: at most connection_buffer + RECV_CHUNK + one read group (reads are
  grouped up to min(connection_buffer / 2, 8 MiB); one READ of up to 32 MiB is a group
  of its own) = about 65 MiB with the defaults, whatever the client does.
- The node: node_buffer, plus, for each connection that had nothing in flight when it
  took them, one receive (RECV_CHUNK) and a read group of at most RECV_CHUNK (a bigger
  group waits for node room unless the connection holds write data of the same batch,
  which keeps the waits free of deadlocks). So clients that read their replies are
  served while others keep the node at its bound, and clients that pipeline reads and
  read nothing hold node_buffer + 2 MiB each at most, until send_timeout drops them.
  A WRITE bigger than one receive always waits for node room.
- A waiting connection holds at most the rest of one batch, and only clients that do
  not read their replies can keep the node at its bound: send_timeout ends that.
"""

from __future__ import annotations

from typing import Any

import trio

from ovsfs.doors.adapter import DoorIO
from ovsfs.errors import ConfigError

RECV_CHUNK = 1 << 20      # bytes per socket receive at most (the shared receive buffer)
PART_OVERHEAD = 64        # bytes charged per queued reply part: a bytes object's header


class NodeFlight:
    """Bytes in flight on the whole door, and the wake-up for connections held at the gate."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._freed = trio.Event()

    def charge(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)

    def release(self, n: int) -> None:
        self.used -= n
        self._freed.set()

    async def wait_freed(self) -> None:
        self._freed = trio.Event() if self._freed.is_set() else self._freed
        await self._freed.wait()


class ConnFlight:
    """Bytes in flight on one connection; every change also goes to the node's figure."""

    def __init__(self, node: NodeFlight, limit: int) -> None:
        self.node = node
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._freed = trio.Event()

    def charge(self, n: int) -> None:
        if n:
            self.used += n
            self.peak = max(self.peak, self.used)
            self.node.charge(n)

    def release(self, n: int) -> None:
        if n:
            self.used -= n
            self.node.release(n)
            self._freed.set()

    def release_all(self) -> None:
        self.release(self.used)

    def fits(self, extra: int, idle_may: bool = False) -> bool:
        """May `extra` more bytes come in now? A connection or node with nothing in flight
        always may (one request bigger than a bound must still run); with idle_may, a
        connection with nothing in flight may whatever the node holds."""
        own = self.used == 0 or self.used + extra <= self.limit
        node = self.node.used == 0 or self.node.used + extra <= self.node.limit
        return own and (node or (idle_may and self.used == 0))

    async def room(self, extra: int, idle_may: bool = False) -> None:
        """Wait (in trio, holding nothing new) until `extra` bytes fit."""
        while not self.fits(extra, idle_may):
            if self.used and self.used + extra > self.limit:
                self._freed = trio.Event() if self._freed.is_set() else self._freed
                await self._freed.wait()
            else:
                await self.node.wait_freed()


class Limits:
    """The door's limits from [nbd], checked once at start-up."""

    def __init__(self, nbd: Any) -> None:
        """nbd: the [nbd] config section (ovsfs.config.NbdSection). Raises ConfigError."""
        self.max_connections = int(nbd.max_connections)
        self.handshake_timeout = float(nbd.handshake_timeout)
        self.send_timeout = float(nbd.send_timeout)
        self.connection_buffer = int(nbd.connection_buffer)
        self.node_buffer = int(nbd.node_buffer)
        self.threads = int(nbd.threads)
        self.flush_threads = int(nbd.flush_threads)
        if self.max_connections < 1:
            raise ConfigError("nbd.max_connections must be at least 1")
        if self.handshake_timeout <= 0 or self.send_timeout <= 0:
            raise ConfigError("nbd.handshake_timeout and nbd.send_timeout must be positive")
        if self.connection_buffer < 2 * RECV_CHUNK:
            raise ConfigError(f"nbd.connection_buffer must be at least {2 * RECV_CHUNK} bytes")
        if self.node_buffer < self.connection_buffer:
            raise ConfigError("nbd.node_buffer must be at least nbd.connection_buffer")
        if self.threads < 1 or self.flush_threads < 1:
            raise ConfigError("nbd.threads and nbd.flush_threads must be at least 1")
        self.node = NodeFlight(self.node_buffer)
        # The door's adapter: its own data threads (reads, writes, trims) and flush threads
        # (FLUSH, FUA, negotiation), and the one writer per node that may go into the
        # engine's blocking reserve when the write buffer has no room for long. Bytes in
        # flight are bounded here (NodeFlight/ConnFlight count reply bytes too), so the
        # adapter's own byte bounds are left wide.
        self.io = DoorIO("nbd", threads=self.threads, flush_threads=self.flush_threads)
        self.data, self.flush, self.probe = self.io.data, self.io.flush, self.io.probe

    def describe(self) -> str:
        return (f"max_connections {self.max_connections}, handshake_timeout "
                f"{self.handshake_timeout:g} s, send_timeout {self.send_timeout:g} s, "
                f"connection_buffer {self.connection_buffer >> 20} MiB, node_buffer "
                f"{self.node_buffer >> 20} MiB, threads {self.threads}+{self.flush_threads}")
