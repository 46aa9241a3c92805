#!/usr/bin/env python3
"""Benchmark the erasure-coded backend against a plain copy of the same bytes.

Starts real ASD processes on temporary directories, then for each policy and
codec setting: puts N objects through the proxy (encode + write, fsync on the ASDs)
and reads them back (fetch + decode), and compares with writing the same bytes as
plain files (fsync too) into the same ASD directories. Prints MB/s, the ratio to
the plain copy, and the manifest bytes of one 64 MiB object.

    .venv/bin/python tools/bench_backend.py [--objects 48] [--size 4]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ovsfs.backend.manifest import Manifest  # noqa: E402
from ovsfs.backend.policy import Policy, Preset, explain  # noqa: E402
from ovsfs.backend.proxy import ProxyStore  # noqa: E402

MiB = 1 << 20


def start_asds(base: Path, n: int) -> tuple[list[subprocess.Popen[str]], list[str]]:
    procs, addrs = [], []
    for i in range(n):
        p = subprocess.Popen([sys.executable, "-m", "ovsfs.backend.asd", "--path", str(base / f"asd{i}"),
                              "--listen", "127.0.0.1:0", "--node", f"node{i}"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        m = re.search(r"listening on (\S+)", p.stdout.readline() if p.stdout else "")
        assert m, "ASD did not start"
        procs.append(p)
        addrs.append(m.group(1))
    return procs, addrs


def make_objects(n: int, size: int) -> list[bytes]:
    # Half random, half text-like: compression has something to do, not everything.
    out = []
    text = (b"ovsfs block storage sco cluster tlog " * (size // 74 + 1))[:size // 2]
    for _ in range(n):
        out.append(os.urandom(size - len(text)) + text)
    return out


def plain_copy(dirs: list[Path], objs: list[bytes]) -> tuple[float, float]:
    t = time.perf_counter()
    paths = []
    for i, data in enumerate(objs):
        path = dirs[i % len(dirs)] / f"plain-{i}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        paths.append(path)
    wt = time.perf_counter() - t
    t = time.perf_counter()
    for path in paths:
        path.read_bytes()
    rt = time.perf_counter() - t
    for path in paths:
        path.unlink()
    total = sum(map(len, objs)) / MiB
    return total / wt, total / rt


def run(addrs: list[str], state: Path, preset: Preset, objs: list[bytes]) -> tuple[float, float]:
    proxy = ProxyStore(addrs, preset, state_dir=state, cache_bytes=0, maintenance=False)
    try:
        proxy.create_namespace("bench")
        t = time.perf_counter()
        for i, data in enumerate(objs):
            proxy.put("bench", f"sco/{i:08x}", data)
        wt = time.perf_counter() - t
        proxy.drop_caches()
        t = time.perf_counter()
        for i, data in enumerate(objs):
            got = proxy.get("bench", f"sco/{i:08x}")
            assert len(got) == len(data)
        rt = time.perf_counter() - t
        proxy.delete_namespace("bench")
    finally:
        proxy.close()
    total = sum(map(len, objs)) / MiB
    return total / wt, total / rt


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, default=48)
    ap.add_argument("--size", type=int, default=4, help="object size in MiB (an SCO)")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="ovsfs-bench-"))
    procs, addrs = start_asds(base, 11)
    try:
        objs = make_objects(args.objects, args.size * MiB)
        dirs = [base / f"asd{i}" for i in range(11)]
        pw, pr = plain_copy(dirs, objs)
        rows = [("plain copy (files, fsync)", pw, pr)]
        for pol in (Policy(4, 2, 6, 1), Policy(8, 3, 11, 1)):
            for comp, enc in (("none", "none"), ("lz4", "none"), ("zstd", "none"),
                              ("none", "aes-256-gcm"), ("zstd", "aes-256-gcm")):
                preset = Preset(policies=[pol], compression=comp, encryption=enc)
                w, r = run(addrs[:pol.k + pol.m], base / f"state-{pol.k}{pol.m}{comp}{enc}", preset, objs)
                rows.append((f"{pol} {comp}/{enc}", w, r))
        print(f"\n{args.objects} objects of {args.size} MiB, 11 ASDs on one disk, 2 cores\n")
        print(f"{'setting':34} {'write MB/s':>11} {'x plain':>8} {'read MB/s':>10} {'x plain':>8}")
        for name, w, r in rows:
            print(f"{name:34} {w:11.1f} {w / pw:8.2f} {r:10.1f} {r / pr:8.2f}")
        print("\nmetadata per 64 MiB object (manifest bytes, one copy):")
        for pol, mfs in ((Policy(8, 2, 10, 1), 4 * MiB), (Policy(4, 2, 6, 1), 4 * MiB),
                         (Policy(8, 3, 11, 1), 4 * MiB), (Policy(4, 1, 5, 1), 16 * MiB)):
            e = explain(Preset(policies=[pol], max_fragment_size=mfs), 64 * MiB)
            print(f"  {str(pol):12} max fragment {mfs // MiB:2} MiB: {e['chunks']} chunks, "
                  f"{e['metadata_bytes']} bytes x {e['manifest_replicas']} replicas")
        assert len(Manifest.sample(Policy(8, 2, 10, 1), Preset(), 64 * MiB).encode()) <= 1024
    finally:
        for p in procs:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
        subprocess.run(["rm", "-rf", str(base)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
