"""`ovsfs` commands of a cluster: cluster status, node list, volume move / restart, DTL modes.

They talk to the local node's daemon like every command; the daemon reaches the other
nodes (ovsfs/member/).
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

from ovsfs.cli.client import q
from ovsfs.cli.common import client_for, out
from ovsfs.cli.output import print_table
from ovsfs.mgmt.units import format_size

Cmd = Callable[[Any, str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]

# Moves and restarts wait for uploads (a whole write buffer, at worst) and another node.
LONG = 3600.0

NODE_COLUMNS = [("NAME", "name"), ("ALIVE", lambda n: "yes" if n.get("alive") else "NO"),
                ("DOMAIN", lambda n: n.get("failure_domain") or "-"), ("MGMT", lambda n: n.get("mgmt") or "-"),
                ("DTL", lambda n: n.get("dtl") or "-"), ("NBD", lambda n: n.get("nbd") or "-"),
                ("VOLUMES", lambda n: n.get("volumes", "-"))]


def cmd_cluster_status(args: argparse.Namespace) -> int:
    st = client_for(args, 30).call("GET", "/cluster")

    def human(st: dict[str, Any]) -> None:
        print(f"node:      {st['node']} (failure domain {st.get('failure_domain') or '-'})")
        print(f"etcd:      {', '.join(st['etcd'])} (prefix {st['prefix']}): {st['etcd_state']}")
        alive = sum(1 for n in st["nodes"] if n.get("alive"))
        print(f"nodes:     {alive} of {len(st['nodes'])} alive")
        print(f"volumes:   {st['volumes']} ({st['owned']} owned here)")
        for v in st.get("attention", []):
            print(f"attention: {v}")
        print()
        print_table(st["nodes"], NODE_COLUMNS)
    out(args, st, human)
    return 0


def cmd_node_list(args: argparse.Namespace) -> int:
    out(args, client_for(args, 30).call("GET", "/nodes"), lambda ns: print_table(ns, NODE_COLUMNS))
    return 0


def _timed(args: argparse.Namespace, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    start = time.monotonic()
    res = client_for(args, LONG).call(method, path, body)
    res.setdefault("seconds", round(time.monotonic() - start, 3))
    return res


def cmd_volume_move(args: argparse.Namespace) -> int:
    res = _timed(args, "POST", f"/volumes/{q(args.name)}/move", {"node": args.node})
    out(args, res, lambda r: print(f"moved volume {args.name} to {r['node']} (owner generation "
                                   f"{r['gen']}) in {r['seconds']:.1f} s"))
    return 0


def cmd_volume_restart(args: argparse.Namespace) -> int:
    res = _timed(args, "POST", f"/volumes/{q(args.name)}/restart", {"on": args.on, "force": args.force})

    def human(r: dict[str, Any]) -> None:
        print(f"restarted volume {args.name} on {r['node']} (owner generation {r['gen']}, "
              f"{r['dtl_entries']} DTL entries replayed) in {r['seconds']:.1f} s")
        if r.get("may_be_lost"):
            print(f"warning: {r['may_be_lost']}")
    out(args, res, human)
    return 0


def cmd_volume_dtl(args: argparse.Namespace) -> int:
    res = client_for(args, 60).call("PUT", f"/volumes/{q(args.name)}/dtl", {"mode": args.mode})
    out(args, res, lambda r: print(f"volume {args.name}: DTL mode {r['mode']}"
                                   + (" (the vPool's)" if r.get("inherited") else "")
                                   + f"; its owner {r.get('owner') or '-'} applies it within "
                                     f"{r['applies_within']} s"))
    return 0


def cmd_vpool_dtl(args: argparse.Namespace) -> int:
    res = client_for(args, 60).call("PUT", f"/vpools/{q(args.name)}/dtl", {"mode": args.mode})
    out(args, res, lambda r: print(f"vPool {args.name}: default DTL mode {r['mode']}; the owners of its "
                                   f"volumes apply it within {r['applies_within']} s"))
    return 0


def dtl_lines(info: dict[str, Any]) -> None:
    """The DTL part of `volume info` (a volume served by this node)."""
    d = info.get("dtl") or {}
    print(f"dtl mode:        {d.get('mode', 'none')}")
    print(f"dtl peer:        {d.get('peer') or '-'}")
    print(f"dtl state:       {d.get('state', 'standalone')}")
    print(f"not yet safe:    {format_size(int(d.get('unsafe_bytes') or 0))} (acknowledged, only on this node)")


def register(sub: Any, vp: Any, vo: Any, cmd: Cmd) -> None:
    cl = sub.add_parser("cluster", help="the cluster this node is in").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    cmd(cl, "status", cmd_cluster_status, "show the cluster: etcd, nodes, ownership")
    no = sub.add_parser("node", help="nodes of the cluster").add_subparsers(dest="action", required=True,
                                                                          metavar="ACTION")
    cmd(no, "list", cmd_node_list, "list the nodes of the cluster")
    s = cmd(vo, "move", cmd_volume_move, "hand a volume over to another node (flush, upload, release, open there)")
    s.add_argument("name")
    s.add_argument("node")
    s = cmd(vo, "restart", cmd_volume_restart,
            "take a volume from a dead or unreachable owner: open it on NODE from the backend and the DTL")
    s.add_argument("name")
    s.add_argument("--on", required=True, metavar="NODE", help="the node that serves the volume from now on")
    s.add_argument("--force", action="store_true",
                   help="also when the DTL is not in sync (writes acknowledged since may be lost)")
    s = cmd(vo, "dtl", cmd_volume_dtl, "set a volume's DTL mode (default: the vPool's)")
    s.add_argument("name")
    s.add_argument("mode", choices=["none", "async", "sync", "default"])
    s = cmd(vp, "dtl", cmd_vpool_dtl, "set a vPool's default DTL mode")
    s.add_argument("name")
    s.add_argument("mode", choices=["none", "async", "sync"])
