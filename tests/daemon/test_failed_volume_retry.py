"""A volume that failed to open for a reason that passes is opened again in the background
(fault review finding 3): the write-buffer disk (a real tmpfs, mounted by the test) is full
when the node starts, so the volume fails ("disk full"); status says to free space and that
it is retried; once space is freed it opens without a restart, its data intact.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from tests.conftest import Daemon
from tests.daemon.images import make_image, same
from tests.engine.helpers import fill, tmpfs

MiB = 1 << 20


def test_volume_failed_on_full_disk_opens_once_space_is_freed(daemon_factory: Callable[..., Daemon],
                                                               tmp_path: Path) -> None:
    with tmpfs(tmp_path / "wbfs", 24 * MiB) as wb:
        d = daemon_factory({"engine": {"write_buffer": str(wb / "wb"), "reopen_seconds": 1.0,
                                       "disk_reserve": 1 * MiB}})
        try:
            src = make_image(tmp_path / "src.img", 4 * MiB, data=[(0, 1 * MiB), (3 * MiB, 5000)])
            d.cli("volume", "import", "v", str(src))
            d.kill()     # a crash: the next open replays the TLog and commits the map
            filler = fill(wb)
            d.start()
            (f,) = d.cli_json("status")["engine"]["failed_volumes"]
            assert f["name"] == "v" and "free space on" in f["hint"] and "retried every" in f["hint"], f
            assert "free space on" in d.cli("status").stdout
            filler.unlink()
            deadline = time.monotonic() + 30
            while d.cli_json("status")["engine"]["failed_volumes"] and time.monotonic() < deadline:
                time.sleep(0.2)
            st = d.cli_json("status")["engine"]
            assert st["failed_volumes"] == [] and st["volumes"] == 1, st
            d.cli("volume", "export", "v", str(tmp_path / "out.img"))
            assert same(tmp_path / "out.img", src)
        finally:
            d.teardown()
