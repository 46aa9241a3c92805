"""A corrupt map.db of one volume costs a rebuild of that volume, never the node (issue 9,
case 4, at the daemon level)."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import Daemon
from tests.daemon.images import make_image, same

MiB = 1 << 20


def test_daemon_starts_and_serves_a_volume_whose_map_is_corrupt(daemon: Daemon, tmp_path: Path) -> None:
    srcs = {
        "bad": make_image(tmp_path / "bad.img", 6 * MiB, data=[(0, 2 * MiB), (4 * MiB, 2 * MiB)]),
        "good": make_image(tmp_path / "good.img", 3 * MiB, data=[(MiB, 2 * MiB)]),
    }
    for name, src in srcs.items():
        daemon.cli("volume", "import", name, str(src))
    daemon.cli("snapshot", "create", "bad", "s")
    ns = daemon.cli_json("volume", "info", "bad")["namespace"]
    daemon.kill()   # whatever was not uploaded yet stays only in the local write buffer
    db = daemon.state / "wb" / ns / "map.db"
    for f in (db, Path(f"{db}-wal")):   # a damaged disk area: the database and its log
        if f.exists():
            f.write_bytes(os.urandom(max(f.stat().st_size, 8192)))
    daemon.start()
    for name, src in srcs.items():
        out = tmp_path / f"{name}.out"
        daemon.cli("volume", "export", name, str(out))
        assert same(src, out), f"volume {name} differs after the restart"
    assert [s["name"] for s in daemon.cli_json("snapshot", "list", "bad")] == ["s"]
    kept = [p.name for p in db.parent.iterdir() if p.name.startswith("map.db.corrupt-")]
    assert kept, "the corrupt map.db is kept for post-mortem"
    assert "map.db is unusable" in daemon.log_path.read_text()
    daemon.stop()
