#!/usr/bin/env python3
"""fio through NBD: ovsfs against qemu-nbd (raw) and qemu-storage-daemon (qcow2), same
disk, same run, runs alternated.

    .venv/bin/python tools/bench_nbd.py [--dir DIR] [--size 1G] [--runtime 8] [--jobs a,b]

Targets (all served at once, each over a unix socket, files in the same directory):
  ovsfs       the real Engine and NBD door in their own process (this script, --serve)
  nbd-raw     qemu-nbd on a fully allocated raw file (a raw file's steady state)
  nbd-sparse  qemu-nbd on a new sparse raw file: recreated before every write run
              (reads are not measured on it: they would read holes)
  qsd-qcow2   qemu-storage-daemon on a qcow2 file
ovsfs, nbd-raw and qsd-qcow2 are first filled with a sequential write so reads find data.

Jobs: 4 KiB random write and read at QD1 and QD32, 1 MiB sequential write and read (QD8).
Each job runs on every target in the order A B C D, then D C B A (noisy machines: the
drift cancels out); every run is printed, then a table of means and ratios ovsfs / peer,
and the issue-10 targets with met / not met. Every process it starts is stopped by PID
and the work directory is removed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SYS_ENV = {**os.environ, "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
JOBS = [  # name, rw, bs, iodepth
    ("4k randwrite QD1", "randwrite", "4k", 1),
    ("4k randwrite QD32", "randwrite", "4k", 32),
    ("4k randread QD1", "randread", "4k", 1),
    ("4k randread QD32", "randread", "4k", 32),
    ("1M seq write QD8", "write", "1M", 8),
    ("1M seq read QD8", "read", "1M", 8),
]
TARGETS = [  # (job, peer, wanted ratio ovsfs / peer): issue 10
    ("1M seq write QD8", "nbd-raw", 0.8),
    ("1M seq read QD8", "nbd-raw", 0.8),
    ("4k randwrite QD32", "qsd-qcow2", 1.5),
    ("4k randread QD32", "nbd-raw", 1.3),
    ("4k randwrite QD1", "nbd-raw", 0.7),
]


def parse_size(s: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    return int(s[:-1]) * units[s[-1].lower()] if s[-1].lower() in units else int(s)


# ---- the ovsfs server (child process) ------------------------------------------------------

def serve_main(state: str, sock: str, size: int) -> None:
    import trio

    from ovsfs.backend.local import LocalStore
    from ovsfs.config import Config
    from ovsfs.engine.engine import Engine
    from ovsfs.nbd.server import serve

    cfg = Config()
    cfg.state_dir = Path(state)
    cfg.nbd.socket = sock
    cfg.nbd.tcp_port = 0
    eng = Engine(cfg, LocalStore(cfg.path(cfg.backend.path)))
    eng.open()
    if not eng.list_vpools():
        eng.create_vpool("default")
    if not eng.list_volumes():
        eng.create_volume("bench", size)

    async def main() -> None:
        async with trio.open_nursery() as n:
            await n.start(serve, eng, cfg)
            print("READY", flush=True)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for _ in sigs:
                    n.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    finally:
        eng.close()


# ---- process handling ----------------------------------------------------------------------

class Proc:
    def __init__(self, name: str, cmd: list[str], log: Path, env: dict | None = None) -> None:
        self.name = name
        self.logf = open(log, "wb")
        self.p = subprocess.Popen(cmd, stdout=self.logf, stderr=subprocess.STDOUT, env=env or SYS_ENV,
                                  start_new_session=True)
        self.pid = self.p.pid

    def stop(self) -> None:
        if self.p.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.p.wait()
        self.logf.close()


def wait_socket(path: Path, proc: Proc, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists():
            r = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///?socket={path}"], env=SYS_ENV,
                               capture_output=True, timeout=30)
            if r.returncode == 0 or b"export" in r.stderr:
                return
        if proc.p.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.p.returncode} before listening")
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} did not listen on {path}")


def fio(uri: str, name: str, rw: str, bs: str, qd: int, size: int, runtime: float) -> dict:
    cmd = ["fio", f"--name={name.replace(' ', '_')}", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
           f"--bs={bs}", f"--iodepth={qd}", f"--size={size}", "--output-format=json",
           "--randrepeat=0", "--norandommap"]
    if runtime:
        cmd += ["--time_based", f"--runtime={runtime}", "--ramp_time=1"]
    r = subprocess.run(cmd, env=SYS_ENV, capture_output=True, text=True, timeout=runtime * 4 + 600)
    if r.returncode:
        raise RuntimeError(f"fio failed: {r.stderr[-2000:]}")
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    return {"iops": side["iops"], "mibs": side["bw_bytes"] / (1 << 20),
            "lat_us": side["lat_ns"]["mean"] / 1000}


class Target:
    """One NBD server under test; `fresh` ones get a new sparse file before each write run."""

    def __init__(self, name: str, work: Path, size: int, fresh: bool = False) -> None:
        self.name, self.work, self.size, self.fresh = name, work, size, fresh
        self.sock = work / f"{name}.sock"
        self.proc: Proc | None = None

    def uri(self) -> str:
        return f"nbd+unix:///{'bench' if self.name == 'ovsfs' else 'd0'}?socket={self.sock}"

    def start(self) -> None:
        w, size = self.work, self.size
        if self.name == "ovsfs":
            cmd = [sys.executable, os.path.abspath(__file__), "--serve", str(w / "state"),
                   str(self.sock), str(size)]
            self.proc = Proc("ovsfs", cmd, w / "ovsfs.log", env=os.environ.copy())
        elif self.name.startswith("nbd-"):
            img = w / f"{self.name}.raw"
            img.unlink(missing_ok=True)
            with open(img, "wb") as f:
                f.truncate(size)
            if not self.fresh:      # fully allocated: blocks exist, the steady state
                subprocess.run(["fallocate", "-l", str(size), str(img)], check=True, env=SYS_ENV)
            self.proc = Proc(self.name, ["qemu-nbd", "-f", "raw", "-k", str(self.sock), "-x", "d0",
                                         "-t", "-e", "64", str(img)], w / f"{self.name}.log")
        else:
            img = w / f"{self.name}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(size)],
                           check=True, env=SYS_ENV)
            self.proc = Proc(self.name, [
                "qemu-storage-daemon", "--blockdev", f"driver=file,node-name=f0,filename={img}",
                "--blockdev", "driver=qcow2,node-name=d0,file=f0",
                "--nbd-server", f"addr.type=unix,addr.path={self.sock}",
                "--export", "type=nbd,id=e0,node-name=d0,name=d0,writable=on"], w / f"{self.name}.log")
        wait_socket(self.sock, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def measures(self, rw: str) -> bool:
        return not (self.fresh and "read" in rw)

    def run(self, name: str, rw: str, bs: str, qd: int, runtime: float) -> dict:
        if self.fresh:
            self.stop()
            self.start()
        return fio(self.uri(), name, rw, bs, qd, self.size, runtime)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", help="work directory (default: a new one under /var/tmp)")
    ap.add_argument("--size", default="1G", help="volume / file size")
    ap.add_argument("--runtime", type=float, default=8, help="seconds per run")
    ap.add_argument("--jobs", help="comma-separated job names (default: all)")
    ap.add_argument("--serve", nargs=3, metavar=("STATE", "SOCKET", "SIZE"), help=argparse.SUPPRESS)
    ap.add_argument("--skip-peers", action="store_true", help="only measure ovsfs")
    a = ap.parse_args()
    if a.serve:
        serve_main(a.serve[0], a.serve[1], int(a.serve[2]))
        return 0
    for tool in ("fio", "qemu-img", "qemu-nbd", "qemu-storage-daemon", "nbdinfo", "fallocate"):
        if not shutil.which(tool, path=SYS_ENV["PATH"]):
            print(f"{tool} is needed", file=sys.stderr)
            return 2
    size = parse_size(a.size)
    jobs = [j for j in JOBS if not a.jobs or j[0] in a.jobs.split(",")]
    work = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="ovsfs-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    names = ["ovsfs"] + ([] if a.skip_peers else ["nbd-raw", "nbd-sparse", "qsd-qcow2"])
    targets = [Target(n, work, size, fresh=(n == "nbd-sparse")) for n in names]
    runs: dict[str, dict[str, list[dict]]] = {t.name: {} for t in targets}
    try:
        for t in targets:
            t.start()
            if not t.fresh:
                print(f"== {t.name}: prefill {size >> 20} MiB", flush=True)
                fio(t.uri(), "prefill", "write", "1M", 8, size, 0)
        for name, rw, bs, qd in jobs:
            order = targets + targets[::-1]          # A B C D D C B A
            for t in order:
                if not t.measures(rw):
                    continue
                res = t.run(name, rw, bs, qd, a.runtime)
                runs[t.name].setdefault(name, []).append(res)
                print(f"   {name:20s} {t.name:11s} {res['iops']:10.0f} IOPS {res['mibs']:9.1f} MiB/s "
                      f"lat {res['lat_us']:8.1f} us", flush=True)
        print_table(runs, jobs)
    finally:
        for t in targets:
            t.stop()
        if not a.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _mean(rs: list[dict], key: str) -> float:
    return sum(r[key] for r in rs) / len(rs) if rs else 0.0


def print_table(runs: dict[str, dict[str, list[dict]]], jobs: list) -> None:
    peers = [k for k in runs if k != "ovsfs"]
    print()
    head = f"| {'job (mean of runs)':20s} | {'ovsfs':>14s} |" + "".join(
        f" {p:>14s} | {'ratio':>6s} |" for p in peers)
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for name, _rw, bs, _qd in jobs:
        unit, key = ("MiB/s", "mibs") if bs == "1M" else ("IOPS", "iops")
        o = _mean(runs["ovsfs"].get(name, []), key)
        row = f"| {name:20s} | {o:>8.0f} {unit:5s} |"
        for p in peers:
            v = _mean(runs[p].get(name, []), key)
            row += (f" {v:>8.0f} {unit:5s} | {o / v:6.2f} |" if v else f" {'-':>14s} | {'-':>6s} |")
        print(row)
    print()
    for name, peer, want in TARGETS:
        key = "mibs" if "1M" in name else "iops"
        o, v = _mean(runs["ovsfs"].get(name, []), key), _mean(runs.get(peer, {}).get(name, []), key)
        if o and v:
            print(f"target {name:20s} >= {want:.1f} x {peer:10s}: {o / v:5.2f}  "
                  f"{'met' if o / v >= want else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())
