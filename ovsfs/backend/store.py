"""The backend interface every store implements (local directory now, ASDs later).

Objects live in namespaces (one per volume). Calls are synchronous and
thread-safe: the engine calls them from worker threads. `put` is atomic: a reader
sees the whole old object, the whole new one, or none.

Fencing (issue 11, DESIGN.md "Fencing"): every owner write (put, put_file, delete)
carries the owner generation `gen` of the volume; `fence(ns, gen)` raises the
namespace's generation, after which writes carrying a lower one raise Fenced, from
any node sharing the store. gen 0 with no fence ever set is always accepted (one node).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

from ovsfs.errors import Fenced, InvalidArgument

_NAME = re.compile(r"^[A-Za-z0-9._-][A-Za-z0-9._/-]{0,250}$")


def check_name(kind: str, name: str) -> str:
    if not _NAME.match(name) or ".." in name or name.startswith("/"):
        raise InvalidArgument(f"bad backend {kind} name {name!r}")
    return name


def fenced(ns: str, gen: int, in_force: int, where: str = "") -> Fenced:
    """The error every store raises for a write from a stale owner generation."""
    at = f" ({where})" if where else ""
    return Fenced(f"backend namespace {ns} is fenced: write from owner generation {gen} refused, "
                  f"generation {in_force} is in force{at}")


class Store(Protocol):
    def create_namespace(self, ns: str, preset: str | None = None) -> None:
        """A namespace bound to a preset (stores without presets ignore it)."""
    def delete_namespace(self, ns: str) -> None:
        """Once it returns, neither the namespace nor any object in it comes back, not even
        from a part of the store that was away (the EC proxy leaves tombstones). Deleting a
        namespace that does not exist is not an error. BackendError when the delete could
        not be made to stick (the caller retries)."""
    def namespaces(self) -> list[str]: ...
    def fence(self, ns: str, gen: int) -> int:
        """Raise ns's owner generation to `gen` (never lower it); returns the generation now in
        force. Once it returns, put / put_file / delete in ns carrying a lower gen raise Fenced,
        from this node or any other sharing the backend. NotFound when ns does not exist;
        BackendError when not enough of the store acknowledged the fence for that promise to
        hold (the caller retries)."""
    def refresh(self, ns: str) -> None:
        """Forget what this node cached about ns and read it again from the shared store (a
        volume is about to be opened here after another node wrote it). LocalStore: no-op."""
    def put(self, ns: str, name: str, data: bytes | memoryview, gen: int = 0) -> None:
        """Fenced when gen is below ns's fence."""
    def put_file(self, ns: str, name: str, path: Path, gen: int = 0) -> None:
        """Store a local file that never changes again (a sealed SCO or TLog). Fenced as put."""
    def get(self, ns: str, name: str) -> bytes: ...
    def get_range(self, ns: str, name: str, offset: int, length: int) -> bytes: ...
    def delete(self, ns: str, name: str, gen: int = 0) -> None:
        """Same promise as delete_namespace, for one object; a missing object is not an error.
        Fenced as put."""
    def list(self, ns: str, prefix: str = "") -> list[str]: ...
    def usage(self) -> dict[str, int]: ...
