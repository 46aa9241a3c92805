#!/usr/bin/env python3
"""Micro-benchmark of the DTL: one DtlClient -> one DTL server (a subprocess) on loopback.

4 KiB entries; QD1 and QD32 (that many writer threads, each: append under a shared "volume
lock", then wait() outside it, as the engine does); sync and async modes, run in A B B A
order per queue depth so drift (page cache, CPU frequency, neighbours) shows up. Prints IOPS
and latency (append + wait, i.e. what a writer waits for before its write is acknowledged).

    PYTHONPATH=. python tools/bench_dtl.py [--seconds 2] [--qd 1 32]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ovsfs.config import DtlSection
from ovsfs.dtl import Peer
from ovsfs.dtl.client import DtlClient

SIZE = 4096


def run(peer: Peer, mode: str, qd: int, seconds: float, volume: str) -> dict:
    cfg = DtlSection(timeout=10.0, retry_seconds=1.0)
    c = DtlClient(volume, 1, mode, cfg, lambda exclude: peer, lambda p: iter(()), lambda s: None)
    end = time.monotonic() + 5
    while c.status()["state"] != "ok":
        if time.monotonic() > end:
            raise SystemExit(f"no DTL peer in sync: {c.status()}")
        time.sleep(0.01)
    lock = threading.Lock()
    nxt = [0]
    data = os.urandom(SIZE)
    lat: list[list[float]] = [[] for _ in range(qd)]
    stop_at = time.monotonic() + seconds

    def writer(k: int) -> None:
        mine = lat[k]
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            with lock:                       # the volume lock: positions in log order
                i = nxt[0]
                nxt[0] += 1
                t = c.append((i >> 16, (i & 0xFFFF) * SIZE), data)
                if i % 2048 == 2047:         # keep the peer's tail short, as uploads would
                    c.trim((i >> 16, (i & 0xFFFF) * SIZE))
            c.wait(t)
            mine.append(time.perf_counter() - t0)

    t_start = time.perf_counter()
    ths = [threading.Thread(target=writer, args=(k,)) for k in range(qd)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    c.flush()                                # async: count the time to get it all shipped
    elapsed = time.perf_counter() - t_start
    st = c.status()
    c.close(drop=True)
    if st["state"] != "ok":
        raise SystemExit(f"DTL left sync during the run: {st}")
    all_lat = sorted(x for m in lat for x in m)
    n = len(all_lat)
    return {"mode": mode, "qd": qd, "ops": n, "iops": n / elapsed,
            "mean_us": statistics.fmean(all_lat) * 1e6,
            "p50_us": all_lat[n // 2] * 1e6, "p99_us": all_lat[min(n - 1, n * 99 // 100)] * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--qd", type=int, nargs="+", default=[1, 32])
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_dtl.") as d:
        proc = subprocess.Popen([sys.executable, "-m", "ovsfs.dtl.server", "--path", d + "/dtl"],
                                stdout=subprocess.PIPE, stderr=open(Path(d) / "server.log", "w"))
        try:
            line = proc.stdout.readline().decode().split()  # type: ignore[union-attr]
            peer = Peer("bench", "127.0.0.1", int(line[3]))
            print(f"{'mode':6} {'QD':>3} {'ops':>8} {'IOPS':>9} {'mean us':>9} {'p50 us':>9} "
                  f"{'p99 us':>9}")
            k = 0
            for qd in a.qd:
                for mode in ("sync", "async", "async", "sync"):      # A B B A
                    k += 1
                    r = run(peer, mode, qd, a.seconds, f"bench{k}")
                    print(f"{r['mode']:6} {r['qd']:3d} {r['ops']:8d} {r['iops']:9.0f} "
                          f"{r['mean_us']:9.0f} {r['p50_us']:9.0f} {r['p99_us']:9.0f}",
                          flush=True)
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(10)


if __name__ == "__main__":
    main()
