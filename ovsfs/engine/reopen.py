"""Volumes that failed to open for a reason that passes are opened again in the background.

A full write-buffer disk at start ("map.db: commit: disk full"), a local I/O error, or a
backend that is away or late (an ASD that starts after the node) must not fail a volume for
good: the engine's ticker calls `retry_failed` every second, and each failed volume whose
reason is transient is tried again every `engine.reopen_seconds`. A reason that does not
pass (the registry record is wrong, the volume is gone) is left to the operator, who deletes it.
"""

from __future__ import annotations

import errno
import logging
import time
from typing import Any, Callable

from ovsfs.errors import BackendError, DataError, LocalIOError, NoSpace, VolumeFailed

log = logging.getLogger("ovsfs.engine")

# Errors that a later try may not see: space freed, a disk back, ASDs back.
TRANSIENT = (NoSpace, LocalIOError, BackendError, DataError)
TRANSIENT_ERRNO = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN}


def is_transient(e: BaseException) -> bool:
    if isinstance(e, VolumeFailed) and e.__cause__ is not None:
        return is_transient(e.__cause__)  # a clone whose parent failed: as the parent's reason
    if isinstance(e, TRANSIENT):
        return True
    return isinstance(e, OSError) and e.errno in TRANSIENT_ERRNO


def hint(e: BaseException, wb_root: str, every: float) -> str:
    """What the operator can do about a volume that failed to open with `e`."""
    if isinstance(e, VolumeFailed) and e.__cause__ is not None:
        return hint(e.__cause__, wb_root, every)
    again = f"retried every {every:g} s"
    if isinstance(e, NoSpace) or (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)):
        return f"free space on {wb_root}; {again}"
    if isinstance(e, (BackendError, DataError)):
        return f"bring the backend's ASDs back (ovsfs backend status); {again}"
    if is_transient(e):
        return f"check the disk under {wb_root}; {again}"
    return "delete it to remove it (ovsfs volume delete NAME)"


def mark_failed(failed: dict[str, dict[str, Any]], rec: dict[str, Any], e: BaseException, reason: str,
                wb_root: str, every: float) -> None:
    """Record (or update) why volume rec could not be opened and when it is tried again."""
    transient = is_transient(e)
    tries = failed.get(rec["name"], {}).get("tries", 0) + 1
    failed[rec["name"]] = {**{k: v for k, v in rec.items() if k not in ("state", "reason", "hint")},
                           "state": "failed", "reason": reason, "hint": hint(e, wb_root, every),
                           "transient": transient, "tries": tries,
                           "retry_at": time.monotonic() + every if transient else None}


def due(failed: dict[str, dict[str, Any]], now: float) -> list[dict[str, Any]]:
    """Failed volumes to try now, parents before their clones (a clone waits for its parent)."""
    names_ns = {r["ns"] for r in failed.values()}
    return [r for r in sorted(failed.values(), key=lambda r: r["name"])
            if r.get("transient") and r.get("retry_at") is not None and now >= r["retry_at"]
            and not (r.get("parent") and r["parent"]["ns"] in names_ns)]


def retry_failed(engine: Any, open_one: Callable[[dict[str, Any]], Any]) -> None:
    """Try the due failed volumes of `engine` once each; open_one(record) opens one volume
    (and raises on failure). Called from the engine's ticker thread."""
    for rec in due(engine.failed, time.monotonic()):
        if engine._stop.is_set():
            return
        with engine.lock:
            cur = engine.failed.get(rec["name"])
            if cur is None or cur["ns"] != rec["ns"]:
                continue    # deleted (or replaced) meanwhile
            try:
                vol = open_one(cur)
            except Exception as e:  # noqa: BLE001 - stays failed, with the new reason
                reason = e.message if hasattr(e, "message") else f"{type(e).__name__}: {e}"
                mark_failed(engine.failed, cur, e, reason, str(engine.wb_root), engine.cfg.engine.reopen_seconds)
                log.warning("volume %s still cannot be opened (try %d): %s", cur["name"],
                            engine.failed[cur["name"]]["tries"], reason)
                continue
            engine.volumes[vol.name] = vol
            del engine.failed[cur["name"]]
            log.info("volume %s opened after %d failed tries", vol.name, cur["tries"])
