"""`ovsfs`: run the node daemon, or manage it over its unix socket."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ovsfs.cli import backend_cmds, cluster_cmds, qemu_cmds
from ovsfs.cli.client import CliError, q, state_dir
from ovsfs.cli.common import client_for as _client
from ovsfs.cli.common import out as _out
from ovsfs.cli.common import size_arg as _size
from ovsfs.cli.output import Progress, print_info, print_table
from ovsfs.mgmt.units import format_size


def _snapref(text: str) -> tuple[str, str]:
    vol, sep, snap = text.partition("@")
    if not sep or not vol or not snap:
        raise CliError(f"{text!r} does not name a snapshot: use VOLUME@SNAPSHOT")
    return vol, snap


# ---- daemon ---------------------------------------------------------------------------------

def cmd_daemon(args: argparse.Namespace) -> int:
    from ovsfs import daemon

    return daemon.main(Path(args.config), state_dir(args.state), embedded=False)


def cmd_run(args: argparse.Namespace) -> int:
    from ovsfs import daemon

    return daemon.main(None, state_dir(args.state), embedded=True, asds=args.asds)


# ---- node -----------------------------------------------------------------------------------

def cmd_status(args: argparse.Namespace) -> int:
    st = _client(args, 30).call("GET", "/status")

    def human(st: dict[str, Any]) -> None:
        eng = st["engine"]
        print(f"node:        {st['node']} (pid {st['pid']}, up {st['uptime']:.0f} s)")
        print(f"state:       {st['state_dir']}")
        print(f"socket:      {st['mgmt_socket']}")
        print(f"vPools:      {eng['vpools']}")
        print(f"volumes:     {eng['volumes']}")
        for f in eng.get("failed_volumes", []):
            print(f"failed:      {f['name']} (not opened: {f['reason']})"
                  + (f"; {f['hint']}" if f.get("hint") else ""))
        print("doors:       " + ", ".join(f"{k} {v}" for k, v in st["doors"].items()))
        print(f"map:         {eng['map_resident_bytes']} bytes resident, {eng['map_stored_bytes']} stored")
        wb = eng.get("write_buffer") or {}
        if "limit" in wb:
            print("write buffer: " + _write_buffer_line(wb))
        if "queued" in wb:
            print(f"uploads:     {wb['queued']} queued, {wb['upload_errors']} failed tries")
            for name, lane in sorted(wb.get("lanes", {}).items()):
                line = f"  {name}: {lane['queued']} queued, {lane['errors']} failed tries"
                if lane["last_error"]:
                    ago = max(0.0, time.time() - lane["last_error_at"])
                    line += f"; last error {ago:.0f} s ago: {lane['last_error']}"
                print(line)

    _out(args, st, human)
    return 0


def _write_buffer_line(wb: dict[str, Any]) -> str:
    """How full the write buffer is and who waits for it: a full buffer with writers
    waiting is what a backend that went away looks like from here."""
    used = int(wb["pending_bytes"]) + int(wb.get("local_meta_bytes", 0))
    line = f"{format_size(used)} of {format_size(int(wb['limit']))} used"
    if wb.get("cached_bytes"):
        line += f" (+{format_size(int(wb['cached_bytes']))} uploaded, kept as cache)"
    waiting = int(wb.get("waiting_writers", 0))
    if waiting:
        why = "backend away?" if wb.get("upload_errors") else "uploads behind?"
        line += f", {waiting} writer{'s' if waiting != 1 else ''} waiting for room ({why})"
    return line


def cmd_scrub(args: argparse.Namespace) -> int:
    res = _client(args).call("POST", "/scrub", {"volume": args.volume} if args.volume else {})
    _out(args, res, lambda rs: print_table(
        rs, [("VOLUME", "volume"), ("LIVE_CLUSTERS", "live_clusters"), ("DELETED_SCOS", "deleted_scos"),
             ("REWRITTEN_SCOS", "rewritten_scos"), ("FREED", lambda r: format_size(r["freed_bytes"]))]))
    return 0


# ---- vPools ---------------------------------------------------------------------------------

def cmd_vpool_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name}
    if args.sco_clusters:
        body["sco_clusters"] = args.sco_clusters
    if args.preset:
        body["preset"] = args.preset
    rec = _client(args).call("POST", "/vpools", body)
    _out(args, rec, lambda r: print(f"created vPool {r['name']}"
                                    + (f" with preset {r['preset']}" if r.get("preset") else "")))
    return 0


def cmd_vpool_list(args: argparse.Namespace) -> int:
    pools = _client(args).call("GET", "/vpools")
    _out(args, pools, lambda ps: print_table(
        ps, [("NAME", "name"), ("CLUSTER", lambda p: format_size(p["cluster_size"])),
             ("SCO", lambda p: format_size(p["sco_clusters"] * p["cluster_size"])),
             ("PRESET", lambda p: p.get("preset") or "-"), ("VOLUMES", "volumes")]))
    return 0


# ---- volumes --------------------------------------------------------------------------------

def _volume_state(v: dict[str, Any]) -> str:
    if v.get("state") == "failed":
        return f"failed: {v['reason']}" + (f"; {v['hint']}" if v.get("hint") else "")
    if v.get("state") == "remote":
        return f"on {v.get('owner') or '?'}"
    if v.get("fenced"):
        return "fenced"
    dtl = (v.get("dtl") or {}).get("state")
    return f"ok (DTL {dtl})" if dtl and dtl not in ("ok", "standalone") else "ok"


VOLUME_COLUMNS = [("NAME", "name"), ("VPOOL", "vpool"), ("SIZE", lambda v: format_size(v["size"])),
                  ("SNAPSHOTS", "snapshots"), ("PARENT", lambda v: v["parent"] or "-"),
                  ("STATE", _volume_state)]


def cmd_volume_create(args: argparse.Namespace) -> int:
    info = _client(args).call("POST", "/volumes", {"name": args.name, "size": _size(args.size), "vpool": args.vpool})
    _out(args, info, lambda i: print(f"created volume {i['name']} ({format_size(i['size'])}) in vPool {i['vpool']}"))
    return 0


def cmd_volume_list(args: argparse.Namespace) -> int:
    url = "/volumes" + (f"?vpool={q(args.vpool)}" if args.vpool else "")
    vols = _client(args).call("GET", url)
    _out(args, vols, lambda vs: print_table(vs, VOLUME_COLUMNS))
    return 0


def cmd_volume_info(args: argparse.Namespace) -> int:
    info = _client(args).call("GET", f"/volumes/{q(args.name)}")

    def human(i: dict[str, Any]) -> None:
        print_info({k: v for k, v in i.items() if k != "dtl"})
        cluster_cmds.dtl_lines(i)
    _out(args, info, human)
    return 0


def cmd_volume_resize(args: argparse.Namespace) -> int:
    info = _client(args).call("PATCH", f"/volumes/{q(args.name)}", {"size": _size(args.size)})
    _out(args, info, lambda i: print(f"resized volume {i['name']} to {format_size(i['size'])}"))
    return 0


def cmd_volume_delete(args: argparse.Namespace) -> int:
    res = _client(args).call("DELETE", f"/volumes/{q(args.name)}")
    _out(args, res, lambda r: print(f"deleted volume {args.name}"))
    return 0


def cmd_volume_rename(args: argparse.Namespace) -> int:
    info = _client(args).call("PATCH", f"/volumes/{q(args.name)}", {"name": args.new})
    _out(args, info, lambda i: print(f"renamed volume {args.name} to {i['name']}"))
    return 0


def cmd_volume_clone(args: argparse.Namespace) -> int:
    vol, snap = _snapref(args.source)
    body = {"name": args.new, "vpool": args.vpool}
    info = _client(args).call("POST", f"/volumes/{q(vol)}/snapshots/{q(snap)}/clone", body)
    _out(args, info, lambda i: print(f"cloned {args.source} as volume {i['name']}"))
    return 0


def cmd_volume_import(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.file)
    with Progress(f"import {args.name}") as progress:
        res = _client(args).stream("POST", f"/volumes/{q(args.name)}/import",
                                   {"path": path, "vpool": args.vpool}, progress)
    _out(args, res, lambda r: print(
        f"imported {r['file']} into {'new ' if r['created'] else ''}volume {r['volume']}: "
        f"{format_size(r['written'])} written, {format_size(r['skipped'])} of zeros skipped"))
    return 0


def cmd_volume_export(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.file)
    what = f"{args.name}@{args.snapshot}" if args.snapshot else args.name
    with Progress(f"export {what}") as progress:
        res = _client(args).stream("POST", f"/volumes/{q(args.name)}/export",
                                   {"path": path, "snapshot": args.snapshot}, progress)
    _out(args, res, lambda r: print(f"exported {what} to {r['file']}: {format_size(r['bytes'])}, "
                                    f"{format_size(r['written'])} of data"))
    return 0


# ---- snapshots ------------------------------------------------------------------------------

def cmd_snapshot_create(args: argparse.Namespace) -> int:
    rec = _client(args).call("POST", f"/volumes/{q(args.volume)}/snapshots", {"name": args.snapshot})
    _out(args, rec, lambda r: print(f"created snapshot {args.volume}@{r['name']}"))
    return 0


def cmd_snapshot_list(args: argparse.Namespace) -> int:
    snaps = _client(args).call("GET", f"/volumes/{q(args.volume)}/snapshots")
    _out(args, snaps, lambda ss: print_table(
        ss, [("NAME", "name"), ("EPOCH", "epoch"), ("SIZE", lambda s: format_size(s["size"])),
             ("CREATED", lambda s: _when(s.get("created"))),
             ("HELD BY", lambda s: ", ".join(s.get("holders") or []) or "-")]))
    return 0


def _when(t: float | None) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def cmd_snapshot_delete(args: argparse.Namespace) -> int:
    res = _client(args).call("DELETE", f"/volumes/{q(args.volume)}/snapshots/{q(args.snapshot)}")
    _out(args, res, lambda r: print(f"deleted snapshot {args.volume}@{args.snapshot}"))
    return 0


def cmd_snapshot_rollback(args: argparse.Namespace) -> int:
    info = _client(args).call("POST", f"/volumes/{q(args.volume)}/snapshots/{q(args.snapshot)}/rollback")
    _out(args, info, lambda i: print(f"rolled {args.volume} back to snapshot {args.snapshot}"))
    return 0


# ---- parser ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    # SUPPRESS keeps a sub-command's unset option from overwriting one given before the sub-command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state", metavar="DIR", default=argparse.SUPPRESS,
                        help="state directory of the node (default: $OVSFS_STATE or ./var)")
    common.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS,
                        help="the daemon's management socket (default: $OVSFS_SOCKET, else from the state directory)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")

    p = argparse.ArgumentParser(prog="ovsfs", parents=[common],
                                description="ovsfs: distributed block storage (node daemon and its CLI)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(parent: Any, name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sp = parent.add_parser(name, parents=[common], help=help, description=help)
        sp.set_defaults(func=fn)
        return sp

    d = cmd(sub, "daemon", cmd_daemon, "run the node daemon with a config file (the systemd service)")
    d.add_argument("--config", required=True, metavar="FILE", help="node configuration (TOML)")
    r = cmd(sub, "run", cmd_run, "run the embedded single-node daemon (writes DIR/ovsfs.toml on first start)")
    # Where a second node on the same machine picks its own ports (the start names the key).
    r.epilog = ("Ports and paths come from DIR/ovsfs.toml: e.g. [nbd] tcp_port = 10810 (0: no NBD over "
                "TCP) when another node already listens on the default port 10809.")
    r.add_argument("--asds", type=int, metavar="N",
                   help="erasure-coded backend over N local ASD processes (disks at DIR/asd/0..N-1)")
    cmd(sub, "status", cmd_status, "show the daemon's status")
    s = cmd(sub, "scrub", cmd_scrub, "reclaim garbage of one volume or of all")
    s.add_argument("volume", nargs="?")

    vp = sub.add_parser("vpool", help="manage vPools").add_subparsers(dest="action", required=True, metavar="ACTION")
    s = cmd(vp, "create", cmd_vpool_create, "create a vPool")
    s.add_argument("name")
    s.add_argument("--sco-clusters", type=int, help="clusters per SCO (default from the config)")
    s.add_argument("--preset", help="backend preset of the vPool (asd backend)")
    cmd(vp, "list", cmd_vpool_list, "list vPools")

    vo = sub.add_parser("volume", help="manage volumes").add_subparsers(dest="action", required=True, metavar="ACTION")
    s = cmd(vo, "create", cmd_volume_create, "create a thin volume")
    s.add_argument("name")
    s.add_argument("--size", required=True, help="logical size, e.g. 10G (K/M/G/T are binary)")
    s.add_argument("--vpool", default="default")
    s = cmd(vo, "list", cmd_volume_list, "list volumes")
    s.add_argument("--vpool")
    s = cmd(vo, "info", cmd_volume_info, "show a volume")
    s.add_argument("name")
    s = cmd(vo, "resize", cmd_volume_resize, "grow or shrink a volume (never below written data)")
    s.add_argument("name")
    s.add_argument("size")
    s = cmd(vo, "delete", cmd_volume_delete, "delete a volume and its snapshots")
    s.add_argument("name")
    s = cmd(vo, "rename", cmd_volume_rename, "rename a volume")
    s.add_argument("name")
    s.add_argument("new")
    s = cmd(vo, "clone", cmd_volume_clone, "create a volume from a snapshot (VOLUME@SNAPSHOT)")
    s.add_argument("source", metavar="VOLUME@SNAPSHOT")
    s.add_argument("new")
    s.add_argument("--vpool")
    s = cmd(vo, "import", cmd_volume_import, "copy a raw image file into a volume (created if missing)")
    s.add_argument("name")
    s.add_argument("file")
    s.add_argument("--vpool", help="vPool of a volume the import creates (default: default)")
    s = cmd(vo, "export", cmd_volume_export, "copy a volume to a sparse raw image file")
    s.add_argument("name")
    s.add_argument("file")
    s.add_argument("--snapshot", help="export this snapshot instead of the live volume")

    sn = sub.add_parser("snapshot", help="manage snapshots").add_subparsers(dest="action", required=True,
                                                                          metavar="ACTION")
    for name, fn, help in [("create", cmd_snapshot_create, "take a snapshot"),
                           ("delete", cmd_snapshot_delete, "delete a snapshot"),
                           ("rollback", cmd_snapshot_rollback, "roll a volume back to a snapshot")]:
        s = cmd(sn, name, fn, help)
        s.add_argument("volume")
        s.add_argument("snapshot")
    s = cmd(sn, "list", cmd_snapshot_list, "list a volume's snapshots")
    s.add_argument("volume")
    backend_cmds.register(sub, vo, cmd)
    cluster_cmds.register(sub, vp, vo, cmd)
    qemu_cmds.register(sub, cmd)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.state = getattr(args, "state", None)
    args.json = getattr(args, "json", False)
    args.socket = getattr(args, "socket", None)
    try:
        rc = args.func(args)
    except CliError as e:
        print(f"ovsfs: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ovsfs: error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into something that stopped reading (| head): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return rc


if __name__ == "__main__":
    sys.exit(main())
