"""The backend interface every store implements (local directory now, ASDs later).

Objects live in namespaces (one per volume). Calls are synchronous and
thread-safe: the engine calls them from worker threads. `put` is atomic: a reader
sees the whole old object, the whole new one, or none.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

from ovsfs.errors import InvalidArgument

_NAME = re.compile(r"^[A-Za-z0-9._-][A-Za-z0-9._/-]{0,250}$")


def check_name(kind: str, name: str) -> str:
    if not _NAME.match(name) or ".." in name or name.startswith("/"):
        raise InvalidArgument(f"bad backend {kind} name {name!r}")
    return name


class Store(Protocol):
    def create_namespace(self, ns: str, preset: str | None = None) -> None:
        """A namespace bound to a preset (stores without presets ignore it)."""
    def delete_namespace(self, ns: str) -> None:
        """Once it returns, neither the namespace nor any object in it comes back, not even
        from a part of the store that was away (the EC proxy leaves tombstones). Deleting a
        namespace that does not exist is not an error. BackendError when the delete could
        not be made to stick (the caller retries)."""
    def namespaces(self) -> list[str]: ...
    def put(self, ns: str, name: str, data: bytes | memoryview) -> None: ...
    def put_file(self, ns: str, name: str, path: Path) -> None:
        """Store a local file that never changes again (a sealed SCO or TLog)."""
    def get(self, ns: str, name: str) -> bytes: ...
    def get_range(self, ns: str, name: str, offset: int, length: int) -> bytes: ...
    def delete(self, ns: str, name: str) -> None:
        """Same promise as delete_namespace, for one object; a missing object is not an error."""
    def list(self, ns: str, prefix: str = "") -> list[str]: ...
    def usage(self) -> dict[str, int]: ...
