"""A cluster on one machine, for demos and trying things: etcd members, N node daemons.

    .venv/bin/python tools/cluster.py start DIR [--nodes 3] [--etcd 3] [--dtl sync|async|none]
    .venv/bin/python tools/cluster.py stop DIR

Node i gets the state directory DIR/n<i>, failure domain fd<i>, its management socket at
DIR/n<i>/run/ovsfs.sock, NBD at DIR/n<i>/run/nbd.sock and 127.0.0.1:10810+i, the DTL on
127.0.0.1:10830+i and the node-to-node management API on 127.0.0.1:10850+i (`--base-port`
moves them all). The nodes share one local-directory backend, DIR/backend (the one backend
that every node on one machine sees at the same path; on several machines use the
erasure-coded backend over ASDs). Processes are recorded in DIR/pids.json and stopped by
PID; `stop` keeps every state directory, so `start` again brings the same cluster back.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ovsfs.cluster.etcd_launch import EtcdCluster  # noqa: E402

OVSFS = str(Path(sys.executable).with_name("ovsfs"))


def node_toml(dir: Path, i: int, urls: list[str], base: int, dtl_mode: str) -> str:
    return f"""\
# node n{i} of the demo cluster in {dir} (tools/cluster.py)
state_dir = "{dir / f'n{i}'}"

[node]
name = "n{i}"

[backend]
kind = "local"
path = "{dir / 'backend'}"

[nbd]
socket = "run/nbd.sock"
tcp_port = {base + i}

[fuse]
enabled = false

[cluster]
etcd = {json.dumps(urls)}
failure_domain = "fd{i}"
mgmt_port = {base + 40 + i}

[dtl]
port = {base + 20 + i}
mode = "{dtl_mode}"
"""


def start(args: argparse.Namespace) -> int:
    dir = Path(args.dir).absolute()
    dir.mkdir(parents=True, exist_ok=True)
    pids_file = dir / "pids.json"
    if pids_file.exists():
        print(f"{dir} has a running cluster (pids.json): stop it first", file=sys.stderr)
        return 1
    etcd = EtcdCluster(dir / "etcd", members=args.etcd, base_port=args.base_port + 60)
    etcd.start()
    pids = {}
    for i in range(1, args.nodes + 1):
        conf = dir / f"n{i}" / "ovsfs.toml"
        conf.parent.mkdir(parents=True, exist_ok=True)
        if not conf.exists():
            conf.write_text(node_toml(dir, i, etcd.urls, args.base_port, args.dtl))
        with open(dir / f"n{i}.log", "ab") as log:
            p = subprocess.Popen([OVSFS, "daemon", "--config", str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        pids[f"n{i}"] = p.pid
    pids_file.write_text(json.dumps(pids))
    deadline = time.monotonic() + 60
    for name in pids:
        sock = dir / name / "run" / "ovsfs.sock"
        while not sock.exists():
            if time.monotonic() > deadline:
                print(f"{name} did not start: see {dir / (name + '.log')}", file=sys.stderr)
                return 1
            time.sleep(0.2)
    print(f"cluster of {args.nodes} nodes in {dir}, etcd {' '.join(etcd.urls)}")
    for name in pids:
        print(f"  {name}: ovsfs --state {dir / name} ...   (log {dir / (name + '.log')})")
    return 0


def stop(args: argparse.Namespace) -> int:
    dir = Path(args.dir).absolute()
    pids_file = dir / "pids.json"
    pids = json.loads(pids_file.read_text()) if pids_file.exists() else {}
    for pid in pids.values():
        for sig in (signal.SIGCONT, signal.SIGTERM):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 60
    for pid in pids.values():
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            if not Path(f"/proc/{pid}/status").exists() or "State:\tZ" in Path(f"/proc/{pid}/status").read_text():
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
    pids_file.unlink(missing_ok=True)
    if (dir / "etcd").exists():
        EtcdCluster.load(dir / "etcd").stop()
    print(f"stopped the cluster in {dir}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start")
    s.add_argument("dir")
    s.add_argument("--nodes", type=int, default=3)
    s.add_argument("--etcd", type=int, default=3, help="etcd members (1 or 3)")
    s.add_argument("--dtl", default="sync", choices=["none", "async", "sync"], help="default DTL mode")
    s.add_argument("--base-port", type=int, default=10810)
    s.set_defaults(fn=start)
    s = sub.add_parser("stop")
    s.add_argument("dir")
    s.set_defaults(fn=stop)
    args = p.parse_args()
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
