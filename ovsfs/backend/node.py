"""The node's backend as the daemon runs it: the local directory, or the erasure-coded
proxy over ASDs, some of which the daemon may start and stop itself (`ovsfs run --asds N`).

The proxy keeps its state (ASD registry, presets, keys, manifest index, fragment
cache) under STATE/proxy; the daemon's own ASDs keep their disks under STATE/asd/i.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from ovsfs.backend.policy import Policy, Preset, PresetStore
from ovsfs.backend.store import Store
from ovsfs.config import Config
from ovsfs.errors import ConfigError

if TYPE_CHECKING:
    from ovsfs.backend.proxy import ProxyStore

log = logging.getLogger("ovsfs.daemon")

LOCAL_ONLY = "the local backend has no ASDs"


def default_policies(n: int) -> list[Policy]:
    """Policies for n ASDs, one storage node each (x = 1): the widest that fits first,
    then a narrower one that keeps writes going while an ASD is down."""
    if n >= 6:
        return [Policy(4, 2, 5, 1), Policy(2, 1, 2, 1)]
    if n == 5:
        return [Policy(3, 2, 4, 1), Policy(2, 1, 2, 1)]
    if n == 4:
        return [Policy(2, 2, 3, 1), Policy(2, 1, 2, 1)]
    if n == 3:
        return [Policy(2, 1, 2, 1), Policy(1, 1, 1, 1)]
    if n == 2:
        return [Policy(1, 1, 1, 1)]       # a mirror
    return [Policy(1, 0, 1, 1)]           # one ASD: no redundancy at all


def preset_note(n: int) -> str:
    pols = ", ".join(str(p) for p in default_policies(n))
    return f'preset "default" was made for {n} ASDs: policies (k,m,c,x) {pols}'


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct free TCP ports (all held open until all are picked, so no repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class NodeBackend:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.kind = cfg.backend.kind
        self.proxy_dir = cfg.path("proxy")
        self.procs: list[subprocess.Popen[str]] = []
        self.local_addrs: list[str] = []
        self.proxy: ProxyStore | None = None      # with kind = "asd", once open

    @property
    def presets(self) -> PresetStore:
        return PresetStore(self.proxy_dir / "presets.json")

    @property
    def removed_file(self) -> Path:
        return self.proxy_dir / "removed.json"

    # -- local ASD processes -------------------------------------------------------

    def spawn(self) -> None:
        """Start the daemon's own ASDs (blocking; before the event loop runs)."""
        b = self.cfg.backend
        if self.kind != "asd" or not b.local_asds:
            return
        from ovsfs.backend.launch import spawn_asds

        started = spawn_asds(self.cfg.path("asd"), b.local_asds, node=self.cfg.node.name,
                             ports=b.local_asd_ports)
        self.procs = [p for p, _ in started]
        self.local_addrs = [a for _, a in started]
        log.info("started %d ASDs: %s", len(started),
                 ", ".join(f"{a} (pid {p.pid})" for p, a in started))

    def stop(self) -> None:
        """Stop every ASD this daemon started, by PID."""
        if not self.procs:
            return
        from ovsfs.backend.launch import stop_asds

        stop_asds(self.procs)
        log.info("stopped %d ASDs (pids %s)", len(self.procs), ", ".join(str(p.pid) for p in self.procs))
        self.procs = []

    # -- the store -----------------------------------------------------------------

    def open(self) -> Store:
        """The store the engine runs on (blocking: call it from a worker thread)."""
        if self.kind == "local":
            from ovsfs.backend.local import LocalStore

            return LocalStore(self.cfg.path(self.cfg.backend.path))
        from ovsfs.backend.launch import open_proxy

        b = self.cfg.backend
        self._ensure_default_preset()
        try:
            self.presets.get(b.preset)
        except Exception:
            names = ", ".join(p.name for p in self.presets.list())
            raise ConfigError(f"backend.preset {b.preset!r} does not exist (presets: {names})") from None
        removed = set(self.removed())
        addrs = [a for a in [*self.local_addrs, *b.asds] if a not in removed]
        proxy = open_proxy(self.proxy_dir, addrs, b.preset, cache_bytes=b.fragment_cache_size,
                           down_timeout=b.down_timeout, gc_interval=b.gc_interval,
                           gc_grace=b.gc_grace)
        self.proxy = proxy
        return proxy

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
            self.proxy = None

    def _ensure_default_preset(self) -> None:
        """On first start, a default preset that fits the configured ASDs."""
        if self.cfg.backend.preset != "default" or (self.proxy_dir / "presets.json").exists():
            return
        n = self.cfg.backend.local_asds + len(self.cfg.backend.asds)
        preset = Preset(name="default", policies=default_policies(n))
        store = self.presets
        store.delete("default")  # the store's built-in default (no file yet) gives way to ours
        store.create(preset)
        log.info("first start: %s", preset_note(n))

    # -- ASDs removed for good -------------------------------------------------------

    def removed(self) -> list[str]:
        """Addresses drained away that the config still names: not attached again at start."""
        try:
            return list(json.loads(self.removed_file.read_text()))
        except (OSError, ValueError):
            return []

    def set_removed(self, addr: str, removed: bool) -> None:
        old = self.removed()
        names = [a for a in old if a != addr]
        if removed and addr in [*self.local_addrs, *self.cfg.backend.asds]:
            names.append(addr)
        if names == old:
            return
        self.proxy_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.removed_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(names))
        os.replace(tmp, self.removed_file)
