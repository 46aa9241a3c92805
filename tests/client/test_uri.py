"""`openvstorage:` URIs and the QEMU argument translation (issue 12, item 4): the exact
argv that `ovsfs qemu-args` / `ovsfs qemu` / `ovsfs qemu-img` produce. That QEMU accepts
these arguments is checked by starting it (tests/guest boots a guest with them)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from ovsfs.cli.client import CliError
from ovsfs.cli.qemu_cmds import Node, qemu_args_for, ram_bytes, split_opts, translate_qemu, translate_qemu_img
from ovsfs.client.uri import VolumeURI, open_volume, parse_uri
from ovsfs.errors import DaemonNotRunning, InvalidArgument
from tests.conftest import OVSFS

NODE = Node(Path("/s/run/vhost"), Path("/s/run/nbd.sock"))


@pytest.mark.parametrize("text, want", [
    ("openvstorage:vol1", VolumeURI("vol1")),
    ("openvstorage:vol1@snap.1", VolumeURI("vol1", "snap.1")),
    ("openvstorage+tcp:node2/vol1", VolumeURI("vol1", None, "node2", 10809)),
    ("openvstorage+tcp://10.0.0.2:10810/v_2@s", VolumeURI("v_2", "s", "10.0.0.2", 10810)),
    ("openvstorage+tcp:[::1]:7000/v", VolumeURI("v", None, "::1", 7000)),
])
def test_parse(text: str, want: VolumeURI) -> None:
    u = parse_uri(text)
    assert u == want
    assert parse_uri(str(u)) == u            # printing gives the same URI back
    assert u.read_only == (want.snapshot is not None)


@pytest.mark.parametrize("text", ["openvstorage:", "openvstorage:a/b", "openvstorage:v@", "openvstorage:@s",
                                  "openvstorage+tcp:host", "openvstorage+tcp:host:99999/v", "nbd://h/v",
                                  "openvstorage:.hidden", "openvstorage+tcp:/v"])
def test_parse_refuses(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_uri(text)


def test_socket_and_nbd_addresses() -> None:
    assert parse_uri("openvstorage:v@s").socket_path("/s/run/vhost") == Path("/s/run/vhost/v@s.sock")
    assert parse_uri("openvstorage:v").nbd_uri("/s/run/nbd.sock") == "nbd+unix:///v?socket=/s/run/nbd.sock"
    assert parse_uri("openvstorage+tcp:[::1]:7000/v").nbd_uri() == "nbd://[::1]:7000/v"


def test_open_volume_without_daemon(tmp_path: Path) -> None:
    with pytest.raises(DaemonNotRunning):
        open_volume("openvstorage:v", tmp_path, busy_wait=0.2)
    with pytest.raises(DaemonNotRunning, match=str(tmp_path / "run" / "vhost" / "v@s.sock")):
        open_volume("openvstorage:v@s", state=tmp_path, busy_wait=0.2)


def test_qemu_args_local_and_remote() -> None:
    assert qemu_args_for(parse_uri("openvstorage:vol1"), NODE, ram=256 << 20, queues=2) == [
        "-object", "memory-backend-memfd,id=ovsfs-mem,size=256M,share=on",
        "-machine", "memory-backend=ovsfs-mem", "-m", "256M",
        "-chardev", "socket,id=ovsfs-c0,path=/s/run/vhost/vol1.sock,reconnect=1",
        "-device", "vhost-user-blk-pci,chardev=ovsfs-c0,num-queues=2"]
    assert qemu_args_for(parse_uri("openvstorage+tcp:n2:7000/v@s"), NODE) == [
        "-drive", "file=nbd://n2:7000/v@s,if=virtio,cache=none,format=raw,readonly=on"]


def test_qemu_drive_translation() -> None:
    argv = ["-M", "q35,accel=tcg", "-m", "1G,slots=2,maxmem=4G", "-nodefaults",
            "-drive", "file=openvstorage:a,if=virtio,cache=none,format=raw,id=disk0",
            "-drive", "file=/img/b.qcow2,if=virtio",
            "-drive", "file=openvstorage:a@s,readonly=on,queues=2",
            "-drive", "file=openvstorage+tcp:n2/c,if=virtio,cache=writeback",
            "-append", "console=ttyS0 -drive x"]
    assert translate_qemu(argv, NODE, check_sockets=False) == [
        "-object", "memory-backend-memfd,id=ovsfs-mem,size=1G,share=on",
        "-M", "q35,accel=tcg,memory-backend=ovsfs-mem", "-m", "1G,slots=2,maxmem=4G", "-nodefaults",
        "-chardev", "socket,id=ovsfs-c0,path=/s/run/vhost/a.sock,reconnect=1",
        "-device", "vhost-user-blk-pci,chardev=ovsfs-c0,num-queues=1,id=disk0",
        "-drive", "file=/img/b.qcow2,if=virtio",
        "-chardev", "socket,id=ovsfs-c1,path=/s/run/vhost/a@s.sock,reconnect=1",
        "-device", "vhost-user-blk-pci,chardev=ovsfs-c1,num-queues=2",
        "-drive", "file=nbd://n2:10809/c,if=virtio,cache=writeback,format=raw",
        "-append", "console=ttyS0 -drive x"]


def test_qemu_keeps_a_memory_backend_given() -> None:
    argv = ["-object", "memory-backend-memfd,id=m,size=512M,share=on", "-machine", "pc,memory-backend=m",
            "-drive", "file=openvstorage:a"]
    assert translate_qemu(argv, NODE, check_sockets=False) == [
        "-object", "memory-backend-memfd,id=m,size=512M,share=on", "-machine", "pc,memory-backend=m",
        "-chardev", "socket,id=ovsfs-c0,path=/s/run/vhost/a.sock,reconnect=1",
        "-device", "vhost-user-blk-pci,chardev=ovsfs-c0,num-queues=1"]
    # No -m: QEMU's default RAM, said explicitly so that it matches the backend's size.
    assert translate_qemu(["-drive", "file=openvstorage:a"], NODE, check_sockets=False)[:6] == [
        "-object", "memory-backend-memfd,id=ovsfs-mem,size=128M,share=on",
        "-machine", "memory-backend=ovsfs-mem", "-m", "128M"]


@pytest.mark.parametrize("drive, why", [
    ("file=openvstorage:a,if=ide", "if=ide"),
    ("file=openvstorage:a,format=qcow2", "format=qcow2"),
    ("file=openvstorage:a,readonly=on", "needs a snapshot"),
    ("file=openvstorage:a,snapshot=on", "not supported"),
    ("file=openvstorage:a/b", "VOL@SNAP"),
])
def test_qemu_drive_refused(drive: str, why: str) -> None:
    with pytest.raises(CliError, match=why):
        translate_qemu(["-drive", drive], NODE, check_sockets=False)


def test_qemu_needs_the_socket(tmp_path: Path) -> None:
    with pytest.raises(CliError, match="no shared-memory socket"):
        translate_qemu(["-drive", "file=openvstorage:a"], Node(tmp_path, tmp_path / "nbd.sock"))


def test_qemu_img_translation() -> None:
    assert translate_qemu_img(["info", "openvstorage:v@s"], NODE) == [
        "info", "-f", "raw", "nbd+unix:///v@s?socket=/s/run/nbd.sock"]
    assert translate_qemu_img(["convert", "-p", "-f", "qcow2", "in.qcow2", "openvstorage:v"], NODE) == [
        "convert", "-n", "-O", "raw", "-p", "-f", "qcow2", "in.qcow2", "nbd+unix:///v?socket=/s/run/nbd.sock"]
    assert translate_qemu_img(["convert", "-O", "qcow2", "openvstorage+tcp:h:1/v", "out.qcow2"], NODE) == [
        "convert", "-f", "raw", "-O", "qcow2", "nbd://h:1/v", "out.qcow2"]


def test_option_strings() -> None:
    assert split_opts("a=1,,2,b,c=") == [("a", "1,2"), ("b", None), ("c", "")]
    assert [ram_bytes(t) for t in ("256", "1G", "size=2G,slots=1", "512M,maxmem=1G")] == \
        [256 << 20, 1 << 30, 2 << 30, 512 << 20]


def test_cli_prints(tmp_path: Path) -> None:
    """Through the `ovsfs` command: the socket directory comes from the node's config."""
    (tmp_path / "ovsfs.toml").write_text('[nbd]\nsocket = "/elsewhere/nbd.sock"\n')
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    r = subprocess.run([OVSFS, "--state", str(tmp_path), "qemu-args", "--json", "--memory", "64M", "openvstorage:v"],
                       capture_output=True, text=True, env=env, check=True)
    argv = json.loads(r.stdout)
    assert argv[argv.index("-chardev") + 1] == f"socket,id=ovsfs-c0,path={tmp_path}/run/vhost/v.sock,reconnect=1"
    assert "memory-backend-memfd,id=ovsfs-mem,size=64M,share=on" in argv
    r = subprocess.run([OVSFS, "--state", str(tmp_path), "qemu-img", "--print", "--json", "info", "openvstorage:v"],
                       capture_output=True, text=True, env=env, check=True)
    assert json.loads(r.stdout) == ["qemu-img", "info", "-f", "raw", "nbd+unix:///v?socket=/elsewhere/nbd.sock"]
    r = subprocess.run([OVSFS, "--state", str(tmp_path), "qemu", "--", "-drive", "file=openvstorage:v"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "no shared-memory socket" in r.stderr


# ---- what the breaker found (issue 12 follow-up): refused with a reason, never passed on ----

@pytest.mark.parametrize("argv, why", [
    (["-drive", "file=openvstorage:a,queues=5"], r"at most 4 \(\[shm\] num_queues\)"),
    (["-drive", "file=openvstorage:a", "-drive", "file=openvstorage:a,id=x"], "given twice"),
    (["-m", "0", "-drive", "file=openvstorage:a"], "more than 0"),
    (["-m", "lots", "-drive", "file=openvstorage:a"], "bad size"),
    (["-object", "memory-backend-memfd,id=m,size=1G", "-machine", "memory-backend=m",
      "-drive", "file=openvstorage:a"], "add share=on"),
    (["-machine", "memory-backend=nope", "-drive", "file=openvstorage:a"], "no -object with id=nope"),
    (["-drive=file=openvstorage:a"], "a space, not '='"),
    (["-drive", "file=openvstorage:a,if=none,id=d0", "-device", "virtio-blk-pci,drive=d0"],
     "leave out the -device virtio-blk-pci,drive=ID"),
    (["-drive", "file=openvstorage:" + "v" * 90], "more than a unix socket takes"),
])
def test_qemu_translation_refuses(argv: list[str], why: str) -> None:
    with pytest.raises(CliError, match=why):
        translate_qemu(argv, NODE, check_sockets=False)


def test_qemu_translation_checks_pass_what_is_right() -> None:
    """The checks above refuse only what cannot work: queues up to [shm] num_queues, a
    shared backend of the user's own, the same volume once plus its snapshot."""
    argv = ["-object", "memory-backend-file,id=m,size=1G,mem-path=/dev/shm/x,share=on", "-machine",
            "memory-backend=m", "-drive", "file=openvstorage:a,queues=4", "-drive", "file=openvstorage:a@s"]
    out = translate_qemu(argv, NODE, check_sockets=False)
    assert "vhost-user-blk-pci,chardev=ovsfs-c0,num-queues=4" in out and out.count("-chardev") == 2
    node2 = Node(Path("/s/run/vhost"), Path("/s/run/nbd.sock"), num_queues=8)
    assert "vhost-user-blk-pci,chardev=ovsfs-c0,num-queues=8" in translate_qemu(
        ["-drive", "file=openvstorage:a,queues=8"], node2, check_sockets=False)


def test_qemu_backend_in_json_form_is_understood() -> None:
    shared = '{"qom-type": "memory-backend-memfd", "id": "m", "size": 268435456, "share": true}'
    out = translate_qemu(["-object", shared, "-machine", "memory-backend=m", "-drive", "file=openvstorage:a"],
                         NODE, check_sockets=False)
    assert out[:2] == ["-object", shared]
    with pytest.raises(CliError, match="add share=on"):
        translate_qemu(["-object", shared.replace("true", "false"), "-machine", "memory-backend=m",
                        "-drive", "file=openvstorage:a"], NODE, check_sockets=False)
