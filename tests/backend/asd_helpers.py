"""Real ASD processes for backend tests: started as subprocesses, stopped by PID."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class AsdCluster:
    def __init__(self, base: Path) -> None:
        self.base = Path(base)
        self.procs: dict[int, subprocess.Popen[str]] = {}
        self.addrs: dict[int, str] = {}
        self.nodes: dict[int, str] = {}

    def dir(self, i: int) -> Path:
        return self.base / f"asd{i}"

    def start(self, i: int, node: str | None = None) -> str:
        node = node or self.nodes.get(i) or f"node{i}"
        listen = self.addrs.get(i, "127.0.0.1:0")  # a restart keeps its port
        p = subprocess.Popen(
            [sys.executable, "-m", "ovsfs.backend.asd", "--path", str(self.dir(i)),
             "--listen", listen, "--node", node],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = p.stdout.readline() if p.stdout else ""
        m = re.search(r"listening on (\S+)", line)
        if not m:
            p.kill()
            raise RuntimeError(f"ASD {i} did not start: {line!r}")
        self.procs[i], self.addrs[i], self.nodes[i] = p, m.group(1), node
        return m.group(1)

    def start_many(self, n: int, nodes: list[str] | None = None) -> list[str]:
        return [self.start(self._next(), nodes[j] if nodes else None) for j in range(n)]

    def _next(self) -> int:
        return max(self.addrs, default=-1) + 1

    def kill(self, i: int) -> None:
        p = self.procs.pop(i, None)
        if p is not None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()

    def wipe(self, i: int) -> None:
        """Remove every file of a running ASD (a replaced, empty disk)."""
        for child in self.dir(i).iterdir():
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)

    def fragments(self, i: int) -> list[Path]:
        d = self.dir(i) / "f"
        return sorted(d.iterdir()) if d.is_dir() else []

    def corrupt(self, i: int, rnd: random.Random, count: int = 1000) -> int:
        """Flip a byte in the data of up to `count` fragment files of ASD i."""
        n = 0
        for f in self.fragments(i)[:count]:
            size = f.stat().st_size
            if size <= 64:
                continue
            with open(f, "r+b") as fh:
                pos = rnd.randrange(size - 64, size) if size > 128 else size - 1
                fh.seek(pos)
                b = fh.read(1)
                fh.seek(pos)
                fh.write(bytes([b[0] ^ 0xFF]))
            n += 1
        return n

    def stop_all(self) -> None:
        for i in list(self.procs):
            self.kill(i)


def make_proxy(cluster: AsdCluster, state: Path, **kw):  # type: ignore[no-untyped-def]
    from ovsfs.backend.policy import Policy, Preset
    from ovsfs.backend.proxy import ProxyStore

    preset = kw.pop("preset", None) or Preset(
        policies=[kw.pop("policy", Policy(4, 2, 6, 1))], max_fragment_size=kw.pop("mfs", 256 << 10),
        compression=kw.pop("compression", "none"), encryption=kw.pop("encryption", "none"))
    kw.setdefault("down_timeout", 3600.0)
    return ProxyStore(list(cluster.addrs.values()), preset, state_dir=state, **kw)
