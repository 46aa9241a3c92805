#!/usr/bin/env python3
"""The shared-memory door against the NBD door, same daemon, same volume, same run (issue 12).

    .venv/bin/python tools/bench_shm.py [--dir DIR] [--size 1G] [--runtime 5] [--jobs a,b]

Targets:
  shm       the client library (ovsfs.client.VhostVolume) on the daemon's vhost-user-blk
            socket STATE/run/vhost/bench.sock
  nbd       fio --ioengine=nbd on the same volume through the daemon's NBD door
  qsd-vhost qemu-storage-daemon's vhost-user-blk export of a fully allocated raw file,
            driven by the same client library (what the client costs, and a reference
            vhost-user-blk server)
The volume (and the raw file) is filled first so that reads find data. Each job runs on
every target in the order A B C, then C B A (noisy machines: drift cancels out); every run
is printed, then means, ratios shm / nbd, the issue's targets met / not met, and CPU
seconds per GiB moved: the server's (from /proc/PID/stat) and the client's (this
process's CPU time for the library, fio's usr+sys for NBD). Every process it starts is
stopped by PID, the work directory is removed unless --dir was given.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))

from ovsfs.cli.client import CliError, Client  # noqa: E402
from ovsfs.client.volume import VhostVolume  # noqa: E402
from ovsfs.mgmt.units import parse_size  # noqa: E402
from bench_nbd import Proc  # noqa: E402 - the same process handling as the NBD benchmark

ROOT = Path(__file__).resolve().parents[1]
SYS_ENV = {**os.environ, "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
MiB, GiB = 1 << 20, 1 << 30
JOBS = [  # name, rw, bs, iodepth
    ("4k randwrite QD32", "randwrite", 4096, 32),
    ("4k randread QD32", "randread", 4096, 32),
    ("1M seq write QD8", "write", MiB, 8),
    ("1M seq read QD8", "read", MiB, 8),
]
TARGETS = [  # job, wanted ratio shm / nbd (issue 12)
    ("4k randwrite QD32", 1.5),
    ("4k randread QD32", 1.5),
    ("1M seq write QD8", 1.0),
    ("1M seq read QD8", 1.0),
]
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its waited-for children), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / TICK


def wait_for(path: Path, proc: Proc, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.p.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.p.returncode}; see its log")
        if time.monotonic() > end:
            raise RuntimeError(f"{proc.name} made no {path}")
        time.sleep(0.05)


def start_daemon(work: Path, size: int) -> tuple[Proc, Path, Path]:
    state = work / "state"
    state.mkdir(parents=True, exist_ok=True)
    (state / "ovsfs.toml").write_text('[node]\nname = "bench"\n[nbd]\ntcp_port = 0\n[fuse]\nenabled = false\n'
                                      '[engine]\nwrite_buffer_size = 4294967296\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = Proc("ovsfs", [sys.executable, "-m", "ovsfs.cli.main", "--state", str(state), "run"],
                work / "ovsfs.log", env)
    mgmt = state / "run" / "ovsfs.sock"
    wait_for(mgmt, proc)
    api = Client(mgmt, timeout=60)
    end = time.monotonic() + 60
    while True:
        try:
            if "starting" not in api.call("GET", "/status")["doors"].values():
                break
        except CliError:
            pass
        if time.monotonic() > end:
            raise RuntimeError("the daemon did not start")
        time.sleep(0.1)
    api.call("POST", "/volumes", {"name": "bench", "size": size, "vpool": "default"})   # CliError: fails the run
    vsock = state / "run" / "vhost" / "bench.sock"
    wait_for(vsock, proc)
    return proc, vsock, state / "run" / "nbd.sock"


def start_qsd(work: Path, size: int) -> tuple[Proc, Path]:
    img = work / "qsd.raw"
    with open(img, "wb") as f:
        f.truncate(size)
    subprocess.run(["fallocate", "-l", str(size), str(img)], check=True, env=SYS_ENV)
    sock = work / "qsd.sock"
    proc = Proc("qsd-vhost", ["qemu-storage-daemon", "--blockdev", f"driver=file,node-name=f0,filename={img}",
                              "--export", f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={sock},"
                              "writable=on,num-queues=4"], work / "qsd.log", SYS_ENV)
    wait_for(sock, proc)
    return proc, sock


def client_run(sock: Path, rw: str, bs: int, qd: int, size: int, runtime: float, queues: int = 1) -> dict:
    """The library at queue depth qd for `runtime` seconds: IOPS, MiB/s, client CPU s."""
    buf = os.urandom(bs)
    blocks = size // bs
    with VhostVolume(sock, queue_depth=qd, num_queues=queues, max_request_bytes=max(bs, MiB)) as vol:
        kind = "write" if "write" in rw else "read"
        seq = rw in ("read", "write")
        nxt = 0
        done = 0
        c0 = time.process_time()
        t0 = time.perf_counter()
        end = t0 + runtime
        while True:
            now = time.perf_counter()
            if now < end:
                while vol.in_flight < qd:
                    if seq:
                        off, nxt = nxt * bs, (nxt + 1) % blocks
                    else:
                        off = random.randrange(blocks) * bs
                    vol.submit(kind, off, bs, buf if kind == "write" else None)
            elif not vol.in_flight:
                break
            for r in vol.wait():
                if r.error is not None:
                    raise r.error
                done += 1
        dt = time.perf_counter() - t0
        return {"iops": done / dt, "mibs": done * bs / dt / MiB, "secs": dt, "bytes": done * bs,
                "client_cpu": time.process_time() - c0}


def fio_run(uri: str, rw: str, bs: int, qd: int, size: int, runtime: float) -> dict:
    cmd = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={qd}", f"--size={size}", "--output-format=json", "--randrepeat=0", "--norandommap",
           "--time_based", f"--runtime={runtime}"]
    r = subprocess.run(cmd, env=SYS_ENV, capture_output=True, text=True, timeout=runtime * 4 + 300)
    if r.returncode:
        raise RuntimeError(f"fio failed: {r.stderr[-2000:]}")
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    secs = job["job_runtime"] / 1000
    return {"iops": side["iops"], "mibs": side["bw_bytes"] / MiB, "secs": secs, "bytes": side["io_bytes"],
            "client_cpu": (job["usr_cpu"] + job["sys_cpu"]) / 100 * secs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", help="work directory (default: a new one under /var/tmp)")
    ap.add_argument("--size", default="1G", help="volume / file size")
    ap.add_argument("--runtime", type=float, default=5, help="seconds per run")
    ap.add_argument("--jobs", help="comma-separated job names (default: all)")
    ap.add_argument("--queues", type=int, default=1, help="virtqueues the client library uses (default 1)")
    args = ap.parse_args()
    size = parse_size(args.size)
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_shm.", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    jobs = [j for j in JOBS if not args.jobs or j[0] in args.jobs.split(",")]
    procs: list[Proc] = []
    results: dict[tuple[str, str], list[dict]] = {}
    try:
        daemon, vsock, nsock = start_daemon(work, size)
        procs.append(daemon)
        qsd, qsock = start_qsd(work, size)
        procs.append(qsd)
        print(f"filling the volume ({size // MiB} MiB) ...", flush=True)
        with VhostVolume(vsock, queue_depth=8) as vol:
            chunk = os.urandom(MiB)
            vol.writev([(o, chunk) for o in range(0, size, MiB)])
            vol.flush()
        targets = {
            "shm": (daemon.pid, lambda rw, bs, qd: client_run(vsock, rw, bs, qd, size, args.runtime, args.queues)),
            "nbd": (daemon.pid, lambda rw, bs, qd: fio_run(f"nbd+unix:///bench?socket={nsock}", rw, bs, qd,
                                                           size, args.runtime)),
            "qsd-vhost": (qsd.pid, lambda rw, bs, qd: client_run(qsock, rw, bs, qd, size, args.runtime, args.queues)),
        }
        order = list(targets)
        for name, rw, bs, qd in jobs:
            for tname in order + order[::-1]:
                pid, run = targets[tname]
                s0 = cpu_seconds(pid)
                res = run(rw, bs, qd)
                res["server_cpu"] = cpu_seconds(pid) - s0
                results.setdefault((name, tname), []).append(res)
                print(f"{name:20s} {tname:10s} {res['iops']:9.0f} IOPS {res['mibs']:8.1f} MiB/s  "
                      f"server {res['server_cpu']:5.1f} s  client {res['client_cpu']:5.1f} s CPU", flush=True)
    finally:
        for p in procs:
            p.stop()
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)

    def mean(job: str, t: str, key: str) -> float:
        rs = results.get((job, t), [])
        return sum(r[key] for r in rs) / len(rs) if rs else 0.0

    def per_gib(job: str, t: str, key: str) -> float:
        rs = results.get((job, t), [])
        moved = sum(r["bytes"] for r in rs) / GiB
        return sum(r[key] for r in rs) / moved if moved else 0.0

    print("\nmeans (IOPS; CPU seconds per GiB moved: server + client)")
    print(f"{'job':20s} " + "".join(f"{t:>28s}" for t in targets))
    for name, *_ in jobs:
        cells = "".join(f"{mean(name, t, 'iops'):9.0f} ({per_gib(name, t, 'server_cpu'):5.1f}+"
                        f"{per_gib(name, t, 'client_cpu'):5.1f} s/GiB)" for t in targets)
        print(f"{name:20s} {cells}")
    print("\nissue 12 targets (shm / nbd, IOPS)")
    for job, want in TARGETS:
        if (job, "shm") not in results:
            continue
        ratio = mean(job, "shm", "iops") / max(mean(job, "nbd", "iops"), 1e-9)
        print(f"  {job:20s} {ratio:5.2f} x (want >= {want}): {'met' if ratio >= want else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
