"""The Distributed Transaction Log: a peer's copy of writes not yet on the backend.

The engine calls a DtlSink in its write path (CONTRACT11.md section 2): `append(pos, blob)`
under the volume lock, in log order; `wait(ticket)` outside it in sync mode; `flush()` in the
volume's flush; `trim(pos)` when TLogs reach the backend. With no DTL the engine uses NoDtl;
the network client is `ovsfs.dtl.client.DtlClient`, the server `ovsfs.dtl.server.DtlServer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

Pos = tuple[int, int]     # (tlog_no, tlog_off): where a batch starts in the owner's log


@dataclass(frozen=True)
class Peer:
    """A DTL server: the node that runs it and its address (the cluster layer's choice)."""
    node: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.node} ({self.host}:{self.port})"


class DtlSink(Protocol):
    mode: str  # "none" | "async" | "sync"

    def append(self, pos: Pos, blob: bytes) -> object:
        """Called with the volume lock held, in log order, after the batch is in the local log
        (a catch-up reads it back from there). Queues; never waits on the network, except
        async mode when dtl.queue_bytes are queued (then it waits until some are shipped or
        the DTL degrades: throttling). Returns a ticket for wait(). Raises Fenced."""

    def wait(self, ticket: object) -> None:
        """Sync mode, called WITHOUT the volume lock: returns once the peer has the entry, or
        at once if the DTL is not in sync (degraded, catching up, standalone: the entry is
        then only local and counted in unsafe_bytes). Raises Fenced."""

    def flush(self) -> None:
        """Everything appended so far at the peer and fsynced there (async and sync); returns
        at once when not in sync. Raises Fenced."""

    def trim(self, pos: Pos) -> None:
        """Everything below pos is on the backend: tell the peer to drop it (background)."""

    def status(self) -> dict:
        """{"mode", "peer", "state": ok | catching up | degraded | standalone | fenced,
        "unsafe_bytes": bytes acknowledged and only on this node, "queued_bytes",
        "peer_incarnation"}."""

    def close(self, drop: bool = False) -> None:
        """Stop; with drop, ask the peer to forget the volume's tail."""


class NoDtl:
    """No DTL (mode none, or a single node): every write is only local."""

    mode = "none"

    def append(self, pos: Pos, blob: bytes) -> None:
        return None

    def wait(self, ticket: object) -> None:
        return None

    def flush(self) -> None:
        return None

    def trim(self, pos: Pos) -> None:
        return None

    def status(self) -> dict:
        return {"mode": "none", "state": "standalone", "peer": None, "unsafe_bytes": 0,
                "queued_bytes": 0, "peer_incarnation": None}

    def close(self, drop: bool = False) -> None:
        return None
