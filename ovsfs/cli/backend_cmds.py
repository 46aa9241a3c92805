"""`ovsfs` commands of the erasure-coded backend (presets, ASDs, status, repair) and the
cache and sync commands that work with either backend."""

from __future__ import annotations

import argparse
import socket
from typing import Any, Callable

from ovsfs.cli.client import CliError, q
from ovsfs.cli.common import client_for, out, size_arg
from ovsfs.cli.output import Progress, print_table
from ovsfs.mgmt.units import format_size

Cmd = Callable[[Any, str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def _human(n: int) -> str:
    """1.5G rather than format_size's exact 1572864K: capacities are rarely round."""
    for unit, mult in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= mult:
            return f"{n / mult:.1f}{unit}"
    return str(n)


def _policies(p: dict[str, Any]) -> str:
    return ", ".join(f"({','.join(map(str, pol))})" for pol in p["policies"])


# ---- ASD daemon ---------------------------------------------------------------------------

def cmd_asd_serve(args: argparse.Namespace) -> int:
    from ovsfs.backend import asd

    # Runs in this process, not through the node daemon: an ASD is its own service.
    return asd.main(["--path", args.path, "--listen", args.listen, "--node", args.node])


# ---- presets ------------------------------------------------------------------------------

def cmd_preset_create(args: argparse.Namespace) -> int:
    body = {"name": args.name, "policies": args.policy, "max_fragment_size": size_arg(args.fragment_size),
            "compression": args.compression, "encryption": args.encryption}
    rec = client_for(args).call("POST", "/presets", body)
    out(args, rec, lambda r: print(f"created preset {r['name']}: policies {_policies(r)}"))
    return 0


def cmd_preset_list(args: argparse.Namespace) -> int:
    presets = client_for(args).call("GET", "/presets")
    out(args, presets, lambda ps: print_table(
        ps, [("NAME", lambda p: p["name"] + (" *" if p["active"] else "")), ("POLICIES", _policies),
             ("FRAGMENT", lambda p: format_size(p["max_fragment_size"])),
             ("COMPRESSION", "compression"), ("ENCRYPTION", "encryption")]))
    return 0


def cmd_preset_show(args: argparse.Namespace) -> int:
    p = client_for(args).call("GET", f"/presets/{q(args.name)}")

    def human(p: dict[str, Any]) -> None:
        print(f"name:          {p['name']}" + ("  (the proxy writes with it)" if p["active"] else ""))
        print(f"policies:      {_policies(p)}  (k,m,c,x; the first one the live ASDs fit is used)")
        print(f"fragment size: up to {format_size(p['max_fragment_size'])}")
        print(f"compression:   {p['compression']}")
        print(f"encryption:    {p['encryption']}")

    out(args, p, human)
    return 0


def cmd_preset_explain(args: argparse.Namespace) -> int:
    size = size_arg(args.object_size)
    res = client_for(args).call("GET", f"/presets/{q(args.name)}/explain?object_size={size}")

    def human(r: dict[str, Any]) -> None:
        k = r["data_fragments_per_chunk"]
        m = r["fragments_per_chunk"] - k
        sizes = " / ".join(format_size(s) for s in r["fragment_sizes"]) or "-"
        print(f"preset:     {r['preset']}, policy {r['policy']}"
              + (f" (with the live ASDs: {r['live_policy']})" if r.get("live_policy") not in (None, r["policy"])
                 else "" if r.get("live_policy") else " (the live ASDs fit none of its policies)"))
        print(f"object:     {format_size(r['object_size'])}")
        print(f"chunks:     {r['chunks']} of up to {format_size(r['chunk_size'])}")
        print(f"fragments:  {k} data + {m} parity per chunk, {sizes} each ({r['fragments']} in all)")
        print(f"stored:     {format_size(r['stored_bytes'])} on the ASDs ({r['overhead']}x the object)"
              + (f"; {r['note']}" if r.get("note") else ""))
        print(f"metadata:   {r['metadata_bytes']} bytes per object (manifest, kept on "
              f"{r['manifest_replicas']} ASDs)")

    out(args, res, human)
    return 0


# ---- backend ------------------------------------------------------------------------------

def _asd_state(a: dict[str, Any]) -> str:
    if a["draining"]:
        return "draining"
    if a["up"]:
        return "up"
    why = (a.get("local") or {}).get("error") or ("never answered" if a.get("never_answered") else "")
    return f"DOWN ({why})" if why else "DOWN"


def cmd_backend_status(args: argparse.Namespace) -> int:
    st = client_for(args, 60).call("GET", "/backend")

    def human(st: dict[str, Any]) -> None:
        p = st["preset"]
        fc = st["fragment_cache"]
        print(f"ASDs:           {st['asds_up']} up, {st['asds_down']} down")
        print(f"capacity:       {_human(st['capacity'])}, {_human(st['free'])} free")
        print(f"objects:        {st['objects']} in {st['namespaces']} namespaces, "
              f"{st['degraded_objects']} degraded")
        print(f"rebuilt:        {st['fragments_rebuilt']} fragments since the daemon started")
        if "index_complete" in st:
            print("index:          " + ("complete" if st["index_complete"] else
                                        "INCOMPLETE: ASDs that did not answer yet are merged when they do")
                  + (f"; {st['tombstones']} tombstones" if st.get("tombstones") else ""))
        print(f"preset:         {p['name']} {_policies(p)}, fragments up to {format_size(p['max_fragment_size'])}, "
              f"compression {p['compression']}, encryption {p['encryption']}")
        print(f"fragment cache: {_human(fc['bytes'])} of "
              f"{format_size(fc['capacity'])} ({fc['fragments']} fragments)")
        print()
        print_table(st["asds"], [
            ("ID", lambda a: a["asd_id"][:12] or "?"), ("ADDRESS", "addr"), ("NODE", "node"),
            ("STATE", _asd_state),
            ("FRAGMENTS", "fragments_placed"),
            ("USED", lambda a: _human(a["used"]) if a.get("used") else ("0" if a["up"] else "-"))])

    out(args, st, human)
    return 0


def cmd_backend_repair(args: argparse.Namespace) -> int:
    with Progress("backend repair", unit="objects") as progress:
        res = client_for(args).stream("POST", "/backend/repair", {}, progress)
    out(args, res, lambda r: print(
        f"repair done: {r['fragments_rebuilt']} fragments rebuilt, {r['objects']} objects"
        + ("; full redundancy" if r["full_redundancy"] else "")))
    if not res["full_redundancy"]:
        failed = res["failed"]
        raise CliError(f"{len(failed)} objects are still degraded, e.g. {failed[0]}")
    return 0


def cmd_backend_gc(args: argparse.Namespace) -> int:
    body = {} if args.grace is None else {"grace": args.grace}
    with Progress("backend gc", unit="ASDs") as progress:
        res = client_for(args).stream("POST", "/backend/gc", body, progress)
    out(args, res, lambda r: print(
        f"gc done: {r['fragments_removed']} fragments and {r['records_removed']} stale manifest copies "
        f"removed, {r['tombstones_collected']} tombstones collected, {r['tombstones_left']} kept"
        + (f"; skipped (down): {', '.join(r['asds_skipped'])}" if r["asds_skipped"] else "")))
    return 0


def cmd_backend_asd_add(args: argparse.Namespace) -> int:
    res = client_for(args).call("POST", "/backend/asds", {"addr": args.addr})
    out(args, res, lambda r: print(f"added ASD {r['asd_id']} at {r['addr']} (node {r['node']})"))
    return 0


def cmd_backend_asd_remove(args: argparse.Namespace) -> int:
    with Progress(f"drain {args.id}", unit="objects") as progress:
        res = client_for(args).stream("DELETE", f"/backend/asds/{q(args.id)}", None, progress)
    out(args, res, lambda r: print(f"removed ASD {r['asd']}: {r['fragments_moved']} fragments of "
                                   f"{r['objects']} objects moved"))
    return 0


# ---- with either backend ------------------------------------------------------------------

def cmd_volume_sync(args: argparse.Namespace) -> int:
    res = client_for(args).call("POST", f"/volumes/{q(args.name)}/sync")
    out(args, res, lambda r: print(f"volume {r['volume']} is on the backend ({r['seconds']:.2f} s)"))
    return 0


def cmd_cache_drop(args: argparse.Namespace) -> int:
    res = client_for(args).call("POST", "/cache/drop")
    out(args, res, lambda r: print(
        f"freed {r['freed_bytes']} bytes: {r['write_buffer_bytes']} of cached SCOs, "
        f"{r['fragment_cache_bytes']} of cached fragments"))
    return 0


# ---- parser -------------------------------------------------------------------------------

def register(sub: Any, volume_sub: Any, cmd: Cmd) -> None:
    """Add these commands to the top-level parser (`sub`) and to `ovsfs volume`."""
    s = cmd(volume_sub, "sync", cmd_volume_sync, "return once everything written to a volume is on the backend")
    s.add_argument("name")

    ca = sub.add_parser("cache", help="local caches").add_subparsers(dest="action", required=True, metavar="ACTION")
    cmd(ca, "drop", cmd_cache_drop, "drop cached SCOs and fragments (data on the backend stays)")

    a = sub.add_parser("asd", help="run an ASD").add_subparsers(dest="action", required=True, metavar="ACTION")
    s = cmd(a, "serve", cmd_asd_serve, "serve one disk (a directory) as an ASD, in the foreground")
    s.add_argument("--path", required=True, help="directory holding this ASD's fragments")
    s.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0 picks a free one)")
    s.add_argument("--node", default=socket.gethostname(), help="storage node this disk belongs to")

    pr = sub.add_parser("preset", help="backend presets").add_subparsers(dest="action", required=True,
                                                                        metavar="ACTION")
    s = cmd(pr, "create", cmd_preset_create, "create a preset")
    s.add_argument("name")
    s.add_argument("--policy", action="append", required=True, metavar="K,M,C,X",
                   help="k data + m parity fragments, ack after c, at most x per node; repeat for fallbacks")
    s.add_argument("--fragment-size", default="4M", help="max fragment size (default 4M)")
    s.add_argument("--compression", choices=["none", "zstd", "lz4"], default="none")
    s.add_argument("--encryption", choices=["none", "aes-256-gcm"], default="none")
    cmd(pr, "list", cmd_preset_list, "list presets (* = the one the proxy writes with)")
    s = cmd(pr, "show", cmd_preset_show, "show a preset")
    s.add_argument("name")
    s = cmd(pr, "explain", cmd_preset_explain, "what storing one object costs under a preset")
    s.add_argument("name")
    s.add_argument("--object-size", required=True, help="e.g. 64M (an SCO's size)")

    b = sub.add_parser("backend", help="the erasure-coded backend").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    cmd(b, "status", cmd_backend_status, "ASDs up/down, capacity, objects, degraded objects")
    cmd(b, "repair", cmd_backend_repair, "rebuild now until every object has full redundancy")
    s = cmd(b, "gc", cmd_backend_gc, "delete what ASDs hold for deleted or replaced objects, and orphans")
    s.add_argument("--grace", type=float, default=None, metavar="SECONDS",
                   help="spare orphaned fragments younger than this (default: backend.gc_grace)")
    ba = b.add_parser("asd", help="add or remove ASDs").add_subparsers(dest="asd_action", required=True,
                                                                       metavar="ACTION")
    s = cmd(ba, "add", cmd_backend_asd_add, "attach a running ASD (new fragments go to it first)")
    s.add_argument("addr", metavar="HOST:PORT")
    s = cmd(ba, "remove", cmd_backend_asd_remove, "drain an ASD (I/O continues), then forget it")
    s.add_argument("id", metavar="ID", help="ASD id (or a 6+ character prefix) or HOST:PORT")
