"""The Distributed Transaction Log: a peer's copy of writes not yet on the backend.

The engine calls a DtlSink in its write path (CONTRACT: append under the volume lock,
wait outside it, flush, trim); the network client implements it. With no DTL the
engine uses NoDtl.
"""

from __future__ import annotations

from typing import Any, Protocol


class DtlSink(Protocol):
    mode: str  # "none" | "async" | "sync"

    def append(self, pos: tuple[int, int], blob: bytes) -> object: ...
    def wait(self, ticket: object) -> None: ...
    def flush(self) -> None: ...
    def trim(self, pos: tuple[int, int]) -> None: ...
    def status(self) -> dict[str, Any]: ...
    def close(self, drop: bool = False) -> None: ...


class NoDtl:
    mode = "none"

    def append(self, pos: tuple[int, int], blob: bytes) -> object:
        return None

    def wait(self, ticket: object) -> None:
        return None

    def flush(self) -> None:
        return None

    def trim(self, pos: tuple[int, int]) -> None:
        return None

    def status(self) -> dict[str, Any]:
        return {"mode": "none", "peer": None, "state": "standalone", "unsafe_bytes": 0}

    def close(self, drop: bool = False) -> None:
        return None
