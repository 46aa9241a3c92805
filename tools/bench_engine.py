#!/usr/bin/env python3
"""Engine benchmark: 4 KiB random and 1 MiB sequential writes and reads through the engine API.

Runs in-process on a temporary state directory (or --dir), batching requests the
way doors do (one writev / readv call per batch). Prints IOPS, MB/s, and map
memory and metadata bytes per GiB written.

    .venv/bin/python tools/bench_engine.py [--size 4G] [--batch 256] [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ovsfs.config import load  # noqa: E402
from ovsfs.engine.engine import Engine  # noqa: E402
from ovsfs.engine.map import PAGE_ENTRIES  # noqa: E402

GiB = 1 << 30


def parse_size(s: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(s[:-1]) * units[s[-1].upper()] if s[-1].upper() in units else int(s)


def timed(label: str, nbytes_per_op: int, fn, seconds: float) -> tuple[float, float]:
    ops = 0
    start = time.perf_counter()
    while True:
        ops += fn()
        el = time.perf_counter() - start
        if el >= seconds:
            break
    iops = ops / el
    mbs = iops * nbytes_per_op / 1e6
    print(f"{label:<34} {iops:>12,.0f} IOPS {mbs:>10,.1f} MB/s")
    return iops, mbs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G", help="volume size (default 4G)")
    ap.add_argument("--batch", type=int, default=256, help="requests per engine call")
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per workload")
    ap.add_argument("--dir", help="state directory (default: a temporary one, removed after)")
    ap.add_argument("--map-size", default="1T", help="volume size for the map-memory figure")
    args = ap.parse_args()
    size = parse_size(args.size)
    state = Path(args.dir or tempfile.mkdtemp(prefix="ovsfs-bench-"))
    cfg = load(None, state)
    cfg.engine.write_buffer_size = max(cfg.engine.write_buffer_size, 2 * size)
    eng = Engine(cfg)
    eng.open()
    try:
        eng.create_vpool("default")
        vol = eng.create_volume("bench", size)
        cs = vol.cluster_size
        nclusters = size // cs
        rnd = random.Random(1)
        block = os.urandom(cs)
        big = os.urandom(1 << 20)
        b = args.batch
        print(f"ovsfs engine benchmark: volume {size / GiB:.1f} GiB, batch {b}, {args.seconds:.0f} s each, state {state}")

        # The same bytes written plainly to a file on the same disk: what the disk gives.
        plain = os.open(state / "plain.raw", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(plain, size)  # sparse: random writes land on new blocks, as they would on a fresh volume
        ppos = [0]

        def plain_seq() -> int:
            # Always new bytes on disk (no wrapping onto pages still cached), as the log does.
            for _ in range(max(1, b // 64)):
                os.pwrite(plain, big, ppos[0])
                ppos[0] += len(big)
            return max(1, b // 64)

        def plain_rand() -> int:
            for _ in range(b):
                os.pwrite(plain, block, rnd.randrange(nclusters) * cs)
            return b
        base_seq = timed("plain file: 1 MiB sequential write", 1 << 20, plain_seq, args.seconds)[0]
        base_rand = timed("plain file: 4 KiB random write", cs, plain_rand, args.seconds)[0]
        os.close(plain)
        os.unlink(state / "plain.raw")

        seq_pos = [0]

        def seq_write() -> int:
            n = max(1, b // 64)
            reqs = []
            for _ in range(n):
                reqs.append((seq_pos[0], big))
                seq_pos[0] = (seq_pos[0] + len(big)) % size
            vol.writev(reqs)
            return n
        seq = timed("1 MiB sequential write", 1 << 20, seq_write, args.seconds)[0]
        vol.flush()

        def rand_write() -> int:
            vol.writev([(rnd.randrange(nclusters) * cs, block) for _ in range(b)])
            return b
        rand = timed("4 KiB random write", cs, rand_write, args.seconds)[0]
        t = time.perf_counter()
        vol.flush()
        print(f"{'flush after random writes':<34} {1000 * (time.perf_counter() - t):>12.1f} ms")

        rd_pos = [0]

        def seq_read() -> int:
            n = max(1, b // 64)
            reqs = []
            for _ in range(n):
                reqs.append((rd_pos[0], 1 << 20))
                rd_pos[0] = (rd_pos[0] + (1 << 20)) % size
            vol.readv(reqs)
            return n
        timed("1 MiB sequential read", 1 << 20, seq_read, args.seconds)

        def rand_read() -> int:
            vol.readv([(rnd.randrange(nclusters) * cs, cs) for _ in range(b)])
            return b
        timed("4 KiB random read", cs, rand_read, args.seconds)

        print(f"ratio ovsfs / plain file: sequential write {seq / base_seq:.2f}, random write {rand / base_rand:.2f}")
        info = vol.info()
        written_gib = size / GiB
        vol.sync()
        backend_meta = sum(f.stat().st_size for f in (cfg.path(cfg.backend.path) / vol.ns).rglob("*")
                           if f.is_file() and not f.parent.name == "sco")
        print()
        print(f"map resident (cache + index)        {info['map_resident_bytes'] / 2**20:>10.1f} MiB")
        print(f"map stored per GiB written          {info['map_stored_bytes'] / written_gib / 2**20:>10.2f} MiB")
        print(f"backend metadata per GiB written    {backend_meta / written_gib / 2**20:>10.2f} MiB (TLogs + checkpoints)")
        map_size = parse_size(args.map_size)
        pages = map_size // cs // PAGE_ENTRIES
        resident = cfg.engine.map_cache_pages * PAGE_ENTRIES * 8 + pages * 8
        print(f"map of a fully written {args.map_size} volume: {pages * PAGE_ENTRIES * 8 / GiB:.1f} GiB on disk,"
              f" at most {resident / 2**20:.1f} MiB resident (cache of {cfg.engine.map_cache_pages} pages + page index)")
    finally:
        eng.close()
        if not args.dir:
            shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
