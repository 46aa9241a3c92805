#!/usr/bin/env python3
"""The cost of the DTL, and handover / restart times, on a cluster on one machine (issue 11).

    PYTHONPATH=. .venv/bin/python tools/bench_cluster.py [--runtime 5] [--nodes 3] [--big 1G]

Sets up, in a new directory under /var/tmp (removed at the end unless --keep):
  - one etcd member (ovsfs.cluster.etcd_launch.EtcdCluster) on free loopback ports;
  - N node daemons (`ovsfs run --state DIR`, DIR/ovsfs.toml as tests/nodes/cluster.py writes
    it), each in its own failure domain, sharing one local-directory backend (one absolute
    path for all nodes: fine on one machine, and no ASD processes to compete for the CPU);
  - on n1 three volumes, DTL mode none / async / sync (`ovsfs volume dtl VOL MODE`);
  - qemu-nbd on a fully allocated raw file in the same directory, as the usual peer line.

Part 1: fio --ioengine=nbd, 4 KiB random write at QD1 and QD32, on every volume in the order
A B C C B A (none, async, sync; the drift of a noisy machine cancels out), then qemu-nbd twice.
Every run is printed (IOPS, mean and p99 latency; per daemon the cores it kept busy and the
thread-seconds per second its threads waited for a CPU; DTL calls/s, from the data segments
its DTL server sent), then means and the ratios async/none and sync/none against the issue's
target (sync >= 0.5 x none at QD32). --conns N spreads the queue depth over N connections.

Part 2: on a volume with DTL mode --big-mode (sync by default: a restart needs a DTL in sync),
a sequential fio write of --big; then `ovsfs volume move` to n2 (and straight back, with
nothing left to upload), timed. Then --big written again on its owner, the owner SIGKILLed,
its lease left to expire, and only `ovsfs volume restart VOL --on NODE` timed.

--profile MODE:QD (e.g. sync:32): one more fio run of that kind while py-spy (next to this
python, or on PATH) records the owner n1 and the volume's DTL peer (--nolineno, --threads;
--profile-flags, default --nonblocking, adds e.g. --idle for wall clock or --gil); the
collapsed stacks stay in the work directory (then kept) and the functions with the most
samples (own, inclusive, per thread) are printed per process.

Every process started here is stopped by PID at the end, also after an error or ^C.
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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ovsfs.cli.client import UnixConnection  # noqa: E402 - after the path above
from ovsfs.cluster.etcd_launch import EtcdCluster, free_ports  # noqa: E402
from ovsfs.mgmt.units import parse_size  # noqa: E402
from tests.conftest import OVSFS, to_toml  # noqa: E402 - the node config the tests write

SYS_ENV = {**os.environ, "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
MODES = ["none", "async", "sync"]
VOL_SIZE = 1 << 30


# ---- processes -----------------------------------------------------------------------------

class Node:
    """One `ovsfs run --state DIR` daemon; stopped by its PID."""

    def __init__(self, work: Path, name: str, cfg: dict[str, Any]) -> None:
        self.name = name
        self.state = work / name
        self.state.mkdir(parents=True)
        (self.state / "ovsfs.toml").write_text(to_toml(cfg))
        self.log_path = work / f"{name}.log"
        self.dtl_port = int(cfg["dtl"]["port"])
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def nbd_socket(self) -> Path:
        return self.state / "run" / "nbd.sock"

    def uri(self, volume: str) -> str:
        return f"nbd+unix:///{volume}?socket={self.nbd_socket}"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 60.0) -> None:
        with open(self.log_path, "ab") as logf:
            # Own session: a ^C at the terminal reaches this script only, which stops us by PID.
            self.proc = subprocess.Popen([OVSFS, "run", "--state", str(self.state)], stdin=subprocess.DEVNULL,
                                         stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                status, st = self.api("GET", "/status", timeout=5)
                if status == 200 and "starting" not in st["doors"].values():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not answer within {timeout} s; see {self.log_path}")
            time.sleep(0.1)

    def api(self, method: str, path: str, timeout: float = 60.0) -> tuple[int, Any]:
        conn = UnixConnection(str(self.state / "run" / "ovsfs.sock"), timeout)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        return resp.status, json.loads(raw) if raw.strip() else None

    def cli(self, *args: str, timeout: float = 600.0) -> str:
        r = subprocess.run([OVSFS, "--state", str(self.state), *args], capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
        if r.returncode:
            raise RuntimeError(f"ovsfs {' '.join(args)} on {self.name} exited {r.returncode}: {r.stderr.strip()}")
        return r.stdout

    def timed_cli(self, *args: str) -> tuple[float, dict[str, Any]]:
        """(wall seconds of the whole command, its JSON answer)."""
        t0 = time.perf_counter()
        out = self.cli(*args, "--json")
        return time.perf_counter() - t0, json.loads(out)

    def wait_dtl(self, volume: str, state: str = "ok", timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        info: Any = None
        while time.monotonic() < deadline:
            status, info = self.api("GET", f"/volumes/{volume}")
            if status == 200 and info["dtl"]["state"] == state:
                return info
            time.sleep(0.1)
        raise RuntimeError(f"DTL of {volume} on {self.name} not {state} within {timeout} s: {info}")

    def sched(self) -> dict[str, tuple[int, int]]:
        """Per thread id: (ns on a CPU, ns runnable but waiting for a CPU), from
        /proc/PID/task/*/schedstat."""
        out = {}
        for t in Path(f"/proc/{self.proc.pid}/task").iterdir():      # type: ignore[union-attr]
            try:
                f = (t / "schedstat").read_text().split()
            except OSError:
                continue
            out[t.name] = (int(f[0]), int(f[1]))
        return out

    def dtl_replies(self) -> int:
        """Frames this node's DTL server sent (data segments out of its accepted connections):
        one small reply per request, so the number of DTL calls it answered."""
        r = subprocess.run(["ss", "-tinH", "state", "established", "sport", "=", f":{self.dtl_port}"],
                           capture_output=True, text=True, env=SYS_ENV)
        return sum(int(w.split(":")[1]) for w in r.stdout.split() if w.startswith("data_segs_out:"))

    def kill(self) -> None:
        if self.running():
            os.kill(self.proc.pid, signal.SIGKILL)          # type: ignore[union-attr]
        if self.proc is not None:
            self.proc.wait(60)

    def stop(self) -> None:
        if not self.running():
            return
        os.kill(self.proc.pid, signal.SIGTERM)              # type: ignore[union-attr]
        try:
            self.proc.wait(60)                              # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            self.kill()


class QemuNbd:
    """qemu-nbd on a fully allocated raw file (a raw file's steady state)."""

    def __init__(self, work: Path, size: int) -> None:
        img = work / "peer.raw"
        with open(img, "wb") as f:
            f.truncate(size)
        subprocess.run(["fallocate", "-l", str(size), str(img)], check=True, env=SYS_ENV)
        self.sock = work / "qemu-nbd.sock"
        self.logf = open(work / "qemu-nbd.log", "wb")
        self.proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", str(self.sock), "-x", "d0", "-t",
                                      "-e", "64", str(img)], stdout=self.logf, stderr=subprocess.STDOUT,
                                     env=SYS_ENV, start_new_session=True)
        deadline = time.monotonic() + 30
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("qemu-nbd did not start; see qemu-nbd.log")
            time.sleep(0.05)

    def uri(self) -> str:
        return f"nbd+unix:///d0?socket={self.sock}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.logf.close()


def fio(uri: str, name: str, rw: str, bs: str, qd: int, size: int, runtime: float,
        conns: int = 1) -> dict[str, float]:
    """One fio run over NBD: IOPS, MiB/s, completion latency mean and p99 (us). conns > 1:
    that many fio jobs (NBD connections), qd / conns deep each, reported as one."""
    conns = max(1, min(conns, qd))
    cmd = ["fio", f"--name={name}", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={qd // conns}", f"--size={size}", "--output-format=json", "--randrepeat=0",
           "--norandommap", "--lat_percentiles=1", f"--numjobs={conns}", "--group_reporting"]
    if runtime:
        cmd += ["--time_based", f"--runtime={runtime}", "--ramp_time=1"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=SYS_ENV, capture_output=True, text=True, timeout=runtime * 4 + 900)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"fio failed: {r.stderr[-2000:]}")
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    lat = side["lat_ns"]
    return {"iops": side["iops"], "mibs": side["bw_bytes"] / (1 << 20), "mean_us": lat["mean"] / 1000,
            "p99_us": lat.get("percentile", {}).get("99.000000", 0) / 1000, "wall": wall,
            "errors": job.get("error", 0)}


# ---- the benchmark -------------------------------------------------------------------------

def line(label: str, qd: int, r: dict[str, float]) -> str:
    return (f"   {label:10s} QD{qd:<3d} {r['iops']:9.0f} IOPS  lat mean {r['mean_us']:8.1f} us"
            f"  p99 {r['p99_us']:8.1f} us")


def dtl_cost(nodes: list[Node], peer: QemuNbd | None, qds: list[int], runtime: float, conns: int) -> None:
    n1 = nodes[0]
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    for qd in qds:
        how = f" over {min(conns, qd)} connections" if min(conns, qd) > 1 else ""
        print(f"== 4k randwrite QD{qd}{how}: A B C C B A (none async sync sync async none)"
              + (", then qemu-nbd x2" if peer is not None else ""),
              flush=True)
        for mode in MODES + MODES[::-1]:
            vol = f"v{mode}"
            if mode != "none":
                n1.wait_dtl(vol)          # measure a DTL in sync, not one catching up
            s0 = [n.sched() for n in nodes]
            d0 = sum(n.dtl_replies() for n in nodes)
            r = fio(n1.uri(vol), f"rw_{mode}", "randwrite", "4k", qd, VOL_SIZE, runtime, conns)
            # Per daemon, over the run (fio's ramp included): cores kept busy, and thread-
            # seconds per second spent runnable but waiting for a CPU (a shared, overloaded
            # machine: every hand-over between threads and processes waits there).
            s1 = [n.sched() for n in nodes]
            calls = (sum(n.dtl_replies() for n in nodes) - d0) / r["wall"]
            cores = [(sum(b[t][0] - a[t][0] for t in a.keys() & b.keys()) / 1e9 / r["wall"],
                      sum(b[t][1] - a[t][1] for t in a.keys() & b.keys()) / 1e9 / r["wall"])
                     for a, b in zip(s0, s1)]
            runs.setdefault((mode, qd), []).append(r)
            st = n1.api("GET", f"/volumes/{vol}")[1]["dtl"]
            dtl = f", {calls:.0f} calls/s" if mode != "none" else ""
            print(line(f"ovsfs {mode}", qd, r) + f"  dtl {st['state']}, peer {st.get('peer') or '-'}{dtl};"
                  " cpu/runq-wait " + " ".join(f"{n.name} {c:.2f}/{w:.2f}" for n, (c, w) in zip(nodes, cores)),
                  flush=True)
        if peer is not None:
            for _ in range(2):
                r = fio(peer.uri(), "rw_qemu", "randwrite", "4k", qd, VOL_SIZE, runtime, conns)
                runs.setdefault(("qemu-nbd", qd), []).append(r)
                print(line("qemu-nbd", qd, r), flush=True)
    print()
    print(f"| {'4k randwrite':13s} | {'IOPS':>8s} | {'mean us':>8s} | {'p99 us':>8s} | {'IOPS / none':>11s} |")
    print(f"|{'-' * 15}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 13}|")
    for qd in qds:
        base = statistics.fmean(r["iops"] for r in runs[("none", qd)])
        for label in MODES + (["qemu-nbd"] if peer is not None else []):
            rs = runs[(label, qd)]
            iops = statistics.fmean(r["iops"] for r in rs)
            print(f"| {label + ' QD' + str(qd):13s} | {iops:8.0f} | "
                  f"{statistics.fmean(r['mean_us'] for r in rs):8.1f} | "
                  f"{statistics.fmean(r['p99_us'] for r in rs):8.1f} | {iops / base:11.2f} |")
    print()
    for qd in qds:
        base = statistics.fmean(r["iops"] for r in runs[("none", qd)])
        for mode in ("async", "sync"):
            ratio = statistics.fmean(r["iops"] for r in runs[(mode, qd)]) / base
            note = ""
            if mode == "sync" and qd >= 32:
                note = f"   target >= 0.50: {'met' if ratio >= 0.5 else 'NOT met'}"
            print(f"{mode}/none QD{qd}: {ratio:5.2f}{note}")


def py_spy() -> str | None:
    here = Path(sys.executable).with_name("py-spy")
    return str(here) if here.exists() else shutil.which("py-spy")


def summarize(raw: Path, top: int = 15) -> None:
    """Top functions of a py-spy raw (collapsed) file: own samples and inclusive samples."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    threads: dict[str, int] = {}
    per_thread: dict[str, dict[str, int]] = {}
    total = 0
    for ln in raw.read_text().splitlines():
        stack, _, n = ln.rpartition(" ")
        if not stack:
            continue
        k = int(n)
        total += k
        frames = stack.split(";")
        threads[frames[0]] = threads.get(frames[0], 0) + k
        own[frames[-1]] = own.get(frames[-1], 0) + k
        pt = per_thread.setdefault(frames[0], {})
        pt[frames[-1]] = pt.get(frames[-1], 0) + k
        for f in set(frames[1:]):
            incl[f] = incl.get(f, 0) + k
    if not total:
        print("   (no samples)")
        return
    print(f"   {total} samples; by thread: " + ", ".join(
        f"{t} {100 * k / total:.0f}%" for t, k in sorted(threads.items(), key=lambda x: -x[1])[:6]))
    for title, d in (("own", own), ("inclusive", incl)):
        print(f"   top {title}:")
        for f, k in sorted(d.items(), key=lambda x: -x[1])[:top]:
            print(f"     {100 * k / total:5.1f}%  {f}")
    for t, k in sorted(threads.items(), key=lambda x: -x[1])[:4]:
        print(f"   {t} ({100 * k / total:.0f}%), own:")
        for f, j in sorted(per_thread[t].items(), key=lambda x: -x[1])[:6]:
            print(f"     {100 * j / k:5.1f}%  {f}")


def profile(nodes: list[Node], mode: str, qd: int, runtime: float, work: Path, flags: list[str]) -> None:
    spy = py_spy()
    if spy is None:
        print("py-spy is not installed: no profile")
        return
    n1 = nodes[0]
    vol = f"v{mode}"
    if mode != "none":
        n1.wait_dtl(vol)
    peer_name = n1.api("GET", f"/volumes/{vol}")[1]["dtl"].get("peer")
    targets = [n1] + [n for n in nodes if n.name == peer_name]
    spies = []
    for n in targets:
        out = work / f"profile-{n.name}-{mode}-qd{qd}.txt"
        cmd = [spy, "record", "--pid", str(n.proc.pid), "--duration", str(int(runtime) + 1),   # type: ignore[union-attr]
               "--rate", "250", "--format", "raw", "--nolineno", "--threads", *flags, "-o", str(out)]
        spies.append((n, out, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
    try:
        r = fio(n1.uri(vol), f"prof_{mode}", "randwrite", "4k", qd, VOL_SIZE, runtime)
        print(f"== profile: {mode} QD{qd} (py-spy on {', '.join(n.name for n in targets)})")
        print(line(f"ovsfs {mode}", qd, r) + "  (under py-spy)", flush=True)
    finally:
        for _n, _out, p in spies:
            try:
                p.wait(runtime + 30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    for n, out, p in spies:
        role = "owner" if n is n1 else "DTL peer"
        print(f"-- {n.name} ({role}), {out}")
        if out.exists():
            summarize(out)
        else:
            print(f"   py-spy failed: {p.stderr.read().decode()[-500:]}")     # type: ignore[union-attr]


def wait_dead(other: Node, name: str, timeout: float = 60.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        status, nodes = other.api("GET", "/nodes")
        if status == 200 and not next(n for n in nodes if n["name"] == name)["alive"]:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise RuntimeError(f"{name} still alive after {timeout} s")


def owner_of(node: Node, vol: str) -> str:
    return node.api("GET", f"/volumes/{vol}/cluster")[1]["owner"]["node"]


def handover_and_restart(nodes: list[Node], big: int, mode: str) -> None:
    n1, n2 = nodes[0], nodes[1]
    target = nodes[2] if len(nodes) > 2 else n1
    vol = "vbig"
    n1.cli("volume", "create", vol, "--size", str(big))
    n1.cli("volume", "dtl", vol, mode)
    if mode != "none":
        n1.wait_dtl(vol)
    mib = big >> 20
    r = fio(n1.uri(vol), "fill", "write", "1M", 8, big, 0)
    print(f"== handover / restart, DTL {mode}: {mib} MiB written on n1 in {r['wall']:.1f} s "
          f"({r['mibs']:.0f} MiB/s)", flush=True)
    wall, res = n2.timed_cli("volume", "move", vol, "n2")
    print(f"   move n1 -> n2 right after the write: {wall:6.2f} s wall ({res['seconds']:.2f} s in the API)",
          flush=True)
    wall, res = n1.timed_cli("volume", "move", vol, "n1")
    print(f"   move n2 -> n1 straight back:        {wall:6.2f} s wall ({res['seconds']:.2f} s in the API)",
          flush=True)
    if mode != "none":
        n1.wait_dtl(vol)
    r = fio(n1.uri(vol), "refill", "write", "1M", 8, big, 0)
    info = n1.api("GET", f"/volumes/{vol}")[1]
    wb = n1.api("GET", "/status")[1]["engine"].get("write_buffer") or {}
    print(f"   {mib} MiB written again on n1 in {r['wall']:.1f} s; at the kill: dtl {info['dtl']['state']}, "
          f"peer {info['dtl'].get('peer')}, not yet safe {info['dtl'].get('unsafe_bytes')} B, "
          f"uploads queued {wb.get('queued')}, pending {wb.get('pending_bytes')} B", flush=True)
    n1.kill()
    print(f"   n1 SIGKILLed; its lease expired after {wait_dead(target, 'n1'):.1f} s (not counted)", flush=True)
    wall, res = target.timed_cli("volume", "restart", vol, "--on", target.name)
    print(f"   restart --on {target.name}: {wall:6.2f} s wall ({res['seconds']:.2f} s in the API, "
          f"{res.get('dtl_entries')} DTL entries replayed)", flush=True)
    r = fio(target.uri(vol), "readback", "read", "1M", 8, 64 << 20, 0)
    print(f"   owner now {owner_of(target, vol)}; first 64 MiB read back at {r['mibs']:.0f} MiB/s", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=float, default=5, help="seconds per fio run (plus 1 s ramp)")
    ap.add_argument("--nodes", type=int, default=3, choices=[2, 3])
    ap.add_argument("--qd", type=int, nargs="*", default=[1, 32], help="none: only --profile")
    ap.add_argument("--conns", type=int, default=1, help="NBD connections (fio jobs) sharing the queue depth")
    ap.add_argument("--big", default="1G", help="bytes written before handover / restart")
    ap.add_argument("--big-mode", default="sync", choices=MODES)
    ap.add_argument("--skip-dtl-cost", action="store_true")
    ap.add_argument("--skip-handover", action="store_true")
    ap.add_argument("--skip-peer", action="store_true", help="no qemu-nbd line")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ap.add_argument("--profile", metavar="MODE:QD", help="one more run of that kind under py-spy (keeps the dir)")
    ap.add_argument("--profile-flags", default="--nonblocking",
                    help="more py-spy record flags, e.g. '--idle' (wall clock) or '--gil' (who holds the GIL)")
    a = ap.parse_args()
    for tool in ("fio", "qemu-nbd", "fallocate", "etcd"):
        if not shutil.which(tool, path=SYS_ENV["PATH"]):
            print(f"{tool} is needed", file=sys.stderr)
            return 2
    # SIGTERM as ^C (and ^C even when started in the background, where SIGINT comes in
    # ignored): the finally below stops everything by PID either way.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    work = Path(tempfile.mkdtemp(prefix="ovsfs-bench-cluster-", dir="/var/tmp"))
    etcd = EtcdCluster(work / "etcd", members=1)
    nodes: list[Node] = []
    peer: QemuNbd | None = None
    try:
        etcd.start()
        for i in range(a.nodes):
            name = f"n{i + 1}"
            mgmt, dtl = free_ports(2)
            cfg = {"node": {"name": name},
                   "backend": {"kind": "local", "path": str(work / "backend")},
                   "cluster": {"etcd": etcd.urls, "failure_domain": f"fd{i + 1}", "mgmt_port": mgmt,
                               "lease_ttl": 3},
                   "dtl": {"port": dtl, "mode": "async"},
                   "nbd": {"enabled": True, "tcp_port": 0},
                   "fuse": {"enabled": False}}
            nodes.append(Node(work, name, cfg))
        for n in nodes:
            n.start()
        print(f"work {work}: etcd 1 member, {a.nodes} nodes (ovsfs run --state), shared local backend "
              f"{work / 'backend'}, fio {a.runtime:g} s + 1 s ramp per run; load {os.getloadavg()[0]:.1f}",
              flush=True)
        if not a.skip_dtl_cost:
            for mode in MODES:
                nodes[0].cli("volume", "create", f"v{mode}", "--size", str(VOL_SIZE))
                nodes[0].cli("volume", "dtl", f"v{mode}", mode)
            if not a.skip_peer:
                peer = QemuNbd(work, VOL_SIZE)
            if a.qd:
                dtl_cost(nodes, peer, a.qd, a.runtime, a.conns)
                print()
            if a.profile:
                mode, qd = a.profile.split(":")
                a.keep = True
                profile(nodes, mode, int(qd), a.runtime, work, a.profile_flags.split())
                print()
        if not a.skip_handover:
            handover_and_restart(nodes, parse_size(a.big), a.big_mode)
        print(f"load at the end {os.getloadavg()[0]:.1f}")
    except KeyboardInterrupt:
        print("interrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        for n in nodes:
            n.stop()
        if peer is not None:
            peer.stop()
        etcd.stop()
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
