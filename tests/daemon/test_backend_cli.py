"""The erasure-coded backend inside the node daemon (`ovsfs run --asds N`), through the CLI:
status, sync, cache drop, lost disks and repair, presets, vPools with a preset, adding
and draining ASDs, and the errors a local-backend daemon answers."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from ovsfs.config import load
from ovsfs.daemon import load_config
from ovsfs.errors import ConfigError
from ovsfs.backend.node import LOCAL_ONLY, default_policies
from tests.conftest import OVSFS, Daemon
from tests.daemon.images import make_image, one_error_line, same

MiB = 1 << 20


def _asd_pids(d: Daemon) -> list[int]:
    m = re.findall(r"started \d+ ASDs: (.*)", d.log_path.read_text())
    assert m, d.log()
    return [int(p) for p in re.findall(r"pid (\d+)", m[-1])]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes (its parent has not reaped it yet).
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"


def _qemu_io(*args: str) -> None:
    r = subprocess.run(["qemu-io", "-f", "raw", *args], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr


def test_lost_disks_are_repaired_and_data_stays_readable(daemon_factory, tmp_path: Path) -> None:
    d = daemon_factory(asds=6)
    st = d.cli_json("backend", "status")
    assert st["asds_up"] == 6 and st["asds_down"] == 0
    assert len({a["node"] for a in st["asds"]}) == 6  # each ASD is its own storage node
    assert "6 up, 0 down" in d.cli("backend", "status").stdout
    assert d.cli_json("status")["backend"] == "asd"

    # Data through NBD (qemu-io) and through an import.
    d.cli("volume", "create", "vol1", "--size", "8M")
    uri = f"nbd+unix:///vol1?socket={d.nbd_socket}"
    if shutil.which("qemu-io"):
        _qemu_io("-c", "write -P 0x5a 0 3M", uri)
    img = make_image(tmp_path / "img.raw", 8 * MiB, data=[(0, 5 * MiB), (6 * MiB, 2 * MiB)])
    d.cli("volume", "import", "vol2", str(img))
    for vol in ("vol1", "vol2"):
        assert f"volume {vol} is on the backend" in d.cli("volume", "sync", vol).stdout
    drop = d.cli_json("cache", "drop")
    assert drop["write_buffer_bytes"] > 0 and drop["freed_bytes"] >= drop["write_buffer_bytes"]
    assert d.cli_json("backend", "status")["objects"] > 0

    # Stop: every ASD goes with the daemon. Replace two disks with empty ones, start again.
    pids = _asd_pids(d)
    assert len(pids) == 6
    d.stop()
    assert not [p for p in pids if _alive(p)]
    for i in (1, 4):
        shutil.rmtree(d.state / "asd" / str(i))
        (d.state / "asd" / str(i)).mkdir()
    d.start()
    assert d.cli_json("backend", "status")["asds_up"] == 6
    d.cli("cache", "drop")  # reads must come from the ASDs, not local copies
    d.cli("volume", "export", "vol2", str(tmp_path / "out.raw"))
    assert same(img, tmp_path / "out.raw")
    if shutil.which("qemu-io"):
        _qemu_io("-c", "read -P 0x5a 0 3M", "-c", "read -P 0 3M 5M", uri)

    r = d.cli("backend", "repair")
    assert "full redundancy" in r.stdout
    st = d.cli_json("backend", "status")
    assert st["degraded_objects"] == 0
    assert st["fragments_rebuilt"] > 0  # by the background loop or by the repair command
    assert any((d.state / "asd" / "1" / "f").iterdir())  # the new disk holds fragments again
    d.cli("cache", "drop")
    d.cli("volume", "export", "vol2", str(tmp_path / "out2.raw"))
    assert same(img, tmp_path / "out2.raw")


def test_presets_vpools_and_asd_add_remove(daemon_factory, tmp_path: Path) -> None:
    d = daemon_factory(asds=6)
    presets = {p["name"]: p for p in d.cli_json("preset", "list")}
    assert presets["default"]["policies"][0] == [4, 2, 5, 1] and presets["default"]["active"]
    assert "default *" in d.cli("preset", "list").stdout

    out = d.cli("preset", "create", "big", "--policy", "8,3,10,2", "--policy", "4,2,5,1",
                "--fragment-size", "4M", "--compression", "none").stdout
    assert "created preset big" in out
    show = d.cli("preset", "show", "big").stdout
    assert "(8,3,10,2), (4,2,5,1)" in show and "up to 4M" in show
    # The seeds' example: k=8, 4 MiB fragments, a 64 MiB SCO -> 2 chunks of 8 fragments.
    ex = d.cli_json("preset", "explain", "big", "--object-size", "64M")
    assert ex["chunks"] == 2 and ex["data_fragments_per_chunk"] == 8
    assert ex["fragment_sizes"] == [4 * MiB] and ex["chunk_size"] == 32 * MiB
    assert ex["metadata_bytes"] > 0 and ex["live_policy"] == "(4,2,5,1)"  # 6 ASDs cannot take 11
    text = d.cli("preset", "explain", "big", "--object-size", "64M").stdout
    assert "chunks:     2" in text and "8 data + 3 parity per chunk, 4M each" in text
    assert f"{ex['metadata_bytes']} bytes per object" in text

    assert "already exists" in one_error_line(d.cli("preset", "create", "big", "--policy", "2,1,2,1",
                                                    check=False).stderr)
    assert "c must be" in one_error_line(d.cli("preset", "create", "bad", "--policy", "3,1,9,1",
                                               check=False).stderr)

    assert "with preset big" in d.cli("vpool", "create", "fast", "--preset", "big").stdout
    pools = {p["name"]: p for p in d.cli_json("vpool", "list")}
    assert pools["fast"]["preset"] == "big" and pools["default"].get("preset") is None
    assert "does not exist" in one_error_line(d.cli("vpool", "create", "x", "--preset", "nope",
                                                    check=False).stderr)

    # A seventh ASD, started by the test as its own process.
    asd = subprocess.Popen([OVSFS, "asd", "serve", "--path", str(tmp_path / "extra"),
                            "--listen", "127.0.0.1:0", "--node", "extra"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                           stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        m = re.search(r"ASD (\w+) node extra listening on (\S+)", asd.stdout.readline())  # type: ignore[union-attr]
        assert m, "ovsfs asd serve did not start"
        asd_id, addr = m.groups()
        assert asd_id in d.cli("backend", "asd", "add", addr).stdout
        st = d.cli_json("backend", "status")
        assert st["asds_up"] == 7

        img = make_image(tmp_path / "img.raw", 6 * MiB, data=[(0, 6 * MiB)], seed=7)
        d.cli("volume", "import", "v", str(img))
        d.cli("volume", "sync", "v")
        placed = {a["asd_id"]: a["fragments_placed"] for a in d.cli_json("backend", "status")["asds"]}
        assert placed[asd_id] > 0  # the empty newcomer is filled first

        r = d.cli("backend", "asd", "remove", asd_id[:8])
        assert f"removed ASD {asd_id}" in r.stdout
        st = d.cli_json("backend", "status")
        assert st["asds_up"] == 6 and asd_id not in {a["asd_id"] for a in st["asds"]}
        assert st["degraded_objects"] == 0
    finally:
        os.kill(asd.pid, signal.SIGTERM)
        asd.wait(30)
        asd.stdout.close()  # type: ignore[union-attr]
    d.cli("cache", "drop")
    d.cli("volume", "export", "v", str(tmp_path / "out.raw"))
    assert same(img, tmp_path / "out.raw")
    assert "is not known" in one_error_line(d.cli("backend", "asd", "remove", asd_id, check=False).stderr)
    assert "HOST:PORT" in one_error_line(d.cli("backend", "asd", "add", "nowhere", check=False).stderr)


def test_local_backend_answers_backend_commands_with_one_error(daemon: Daemon, tmp_path: Path) -> None:
    for args in (["backend", "status"], ["backend", "repair"], ["backend", "asd", "add", "127.0.0.1:1"],
                 ["backend", "asd", "remove", "abcdef"], ["preset", "list"], ["preset", "show", "default"],
                 ["preset", "create", "p", "--policy", "2,1,2,1"],
                 ["preset", "explain", "default", "--object-size", "4M"]):
        r = daemon.cli(*args, check=False)
        assert r.returncode == 1, args
        assert one_error_line(r.stderr) == f"ovsfs: error: {LOCAL_ONLY}", args
    r = daemon.cli("vpool", "create", "x", "--preset", "default", check=False)
    assert r.returncode == 1 and "local backend has no presets" in one_error_line(r.stderr)
    # sync and cache drop work with either backend
    daemon.cli("volume", "import", "v", str(make_image(tmp_path / "i.raw", 2 * MiB, data=[(0, 2 * MiB)])))
    assert "is on the backend" in daemon.cli("volume", "sync", "v").stdout
    res = daemon.cli_json("cache", "drop")
    assert res["fragment_cache_bytes"] == 0 and res["write_buffer_bytes"] == 2 * MiB
    assert "does not exist" in one_error_line(daemon.cli("volume", "sync", "nope", check=False).stderr)


def test_run_asds_writes_its_choice_into_the_first_config(daemon_factory, tmp_path: Path) -> None:
    state = tmp_path / "fresh"
    cfg = load_config(None, state, embedded=True, asds=3)
    b = cfg.backend
    assert b.kind == "asd" and b.local_asds == 3 and len(set(b.local_asd_ports)) == 3 and b.asds == []
    text = (state / "ovsfs.toml").read_text()
    assert 'preset "default" was made for 3 ASDs' in text and "(2,1,2,1)" in text
    # A restart reads the same choice back; another N is refused.
    assert load_config(None, state, embedded=True).backend.local_asd_ports == b.local_asd_ports
    with pytest.raises(ConfigError, match="set up for 3 local ASDs"):
        load_config(None, state, embedded=True, asds=4)
    # --asds on a state directory set up for the local backend: one error line, exit 1.
    d = daemon_factory(start=False)
    r = subprocess.run([OVSFS, "run", "--state", str(d.state), "--asds", "2"], capture_output=True,
                       text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and "set up for the local backend" in one_error_line(r.stderr)
    for n in range(1, 9):  # the default preset always fits the ASDs it was made for
        assert all(p.k + p.m <= n for p in default_policies(n))


@pytest.mark.parametrize("body,msg", [
    ('[backend]\nkind = "s3"\n', "backend.kind"),
    ('[backend]\nkind = "asd"\nlocal_asds = 2\nlocal_asd_ports = [1]\n', "local_asd_ports"),
    ('[backend]\nkind = "asd"\nasds = ["nohost"]\n', "HOST:PORT"),
    ('[backend]\nkind = "asd"\n', "needs backend.asds"),
    ('[backend]\nlocal_asds = 1\nlocal_asd_ports = [9]\n', 'need backend.kind = "asd"'),
    ('[backend]\nkind = "asd"\nasds = ["h:1"]\ndown_timeout = "soon"\n', "must be float"),
    ('[backend]\nkind = "asd"\nasds = ["h:1"]\ncache = 5\n', "unknown config key backend.cache"),
])
def test_backend_config_is_validated(tmp_path: Path, body: str, msg: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(body)
    with pytest.raises(ConfigError, match=re.escape(msg)):
        load(f, tmp_path)


def test_asds_are_stopped_when_the_daemon_cannot_start(daemon_factory) -> None:
    d = daemon_factory({"backend": {"preset": "missing"}}, start=False, asds=2)
    r = subprocess.run([OVSFS, "run", "--state", str(d.state), "--asds", "2"], capture_output=True,
                       text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 1
    assert "backend.preset 'missing' does not exist" in r.stderr
    pids = [int(p) for p in re.findall(r"pid (\d+)", re.findall(r"started 2 ASDs: (.*)", r.stderr)[0])]
    assert len(pids) == 2 and not [p for p in pids if _alive(p)]
