"""SIGKILL and power-cut rounds of a real NBD client (fio, verify=crc32c) against a real daemon.

    PYTHONPATH=. .venv/bin/python tools/fault_rounds.py --rounds 10 --kind both --size 16M

Each round: fio writes 4 KiB blocks at random offsets of the volume over NBD (iodepth 1, an NBD
FLUSH after every --fsync writes, each block carrying fio's crc32c verify header), and after a
random time the node fails: "sigkill" kills the daemon; "powercut" also drops everything the
daemon's state directory (on the power-cut filesystem, tests/harness) had not fsynced. Then the
daemon starts again on what survived and the whole volume is read back (qemu-img convert) and
checked block by block.

What fio's own --verify_only cannot say after a crash is which blocks had to survive: it checks
every block of the job, but writes after the last completed FLUSH may be lost and are allowed to
be; and fio ignores a failed FLUSH, so its exit status cannot say which flush completed either.
So the round keeps fio's write log (--write_iolog: one line per write and per sync, in issue
order; at iodepth 1 each I/O is issued only after the one before it completed; see parse_iolog
for which sync counts as completed) and checks each block itself:
- written before the last completed FLUSH of the round: must hold that write or a later one;
- written only after it: the block as it was before the round, or one of those writes;
- not written in the round: exactly as it was before the round;
and a block "holds write k" when its fio header is intact (magic, crc32c of header and data), names
this block's offset and carries write number k (fio's numberio, the index of the write in the job).
"lost" counts blocks that break these rules (a lost flushed write, zeros, garbage, a read error).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import crc32c


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ovsfs.cli.client import UnixConnection  # noqa: E402 - after the path above

from tests.harness.control import PowerCutFS  # noqa: E402  (the harness lives with the tests)

OVSFS = str(Path(sys.executable).with_name("ovsfs"))
BS = 4096
HDR = struct.Struct("<HHIQQIIHHI")   # fio's struct verify_header (verify.h), then a u32 crc32c of the data
MAGIC = 0xACCA


def fio_crc32c(data: bytes) -> int:
    """fio's crc32c: the usual CRC-32C register, without the final inversion."""
    return crc32c.crc32c(data) ^ 0xFFFFFFFF

CONFIG = {
    "node": {"name": "rounds"},
    "engine": {"sco_clusters": 256, "tlog_scos": 4, "write_buffer_size": 64 << 20, "map_cache_pages": 64,
               "checkpoint_seconds": 5.0},
    "nbd": {"enabled": True, "tcp_port": 0},
    "fuse": {"enabled": False},
}


def _toml(cfg: dict[str, Any]) -> str:
    lines = []
    for section, values in cfg.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"



class Node:
    """One `ovsfs run` on STATE; its sockets live outside STATE so a power cut cannot take them."""

    def __init__(self, state: Path, run: Path) -> None:
        self.state, self.run = state, run
        self.mgmt = run / "ovsfs.sock"
        self.nbd = run / "nbd.sock"
        self.log = run.parent / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        cfg = json.loads(json.dumps(CONFIG))
        cfg["node"]["run_dir"] = str(run)
        cfg["mgmt"] = {"socket": str(self.mgmt)}
        cfg["nbd"]["socket"] = str(self.nbd)
        self.config = _toml(cfg)

    def start(self, timeout: float = 60.0) -> None:
        self.run.mkdir(parents=True, exist_ok=True)
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / "ovsfs.toml").write_text(self.config)
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen([OVSFS, "run", "--state", str(self.state)], stdin=subprocess.DEVNULL,
                                         stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode} while starting:\n{self.tail()}")
            try:
                conn = UnixConnection(str(self.mgmt), 10)
                conn.request("GET", "/status")
                st = json.loads(conn.getresponse().read())
                conn.close()
                if "starting" not in st["doors"].values():
                    return
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"daemon did not start within {timeout} s:\n{self.tail()}")
            time.sleep(0.05)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

    def cli(self, *args: str) -> str:
        r = subprocess.run([OVSFS, "--state", str(self.state),
                            "--socket", str(self.mgmt), *args], capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise RuntimeError(f"ovsfs {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def uri(self, volume: str) -> str:
        return f"nbd+unix:///{volume}?socket={self.nbd}"

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(60)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


# ---- fio's write log and blocks --------------------------------------------------------------------

def parse_iolog(path: Path) -> tuple[list[int], int]:
    """(offsets of the writes in issue order, how many writes the last surely completed FLUSH covers).

    fio ignores a failed NBD FLUSH: checked with an nbdkit sh plugin that fails every flush, fio
    still reports err=0 and goes on writing. So a logged sync proves nothing by itself. fio does stop
    at the first failed write, and at iodepth 1 it issues an I/O only after the previous one
    completed: every logged write but the last one completed successfully. A sync followed by such
    a write was answered while the node was still up (a node that fails a flush while up logs
    "flush failed": a bug of its own). The last logged write may be the one that failed.
    """
    writes: list[int] = []
    events: list[tuple[str, int]] = []
    for line in path.read_text().splitlines():
        parts = line.split()
        # version 3: "<usec> <file> <action> <offset> <length>"; version 2 has no time column
        act = next((i for i, p in enumerate(parts) if p in ("write", "sync", "read", "trim", "datasync")), None)
        if act is None:
            continue
        if parts[act] == "write":
            if int(parts[act + 2]) != BS:
                raise RuntimeError(f"unexpected write size in {path}: {line}")
            writes.append(int(parts[act + 1]))
        events.append((parts[act], len(writes)))
    while events and events[-1][0] != "write":
        events.pop()
    if events:
        events.pop()          # the last write: it may have failed
    flushed, after_sync = 0, False
    pending = 0
    for kind, covered in events:
        if kind == "sync":
            pending, after_sync = covered, False
        elif kind == "write" and not after_sync:
            flushed, after_sync = pending, True
    return writes, flushed


def block_write(block: bytes, offset: int) -> int | None:
    """fio's write number (numberio) held by this block, or None when it is not an intact fio block."""
    magic, vtype, length, _seed, hoff, _s, _ns, _thread, numberio, hcrc = HDR.unpack_from(block)
    if magic != MAGIC or length != BS or hoff != offset:
        return None
    if fio_crc32c(block[:HDR.size - 4]) != hcrc:
        return None
    (dcrc,) = struct.unpack_from("<I", block, HDR.size)
    if fio_crc32c(block[HDR.size + 4:]) != dcrc:
        return None
    return int(numberio)


@dataclass
class Totals:
    rounds: int = 0
    blocks_checked: int = 0
    lost: int = 0
    writes: int = 0
    flushed: int = 0
    details: list[str] = field(default_factory=list)


def check_round(before: bytes, after: bytes, writes: list[int], flushed: int, tag: str) -> tuple[int, int, list[str]]:
    """(blocks checked, blocks lost, details) for one round; see the module docstring."""
    by_block: dict[int, list[int]] = {}
    for k, off in enumerate(writes):
        by_block.setdefault(off, []).append(k)
    lost, notes = 0, []
    nblocks = len(after) // BS
    for b in range(nblocks):
        off = b * BS
        got, old = after[off:off + BS], before[off:off + BS]
        ks = by_block.get(off)
        if not ks:
            ok = got == old
            why = "changed although the round never wrote it"
        else:
            must = [k for k in ks if k < flushed]
            allowed = set(ks[ks.index(must[-1]):] if must else ks)
            n = block_write(got, off)
            ok = (n is not None and any(k % 65536 == n for k in allowed)) or (not must and got == old)
            why = (f"written {len(ks)}x, last flushed write #{must[-1] if must else '-'}; reads as "
                   + ("zeros" if got == bytes(BS) else "an intact fio block of write #%s" % n if n is not None
                      else "garbage"))
        if not ok:
            lost += 1
            if len(notes) < 10:
                notes.append(f"{tag}: block at {off}: {why}")
    return nblocks, lost, notes


# ---- rounds ----------------------------------------------------------------------------------------

class Rounds:
    def __init__(self, base: Path, size: int, fsync_every: int, seed: int) -> None:
        self.base, self.size, self.fsync_every = base, size, fsync_every
        self.rnd = random.Random(seed)
        self.fs = PowerCutFS(base / "pfs")
        self.plain = base / "plain"
        self.node: Node | None = None
        self.image = bytes(size)
        self.mode: str | None = None
        # Work around the local backend's non-durable sco/ tlog/ checkpoint/ directories (see
        # tests/engine/test_powercut.py) by creating them durably before the rounds.

    def _node_for(self, kind: str) -> Node:
        """A node (fresh volume) on the power-cut fs for "powercut" rounds, on a plain dir otherwise."""
        want = "pfs" if kind == "powercut" else "plain"
        if self.mode == want and self.node is not None:
            return self.node
        self.close()
        shutil.rmtree(self.fs.src if want == "pfs" else self.plain, ignore_errors=True)   # a fresh node
        if want == "pfs":
            self.fs.start()
            state = self.fs.mnt / "var"
        else:
            state = self.plain / "var"
        self.node = Node(state, self.base / f"run-{want}")
        self.node.start()
        self.node.cli("volume", "create", "v", "--size", str(self.size))
        if want == "pfs":
            # Creating the volume is not what these rounds test (tests/engine/test_powercut.py has it).
            self.fs.sync()
        self.mode, self.image = want, bytes(self.size)
        return self.node

    def read_volume(self, node: Node) -> bytes:
        out = self.base / "read.raw"
        r = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", node.uri("v"), str(out)],
                           capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise RuntimeError(f"reading the volume back failed: {r.stderr.strip()}\n{node.tail()}")
        data = out.read_bytes()
        if not os.environ.get("FAULT_ROUNDS_KEEP"):
            out.unlink()
        return data

    def round(self, kind: str, n: int, totals: Totals) -> str:
        node = self._node_for(kind)
        assert node.proc is not None
        if node.proc.poll() is not None:
            raise RuntimeError(f"the daemon died by itself before round {n} (exit {node.proc.returncode}):\n"
                               f"{node.tail()}")
        log = self.base / f"round{n}.iolog"
        seed = self.rnd.randrange(1, 1 << 31)
        log_from = node.log.stat().st_size
        fio = subprocess.Popen(
            ["fio", f"--name=r{n}", "--ioengine=nbd", f"--uri={node.uri('v')}", "--rw=randwrite", f"--bs={BS}",
             "--iodepth=1", f"--size={self.size}", "--verify=crc32c", "--do_verify=0", f"--fsync={self.fsync_every}",
             "--time_based", "--runtime=120", f"--randseed={seed}", f"--write_iolog={log}"],
            cwd=self.base, stdin=subprocess.DEVNULL, stdout=open(self.base / f"round{n}.fio.txt", "wb"),
            stderr=subprocess.STDOUT)
        # The fault time counts from fio's writing connection (its nbd engine opens one to probe
        # the size, then the one it writes on): on a busy machine fio may take a second to start.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and fio.poll() is None:
            with open(node.log, "rb") as f:
                f.seek(log_from)
                if f.read().count(b"export 'v'") >= 2:
                    break
            time.sleep(0.02)
        time.sleep(self.rnd.uniform(0.3, 2.0))
        assert node.proc is not None
        if kind == "powercut":
            self.fs.power_cut(kill=[node.proc.pid])
        node.kill()
        try:
            fio.wait(60)     # it fails on the dead connection and exits, writing its log
        except subprocess.TimeoutExpired:
            fio.kill()
            fio.wait()
        # No log: fio never got its connection (the fault came first); nothing was written.
        writes, flushed = parse_iolog(log) if log.exists() else ([], 0)
        if kind == "powercut":
            self.fs.start()
        node.start()
        after = self.read_volume(node)
        checked, lost, notes = check_round(self.image, after, writes, flushed, f"round {n} ({kind})")
        if not writes:
            fio_out = (self.base / f"round{n}.fio.txt").read_text(errors="replace")
            notes.append(f"round {n}: the fault came before fio's first write: "
                         + " | ".join(line for line in fio_out.splitlines() if "fio:" in line or "err" in line)[:300])
        if lost or os.environ.get("FAULT_ROUNDS_KEEP"):
            notes.append(f"round {n}: fio's log and output kept in {log} and {self.base / f'round{n}.fio.txt'}")
        else:
            log.unlink(missing_ok=True)
            (self.base / f"round{n}.fio.txt").unlink()
        self.image = after
        totals.rounds += 1
        totals.blocks_checked += checked
        totals.lost += lost
        totals.writes += len(writes)
        totals.flushed += flushed
        totals.details += notes
        return (f"round {n:3d} {kind:8s}: {len(writes):6d} writes, {flushed:6d} before the last flush, "
                f"{checked} blocks checked, lost {lost}")

    def close(self) -> None:
        if self.node is not None:
            self.node.stop()
            self.node = None
        self.fs.kill()
        self.mode = None


def run_rounds(base: Path, rounds: int, kind: str, size: int, fsync_every: int = 16, seed: int = 1,
               out: Any = sys.stdout) -> Totals:
    totals = Totals()
    r = Rounds(base, size, fsync_every, seed)
    try:
        for n in range(rounds):
            k = kind if kind != "both" else ("sigkill" if n < (rounds + 1) // 2 else "powercut")
            print(r.round(k, n, totals), file=out, flush=True)
    finally:
        r.close()
    print(f"total: {totals.rounds} rounds, {totals.writes} writes ({totals.flushed} before a completed flush), "
          f"{totals.blocks_checked} blocks checked, lost {totals.lost}", file=out, flush=True)
    for d in totals.details:
        print("  " + d, file=out)
    return totals


def _size(s: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1].upper()] if s[-1].upper() in units else int(s)


def main() -> None:
    ap = argparse.ArgumentParser(description="SIGKILL / power-cut rounds of fio verify=crc32c against a daemon")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--kind", choices=["sigkill", "powercut", "both"], default="both")
    ap.add_argument("--size", type=_size, default=16 << 20, help="volume size (fio writes all of it at random)")
    ap.add_argument("--fsync", type=int, default=16, help="an NBD FLUSH after this many writes")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", help="work directory (default: a temporary one, removed at the end)")
    args = ap.parse_args()
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="fault-rounds-"))
    base.mkdir(parents=True, exist_ok=True)
    try:
        totals = run_rounds(base, args.rounds, args.kind, args.size, args.fsync, args.seed)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    sys.exit(1 if totals.lost else 0)


if __name__ == "__main__":
    main()
