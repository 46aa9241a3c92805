"""SIGTERM with every ASD stopped (SIGSTOP by PID) finishes soon after engine.stop_timeout,
not stop_timeout + CLOSE_SLACK later (fault review finding 4): the backend close saves its
manifest index first, cancels queued I/O and waits for I/O in flight and for maintenance
with a bound, instead of waiting out its whole budget. After a restart (ASDs continued)
the data is all there.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Callable

from tests.conftest import Daemon
from tests.daemon.images import make_image, same
from tests.daemon.test_backend_away import asd_pids, backend_away

MiB = 1 << 20
STOP_TIMEOUT = 2.0


def test_sigterm_with_asds_stopped_does_not_wait_out_the_backend_budget(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    d = daemon_factory({"engine": {"stop_timeout": STOP_TIMEOUT}}, asds=3)
    src = make_image(tmp_path / "src.img", 2 * MiB, data=[(0, 1 * MiB)])
    d.cli("volume", "import", "v", str(src))
    d.cli("volume", "sync", "v")
    pids = asd_pids(d)
    with backend_away(pids):
        time.sleep(2.5)          # maintenance is now waiting on an ASD that does not answer
        start = time.monotonic()
        os.kill(d.pid, signal.SIGTERM)
        rc = d.proc.wait(60)     # type: ignore[union-attr]
        took = time.monotonic() - start
    assert rc == 0, d.log()
    # Generous (2 s over stop_timeout, this box is shared); before the fix the backend
    # close alone waited max(2 s, what was left of stop_timeout + 3 s).
    assert took < STOP_TIMEOUT + 2.0, f"SIGTERM took {took:.1f} s:\n{d.log()}"
    d.start()
    d.cli("volume", "export", "v", str(tmp_path / "out.img"))
    assert same(tmp_path / "out.img", src)
