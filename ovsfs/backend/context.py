"""What the proxy's parts see of it: the object writer (writer.py), maintenance
(maintenance.py: health, repair, rebalance) and garbage collection (gc.py).

The proxy (proxy.py) builds those parts and passes itself to them as this context; they
never import the proxy, so the proxy sits above them with no circle. The context is a
Protocol: its attributes and methods are what the parts may use, nothing else.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Protocol

from ovsfs.backend import codec
from ovsfs.backend.cache import FragmentCache
from ovsfs.backend.fencing import Fences
from ovsfs.backend.index import Index
from ovsfs.backend.manifest import Manifest
from ovsfs.backend.placement import AsdSet
from ovsfs.backend.policy import Preset
from ovsfs.backend.seq import SeqClock


class ManifestWriter(Protocol):
    def write_manifest(self, ns: str, name: str, man: Manifest, guard: tuple[str, int] | None = None,
                       if_newer: bool = False) -> bool:
        """Store `man` on m+1 ASDs; True when fewer copies than wanted were written."""
        ...


class ProxyContext(Protocol):
    asds: AsdSet                          # the ASDs, their health, where new fragments go
    index: Index                          # every object's current manifest
    clock: SeqClock                       # manifest sequence numbers
    pool: ThreadPoolExecutor              # I/O threads for fragment puts and gets
    fcache: FragmentCache
    keys: codec.KeyRing | None            # encryption keys (None: no encryption possible)
    preset: Preset                        # the proxy's default preset
    inflight: set[bytes]                  # version ids being written: GC leaves their fragments
    dirty: set[tuple[str, str]]           # (ns, name) of objects that need repair
    dirty_lock: threading.Lock
    writer: ManifestWriter
    fences: Fences                        # owner-generation fences (spread by maintenance)

    def obj_lock(self, ns: str, name: str) -> threading.Lock:
        """Serialises manifest replacement of one object (put vs repair)."""
        ...

    def mark_dirty(self, ns: str, name: str) -> None: ...

    def namespace_preset(self, ns: str) -> Preset:
        """The preset new objects of namespace ns are written with (NotFound if none)."""
        ...

    def install(self, ns: str, name: str, man: Manifest) -> None:
        """Make a freshly written manifest current and retire the version it replaces."""
        ...

    def purge(self, man: Manifest, keep_replicas: set[str], ns: str, name: str) -> None:
        """Delete an old version's fragments and manifest copies (best effort)."""
        ...

    def fetch_fragments(self, man: Manifest, i: int, owner: tuple[str, str], want: int,
                        skip: Iterable[int] = ()) -> dict[int, bytes]:
        """At least `want` readable fragments of chunk i (DataError when fewer exist)."""
        ...
