"""The door contract: what every door (NBD, FUSE, vhost-user, iSCSI), the DTL and the
management API may use of the engine, and nothing else.

Two Protocols and two value types:

- `VolumeCatalog`: the node's volumes by name. Opens handles, registers jobs as holders,
  and is the ONE place where lifecycle is decided: deleting, renaming or rolling back a
  volume, deleting a snapshot and shrinking a volume are refused with `Busy` naming who
  holds it (door and client, or job) while any handle or job holds that volume/snapshot.
- `VolumeHandle`: one opened volume (`"VOL"`) or snapshot (`"VOL@SNAP"`), with its
  capabilities declared up front (like nbdkit's `can_*` callbacks). A handle pins what
  it opened: a snapshot handle reads that snapshot (by its epoch) whatever later happens
  to the name, and while it is open the snapshot cannot be deleted or rolled away.

The real implementation is `Engine.catalog` (an `ovsfs.engine.catalog.EngineCatalog`;
`Engine` itself keeps its older methods, whose names clash: `Engine.open()` starts the
engine) with `ovsfs.engine.handles.EngineHandle`; an in-memory one is
`ovsfs.engine.memory.MemoryCatalog`. The same
contract tests (tests/engine/test_contract.py) run on both.

Engine calls are synchronous and thread-safe; trio doors call them through the async
adapter (`ovsfs.doors.adapter`), which owns the nowait-or-thread rule.

Errors are `ovsfs.errors` types, each with `.errno` and `.http_status`:
NotFound, AlreadyExists, InvalidArgument, OutOfRange (past the end), ReadOnly, NoSpace,
VolumeFailed, DataError, BackendError, WouldBlock (only with nowait=True), Busy.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ContextManager, Iterator, Protocol, Sequence, Union, runtime_checkable

# What a write takes: any bytes-like object (a slice of a receive buffer is fine).
Buffer = Union[bytes, bytearray, memoryview]


@dataclass(frozen=True)
class Holder:
    """Who holds a volume or snapshot open; named in `Busy` messages.

    door:   "nbd" | "fuse" | "mgmt" | "job" | "shm" | "iscsi" | ...
    client: who, within the door: "127.0.0.1:50312", "unix", "pid 1234", "import job 7".
    """

    door: str
    client: str

    def __str__(self) -> str:
        if self.door == "job":
            return self.client                      # "import job 7"
        return f"{self.door} client {self.client}" if self.client else self.door


@dataclass(frozen=True)
class Capabilities:
    """What a handle offers, declared at open (never discovered by trying)."""

    read_only: bool             # snapshots, failed volumes, handles opened read_only=True
    logical_block_size: int     # bytes: the smallest unit a size may use (512)
    preferred_block_size: int   # bytes: the cluster size (4096); smaller writes read-modify-write
    fua: bool                   # per-request durability is offered (flush semantics)
    trim: bool
    write_zeroes: bool
    extents: bool               # allocation runs (NBD block status, SEEK_DATA)
    multi_conn: bool            # handles on one volume see each other's flushed writes


def parse_name(name: str) -> tuple[str, str | None]:
    """`"VOL"` -> ("VOL", None); `"VOL@SNAP"` -> ("VOL", "SNAP"). Names are not checked here."""
    vol, sep, snap = name.partition("@")
    return vol, (snap if sep else None)


@runtime_checkable
class VolumeHandle(Protocol):
    """One opened volume or snapshot. Offsets and lengths are bytes; any offset/length
    within [0, size) is allowed (no alignment required). Thread-safe."""

    name: str               # "VOL" or "VOL@SNAP", as opened (a later rename does not show here)
    volume: str             # "VOL"
    snapshot: str | None    # "SNAP" or None
    holder: Holder
    caps: Capabilities

    @property
    def size(self) -> int:
        """Bytes, live: a resize of the volume shows; a snapshot's size never changes."""

    def readv(self, reqs: Sequence[tuple[int, int]], nowait: bool = False) -> list[bytes]:
        """Read a batch of (offset, length); one bytes per request, zeros where unwritten.
        OutOfRange past the end; WouldBlock (nowait) if it would wait for a lock or the
        backend; DataError / BackendError if the data cannot be read; Busy when closed."""

    def writev(self, reqs: Sequence[tuple[int, Buffer]], nowait: bool = False) -> None:
        """Write a batch; acknowledged (survives a process crash) on return.
        ReadOnly on a read-only handle; OutOfRange; NoSpace; VolumeFailed; WouldBlock
        (nowait, before anything was written); Busy when closed."""

    def write_room(self, nbytes: int) -> bool:
        """Would a write of nbytes find write-buffer room now? Reserves nothing."""

    def flush(self) -> None:
        """Everything acknowledged so far is durable on local disk. VolumeFailed."""

    def trim(self, offset: int, length: int) -> None:
        """The range reads as zeros and its space is released. ReadOnly, OutOfRange."""

    def write_zeroes(self, offset: int, length: int) -> None:
        """The range reads as zeros. ReadOnly, OutOfRange."""

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Runs (offset, length, allocated) covering [offset, offset+length). OutOfRange."""

    def resize(self, size: int) -> None:
        """Set the volume's size in bytes (FUSE truncate and growth). Shrinking drops the
        data past the new end (like truncate(2)); it is refused with Busy naming them while
        any OTHER holder has the volume open. InvalidArgument for a bad size (the size
        rule), ReadOnly on a read-only handle."""

    def close(self) -> None:
        """Release the hold. Idempotent; later I/O raises Busy."""


@runtime_checkable
class VolumeCatalog(Protocol):
    """The node's volumes. Names: see ovsfs.engine.names.check_name; "VOL@SNAP" names a
    snapshot. Returned dicts are plain JSON-able records (the management API sends them)."""

    def open(self, name: str, holder: Holder, *, read_only: bool = False) -> VolumeHandle:
        """Open "VOL" (read-write unless read_only or the volume failed) or "VOL@SNAP"
        (always read-only, pinned to that snapshot). The handle holds what it opened until
        closed. NotFound; VolumeFailed (never opened: the reason); InvalidArgument (name)."""

    def hold(self, name: str, holder: Holder) -> ContextManager[None]:
        """Register a job (import/export/clone/...) as a holder of "VOL" or "VOL@SNAP" for
        the duration of the `with` block. NotFound."""

    def holders(self, name: str) -> list[Holder]:
        """Who holds "VOL" (its handles, jobs and its snapshots' handles) or "VOL@SNAP"
        (that snapshot's only); one entry per holder, sorted by str. NotFound."""

    def list_volumes(self, vpool: str | None = None) -> list[dict[str, Any]]:
        """Info records of the open volumes (see info), sorted by name."""

    def stat(self, name: str) -> dict[str, Any]:
        """A light record of an open volume, for a door's getattr/readdir: {"name",
        "vpool", "namespace" (backend namespace: stable across renames), "size" (bytes,
        live), "created" (seconds since the epoch, float; 0.0 if unknown)}. Takes no volume
        lock and never waits for I/O (unlike info). NotFound; VolumeFailed (could not be
        opened)."""

    def list_stats(self, vpool: str | None = None) -> list[dict[str, Any]]:
        """stat records of the open volumes (of one vPool, or all), sorted by name.
        Lock-free like stat; a vPool that does not exist lists nothing."""

    def failed_volumes(self) -> list[dict[str, Any]]:
        """Volumes that could not be opened: {"name", "vpool", "size", "state": "failed", "reason"}."""

    def info(self, name: str) -> dict[str, Any]:
        """{"name", "vpool", "size", "cluster_size", "snapshots", "parent", "holders": [str],
        "failed", ...}; for a volume that could not be opened {"name", "state": "failed",
        "reason", ...}. NotFound."""

    def create_volume(self, name: str, size: int, vpool: str = "default",
                      holder: Holder | None = None) -> dict[str, Any]:
        """A new, empty volume of `size` bytes. A name reserved by `holder` becomes this
        volume (the reservation ends). AlreadyExists (a volume, or a name reserved by
        another holder), InvalidArgument (name, size), NotFound (vPool)."""

    def delete_volume(self, name: str) -> None:
        """Busy naming the holders (or "has clones"); NotFound. A failed volume can be deleted."""

    def rename_volume(self, old: str, new: str) -> None:
        """Busy naming the holders; AlreadyExists (a volume or a reserved name); NotFound."""

    def resize_volume(self, name: str, size: int) -> None:
        """Grow, or shrink (only space past the written data: InvalidArgument otherwise).
        Shrinking is refused with Busy naming the holders while any handle or job holds it."""

    def clone_volume(self, src: str, snapshot: str, new: str, vpool: str | None = None) -> dict[str, Any]:
        """A new volume reading through to src@snapshot (O(1)). AlreadyExists; NotFound."""

    def create_snapshot(self, name: str, snap: str) -> dict[str, Any]:
        """{"name", "epoch", "size", "created"}. AlreadyExists; VolumeFailed."""

    def list_snapshots(self, name: str) -> list[dict[str, Any]]:
        """Snapshot records, oldest first, each with "holders": [str]."""

    def delete_snapshot(self, name: str, snap: str) -> None:
        """Busy while a handle or job holds "VOL@SNAP" (naming it) or a clone reads it."""

    def rollback(self, name: str, snap: str) -> None:
        """The volume's data and size become the snapshot's; later snapshots go. Busy
        (naming them) while any handle or job holds the volume or one of those later
        snapshots, or a clone reads one of them."""

    # ---- vPools and the node ------------------------------------------------------------

    def list_vpools(self) -> list[dict[str, Any]]:
        """[{"name", "sco_clusters", "cluster_size" (bytes), "preset" (str or None),
        "created" (seconds since the epoch), "volumes" (count of open volumes)}], sorted
        by name."""

    def vpool(self, name: str) -> dict[str, Any]:
        """The record of one vPool (as in list_vpools, without "volumes"). NotFound."""

    def create_vpool(self, name: str, sco_clusters: int | None = None,
                     preset: str | None = None) -> dict[str, Any]:
        """A new vPool (sco_clusters: clusters per SCO, 1..65535, default from the config;
        preset: the backend preset name or None). Returns its record. AlreadyExists;
        InvalidArgument (name, sco_clusters)."""

    def usage(self) -> dict[str, Any]:
        """The node's space, for a door's statfs: {"capacity", "free" (bytes of the
        backend), "block_size" (bytes: the cluster size), "files" (open volumes)}.
        May ask the backend (run it in a thread); BackendError if it cannot answer."""

    # Names reserved by a door before they are volumes (a FUSE file being created):
    # one name, one object -- create/import/clone/rename see them as taken.
    def reserve_name(self, name: str, holder: Holder, vpool: str = "default") -> None:
        """AlreadyExists if a volume (open or failed) or another reservation has the name;
        InvalidArgument (name); NotFound (vPool)."""

    def release_name(self, name: str, holder: Holder) -> None:
        """Drop a reservation (no-op if not held by this holder)."""

    def reservations(self, vpool: str | None = None) -> list[dict[str, Any]]:
        """[{"name", "vpool", "holder": str}] sorted by name."""


__all__ = ["Buffer", "Capabilities", "Holder", "VolumeCatalog", "VolumeHandle", "parse_name"]



@runtime_checkable
class NodeMaintenance(Protocol):
    """The node-wide calls the management API needs beside the catalog (the engine
    implements them): figures, garbage collection, the local read cache, backend sync."""

    catalog: VolumeCatalog

    def stats(self) -> dict[str, Any]:
        """Figures of the node: volumes, write buffer, uploads, map memory (JSON-able)."""

    def scrub(self, name: str | None = None) -> list[dict[str, Any]]:
        """Reclaim garbage of one volume (or all): per volume what was freed. NotFound."""

    def drop_cache(self) -> int:
        """Evict uploaded SCOs kept locally as a read cache; returns the bytes freed."""

    def sync_volume(self, name: str, timeout: float | None = None) -> None:
        """Return once everything written to `name` is on the backend. NotFound,
        BackendError when the backend does not take it within `timeout` seconds."""

@contextmanager
def held(catalog: "VolumeCatalog", name: str, holder: Holder) -> Iterator[None]:
    """`VolumeCatalog.hold` as every catalog implements it: a read-only handle kept open
    for the duration of the block (so the lifecycle rules see the job), closed after."""
    h = catalog.open(name, holder, read_only=True)
    try:
        yield
    finally:
        h.close()
