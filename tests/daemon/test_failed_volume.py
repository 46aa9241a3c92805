"""One volume that cannot be opened never stops the node (issue 9, case 5).

A real daemon on its own three ASDs; the volume "bad" loses its local map and every
fragment of its objects while the node is down, so nothing of it can be decoded. The node must start, serve the other volume, name the
failed one with the reason in `ovsfs status` and `ovsfs volume list`, and let the
operator delete it.
"""

from __future__ import annotations

import shutil
import time
from typing import Callable
from pathlib import Path

from ovsfs.backend.asd import Disk
from ovsfs.backend.index import split_manifest_key
from ovsfs.backend.manifest import Manifest
from tests.conftest import Daemon
from tests.daemon.images import make_image, same

MiB = 1 << 20


def _fragments_of(state: Path, ns: str) -> list[Path]:
    """Fragment files on the daemon's ASD disks that belong to objects of namespace ns."""
    vids: set[str] = set()
    disks = sorted((state / "asd").iterdir())
    for root in disks:
        disk = Disk(root, "test")
        for key in disk.list("m/"):
            if split_manifest_key(key)[0] == ns:
                vids.add(Manifest.decode(disk.read(key)[0]).vid.hex())
    return [f for root in disks for f in (root / "f").iterdir() if f.name.split("%2F")[0] in vids]


def test_node_starts_and_serves_when_one_volume_cannot_be_opened(daemon_factory: Callable[..., Daemon],
                                                                 tmp_path: Path) -> None:
    daemon = daemon_factory(asds=3)
    src = make_image(tmp_path / "src.img", 4 * MiB, data=[(0, 1 * MiB), (3 * MiB, 5000)])
    daemon.cli("volume", "import", "good", str(src))
    daemon.cli("volume", "import", "bad", str(src))
    daemon.cli("volume", "sync", "bad")                    # its TLogs on the backend
    bad_ns = daemon.api("GET", "/volumes/bad")[1]["namespace"]
    daemon.stop()
    shutil.rmtree(daemon.state / "wb" / bad_ns)           # its map must come from the backend...
    frags = _fragments_of(daemon.state, bad_ns)            # ... where nothing can be decoded
    assert frags
    for f in frags:
        f.unlink()

    daemon.start()
    st = daemon.cli_json("status")
    assert st["engine"]["volumes"] == 1
    (failed,) = st["engine"]["failed_volumes"]
    assert failed["name"] == "bad" and "fragments readable" in failed["reason"], failed
    text = daemon.cli("status").stdout
    assert "failed:" in text and "bad" in text and failed["reason"] in text
    vols = {v["name"]: v for v in daemon.cli_json("volume", "list")}
    assert sorted(vols) == ["bad", "good"] and vols["bad"]["state"] == "failed"
    assert "failed" in daemon.cli("volume", "list").stdout
    # The other volume serves.
    daemon.cli("volume", "export", "good", str(tmp_path / "out.img"))
    assert same(src, tmp_path / "out.img")
    # I/O on the failed one is refused with the reason; its name is taken until deleted.
    r = daemon.cli("volume", "export", "bad", str(tmp_path / "bad.img"), check=False)
    assert r.returncode != 0 and "could not be opened" in r.stderr
    r = daemon.cli("volume", "create", "bad", "--size", "1M", check=False)
    assert r.returncode != 0 and "already exists" in r.stderr
    daemon.cli("volume", "delete", "bad")
    assert [v["name"] for v in daemon.cli_json("volume", "list")] == ["good"]
    assert daemon.cli_json("status")["engine"]["failed_volumes"] == []
    # Its namespace goes in the background, as a tombstone; with every ASD up, a GC pass
    # then leaves nothing of it (not even the tombstone).
    deadline = time.monotonic() + 30
    while True:
        r = daemon.cli("backend", "gc", "--grace", "0")
        assert "gc done:" in r.stdout
        st = daemon.cli_json("backend", "status")
        if st["namespaces"] == 1 and st["tombstones"] == 0 and st["index_complete"]:
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.5)
    daemon.stop()
    daemon.start()
    assert [v["name"] for v in daemon.cli_json("volume", "list")] == ["good"]
    daemon.stop()
