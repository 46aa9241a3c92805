"""Helpers for engine tests: small configs and an in-process 'crash'."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ovsfs.config import Config, load
from ovsfs.engine.engine import Engine


def small_config(state: Path, **engine: int) -> Config:
    cfg = load(None, state)
    cfg.engine.sco_clusters = 8
    cfg.engine.tlog_scos = 2
    cfg.engine.backend_checkpoint_tlogs = 2
    cfg.engine.map_cache_pages = 4
    cfg.engine.write_buffer_size = 4 * 8 * 4096 * 4
    for k, v in engine.items():
        setattr(cfg.engine, k, v)
    return cfg


@contextmanager
def opened(cfg: Config) -> Iterator[Engine]:
    """An engine opened on cfg, closed cleanly at the end."""
    eng = Engine(cfg)
    eng.open()
    try:
        yield eng
    finally:
        eng.close()


def crash(engine: Engine) -> None:
    """Drop an engine as a SIGKILL would: no flush, no map commit, queued uploads lost.

    What the kernel already has (written files) stays; the SQLite transaction is
    rolled back, exactly as a killed process's would be.
    """
    engine._stop.set()
    engine.wb.abandon()   # queued uploads forgotten; a running one is waited for
    for vol in engine.volumes.values():
        with vol.lock:
            vol.closed = True
            vol.deleted = True  # any upload still running for it becomes a no-op
            for fd in [vol.sco_fd, vol.tlog_fd, *vol.read_fds.values()]:
                if fd is not None:
                    os.close(fd)
            vol.sco_fd = vol.tlog_fd = None
            vol.read_fds.clear()
            vol.map.db.close()
    engine.registry.close()
