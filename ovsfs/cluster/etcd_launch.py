"""Start and stop a 1- or 3-member etcd on 127.0.0.1, for tests and demos (issue 11).

    python -m ovsfs.cluster.etcd_launch start DIR [--members 3] [--base-port 23790]
    python -m ovsfs.cluster.etcd_launch stop DIR
    tools/etcd.sh start|stop DIR [MEMBERS] [BASEPORT]

Member i listens for clients on base_port + 2i and for its peers on base_port + 2i + 1 (free
ports are picked when no base port is given). Its data lives in DIR/member<i>, its log in
DIR/member<i>.log; DIR/pids.json records ports and PIDs so that `stop` (also from another
process) stops exactly these processes, by PID. `start` on a DIR used before starts the same
members again on their ports and data.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from ovsfs.backend.node import free_ports
from ovsfs.errors import ClusterError

PIDS = "pids.json"


def _is_our_etcd(pid: int, data_dir: Path) -> bool:
    """pid still runs etcd on data_dir (guards against a PID reused by another process)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return (bool(argv) and os.path.basename(argv[0]) == b"etcd"
            and str(data_dir).encode() in argv)


class EtcdCluster:
    """`members` etcd processes forming one cluster on loopback, data under `dir`.

    `start()` spawns them and returns once each answers its health check; `urls` are their
    client URLs; `kill(i)` / `start_member(i)` stop and restart one member (fault tests);
    `stop()` stops all (SIGTERM, then SIGKILL after `timeout` seconds)."""

    def __init__(self, dir: Path, members: int = 1, base_port: int | None = None,
                 etcd: str | None = None) -> None:
        if members < 1:
            raise ClusterError(f"an etcd cluster needs at least one member, not {members}")
        self.dir = Path(dir)
        self.members = members
        self.etcd = etcd or shutil.which("etcd") or "/usr/bin/etcd"
        ports = ([base_port + k for k in range(2 * members)] if base_port
                 else free_ports(2 * members))
        self.client_ports = ports[0::2]
        self.peer_ports = ports[1::2]
        self.pids: list[int | None] = [None] * members
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * members

    # ---- addresses --------------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        """Client URLs of every member, in member order."""
        return [f"http://127.0.0.1:{p}" for p in self.client_ports]

    def name(self, i: int) -> str:
        return f"m{i}"

    def data_dir(self, i: int) -> Path:
        return self.dir / f"member{i}"

    # ---- life -------------------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> None:
        """Start every member and wait until each is healthy (it has a leader). ClusterError
        (with the end of the member's log) when one exits or is not ready in `timeout` s."""
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            for i in range(self.members):
                self._spawn(i)
            self._save()
            deadline = time.monotonic() + timeout
            for i in range(self.members):
                self._wait_ready(i, deadline)
        except BaseException:
            self.stop()
            raise

    def start_member(self, i: int, timeout: float = 20.0) -> None:
        """Start member i again (after `kill(i)`), on its old data, and wait until healthy."""
        if self.pids[i] is not None:
            raise ClusterError(f"etcd member {i} runs already (pid {self.pids[i]})")
        self._spawn(i)
        self._save()
        self._wait_ready(i, time.monotonic() + timeout)

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to member i (SIGKILL by default: it is gone at once and reaped). With
        SIGSTOP / SIGCONT the member stays recorded as running."""
        pid = self.pids[i]
        if pid is None:
            raise ClusterError(f"etcd member {i} is not running")
        os.kill(pid, sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self._reap(i, 10.0)
            self._save()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every member: SIGTERM, then SIGKILL when it is not gone after `timeout` s.
        One after the other: members stopped all at once leave the leader waiting for a
        leadership transfer to a stopping peer (6 s here); one at a time takes 0.1 s. Frozen
        (SIGSTOPped) members are thawed first, for the same reason."""
        for pid in self.pids:
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        for i, pid in enumerate(self.pids):
            if pid is None:
                continue
            if self.members > 1 and all(p is None for k, p in enumerate(self.pids) if k != i):
                # The last one left of several: as leader it would wait seconds for a transfer
                # to a peer it still believes alive; without quorum it steps down in one
                # election timeout, and a follower stops at once.
                self._wait_not_leader(i, 2.0)
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            if not self._reap(i, timeout):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self._reap(i, 10.0)
        self._save()

    # ---- from another process (the CLI) ----------------------------------------------------

    @classmethod
    def load(cls, dir: Path) -> EtcdCluster:
        """The cluster recorded in dir/pids.json; members whose recorded PID no longer runs
        etcd on their data dir count as stopped."""
        try:
            rec = json.loads((Path(dir) / PIDS).read_text())
        except (OSError, ValueError) as e:
            raise ClusterError(f"no etcd cluster recorded in {dir}: {e}") from None
        self = cls(Path(dir), len(rec["members"]), base_port=1)
        for i, m in enumerate(rec["members"]):
            self.client_ports[i], self.peer_ports[i] = m["client_port"], m["peer_port"]
            pid = m.get("pid")
            self.pids[i] = pid if pid and _is_our_etcd(pid, self.data_dir(i)) else None
        return self

    # ---- plumbing ---------------------------------------------------------------------------

    def _spawn(self, i: int) -> None:
        peers = ",".join(f"{self.name(k)}=http://127.0.0.1:{self.peer_ports[k]}"
                         for k in range(self.members))
        client = self.urls[i]
        peer = f"http://127.0.0.1:{self.peer_ports[i]}"
        argv = [self.etcd, "--name", self.name(i), "--data-dir", str(self.data_dir(i)),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", peers, "--initial-cluster-state", "new",
                "--initial-cluster-token", f"ovsfs-{self.client_ports[0]}",
                # Loopback: shorter heartbeats so a killed leader is replaced in about 1 s.
                "--heartbeat-interval", "50", "--election-timeout", "500",
                "--logger", "zap", "--log-level", "warn"]
        # ETCD_* variables would override the flags above.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        with open(self.dir / f"member{i}.log", "ab") as logf:
            # Own session: a terminal's ^C or the CLI's exit does not stop the members.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._procs[i], self.pids[i] = proc, proc.pid

    def _wait_ready(self, i: int, deadline: float) -> None:
        url = self.urls[i] + "/health"
        last = "no answer"
        with httpx.Client(timeout=1.0, trust_env=False) as client:
            while True:
                if not self._running(i):
                    raise ClusterError(f"etcd member {i} ({self.urls[i]}) exited at start: "
                                       f"{self._log_tail(i)}")
                try:
                    r = client.get(url)
                    if r.status_code == 200 and r.json().get("health") == "true":
                        return
                    last = f"HTTP {r.status_code} {r.text.strip()[:100]}"
                except (httpx.HTTPError, ValueError) as e:
                    last = str(e)
                if time.monotonic() > deadline:
                    raise ClusterError(f"etcd member {i} ({self.urls[i]}) not ready: {last}; "
                                       f"{self._log_tail(i)}")
                time.sleep(0.05)

    def _wait_not_leader(self, i: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=0.5, trust_env=False) as client:
            while time.monotonic() < deadline:
                try:
                    st = client.post(self.urls[i] + "/v3/maintenance/status", json={}).json()
                    if st.get("leader") != st.get("header", {}).get("member_id"):
                        return
                except (httpx.HTTPError, ValueError):
                    return
                time.sleep(0.05)

    def _running(self, i: int) -> bool:
        proc = self._procs[i]
        if proc is not None:
            return proc.poll() is None
        pid = self.pids[i]
        return pid is not None and _is_our_etcd(pid, self.data_dir(i))

    def _reap(self, i: int, timeout: float) -> bool:
        """Wait up to `timeout` s for member i to be gone; True (and forgotten) when it is."""
        proc = self._procs[i]
        deadline = time.monotonic() + timeout
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
        else:   # not our child (started by another process): poll its /proc entry
            while self._running(i):
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
        self._procs[i], self.pids[i] = None, None
        return True

    def _save(self) -> None:
        rec: dict[str, Any] = {
            "urls": self.urls,
            "members": [{"name": self.name(i), "client_port": self.client_ports[i],
                         "peer_port": self.peer_ports[i], "pid": self.pids[i]}
                        for i in range(self.members)]}
        tmp = self.dir / (PIDS + ".tmp")
        tmp.write_text(json.dumps(rec, indent=1) + "\n")
        tmp.replace(self.dir / PIDS)

    def _log_tail(self, i: int) -> str:
        try:
            lines = (self.dir / f"member{i}.log").read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        return "log: " + " | ".join(lines[-3:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="etcd_launch", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("start", help="start 1 or 3 members; prints their client URLs")
    st.add_argument("dir", type=Path)
    st.add_argument("members_pos", nargs="?", type=int, metavar="MEMBERS")
    st.add_argument("base_port_pos", nargs="?", type=int, metavar="BASEPORT")
    st.add_argument("--members", type=int, default=None)
    st.add_argument("--base-port", type=int, default=None)
    sp = sub.add_parser("stop", help="stop the members recorded in DIR, by PID")
    sp.add_argument("dir", type=Path)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "start":
            members = args.members or args.members_pos or 1
            base = args.base_port or args.base_port_pos
            if (Path(args.dir) / PIDS).exists():
                # Started before: the same members on the same ports, on their data.
                cluster = EtcdCluster.load(args.dir)
                if any(pid is not None for pid in cluster.pids):
                    raise ClusterError(f"the etcd cluster recorded in {args.dir} runs already "
                                       f"({' '.join(cluster.urls)}); stop it first")
            else:
                cluster = EtcdCluster(args.dir, members, base)
            cluster.start()
            print("etcd = [" + ", ".join(json.dumps(u) for u in cluster.urls) + "]")
        else:
            EtcdCluster.load(args.dir).stop()
    except ClusterError as e:
        print(f"etcd_launch: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
