"""Typed errors shared by every layer.

Each error carries an errno; doors map that to their own codes (NBD error
numbers, SCSI sense, HTTP status) so the engine never knows about protocols.
"""

from __future__ import annotations

import errno


class OvsfsError(Exception):
    """Base class: a clear, one-line message and an errno for the doors."""

    errno: int = errno.EIO
    http_status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(OvsfsError):
    errno = errno.ENOENT
    http_status = 404


class AlreadyExists(OvsfsError):
    errno = errno.EEXIST
    http_status = 409


class InvalidArgument(OvsfsError):
    errno = errno.EINVAL
    http_status = 400


class OutOfRange(InvalidArgument):
    """A request past the end of a volume."""

    errno = errno.ENOSPC  # NBD maps ENOSPC for writes past the end; reads get EINVAL at the door


class Busy(OvsfsError):
    """The object is in use: open, exported, has clones, ..."""

    errno = errno.EBUSY
    http_status = 409


class ReadOnly(OvsfsError):
    errno = errno.EROFS
    http_status = 409


class NoSpace(OvsfsError):
    errno = errno.ENOSPC
    http_status = 507


class LocalIOError(OvsfsError):
    """A write-buffer file operation failed (not for lack of space)."""

    errno = errno.EIO
    http_status = 500


class FsyncError(LocalIOError):
    """fsync (of a file or directory) failed: what it covered may be lost."""


class VolumeFailed(OvsfsError):
    """The volume serves no writes: it could not be opened at start, or a failed fsync or an
    unrecoverable local write error stopped it. The message says why; reopening it (a
    restart) replays what is on disk. A volume that could not be opened can be deleted."""

    errno = errno.EIO
    http_status = 503


class Fenced(OvsfsError):
    """A write carried an owner generation older than the newest one a backend namespace or a
    DTL server has seen: another node owns the volume now. The old owner halts that volume at
    once (clients get EIO, never stale data); it is never retried and never taken for an
    unreachable peer or backend. DESIGN.md "Fencing"."""

    errno = errno.EIO
    http_status = 409


class NotOwner(OvsfsError):
    """The volume is owned by another node (or by none): this node does not serve it."""

    errno = errno.EIO
    http_status = 421


class DtlError(OvsfsError):
    """A DTL peer could not be reached or refused a request for a reason other than fencing.
    Never reaches a client: the volume degrades and picks a new peer."""

    errno = errno.EIO
    http_status = 502


class ClusterError(OvsfsError):
    """The cluster store (etcd) could not be reached or answered with an error."""

    errno = errno.EIO
    http_status = 503


class DataError(OvsfsError):
    """Data could not be read back (missing object, checksum mismatch)."""

    errno = errno.EIO
    http_status = 500


class BackendError(OvsfsError):
    errno = errno.EIO
    http_status = 502


class WouldBlock(OvsfsError):
    """A `nowait` call that would have had to wait (lock busy, buffer full, backend read)."""

    errno = errno.EAGAIN
    http_status = 503


class ConfigError(OvsfsError):
    errno = errno.EINVAL
    http_status = 400


class DaemonNotRunning(OvsfsError):
    errno = errno.ECONNREFUSED


def first_leaf(exc: BaseException) -> BaseException:
    """The first exception at the bottom of nested exception groups (trio nurseries wrap
    what their tasks raise), or exc itself when it is no group."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
