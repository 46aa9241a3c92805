"""Shared fixtures: a real node daemon in a subprocess, and a guard against empty runs.

`daemon` starts `ovsfs run --state <tmp>/var` with a small test config; `daemon_factory`
does the same with config overrides (e.g. {"fuse": {"enabled": True}}) and can start
several; `asds=N` runs it as `ovsfs run --asds N` (erasure-coded backend over N local
ASD processes, which the daemon stops itself). Every daemon a test starts is stopped at
teardown, by PID.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from ovsfs.backend.node import free_ports  # noqa: F401 - tests import it from here
from ovsfs.cli.client import UnixConnection

REPO = Path(__file__).resolve().parents[1]


def _ovsfs_bin() -> str:
    here = Path(sys.executable).with_name("ovsfs")
    return str(here if here.exists() else REPO / ".venv" / "bin" / "ovsfs")


OVSFS = _ovsfs_bin()

# Small SCOs and write buffer so that tests cross SCO, TLog and upload boundaries quickly.
TEST_CONFIG: dict[str, Any] = {
    "node": {"name": "test"},
    "engine": {"sco_clusters": 256, "tlog_scos": 4, "write_buffer_size": 64 << 20,
               "map_cache_pages": 64, "checkpoint_seconds": 5.0},
    "nbd": {"enabled": True, "tcp_port": 0},
    "fuse": {"enabled": False},
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg: dict[str, Any]) -> str:
    lines = [f"{k} = {_toml_value(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    for section, values in cfg.items():
        if isinstance(values, dict):
            lines.append(f"\n[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"



class Daemon:
    """One `ovsfs run` process on its own state directory."""

    def __init__(self, base: Path, config: dict[str, Any], asds: int = 0) -> None:
        self.base = base
        self.asds = asds
        self.state = base / "var"
        self.run_dir = self.state / "run"
        self.mgmt_socket = self.run_dir / "ovsfs.sock"
        self.nbd_socket = self.run_dir / "nbd.sock"
        self.log_path = base / "daemon.log"
        self.config = config
        self.env: dict[str, str] = {}   # extra environment for the daemon (e.g. NOTIFY_SOCKET)
        self.proc: subprocess.Popen[bytes] | None = None
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / "ovsfs.toml").write_text(to_toml(config))

    @property
    def pid(self) -> int:
        assert self.proc is not None, "daemon was never started"
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def start(self, timeout: float = 60.0) -> "Daemon":
        assert not self.running(), f"daemon {self.pid} is already running"
        with open(self.log_path, "ab") as logf:
            # Own session: a ^C at the terminal goes to pytest, which stops the daemon by PID.
            extra = ["--asds", str(self.asds)] if self.asds else []
            self.proc = subprocess.Popen([OVSFS, "run", "--state", str(self.state), *extra], stdin=subprocess.DEVNULL,
                                         stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, **self.env})
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode} while starting:\n{self.log()}")
            try:
                status, st = self.api("GET", "/status", timeout=5)
                if status == 200 and "starting" not in st["doors"].values():
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"daemon did not answer /status within {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def api(self, method: str, path: str, body: Any = None, timeout: float = 120.0) -> tuple[int, Any]:
        """One request to the management API: (status, decoded JSON); NDJSON gives a list."""
        conn = UnixConnection(str(self.mgmt_socket), timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        if resp.getheader("Content-Type", "").startswith("application/x-ndjson"):
            return resp.status, [json.loads(line) for line in raw.splitlines() if line.strip()]
        return resp.status, json.loads(raw) if raw.strip() else None

    def cli(self, *args: str, check: bool = True, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([OVSFS, "--state", str(self.state), *args], capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise AssertionError(f"ovsfs {' '.join(args)} exited {r.returncode}: {r.stderr.strip()}")
        return r

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.running():
            os.kill(self.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(60)

    def stop(self, timeout: float = 120.0) -> int:
        """SIGTERM and wait; a clean stop must exit 0."""
        assert self.proc is not None
        if self.running():
            os.kill(self.pid, signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"daemon {self.pid} did not stop within {timeout} s after SIGTERM:\n{self.log()}")
        assert rc == 0, f"daemon exited {rc} after SIGTERM:\n{self.log()}"
        return rc

    def teardown(self) -> None:
        if not self.running():
            return
        os.kill(self.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            self.kill()


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """daemon_factory(config_overrides=None, start=True, asds=0) -> Daemon, on a fresh state dir."""
    made: list[Daemon] = []

    def make(config_overrides: dict[str, Any] | None = None, start: bool = True, asds: int = 0) -> Daemon:
        config = _merge(TEST_CONFIG, config_overrides or {})
        if asds:
            # What `ovsfs run --asds N` writes on a first start, on top of the small test config.
            config = _merge(config, {"backend": {"kind": "asd", "local_asds": asds,
                                                 "local_asd_ports": free_ports(asds)}})
        d = Daemon(tmp_path / f"node{len(made)}", config, asds)
        made.append(d)
        return d.start() if start else d

    yield make
    for d in made:
        d.teardown()


@pytest.fixture
def daemon(daemon_factory: Callable[..., Daemon]) -> Daemon:
    return daemon_factory()


# ---- the suite runs bottom-up ------------------------------------------------------------------

# tests/test_*.py (the layer check) first, then the cluster store, the engine, the DTL, the
# backend (its tests run the engine over the proxy too), the doors, the daemon, and whole
# clusters of daemons last: a failure shows up first in the lowest layer that has it. The directories keep their names (imports such as tests.engine.helpers
# stay); a stable sort keeps each file's own order and its module fixtures together.
LAYER_ORDER = ["", "client", "cluster", "engine", "dtl", "backend", "doors", "daemon", "guest", "nodes"]


def _layer_rank(item: Any) -> int:
    rel = Path(str(item.fspath)).resolve().relative_to(REPO / "tests")
    top = rel.parts[0] if len(rel.parts) > 1 else ""
    return LAYER_ORDER.index(top) if top in LAYER_ORDER else len(LAYER_ORDER)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[Any]) -> None:
    items.sort(key=_layer_rank)


# ---- a run that collects nothing is a failure --------------------------------------------------

@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    session.config.stash[_collected] = len(session.items)


_collected = pytest.StashKey[int]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # pytest already exits 5 on an empty collection; this also covers runs where a plugin
    # or option turned that into success.
    if session.config.stash.get(_collected, 0) == 0 and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED
