#!/usr/bin/env python3
"""FUSE door benchmark: fio on a volume file of the ovsfs mount vs the same workload on
qemu-storage-daemon FUSE exports of raw files, same disk, same run, side by side.

    .venv/bin/python tools/bench_fuse.py [--dir DIR] [--size 1G] [--runtime 10] [--rounds 1] [--profile]

Workloads (fio, psync, direct=1, QD1): 1 MiB sequential write then read of the whole file,
4 KiB random write for --runtime seconds. The peer is qsd's FUSE export of a fully
allocated raw file (its steady state: written once before the runs) and of a sparse one
(its holes punched again before each of its write runs). The machine is shared and noisy,
so the runs alternate A B B A (ovsfs, peers, peers reversed, ovsfs) per round, every run
is printed, and each ratio is of the medians.
--profile records the ovsfs node with py-spy during each ovsfs job (DIR/pyspy-JOB-N.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
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


def punch(path: Path) -> None:
    """Make a raw file sparse again (all holes), keeping its size."""
    size = path.stat().st_size
    subprocess.run(["fallocate", "--punch-hole", "--offset", "0", "--length", str(size), str(path)],
                   check=True, env=ENV)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir under ./var)")
    ap.add_argument("--size", default="1G", help="volume and raw file size (default 1G)")
    ap.add_argument("--runtime", type=int, default=10, help="seconds of 4 KiB random writes (default 10)")
    ap.add_argument("--rounds", type=int, default=1, help="A B B A rounds per workload (default 1)")
    ap.add_argument("--profile", action="store_true", help="py-spy the ovsfs node during each job")
    args = ap.parse_args()
    for tool in ("fio", "qemu-storage-daemon", "truncate", "fallocate", "dd"):
        if not shutil.which(tool, path=ENV["PATH"]):
            raise SystemExit(f"{tool} is not installed")
    base = args.dir or Path(tempfile.mkdtemp(prefix="bench-fuse-", dir=(REPO / "var").mkdir(exist_ok=True) or REPO / "var"))
    base.mkdir(parents=True, exist_ok=True)
    node = None
    qsds: list[subprocess.Popen] = []
    peers = ["qsd allocated", "qsd sparse"]
    who_all = ["ovsfs", *peers]
    results: dict[str, dict[str, list[float]]] = {w: {name: [] for name, _u, _j in JOBS} for w in who_all}
    try:
        node, mnt = start_ovsfs(base / "ovsfs")
        targets = {"ovsfs": mnt / "default" / "bench.raw"}
        subprocess.run(["truncate", "-s", args.size, str(targets["ovsfs"])], check=True, env=ENV)
        raws = {"qsd allocated": base / "qsd-allocated.raw", "qsd sparse": base / "qsd-sparse.raw"}
        subprocess.run(["truncate", "-s", args.size, str(raws["qsd sparse"])], check=True, env=ENV)
        nbytes = os.path.getsize(raws["qsd sparse"])
        subprocess.run(["dd", "if=/dev/zero", f"of={raws['qsd allocated']}", "bs=1M", f"count={nbytes >> 20}",
                        "conv=fsync", "status=none"], check=True, env=ENV)
        for peer in peers:
            export = base / f"{peer.replace(' ', '-')}-export.raw"
            qsds.append(start_qsd(raws[peer], export))
            targets[peer] = export
        order = ["ovsfs", *peers, *reversed(peers), "ovsfs"]       # A B B A
        print(f"{'workload':<16}{'run':>4}  {'target':<15}{'figure':>12}", flush=True)
        for name, unit, job in JOBS:
            for rnd in range(args.rounds):
                for i, who in enumerate(order):
                    if who == "qsd sparse" and "write" in job[0]:
                        punch(raws[who])
                    spy = None
                    if who == "ovsfs" and args.profile:
                        out = base / f"pyspy-{name.replace(' ', '_')}-{rnd}{i}.txt"
                        spy = subprocess.Popen([shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"),
                                                "record", "--pid", str(node.pid), "--format", "raw", "-r", "250",
                                                "--threads", "-o", str(out), "--nonblocking"],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                        time.sleep(1)
                    fig = fio(targets[who], job, args.size, args.runtime, base)[unit]
                    results[who][name].append(fig)
                    print(f"{name:<16}{rnd * len(order) + i + 1:>4}  {who:<15}{fig:>8.0f} {unit}", flush=True)
                    if spy is not None:
                        spy.send_signal(signal.SIGINT)
                        spy.wait(60)
    finally:
        for q in qsds:
            stop(q)
        if node is not None:
            stop(node)
    print(f"\nmedians{'':<9}{'ovsfs FUSE':>14}" + "".join(f"{p:>16}{'ratio':>7}" for p in peers))
    for name, unit, _ in JOBS:
        o = statistics.median(results["ovsfs"][name])
        line = f"{name:<16}{o:>9.0f} {unit:<4}"
        for p in peers:
            q = statistics.median(results[p][name])
            line += f"{q:>11.0f} {unit:<4}{o / q:>6.2f}x"
        print(line)
    print(f"\nwork dir: {base} (size {args.size}, psync, direct=1, QD1; a shared machine: figures are noisy)")
    if not args.dir:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
