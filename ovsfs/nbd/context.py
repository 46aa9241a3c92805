"""What an NBD connection needs of its door: the interface the server (server.py) passes
down, so connection.py and negotiation.py never import the server (layers without circles).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any, Protocol

from ovsfs.doors.adapter import DoorIO
from ovsfs.nbd.limits import Limits


@dataclass
class Export:
    """One export: a volume ("VOL") or a read-only snapshot ("VOL@SNAP").

    `handle` is the opened VolumeHandle (ovsfs.engine.api) after NBD_OPT_GO /
    EXPORT_NAME, None for NBD_OPT_INFO (which opens nothing). Sizes in bytes."""

    name: str
    volume: str
    snapshot: str | None
    size: int
    read_only: bool
    block_size: int = 4096        # preferred block size (the cluster)
    handle: Any = None


class DoorContext(Protocol):
    """The NBD door as its connections see it."""

    limits: Limits
    io: DoorIO                    # the door's adapter (threads and bounds)
    recv_buffer: bytearray        # one shared receive buffer (connection._receive)
    ssl_ctx: ssl.SSLContext | None

    def tls_required(self, tcp: bool) -> bool: ...

    def resolve(self, name: str) -> Export:
        """Describe an export without opening it (blocking: run in a worker thread).
        NotFound."""

    def open(self, name: str, client: str) -> Export:
        """Open an export for `client` (e.g. "127.0.0.1:50312" or "unix"); the caller
        closes export.handle when the connection ends (blocking). NotFound, VolumeFailed."""

    def list_exports(self) -> list[tuple[str, str]]:
        """(name, description) of every volume (blocking)."""
