"""Between the doors (nbd, fuse, later shm, iscsi) and the engine: the one async adapter
(adapter.py) every door runs its I/O through."""

from ovsfs.doors.adapter import (
    EXTENTS, FLUSH, READ, TRIM, WRITE, ZEROES, DoorIO, Op,
)

__all__ = ["DoorIO", "Op", "READ", "WRITE", "TRIM", "ZEROES", "EXTENTS", "FLUSH"]
