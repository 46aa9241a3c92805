"""Changes of owner as the engine carries them out (ovsfs/member/ decides when): a
move's source releases a volume, its target or a restart takes it, a node that finds
itself replaced drops it. See ovsfs/engine/owners.py for generations and local state.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from ovsfs.engine.owners import set_aside
from ovsfs.engine.volume import Volume
from ovsfs.errors import AlreadyExists, NotFound, OvsfsError

log = logging.getLogger("ovsfs.engine")

# `engine` below is the Engine (engine.py), which calls these: typed Any, not imported back.


def take(engine: Any, name: str, gen: int, tail_entries: list[Any] | None = None,
                timeout: float | None = None, drop_old: Callable[[], None] | None = None) -> Volume:
    """Open a volume this node now owns at `gen` (a move's target, or a restart here):
    the namespace is fenced at `gen`, the map rebuilt from the backend (or the local
    state of this same generation), then the previous owner's DTL tail appended as new
    writes and uploaded; then `drop_old()` (the old tail may go), then the volume's own
    DTL starts and the doors see it. NotFound, AlreadyExists (open here already),
    BackendError (the upload did not finish within `timeout`)."""
    with engine.lock:
        if name in engine.volumes:
            raise AlreadyExists(f"volume {name} is open on this node already")
        rec = engine.registry.get(f"/volumes/{name}")
        if rec is None:
            raise NotFound(f"volume {name} does not exist")
        parent = engine._by_ns(rec["parent"]["ns"]) if rec.get("parent") else None
        engine.failed.pop(name, None)
        vol = engine._open_record(rec, parent, gen, tail_entries, attach_dtl=False)
    try:
        if tail_entries:
            vol.sync(timeout)
        if drop_old is not None:
            drop_old()
        engine.attach(vol)
    except BaseException:
        vol.close()
        raise
    with engine.lock:
        engine.volumes[name] = vol
    log.info("volume %s taken at owner generation %d (%d DTL entries of the previous owner)",
             name, gen, len(tail_entries or []))
    return vol


def drop(engine: Any, name: str, why: str) -> None:
    """Stop serving a volume another node owns now: halted (reads and writes fail with
    Fenced), closed without uploading, its local state set aside."""
    with engine.lock:
        vol = engine.volumes.pop(name, None)
    if vol is None:
        return
    vol.log.halt(why)
    try:
        vol.close()
    except OvsfsError:
        pass   # fenced: nothing of it is needed here any more
    vol.dtl.close()
    engine.wb.forget_owner(vol, 0)
    set_aside(engine.wb_root, vol.ns, why)


def release(engine: Any, name: str, timeout: float | None = None) -> None:
    """Hand a volume over: refuse writes from now on (Busy), put everything on the
    backend, close it here and drop its DTL tail. On failure (backend too slow) the
    volume goes on here as before and the error is raised."""
    vol = engine.volume(name)
    with vol.lock:
        vol.log.check_open()
        vol.seal()
        vol.state.released = "being handed over to another node"
    log.info("volume %s: handing over: writes wait while what is not on the backend yet is uploaded", name)
    try:
        vol.flush()
        vol.commit()
        vol.queue_checkpoint()   # the next owner opens from it instead of replaying every TLog
        vol.sync(timeout)
    except BaseException:
        with vol.lock:
            vol.state.released = None
        raise
    with engine.lock:
        vol.close()
        engine.volumes.pop(name, None)
    vol.dtl.close(drop=True)
    log.info("volume %s released: everything is on the backend", name)
