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
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from ovsfs.backend.policy import Policy, Preset, PresetStore
from ovsfs.backend.store import Store
from ovsfs.config import Config
from ovsfs.errors import ConfigError, OvsfsError

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


class LocalAsd:
    """One ASD process the daemon runs itself: its disk, fixed port, process or why not."""

    def __init__(self, index: int, path: Path, port: int) -> None:
        self.index = index
        self.path = path
        self.port = port
        self.addr = f"127.0.0.1:{port}"
        self.proc: subprocess.Popen[str] | None = None
        self.error = ""              # why the last start failed ("" while it runs)

    def status(self) -> dict[str, object]:
        running = self.proc is not None and self.proc.poll() is None
        return {"index": self.index, "addr": self.addr, "path": str(self.path),
                "pid": self.proc.pid if running and self.proc else None,
                "state": "running" if running else "not started", "error": self.error}


class NodeBackend:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.kind = cfg.backend.kind
        self.proxy_dir = cfg.path("proxy")
        self.local: list[LocalAsd] = []
        self.local_addrs: list[str] = []
        self.proxy: ProxyStore | None = None      # with kind = "asd", once open
        self._stopping = threading.Event()
        self._restarter: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def procs(self) -> list[subprocess.Popen[str]]:
        """The ASD processes this daemon started (and has not stopped yet)."""
        with self._lock:
            return [a.proc for a in self.local if a.proc is not None]

    @property
    def presets(self) -> PresetStore:
        return PresetStore(self.proxy_dir / "presets.json")

    @property
    def removed_file(self) -> Path:
        return self.proxy_dir / "removed.json"

    @property
    def pids_file(self) -> Path:
        # Not under STATE/asd: that directory holds the ASD disks only.
        return self.cfg.path(self.cfg.node.run_dir) / "asd-pids.json"

    # -- local ASD processes -------------------------------------------------------

    def spawn(self) -> None:
        """Start the daemon's own ASDs (blocking; before the event loop runs).

        An ASD that does not start (its port taken, its disk unreadable) does not stop the
        node: it is reported (local_status) and retried every backend.asd_restart_interval
        seconds; the proxy meanwhile knows it as a pending ASD and attaches it once it answers.
        """
        b = self.cfg.backend
        if self.kind != "asd" or not b.local_asds:
            return
        base = self.cfg.path("asd")
        self.local = [LocalAsd(i, base / str(i), b.local_asd_ports[i]) for i in range(b.local_asds)]
        self.local_addrs = [a.addr for a in self.local]
        self._reap_leftovers()
        for a in self.local:
            self._start_one(a)
        started = [a for a in self.local if a.proc is not None]
        log.info("started %d ASDs: %s", len(started),
                 ", ".join(f"{a.addr} (pid {a.proc.pid})" for a in started if a.proc))
        if len(started) < len(self.local):
            log.warning("%d of %d local ASDs did not start; the node runs degraded and retries "
                        "them every %.0f s", len(self.local) - len(started), len(self.local),
                        b.asd_restart_interval)
        # The thread that starts an ASD is its parent for PR_SET_PDEATHSIG (the death signal
        # goes out when that *thread* ends): this one lives until stop().
        self._restarter = threading.Thread(target=self._restart_loop, name="asd-restart", daemon=True)
        self._restarter.start()

    def _start_one(self, a: LocalAsd) -> None:
        from ovsfs.backend.launch import spawn_asd

        try:
            proc, _ = spawn_asd(a.path, "127.0.0.1", a.port, f"{self.cfg.node.name}-{a.index}")
        except (OvsfsError, OSError) as e:
            a.error = getattr(e, "message", None) or str(e)
            log.warning("local ASD %d (%s) did not start: %s", a.index, a.addr, a.error)
            return
        with self._lock:
            a.proc, a.error = proc, ""
        self._save_pids()

    def _restart_loop(self) -> None:
        while not self._stopping.wait(self.cfg.backend.asd_restart_interval):
            for a in self.local:
                if a.proc is None and not self._stopping.is_set():
                    self._start_one(a)
                    if a.proc is not None:
                        log.info("local ASD %d (%s) started late (pid %d)", a.index, a.addr, a.proc.pid)

    def _reap_leftovers(self) -> None:
        """ASDs of an earlier life of this daemon that outlived it (a stopped process does
        not act on its death signal) hold their ports: stop them by recorded PID."""
        from ovsfs.backend.launch import reap_leftover

        try:
            pids = json.loads(self.pids_file.read_text())
        except (OSError, ValueError):
            return
        for a in self.local:
            pid = pids.get(str(a.index)) if isinstance(pids, dict) else None
            if isinstance(pid, int) and pid != os.getpid() and reap_leftover(pid, a.path):
                log.warning("stopped leftover ASD %d (pid %d) of an earlier daemon", a.index, pid)

    def _save_pids(self) -> None:
        with self._lock:
            pids = {str(a.index): a.proc.pid for a in self.local if a.proc is not None}
        path = self.pids_file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(pids))
        os.replace(tmp, path)

    def local_status(self) -> list[dict[str, object]]:
        """Each local ASD process: address, disk, pid, running or not and why."""
        with self._lock:
            return [a.status() for a in self.local]

    def stop(self) -> None:
        """Stop every ASD this daemon started, by PID."""
        self._stopping.set()
        if self._restarter is not None:
            self._restarter.join(30)
        procs = self.procs
        if not procs:
            return
        from ovsfs.backend.launch import stop_asds

        stop_asds(procs)
        log.info("stopped %d ASDs (pids %s)", len(procs), ", ".join(str(p.pid) for p in procs))
        with self._lock:
            for a in self.local:
                a.proc = None

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

    def close(self, timeout: float | None = None) -> bool:
        """Close the store; with the proxy, I/O in flight is waited for `timeout` seconds
        at most. False when threads were left running (see ProxyStore.close)."""
        done = True
        if self.proxy is not None:
            done = self.proxy.close(timeout)
            self.proxy = None
        return done

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
