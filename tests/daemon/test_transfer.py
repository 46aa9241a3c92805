"""Import and export through the daemon: thin in, sparse out, snapshots, clones, scrub."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import Daemon
from tests.daemon.images import make_image, one_error_line, same

MiB = 1 << 20


def _image(path: Path) -> Path:
    # Aligned and unaligned data, a written run of zeros (not a hole) and real holes.
    return make_image(path, 24 * MiB,
                      data=[(0, MiB), (5 * MiB, 3 * MiB + 4096), (9 * MiB + 100, 5000), (24 * MiB - 4096, 4096)],
                      zeros=[(12 * MiB, 4 * MiB)])


def test_import_export_sparse(daemon: Daemon, tmp_path: Path) -> None:
    src = _image(tmp_path / "src.img")
    res = daemon.cli_json("volume", "import", "disk", str(src))
    assert res["created"] and res["bytes"] == 24 * MiB
    # Only clusters holding data are written: the two clusters under the unaligned 5000 bytes, etc.
    assert res["written"] == MiB + 3 * MiB + 4096 + 2 * 4096 + 4096
    assert res["skipped"] == 24 * MiB - res["written"]
    assert daemon.cli_json("volume", "info", "disk")["size"] == 24 * MiB

    out = tmp_path / "out.img"
    r = daemon.cli("volume", "export", "disk", str(out))
    assert "100%" in r.stderr  # plain progress lines when not on a terminal
    assert same(src, out)
    assert out.stat().st_size == src.stat().st_size
    # Sparse: the written zeros of the source are holes in the export.
    assert out.stat().st_blocks < src.stat().st_blocks
    assert out.stat().st_blocks * 512 <= res["written"] + 64 * 1024

    # Exporting over an existing file replaces all of it.
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(30 * MiB))
    daemon.cli("volume", "export", "disk", str(junk))
    assert same(src, junk)


def test_import_unaligned_file(daemon: Daemon, tmp_path: Path) -> None:
    """One size rule (issue 10): a size that is not a multiple of 512 is refused, with the
    same message as create and resize, and nothing is created."""
    src = make_image(tmp_path / "odd.img", 10000, data=[(0, 10000)])
    r = daemon.cli("volume", "import", "odd", str(src), check=False)
    assert r.returncode == 1
    assert "bad volume size 10000: a size is a multiple of 512 bytes" in r.stderr
    assert "odd" not in [v["name"] for v in daemon.cli_json("volume", "list")]


def test_import_into_existing_volume(daemon: Daemon, tmp_path: Path) -> None:
    daemon.cli("volume", "create", "big", "--size", "16M")
    first = make_image(tmp_path / "a.img", 8 * MiB, data=[(0, 8 * MiB)], seed=3)
    daemon.cli("volume", "import", "big", str(first))
    # The second file has holes and zeros where the volume has data: they must read as zeros after.
    second = make_image(tmp_path / "b.img", 8 * MiB, data=[(MiB, MiB)], zeros=[(4 * MiB, MiB)], seed=4)
    res = daemon.cli_json("volume", "import", "big", str(second))
    assert not res["created"]
    out = tmp_path / "out.img"
    daemon.cli("volume", "export", "big", str(out))
    with open(out, "rb") as f:
        assert f.read(8 * MiB) == second.read_bytes()
        assert f.read() == bytes(8 * MiB)


def test_export_snapshot_after_overwrite(daemon: Daemon, tmp_path: Path) -> None:
    a = _image(tmp_path / "a.img")
    b = make_image(tmp_path / "b.img", 24 * MiB, data=[(0, 24 * MiB)], seed=9)
    daemon.cli("volume", "import", "v", str(a))
    daemon.cli("snapshot", "create", "v", "before")
    daemon.cli("volume", "import", "v", str(b))
    daemon.cli("volume", "export", "v", str(tmp_path / "snap.img"), "--snapshot", "before")
    daemon.cli("volume", "export", "v", str(tmp_path / "now.img"))
    assert same(tmp_path / "snap.img", a)
    assert same(tmp_path / "now.img", b)


def test_clone_from_snapshot(daemon: Daemon, tmp_path: Path) -> None:
    a = _image(tmp_path / "a.img")
    daemon.cli("volume", "import", "base", str(a))
    daemon.cli("snapshot", "create", "base", "gold")
    info = daemon.cli_json("volume", "clone", "base@gold", "child")
    assert info["parent"] == "base@gold" and info["size"] == 24 * MiB
    daemon.cli("volume", "export", "child", str(tmp_path / "child.img"))
    assert same(tmp_path / "child.img", a)

    # Writes to the clone stay in the clone; writes to the parent do not reach the clone.
    patch = make_image(tmp_path / "p.img", 2 * MiB, data=[(0, 2 * MiB)], seed=5)
    daemon.cli("volume", "import", "child", str(patch))
    daemon.cli("volume", "import", "base", str(make_image(tmp_path / "q.img", MiB, data=[(0, MiB)], seed=6)))
    daemon.cli("volume", "export", "child", str(tmp_path / "child2.img"))
    data = (tmp_path / "child2.img").read_bytes()
    assert data[:2 * MiB] == patch.read_bytes() and data[2 * MiB:] == a.read_bytes()[2 * MiB:]
    daemon.cli("volume", "export", "base", str(tmp_path / "base.img"), "--snapshot", "gold")
    assert same(tmp_path / "base.img", a)

    r = daemon.cli("volume", "delete", "base", check=False)
    assert r.returncode == 1 and "has clones" in one_error_line(r.stderr)
    r = daemon.cli("snapshot", "delete", "base", "gold", check=False)
    assert r.returncode == 1 and "has clones" in one_error_line(r.stderr)


def test_scrub(daemon: Daemon, tmp_path: Path) -> None:
    a = make_image(tmp_path / "a.img", 8 * MiB, data=[(0, 8 * MiB)], seed=7)
    b = make_image(tmp_path / "b.img", 8 * MiB, data=[(0, 6 * MiB)], seed=8)
    daemon.cli("volume", "import", "v", str(a))
    daemon.cli("volume", "import", "v", str(b))  # overwrites: the first copy is garbage
    daemon.cli("volume", "create", "empty", "--size", "1M")
    res = daemon.cli_json("scrub", "v")
    assert [r["volume"] for r in res] == ["v"]
    assert res[0]["freed_bytes"] > 0
    assert "VOLUME" in daemon.cli("scrub").stdout
    assert {r["volume"] for r in daemon.cli_json("scrub")} == {"v", "empty"}
    daemon.cli("volume", "export", "v", str(tmp_path / "out.img"))
    with open(tmp_path / "out.img", "rb") as f:
        assert f.read(6 * MiB) == b.read_bytes()[:6 * MiB]
        assert f.read() == bytes(2 * MiB)  # b's tail is a hole: the import cleared a's data there


def test_import_errors(daemon: Daemon, tmp_path: Path) -> None:
    def err(*args: str) -> str:
        r = daemon.cli(*args, check=False)
        assert r.returncode == 1
        return one_error_line(r.stderr)

    assert "no such file" in err("volume", "import", "v", str(tmp_path / "missing.img"))
    assert "directory" in err("volume", "import", "v", str(tmp_path))
    (tmp_path / "empty.img").touch()
    assert "empty" in err("volume", "import", "v", str(tmp_path / "empty.img"))
    daemon.cli("volume", "create", "small", "--size", "1M")
    big = make_image(tmp_path / "big.img", 2 * MiB, data=[(0, 4096)])
    assert "larger than volume small" in err("volume", "import", "small", str(big))
    assert "no such file" in err("volume", "export", "small", str(tmp_path / "no" / "dir" / "x.img"))
    assert [v["name"] for v in daemon.cli_json("volume", "list")] == ["small"]
