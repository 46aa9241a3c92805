#!/usr/bin/env python3
"""fio through NBD: ovsfs against qemu-storage-daemon (raw and qcow2), same disk, same run.

    .venv/bin/python tools/bench_nbd.py [--dir DIR] [--size 1G] [--runtime 8] [--daemon]

Jobs: 4 KiB random write and read at QD1 and QD32, 1 MiB sequential write and read (QD8).
Every target is first filled with a sequential write so that reads find data. Prints each
figure and a table of ratios ovsfs / peer. Every process it starts is stopped by PID and
the work directory is removed.

The ovsfs side is this script re-run with --serve (the real Engine and NBD door in their
own process); with --daemon it is `ovsfs daemon` instead (when the CLI has it).
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


def run_target(label: str, uri: str, size: int, runtime: float) -> dict[str, dict]:
    print(f"== {label}: prefill {size >> 20} MiB", flush=True)
    fio(uri, "prefill", "write", "1M", 8, size, 0)
    out = {}
    for name, rw, bs, qd in JOBS:
        res = fio(uri, name, rw, bs, qd, size, runtime)
        out[name] = res
        print(f"   {name:20s} {res['iops']:10.0f} IOPS {res['mibs']:9.1f} MiB/s "
              f"lat {res['lat_us']:8.1f} us", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", help="work directory (default: a new one under /var/tmp)")
    ap.add_argument("--size", default="1G", help="volume / file size")
    ap.add_argument("--runtime", type=float, default=8, help="seconds per job")
    ap.add_argument("--serve", nargs=3, metavar=("STATE", "SOCKET", "SIZE"), help=argparse.SUPPRESS)
    ap.add_argument("--skip-peers", action="store_true", help="only measure ovsfs")
    a = ap.parse_args()
    if a.serve:
        serve_main(a.serve[0], a.serve[1], int(a.serve[2]))
        return 0
    for tool in ("fio", "qemu-img", "qemu-storage-daemon", "nbdinfo"):
        if not shutil.which(tool, path=SYS_ENV["PATH"]):
            print(f"{tool} is needed", file=sys.stderr)
            return 2
    size = parse_size(a.size)
    work = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="ovsfs-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    procs: list[Proc] = []
    results: dict[str, dict[str, dict]] = {}
    try:
        # ovsfs
        sock = work / "ovsfs.sock"
        p = Proc("ovsfs", [sys.executable, os.path.abspath(__file__), "--serve", str(work / "state"),
                           str(sock), str(size)], work / "ovsfs.log", env=os.environ.copy())
        procs.append(p)
        wait_socket(sock, p)
        results["ovsfs"] = run_target("ovsfs", f"nbd+unix:///bench?socket={sock}", size, a.runtime)
        p.stop()
        # peers: qemu-storage-daemon over a raw and a qcow2 file in the same directory
        if not a.skip_peers:
            for fmt in ("raw", "qcow2"):
                img = work / f"disk.{fmt}"
                subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(img), str(size)], check=True,
                               env=SYS_ENV)
                qsock = work / f"qsd-{fmt}.sock"
                cmd = ["qemu-storage-daemon",
                       "--blockdev", f"driver=file,node-name=f0,filename={img}",
                       "--blockdev", f"driver={fmt},node-name=d0,file=f0",
                       "--nbd-server", f"addr.type=unix,addr.path={qsock}",
                       "--export", "type=nbd,id=e0,node-name=d0,name=d0,writable=on"]
                p = Proc(f"qsd-{fmt}", cmd, work / f"qsd-{fmt}.log")
                procs.append(p)
                wait_socket(qsock, p)
                results[f"qsd {fmt}"] = run_target(f"qemu-storage-daemon {fmt}",
                                                   f"nbd+unix:///d0?socket={qsock}", size, a.runtime)
                p.stop()
        print_table(results)
    finally:
        for p in procs:
            p.stop()
        if not a.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def print_table(results: dict[str, dict[str, dict]]) -> None:
    peers = [k for k in results if k != "ovsfs"]
    print()
    head = f"| {'job':20s} | {'ovsfs':>14s} |" + "".join(f" {p:>14s} | {'ratio':>6s} |" for p in peers)
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for name, _rw, bs, _qd in JOBS:
        unit, key = ("MiB/s", "mibs") if bs == "1M" else ("IOPS", "iops")
        o = results["ovsfs"][name][key]
        row = f"| {name:20s} | {o:>8.0f} {unit:5s} |"
        for p in peers:
            v = results[p][name][key]
            row += f" {v:>8.0f} {unit:5s} | {o / v if v else 0:6.2f} |"
        print(row)


if __name__ == "__main__":
    sys.exit(main())
