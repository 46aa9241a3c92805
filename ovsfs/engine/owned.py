"""The backend as one volume's owner sees it: every write carries the owner generation.

DESIGN.md "Fencing": a namespace refuses writes from a generation older than the newest it
has seen, so a node that lost a volume (moved or restarted elsewhere while it was frozen or
cut off) cannot write to it any more. The refusal (Fenced) halts the volume on this node at
once: it is never retried and never taken for a backend that is away.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ovsfs.backend.store import Store
from ovsfs.errors import Fenced


class OwnedStore:
    """A Store adapter bound to one owner generation; reads pass through unchanged.

    `on_fenced(reason)` is called (then Fenced is raised again) when a write is refused.
    Generation 0 (one node, never clustered) is passed as no generation at all."""

    def __init__(self, store: Store, gen: int, on_fenced: Callable[[str], None]) -> None:
        self.store = store
        self.gen = gen
        self.on_fenced = on_fenced

    def _owned(self) -> dict[str, int]:
        return {"gen": self.gen} if self.gen else {}

    def _write(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args, **self._owned())
        except Fenced as e:
            self.on_fenced(e.message)
            raise

    def put(self, ns: str, name: str, data: bytes | memoryview) -> None:
        self._write(self.store.put, ns, name, data)

    def put_file(self, ns: str, name: str, path: Path) -> None:
        self._write(self.store.put_file, ns, name, path)

    def delete(self, ns: str, name: str) -> None:
        self._write(self.store.delete, ns, name)

    def __getattr__(self, name: str) -> Any:
        # get, get_range, list, namespaces, usage, create_namespace ...: not owner writes.
        return getattr(self.store, name)
