"""Ownership as the engine sees it: which volumes this node serves, with which owner
generation, and where their DTL goes. The node around the engine decides (one node:
`SingleNode`; several: ovsfs/member/ on etcd); the engine only asks.

Local state and generations: a volume's write-buffer directory records the generation it
was written under (`owner.json`). Opening with another generation means some other node
owned the volume since: what is here is stale (the new owner rebuilt from the backend and
the DTL) and is moved aside to `<write buffer>/.stale/`, never opened, replayed or uploaded.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol

from ovsfs.dtl import DtlSink, NoDtl
from ovsfs.fsutil import fsync_path, mkdir_durable

log = logging.getLogger("ovsfs.engine.owners")

GEN_SHIFT = 32          # SCO and TLog numbers of generation g start at g << GEN_SHIFT
MAX_GEN = (1 << 16) - 1  # SCO numbers have 48 bits (map.SCO_SHIFT = 16)
STALE_DIR = ".stale"


def gen_floor(gen: int) -> int:
    """The first SCO / TLog number of an owner generation (1 for a single node)."""
    return (gen << GEN_SHIFT) | 1


class NodeRole(Protocol):
    """Volumes are named here by their backend namespace (`ns`), which a rename keeps."""

    def owned(self, ns: str) -> int | None:
        """The generation this node serves `ns` with, or None when another node owns it."""
    def claim_new(self, ns: str) -> int:
        """Ownership of a volume being created here: its first generation."""
    def dtl_sink(self, vol: Any) -> DtlSink:
        """The DTL a volume opened here ships to (`vol` is the Volume)."""
    def lease(self, vol: Any) -> Any:
        """The volume's OwnerLease (state.py), or None when no other node can take it."""
    def recover(self, rec: dict[str, Any], gen: int) -> tuple[int, list[Any] | None]:
        """This node owns `rec` at `gen` but has no local state of it: (generation to open it
        with, the previous tail to replay or None). VolumeFailed when it must not be opened
        from the backend alone."""
    def forget(self, ns: str) -> None:
        """The volume is deleted: drop its ownership and DTL records."""
    def owner_of(self, ns: str) -> str | None:
        """The node serving `ns` (for messages), None when unknown."""


class SingleNode:
    """The embedded default: this node owns everything at generation 0, no DTL."""

    def owned(self, ns: str) -> int | None:
        return 0

    def claim_new(self, ns: str) -> int:
        return 0

    def dtl_sink(self, vol: Any) -> DtlSink:
        return NoDtl()

    def lease(self, vol: Any) -> Any:
        return None

    def recover(self, rec: dict[str, Any], gen: int) -> tuple[int, list[Any] | None]:
        return gen, None   # one node: the backend is all there is (the write buffer is gone)

    def forget(self, ns: str) -> None:
        return None

    def owner_of(self, ns: str) -> str | None:
        return None


def _owner_file(vdir: Path) -> Path:
    return vdir / "owner.json"


def local_gen(vdir: Path) -> int | None:
    """The generation a volume's local state was written under (0: before clusters), or
    None when there is no local state."""
    if not vdir.exists():
        return None
    try:
        return int(json.loads(_owner_file(vdir).read_text())["gen"])
    except FileNotFoundError:
        return 0
    except (ValueError, KeyError, TypeError):
        return -1   # unreadable: not trusted


def mark_local(vdir: Path, gen: int) -> None:
    """Record (durably) that the local state of this volume is written under `gen`."""
    if gen == 0 and not _owner_file(vdir).exists():
        return   # one node: nothing to tell apart
    tmp = vdir / ".owner.json.tmp"
    tmp.write_text(json.dumps({"gen": gen}))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, _owner_file(vdir))
    fsync_path(vdir)


def set_aside(wb_root: Path, ns: str, why: str) -> Path | None:
    """Move a volume's local state out of the way (kept for post-mortem)."""
    src = wb_root / ns
    if not src.exists():
        return None
    mkdir_durable(wb_root / STALE_DIR)
    dest = wb_root / STALE_DIR / f"{ns}-{int(time.time())}"
    k = 0
    while dest.exists():
        k += 1
        dest = wb_root / STALE_DIR / f"{ns}-{int(time.time())}.{k}"
    os.replace(src, dest)
    fsync_path(wb_root)
    log.warning("local state of namespace %s set aside as %s: %s", ns, dest, why)
    return dest


def check_local_state(wb_root: Path, ns: str, gen: int) -> None:
    """Before opening with `gen`: set local state written under another generation aside.

    State from before clusters (no owner.json, gen 0) continues as generation 1: the node
    that made the cluster out of a single node is that volume's first owner."""
    have = local_gen(wb_root / ns)
    if have is None or have == gen or (have == 0 and gen <= 1):
        return
    set_aside(wb_root, ns, f"it was written under owner generation {have}, the volume is at {gen} now")
