"""Glue for the node daemon and CLI: start local ASDs, open a proxy from the state dir.

`ovsfs run --asds N` calls spawn_asds(state/"asd", N) then open_proxy(state/"proxy",
addrs); the CLI's preset/backend commands use open_proxy on an existing state dir.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from ovsfs.backend.policy import PresetStore
from ovsfs.backend.proxy import ProxyStore
from ovsfs.errors import BackendError


def spawn_asds(base: Path, n: int, node: str = "node1", host: str = "127.0.0.1") -> list[tuple[subprocess.Popen[str], str]]:
    """Start n ASD processes on base/asd<i>; returns (process, "host:port") pairs.
    The caller stops them by PID (they are its children)."""
    out = []
    for i in range(n):
        d = Path(base) / f"asd{i}"
        port_file = d / "port"
        listen = f"{host}:{port_file.read_text().strip() if port_file.exists() else 0}"
        p = subprocess.Popen([sys.executable, "-m", "ovsfs.backend.asd", "--path", str(d),
                              "--listen", listen, "--node", f"{node}-{i}" if n > 1 else node],
                             stdout=subprocess.PIPE, text=True)
        m = re.search(r"listening on (\S+)", p.stdout.readline() if p.stdout else "")
        if not m:
            p.kill()
            raise BackendError(f"ASD {d} did not start")
        port_file.write_text(m.group(1).rpartition(":")[2])  # same port on the next start
        out.append((p, m.group(1)))
    return out


def open_proxy(state: Path, addrs: list[str] | None = None, preset: str = "default",
               **kw: object) -> ProxyStore:
    """A proxy keeping its ASD list, keys, manifest cache and fragment cache under state."""
    state = Path(state)
    p = PresetStore(state / "presets.json").get(preset)
    return ProxyStore(addrs or [], p, state_dir=state, **kw)  # type: ignore[arg-type]
