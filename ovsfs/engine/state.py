"""The state one volume's parts share: the log writer (log.py), the read path (reads.py)
and the snapshot operations (snapshots.py) each get this object, and `Volume`
(volume.py) is the facade that puts them together.

Plain data plus a few queries on it; it imports none of the parts, so the parts never
import each other through it. Every field is read and changed under `lock`, except
where a field says otherwise.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

from ovsfs.backend.store import Store
from ovsfs.config import EngineSection
from ovsfs.dtl import DtlSink, NoDtl
from ovsfs.engine.fileio import FileIO
from ovsfs.engine.map import ClusterMap
from ovsfs.engine.writebuffer import WriteBuffer
from ovsfs.errors import Fenced, InvalidArgument, LocalIOError, NotFound, NotOwner, OutOfRange, WouldBlock


def _not_opened(_segments: Iterable[Any]) -> int:
    raise LocalIOError("the volume was not opened by recovery.open_volume: no TLog replay")


class OwnerLease(Protocol):
    def valid(self) -> bool:
        """Still sure no other node can have taken the volume (no cluster store call)."""
    def confirm(self, vol: Any) -> None:
        """Ask the cluster store: returns when this node still owns `vol` at its generation;
        halts it and raises Fenced when not; OvsfsError (EIO) when the store cannot say."""


@dataclass(eq=False)
class VolumeState:
    meta: dict[str, Any]                   # the registry record: name, ns, vpool, parent
    wb_root: Path
    store: Store
    wb: WriteBuffer
    cfg: EngineSection
    # Identity of the volume for the write buffer's bookkeeping (uploads, LRU, drain):
    # the facade, so that callers keying on the Volume and the parts agree.
    owner: object = None
    # The state of the volume this one was cloned from (reads fall through to it).
    parent: "VolumeState | None" = None
    parent_epoch: int | None = None
    # has_clones(owner, epoch): is a snapshot epoch (None: any) the base of a clone?
    has_clones: Callable[[Any, int | None], bool] = lambda v, e: False
    # Applies TLog segments to the map (records and markers); returns the records applied.
    # Set by recovery.open_volume, which owns replay: the log writer needs it to rebuild
    # the map in place after SQLite rolled back.
    replay: Callable[[Iterable[Any]], int] = _not_opened
    # Applies one TLog marker (snapshot, delete snapshot, rollback, resize) to the state and
    # map: set by Volume, used by replay of TLogs and of DTL entries alike.
    apply_mark: Callable[[int, dict[str, Any]], None] = lambda op, payload: None
    dtl: DtlSink = field(default_factory=NoDtl)
    # The last DTL ticket handed out (under `lock`): a writer waits for it outside the lock.
    dtl_ticket: object = None
    # Owner generation (cluster mode; 0 on one node): SCO and TLog numbers of this owner
    # start at gen << 32, and every backend write carries it (ovsfs/engine/owned.py).
    gen: int = 0
    # Why this node stopped serving the volume: another node owns it now (a Fenced
    # refusal from the backend or the DTL). Reads and writes fail with Fenced from then on.
    fenced: str | None = None
    # Several nodes: whether this node may still take itself for the owner without asking
    # the cluster store (ovsfs/member/role.py; None on one node). See check_served.
    lease: "OwnerLease | None" = None
    # Set while the volume is handed over (no more writes: everything goes to the backend).
    released: str | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)
    # Every local write goes through this; replace it (per volume) to inject faults.
    fio: FileIO = field(default_factory=FileIO)
    size: int = 0
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    map: ClusterMap = None  # type: ignore[assignment]  # set by recovery.open_volume
    # Open SCO and TLog
    sco_no: int = 0
    sco_idx: int = 0
    sco_fd: int | None = None
    sco_path: Path = Path()
    tlog_no: int = 0
    tlog_fd: int | None = None
    tlog_path: Path = Path()
    tlog_off: int = 0
    scos_in_tlog: int = 0
    next_sco: int = 1
    next_tlog: int = 1
    local_scos: set[int] = field(default_factory=set)
    uploaded_tlogs: set[int] = field(default_factory=set)
    committed_tlog: int = 0
    read_fds: dict[int, int] = field(default_factory=dict)
    # Durability bookkeeping
    write_seq: int = 0
    synced_seq: int = 0
    flushing: bool = False                 # under flush_cv
    flush_cv: threading.Condition = field(default_factory=threading.Condition)
    # Files written since their last fsync -> an fd of their own (see LogWriter._mark_unsynced),
    # those a running flush is fsyncing, and directories with new names in them.
    unsynced: dict[Path, int] = field(default_factory=dict)
    syncing: dict[Path, int] = field(default_factory=dict)
    dirty_dirs: set[Path] = field(default_factory=set)
    syncing_dirs: set[Path] = field(default_factory=set)
    failed: str | None = None              # why the volume stopped (a failed fsync)
    # Write-buffer disk taken by TLogs (bytes, as of the last scan + growth since)
    _tlog_base: int = 0
    _tlog_growth: int = 0
    _tlog_reported: int = 0
    last_commit: float = field(default_factory=time.monotonic)
    tlogs_since_checkpoint: int = 0
    users: dict[str, int] = field(default_factory=dict)
    closed: bool = False
    deleted: bool = False
    appended: int = 0                      # bytes appended to SCOs (write-buffer accounting)
    replayed: int = 0                      # TLog records replayed at open (0 after a clean stop)

    def __post_init__(self) -> None:
        self.ns: str = self.meta["ns"]
        self.cluster_size: int = self.meta["cluster_size"]
        self.sco_clusters: int = self.meta["sco_clusters"]
        self.size = self.meta["size"]
        self.dir = self.wb_root / self.ns
        self.sco_dir = self.dir / "sco"
        self.tlog_dir = self.dir / "tlog"
        self.sco_path = self.sco_dir / "0"
        self.tlog_path = self.tlog_dir / "0"
        self.dirty_dirs.add(self.dir)      # map.db is created in it

    # ---- queries -----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def vpool(self) -> str:
        return self.meta["vpool"]

    def nclusters(self, size: int | None = None) -> int:
        return -(-(self.size if size is None else size) // self.cluster_size)

    def check_served(self, nowait: bool = False) -> None:
        """Raises Fenced once another node owns the volume: never serve stale data.

        With several nodes, past the owner lease (this node was frozen or cut off from the
        cluster store long enough for another node to take the volume) the owner record is
        read again first; `nowait` (a door's event loop) gets WouldBlock instead."""
        if self.lease is not None and not self.lease.valid():
            if nowait:
                raise WouldBlock("the owner lease must be confirmed first")
            self.lease.confirm(self.owner)
        if self.fenced is not None:
            raise Fenced(f"volume {self.name} is served by another node now: {self.fenced}")
        if self.released is not None and self.closed:
            raise NotOwner(f"volume {self.name} was handed over to another node")

    def check_range(self, offset: int, length: int, size: int | None = None) -> None:
        """Raises InvalidArgument (negative) or OutOfRange (past `size`, default the volume's)."""
        size = self.size if size is None else size
        if offset < 0 or length < 0:
            raise InvalidArgument(f"negative offset or length ({offset}, {length})")
        if offset + length > size:
            raise OutOfRange(f"request {offset}+{length} is past the end of {self.name} ({size} bytes)")

    def snapshot(self, name: str) -> dict[str, Any]:
        """The snapshot record of that name; NotFound if there is none."""
        for s in self.snapshots:
            if s["name"] == name:
                return s
        raise NotFound(f"snapshot {self.name}@{name} does not exist")

    def view(self, snapshot: str | None) -> tuple[int | None, int]:
        """(map epoch, size in bytes) to read: the live volume (epoch None) or a snapshot."""
        if snapshot is None:
            return None, self.size
        s = self.snapshot(snapshot)
        return s["epoch"], s["size"]

    def meta_record(self) -> dict[str, Any]:
        """What the map commit stores beside the pages: enough to resume replay."""
        return {"epoch": self.map.epoch, "snapshots": self.snapshots, "size": self.size,
                "tlog": self.tlog_no, "tlog_off": self.tlog_off,
                "next_sco": self.next_sco, "next_tlog": self.next_tlog}
