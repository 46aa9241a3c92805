"""The backend checkpoint counter survives restarts (fault review finding 5): at open it is
set from the TLogs on the backend (and in the write buffer) above the newest backend
checkpoint, so a node that restarts more often than every backend_checkpoint_tlogs TLogs
still uploads checkpoints and a rebuild does not read every TLog since the volume began.
"""

from __future__ import annotations

from pathlib import Path

from ovsfs.backend.local import LocalStore
from ovsfs.engine.checkpoint import numbers
from tests.engine.helpers import opened, small_config

CS = 4096
EVERY = 4            # backend_checkpoint_tlogs


def test_checkpoints_are_uploaded_across_short_lives(tmp_path: Path) -> None:
    cfg = small_config(tmp_path / "var", backend_checkpoint_tlogs=EVERY)
    per_tlog = cfg.engine.sco_clusters * cfg.engine.tlog_scos   # clusters written per TLog
    with opened(cfg) as eng:
        eng.create_vpool("default")
        eng.create_volume("v", 1 << 20)
    lives = 0
    while True:
        lives += 1
        with opened(cfg) as eng:
            vol = eng.volume("v")
            # Fewer TLog rollovers per life than EVERY: a counter that starts at 0 on
            # every open never reaches it.
            for i in range(per_tlog + per_tlog // 2):
                vol.write(((lives * 97 + i) % 256) * CS, bytes([lives]) * CS)
            vol.flush()
            start_count = vol.tlogs_since_checkpoint
            names = eng.store.list(vol.ns)
        if numbers(names, "checkpoint/") or lives == 2 * EVERY:
            break
    cps, tlogs = numbers(names, "checkpoint/"), numbers(names, "tlog/")
    assert cps, f"no backend checkpoint after {lives} short lives ({len(tlogs)} TLogs on the backend)"
    # ... and the count at open is what lies above the newest checkpoint: TLogs on the
    # backend or still in the write buffer (listed while the node is down: nothing moves).
    store = LocalStore(cfg.path(cfg.backend.path))
    ns = next(n for n in store.namespaces() if n.startswith("vol-"))
    names = store.list(ns)
    local = [int(f.name) for f in (cfg.path(cfg.engine.write_buffer) / ns / "tlog").iterdir()
             if f.name.isdigit()]
    newest = numbers(names, "checkpoint/")[-1]
    above = {t for t in [*numbers(names, "tlog/"), *local] if t >= newest}
    with opened(cfg) as eng:
        vol = eng.volume("v")
        assert vol.tlogs_since_checkpoint == len(above), (vol.tlogs_since_checkpoint, above, start_count)
