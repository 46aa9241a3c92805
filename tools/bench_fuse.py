#!/usr/bin/env python3
"""FUSE door benchmark: fio on a volume file of the ovsfs mount vs the same workload on a
qemu-storage-daemon FUSE export of a raw file, same disk, same run.

    .venv/bin/python tools/bench_fuse.py [--dir DIR] [--size 1G] [--runtime 10] [--profile]

Workloads (fio, psync, direct=1, QD1): 1 MiB sequential write then read of the whole file,
4 KiB random write for --runtime seconds. Prints each figure and the ovsfs/qsd ratio.
--profile records the ovsfs node with py-spy during each ovsfs job (DIR/pyspy-JOB.txt).
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

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}

JOBS = [
    ("seq write 1M", "MB/s", ["--rw=write", "--bs=1M"]),
    ("seq read 1M", "MB/s", ["--rw=read", "--bs=1M"]),
    ("rand write 4K", "IOPS", ["--rw=randwrite", "--bs=4k"]),
]


def fio(target: Path, args: list[str], size: str, runtime: int, cwd: Path) -> dict:
    # Sequential jobs cover the whole file (the read job reads what the write job wrote);
    # the random write job runs for `runtime` seconds.
    timing = ["--time_based=1", f"--runtime={runtime}"] if "rand" in args[0] else []
    cmd = ["fio", "--name=b", f"--filename={target}", "--ioengine=psync", "--direct=1", f"--size={size}",
           "--output-format=json", "--invalidate=1", *timing, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=runtime * 10 + 600, cwd=cwd)
    if out.returncode != 0:
        raise SystemExit(f"fio failed: {out.stderr}")
    job = json.loads(out.stdout)["jobs"][0]
    side = job["read"] if "read" in args[0] and "write" not in args[0] else job["write"]
    return {"MB/s": side["bw_bytes"] / 1e6, "IOPS": side["iops"]}


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def is_mounted(path: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def start_ovsfs(state: Path) -> tuple[subprocess.Popen, Path]:
    cfg = state / "bench.toml"
    state.mkdir(parents=True, exist_ok=True)
    cfg.write_text("[nbd]\nenabled = false\n")
    p = subprocess.Popen([sys.executable, "-m", "ovsfs.fuse", str(state), "--config", str(cfg)], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=open(state / "node.log", "ab"), start_new_session=True)
    line = p.stdout.readline().decode()  # type: ignore[union-attr]
    if not line.startswith("READY"):
        raise SystemExit(f"ovsfs node did not start: {(state / 'node.log').read_text()[-2000:]}")
    return p, Path(line.split(None, 1)[1].strip())


def start_qsd(raw: Path, mnt: Path) -> subprocess.Popen:
    mnt.touch()
    p = subprocess.Popen(["qemu-storage-daemon", "--blockdev", f"driver=file,node-name=f0,filename={raw}",
                          "--export", f"type=fuse,id=e0,node-name=f0,mountpoint={mnt},writable=on"],
                         env=ENV, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: is_mounted(mnt) or p.poll() is not None, 30, "the qsd FUSE export")
    if p.poll() is not None:
        raise SystemExit(f"qemu-storage-daemon failed: {p.stderr.read().decode()}")  # type: ignore[union-attr]
    return p


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir under ./var)")
    ap.add_argument("--size", default="1G", help="volume and raw file size (default 1G)")
    ap.add_argument("--runtime", type=int, default=10, help="seconds of 4 KiB random writes (default 10)")
    ap.add_argument("--profile", action="store_true", help="py-spy the ovsfs node during each job")
    args = ap.parse_args()
    for tool in ("fio", "qemu-storage-daemon", "truncate"):
        if not shutil.which(tool, path=ENV["PATH"]):
            raise SystemExit(f"{tool} is not installed")
    base = args.dir or Path(tempfile.mkdtemp(prefix="bench-fuse-", dir=(REPO / "var").mkdir(exist_ok=True) or REPO / "var"))
    base.mkdir(parents=True, exist_ok=True)
    node = qsd = None
    results: dict[str, dict[str, dict]] = {"ovsfs": {}, "qsd": {}}
    try:
        node, mnt = start_ovsfs(base / "ovsfs")
        vol = mnt / "default" / "bench.raw"
        subprocess.run(["truncate", "-s", args.size, str(vol)], check=True, env=ENV)
        raw = base / "qsd-disk.raw"
        subprocess.run(["truncate", "-s", args.size, str(raw)], check=True, env=ENV)
        qsd = start_qsd(raw, base / "qsd-export.raw")
        for name, unit, job in JOBS:
            for who, target in (("ovsfs", vol), ("qsd", base / "qsd-export.raw")):
                spy = None
                if who == "ovsfs" and args.profile:
                    out = base / f"pyspy-{name.replace(' ', '_')}.txt"
                    spy = subprocess.Popen([shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(node.pid), "--format", "raw", "-r", "250",
                                            "--threads", "-o", str(out), "--nonblocking"],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(1)
                results[who][name] = fio(target, job, args.size, args.runtime, base)
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(60)
    finally:
        if qsd is not None:
            stop(qsd)
        if node is not None:
            stop(node)
    print(f"\n{'workload':<16}{'ovsfs FUSE':>14}{'qsd FUSE':>14}{'ratio':>8}")
    for name, unit, _ in JOBS:
        o, q = results["ovsfs"][name][unit], results["qsd"][name][unit]
        print(f"{name:<16}{o:>10.0f} {unit:<4}{q:>9.0f} {unit:<4}{o / q:>7.2f}x")
    print(f"\nwork dir: {base} (size {args.size}, psync, direct=1)")
    if not args.dir:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
