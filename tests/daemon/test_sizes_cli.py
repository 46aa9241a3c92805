"""Issue 10 item 6 through the CLI: `volume import` of a 1000448-byte image gives a
1000448-byte volume (what qemu-nbd serves for the same file), exported over NBD with that
size and those bytes; create, resize and import refuse other sizes with one message."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import Daemon
from tests.daemon.images import make_image, same

ODD = 1000448
RULE = "a size is a multiple of 512 bytes"
SYSTEM_ENV = {"PATH": "/usr/bin:/bin"}


def _err(daemon: Daemon, *args: str) -> str:
    r = daemon.cli(*args, check=False)
    assert r.returncode != 0, r.stdout
    return r.stderr


def test_import_keeps_the_size_to_the_byte(daemon: Daemon, tmp_path: Path) -> None:
    img = make_image(tmp_path / "img.raw", ODD, data=[(0, 8192), (ODD - 3072, 3072)])
    daemon.cli("volume", "import", "v", str(img))
    assert daemon.cli_json("volume", "info", "v")["size"] == ODD
    uri = f"nbd+unix:///v?socket={daemon.nbd_socket}"
    info = json.loads(subprocess.run(["nbdinfo", "--json", uri], capture_output=True, text=True,
                                     env=SYSTEM_ENV, timeout=60, check=True).stdout)
    assert info["exports"][0]["export-size"] == ODD
    out = tmp_path / "back.raw"
    daemon.cli("volume", "export", "v", str(out))
    assert out.stat().st_size == ODD and same(img, out)
    # create / resize / import: the same rule, the same words
    for args in (("volume", "create", "a", "--size", str(ODD + 1)), ("volume", "resize", "v", str(ODD + 100))):
        assert RULE in _err(daemon, *args)
    bad = tmp_path / "bad.raw"
    bad.write_bytes(b"x" * (ODD + 1))
    assert RULE in _err(daemon, "volume", "import", "w", str(bad))
    assert daemon.cli_json("volume", "resize", "v", str(ODD + 512))["size"] == ODD + 512
