"""`ovsfs qemu-args`, `ovsfs qemu`, `ovsfs qemu-img`: stock QEMU on `openvstorage:` URIs
(issue 12, item 4; docs/SHM.md).

A local volume becomes QEMU's vhost-user-blk device on the node's shm door socket, with
guest RAM in a shared memfd (vhost-user needs the back end to map guest memory):

    -object memory-backend-memfd,id=ovsfs-mem,size=SIZE,share=on
    -machine memory-backend=ovsfs-mem        (merged into an existing -machine)
    -chardev socket,id=ovsfs-cN,path=STATE/run/vhost/VOL.sock,reconnect=1
    -device vhost-user-blk-pci,chardev=ovsfs-cN,num-queues=Q[,id=DRIVE-ID]

A volume of another node (`openvstorage+tcp:`) becomes an NBD drive. qemu-img reaches
this node's volumes through its NBD door (nbd+unix:///VOL?socket=...), and `create` goes
to the management API.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ovsfs.cli.client import CliError, state_dir
from ovsfs.cli.common import client_for
from ovsfs.client.frontend import UNIX_PATH_MAX
from ovsfs.client.uri import VolumeURI, is_uri, parse_uri
from ovsfs.errors import OvsfsError
from ovsfs.mgmt.units import format_size, parse_size

MEM_ID = "ovsfs-mem"
DEFAULT_RAM = 128 << 20            # QEMU's default -m
# Drive options that make no sense for a vhost-user disk but that people write for a raw
# virtio disk: accepted and dropped (the door is always writeback + FLUSH, raw, virtio).
_DROPPED = {"if": {"virtio"}, "format": {"raw"}, "cache": None, "aio": None, "discard": None,
            "detect-zeroes": None, "media": {"disk"}, "werror": None, "rerror": None, "serial": None}

# Options whose value is copied untouched (some are free text that could look like an option).
_WITH_VALUE = {"-m", "-machine", "-M", "-object", "-chardev", "-device", "-append", "-kernel", "-initrd",
               "-name", "-pidfile", "-D", "-serial", "-netdev", "-global", "-smp", "-accel", "-cpu"}


@dataclass(frozen=True)
class Node:
    """Where this node's doors listen (from its config)."""

    socket_dir: Path            # [shm] socket_dir: VOL.sock per volume
    nbd_socket: Path            # [nbd] socket
    num_queues: int = 4         # [shm] num_queues: queues the door offers per device


def node_paths(state: Path) -> Node:
    """This node's shm and NBD socket paths from STATE/ovsfs.toml (defaults without it)."""
    from ovsfs import config

    path = state / "ovsfs.toml"
    try:
        cfg = config.load(path if path.exists() else None, state)
    except OvsfsError as e:
        raise CliError(f"node config {path}: {e.message}") from None
    shm = getattr(cfg, "shm", None)
    return Node(cfg.path(shm.socket_dir if shm is not None else "run/vhost"), cfg.path(cfg.nbd.socket),
                shm.num_queues if shm is not None else 4)


def _uri(text: str) -> VolumeURI:
    try:
        return parse_uri(text)
    except OvsfsError as e:
        raise CliError(e.message) from None


# ---- QEMU option strings ("key=value,key=value"; a doubled comma is a literal comma) ----------

def split_opts(text: str) -> list[tuple[str, str | None]]:
    parts: list[str] = []
    cur = ""
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    parts.append(cur)
    out: list[tuple[str, str | None]] = []
    for p in parts:
        k, eq, v = p.partition("=")
        out.append((k, v if eq else None))
    return out


def join_opts(opts: list[tuple[str, str | None]]) -> str:
    return ",".join(k if v is None else f"{k}={v.replace(',', ',,')}" for k, v in opts)


def ram_bytes(text: str) -> int:
    """QEMU's -m value (`256`, `256M`, `1G,slots=2,maxmem=4G`, `size=1G`): bytes; a bare
    number is MiB."""
    first = split_opts(text)[0]
    value = first[1] if first[0] == "size" else first[0]
    if value is None:
        raise CliError(f"-m {text}: no size")
    try:
        size = parse_size(value + "M" if value.isdigit() else value)
    except OvsfsError:
        raise CliError(f"-m {text}: bad size") from None
    if size <= 0:
        raise CliError(f"-m {text}: guest RAM must be more than 0 (it is the memory shared with the door)")
    return size


# ---- translation ------------------------------------------------------------------------------

def memory_args(size: int) -> list[str]:
    return ["-object", f"memory-backend-memfd,id={MEM_ID},size={format_size(size)},share=on"]


def vhost_args(u: VolumeURI, node: Node, n: int, *, queues: int = 1, dev_id: str | None = None,
               reconnect: bool = True) -> list[str]:
    """The chardev and device of one local volume (the n-th such drive)."""
    chardev = f"ovsfs-c{n}"
    sock = u.socket_path(node.socket_dir)
    dev = f"vhost-user-blk-pci,chardev={chardev},num-queues={queues}" + (f",id={dev_id}" if dev_id else "")
    path = str(sock).replace(",", ",,")     # QEMU option syntax: a literal comma is doubled
    return ["-chardev", f"socket,id={chardev},path={path}" + (",reconnect=1" if reconnect else ""),
            "-device", dev]


def nbd_drive(u: VolumeURI, opts: list[tuple[str, str | None]]) -> list[str]:
    """A remote volume's -drive: an NBD drive with the other options kept."""
    out = [("file", u.nbd_uri())]
    keys = {k for k, _ in opts}
    out += [(k, v) for k, v in opts if k != "file"]
    if "format" not in keys:
        out.append(("format", "raw"))
    if u.read_only and "readonly" not in keys:
        out.append(("readonly", "on"))
    return ["-drive", join_opts(out)]


def translate_qemu(argv: list[str], node: Node, *, check_sockets: bool = True) -> list[str]:
    """QEMU arguments with each `-drive file=openvstorage:...` translated (see the module
    docstring); everything else as given. CliError for a drive that cannot be served so."""
    out: list[str] = []
    local = 0
    ram: int | None = None
    machine_at: int | None = None
    backend: str | None = None
    objects: dict[str, list[tuple[str, str | None]]] = {}    # -object id -> its options
    seen: set[str] = set()                                    # local volumes given so far
    i = 0
    while i < len(argv):
        a = argv[i]
        val = argv[i + 1] if i + 1 < len(argv) else None
        opt = a[1:] if a.startswith("--") else a
        step = 2
        if opt.startswith("-drive="):
            # `-drive=file=...`: QEMU itself does not take this form; refused rather than
            # passed on with an untranslated openvstorage: URI in it.
            if is_uri(dict(split_opts(opt[len("-drive="):])).get("file") or ""):
                raise CliError(f"{a}: write -drive FILE-OPTIONS (a space, not '=') for an openvstorage: drive")
        if opt == "-drive" and val is not None:
            opts = split_opts(val)
            file = dict(opts).get("file")
            if file is None or not is_uri(file):
                out += [a, val]
            else:
                u = _uri(file)
                if u.remote:
                    out += nbd_drive(u, opts)
                else:
                    if str(u) in seen:
                        raise CliError(f"{u} is given twice: a volume has one front end at a time")
                    seen.add(str(u))
                    out += _local_drive(u, opts, node, local, check_sockets)
                    local += 1
            i += step
            continue
        if opt == "-m" and val is not None:
            ram = ram_bytes(val)
        elif opt in ("-machine", "-M") and val is not None:
            if machine_at is None:
                machine_at = len(out) + 1
            backend = dict(split_opts(val)).get("memory-backend") or backend
        elif opt == "-object" and val is not None:
            o = _object_opts(val)
            if dict(o).get("id"):
                objects[dict(o)["id"] or ""] = o
        if opt in _WITH_VALUE and val is not None:
            out += [a, val]     # a value is never taken for an option (-append "... -m ...")
            i += 2
            continue
        out.append(a)
        i += 1
    if local and backend is not None:
        _check_backend(backend, objects)
    if local and backend is None:
        size = ram if ram is not None else DEFAULT_RAM
        extra = memory_args(size)
        if machine_at is not None:
            out[machine_at] = join_opts(split_opts(out[machine_at]) + [("memory-backend", MEM_ID)])
        else:
            extra += ["-machine", f"memory-backend={MEM_ID}"]
        if ram is None:
            extra += ["-m", format_size(size)]
        out = extra + out
    return out


def _object_opts(val: str) -> list[tuple[str, str | None]]:
    """An -object's options, from QEMU's key=value form or its JSON form."""
    if val.lstrip().startswith("{"):
        try:
            obj = json.loads(val)
        except ValueError:
            return []
        if isinstance(obj, dict):
            return [(str(k), "on" if v is True else "off" if v is False else str(v)) for k, v in obj.items()]
        return []
    return split_opts(val)


def _check_backend(backend: str, objects: dict[str, list[tuple[str, str | None]]]) -> None:
    """A guest RAM backend given by the user must be shared: the door maps guest memory."""
    o = objects.get(backend)
    if o is None:
        raise CliError(f"-machine memory-backend={backend}: no -object with id={backend} (a vhost-user disk "
                       "needs guest RAM in a memory-backend-memfd/-file object with share=on)")
    share = dict(o).get("share")
    if share not in ("on", "true", "yes"):
        raise CliError(f"-object {join_opts(o)}: a vhost-user disk needs guest RAM the door can map: add "
                       "share=on (or leave -machine memory-backend out and ovsfs adds one)")


def _local_drive(u: VolumeURI, opts: list[tuple[str, str | None]], node: Node, n: int,
                 check_sockets: bool) -> list[str]:
    dev_id = None
    queues = 1
    for k, v in opts:
        if k == "file":
            continue
        if k == "id":
            dev_id = v
        elif k == "queues":        # ours: the device's num-queues (at most the door's [shm] num_queues)
            if not (v or "").isdigit() or int(v or 0) < 1:
                raise CliError(f"-drive queues={v}: a number >= 1")
            queues = int(v or 1)
            if queues > node.num_queues:
                raise CliError(f"-drive queues={queues}: this node's shm door offers at most "
                               f"{node.num_queues} ([shm] num_queues)")
        elif k == "readonly":
            if v in ("on", "true", "yes", None) and not u.read_only:
                raise CliError(f"{u}: readonly=on needs a snapshot (VOL@SNAP); a vhost-user disk of "
                               "a volume is writable")
        elif k == "if" and v == "none":
            raise CliError(f"{u}: if=none with a separate -device is not translated: ovsfs makes the device "
                           "(vhost-user-blk-pci) itself; write -drive file=openvstorage:VOL,id=ID (the device "
                           "gets that id) and leave out the -device virtio-blk-pci,drive=ID")
        elif k in _DROPPED:
            allowed = _DROPPED[k]
            if allowed is not None and v not in allowed:
                raise CliError(f"{u}: {k}={v} is not possible for a shared-memory disk "
                               f"(vhost-user-blk is {', '.join(sorted(allowed))})")
        else:
            raise CliError(f"{u}: drive option {k!r} is not supported for a shared-memory disk")
    sock = u.socket_path(node.socket_dir)
    if len(os.fsencode(sock)) > UNIX_PATH_MAX:
        raise CliError(f"{u}: its socket path {sock} is {len(os.fsencode(sock))} bytes, more than a unix "
                       f"socket takes ({UNIX_PATH_MAX}): use a shorter volume name or [shm] socket_dir")
    if check_sockets and not sock.exists():
        raise CliError(f"{u}: no shared-memory socket at {sock} (is the daemon running, with the "
                       "shm door enabled, and does the volume exist?)")
    return vhost_args(u, node, n, queues=queues, dev_id=dev_id)


def qemu_args_for(u: VolumeURI, node: Node, *, ram: int = DEFAULT_RAM, queues: int = 1,
                  dev_id: str | None = None) -> list[str]:
    """What `ovsfs qemu-args URI` prints."""
    if u.remote:
        return nbd_drive(u, [("if", "virtio"), ("cache", "none")] + ([("id", dev_id)] if dev_id else []))
    return (memory_args(ram) + ["-machine", f"memory-backend={MEM_ID}", "-m", format_size(ram)]
            + vhost_args(u, node, 0, queues=queues, dev_id=dev_id))


# ---- qemu-img ---------------------------------------------------------------------------------

def translate_qemu_img(argv: list[str], node: Node) -> list[str]:
    """qemu-img arguments with every openvstorage URI as an NBD URI (this node's NBD door for
    local volumes); `-f raw` for our sources, and for a convert into a volume `-n -O raw`."""
    if not argv:
        raise CliError("qemu-img needs a command")
    sub, rest = argv[0], argv[1:]
    ours = [is_uri(a) for a in rest]
    out = [_uri(a).nbd_uri(node.nbd_socket) if mine else a for a, mine in zip(rest, ours)]
    extra: list[str] = []
    if sub == "convert":
        if ours and ours[-1]:
            if "-n" not in rest:
                extra.append("-n")
            if "-O" not in rest:
                extra += ["-O", "raw"]
        if any(ours[:-1]) and "-f" not in rest:
            extra += ["-f", "raw"]
    elif any(ours) and "-f" not in rest and sub in ("info", "map", "compare", "check", "measure", "dd", "bench"):
        extra += ["-f", "raw"]
    return [sub, *extra, *out]


def _ensure_target(args: argparse.Namespace, argv: list[str]) -> bool:
    """`convert ... openvstorage:VOL`: create the volume (the size of the source) if missing;
    True if it was created here. CliError for a snapshot target (read-only)."""
    u = _uri(argv[-1])
    if u.remote:
        return False
    if u.snapshot:
        raise CliError(f"qemu-img convert: {u} is a snapshot, which is read-only; convert into a volume")
    cli = client_for(args)
    if any(v.get("name") == u.volume for v in cli.call("GET", "/volumes")):
        return False
    if args.print:
        return False        # a dry run: the volume would be created with the source's size
    sources = [a for a in argv[1:-1] if not a.startswith("-")]
    if not sources:
        raise CliError("qemu-img convert: no source")
    src = sources[-1]
    src = _uri(src).nbd_uri(node_paths(state_dir(args.state)).nbd_socket) if is_uri(src) else src
    r = subprocess.run(["qemu-img", "info", "--output=json", src], capture_output=True, text=True)
    if r.returncode != 0:
        raise CliError(f"qemu-img info {src}: {r.stderr.strip()}")
    size = int(json.loads(r.stdout)["virtual-size"])
    cli.call("POST", "/volumes", {"name": u.volume, "size": size, "vpool": getattr(args, "vpool", None) or "default"})
    return True


# ---- commands ---------------------------------------------------------------------------------

def cmd_qemu_args(args: argparse.Namespace) -> int:
    u = _uri(args.uri)
    node = node_paths(state_dir(args.state))
    ram = parse_size(args.memory) if args.memory else DEFAULT_RAM
    argv = qemu_args_for(u, node, ram=ram, queues=args.queues, dev_id=args.id)
    print(json.dumps(argv) if args.json else shlex.join(argv))
    return 0


def cmd_qemu(args: argparse.Namespace) -> int:
    qargs = list(args.qemu_args)
    if qargs[:1] == ["--"]:
        qargs = qargs[1:]
    node = node_paths(state_dir(args.state))
    argv = [args.qemu, *translate_qemu(qargs, node, check_sockets=not args.print)]
    if args.print:
        print(json.dumps(argv) if args.json else shlex.join(argv))
        return 0
    return _exec(argv)


def cmd_qemu_img(args: argparse.Namespace) -> int:
    argv = list(args.img_args)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    # argparse leaves our own flags given after the subcommand in argv: qemu-img has no
    # --print / --json, so they are ours wherever they are.
    for flag in ("--print", "--json"):
        if flag in argv:
            argv = [a for a in argv if a != flag]
            setattr(args, flag[2:], True)
    if not argv:
        raise CliError("usage: ovsfs qemu-img create|info|convert|... ARGS (openvstorage: URIs allowed)")
    if argv[0] == "create":
        return _img_create(args, argv[1:])
    node = node_paths(state_dir(args.state))
    created = False
    if argv[0] == "convert" and len(argv) > 2 and is_uri(argv[-1]):
        created = _ensure_target(args, argv)
    full = ["qemu-img", *translate_qemu_img(argv, node)]
    if args.print:
        print(json.dumps(full) if args.json else shlex.join(full))
        return 0
    if not created:
        return _exec(full)
    # A volume made for this convert is deleted again if qemu-img fails: no half copy left.
    rc = subprocess.run(full).returncode
    if rc != 0:
        name = _uri(argv[-1]).volume
        try:
            client_for(args).call("DELETE", f"/volumes/{name}")
        except (OvsfsError, CliError) as e:
            print(f"ovsfs: qemu-img failed; deleting the volume {name} it was converting into failed too: {e}",
                  file=sys.stderr)
        else:
            print(f"ovsfs: qemu-img failed; volume {name}, created for this convert, deleted", file=sys.stderr)
    return rc


def _img_create(args: argparse.Namespace, rest: list[str]) -> int:
    """qemu-img create [-f raw] [-q] [-o vpool=P] openvstorage:VOL SIZE"""
    pos: list[str] = []
    vpool = "default"
    quiet = False
    i = 0
    while i < len(rest):
        a = rest[i]
        if a == "-f" and i + 1 < len(rest):
            if rest[i + 1] != "raw":
                raise CliError(f"qemu-img create: a volume is raw, not {rest[i + 1]}")
            i += 2
            continue
        if a == "-o" and i + 1 < len(rest):
            for k, v in split_opts(rest[i + 1]):
                if k != "vpool" or not v:
                    raise CliError(f"qemu-img create: option {k!r} (only vpool=NAME)")
                vpool = v
            i += 2
            continue
        if a == "-q":
            quiet = True
        elif re.fullmatch(r"-[0-9.]+[A-Za-z]*", a):
            raise CliError(f"qemu-img create: size {a}: a volume's size must be positive")
        elif a.startswith("-"):
            raise CliError(f"qemu-img create: option {a} is not supported for a volume")
        else:
            pos.append(a)
        i += 1
    if len(pos) != 2:
        raise CliError("usage: ovsfs qemu-img create [-f raw] [-o vpool=NAME] openvstorage:VOL SIZE")
    u = _uri(pos[0])
    if u.remote or u.snapshot:
        raise CliError(f"{u}: create a volume on its own node, as openvstorage:VOL")
    try:
        size = parse_size(pos[1])
    except OvsfsError as e:
        raise CliError(f"qemu-img create: {e.message}") from None
    if size <= 0:
        raise CliError(f"qemu-img create: size {pos[1]}: a volume's size must be positive")
    if args.print:
        # A dry run: what would be asked of the management API, nothing created.
        req = {"name": u.volume, "size": size, "vpool": vpool}
        print(json.dumps({"POST": "/volumes", "body": req}) if args.json
              else f"would create volume {u.volume} of {size} bytes in vpool {vpool}")
        return 0
    info = client_for(args).call("POST", "/volumes", {"name": u.volume, "size": size, "vpool": vpool})
    if args.json:
        print(json.dumps(info, indent=2))
    elif not quiet:
        print(f"Formatting '{u}', fmt=raw size={info['size']}")
    return 0


def _exec(argv: list[str]) -> int:
    binary = shutil.which(argv[0]) or argv[0]
    sys.stdout.flush()
    try:
        os.execv(binary, argv)
    except OSError as e:
        raise CliError(f"cannot run {argv[0]}: {e.strerror}") from None
    return 127  # not reached


def register(sub: Any, cmd: Callable[..., argparse.ArgumentParser]) -> None:
    s = cmd(sub, "qemu-args", cmd_qemu_args, "print the stock QEMU arguments for an openvstorage: URI")
    s.add_argument("uri", metavar="URI", help="openvstorage:VOL[@SNAP] or openvstorage+tcp:HOST[:PORT]/VOL[@SNAP]")
    s.add_argument("--memory", metavar="SIZE", help="guest RAM, the shared memfd's size (default 128M, as -m)")
    s.add_argument("--queues", type=int, default=1, help="virtqueues of the device (default 1)")
    s.add_argument("--id", help="device id")
    s = cmd(sub, "qemu", cmd_qemu, "run qemu-system-x86_64 with -drive file=openvstorage:... translated")
    s.add_argument("--qemu", default=os.environ.get("OVSFS_QEMU", "qemu-system-x86_64"),
                   help="the QEMU binary (default: $OVSFS_QEMU or qemu-system-x86_64)")
    s.add_argument("--print", action="store_true", help="print the command instead of running it")
    s.add_argument("qemu_args", nargs=argparse.REMAINDER, metavar="-- QEMU-ARGS")
    s = cmd(sub, "qemu-img", cmd_qemu_img, "qemu-img create|info|convert|... on openvstorage: URIs")
    s.add_argument("--print", action="store_true", help="print the qemu-img command instead of running it")
    s.add_argument("img_args", nargs=argparse.REMAINDER, metavar="COMMAND ARGS")
